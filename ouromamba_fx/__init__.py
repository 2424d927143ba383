"""ouromamba-fx: data-free post-training quantization of vision Mamba models.

    >>> import ouromamba_fx as of
    >>> model = of.models.reference_model()
    >>> gm = of.capture(model)          # torch.fx graph, one node per selective scan
"""

from ouromamba_fx import models  # noqa: F401  (registers the Vim variants in timm)
from ouromamba_fx.capture import capture
from ouromamba_fx.config import (PRESETS, W4A4O8, W4A8, W6A6, W8A8, W8A8_PER_TOKEN, W8A8_RTN, W8A8O8,
                                 ActQuant,
                                 KScale, OutlierQuant, QuantConfig, Refine, Reparam, WeightQuant)
from ouromamba_fx.convert import convert
from ouromamba_fx.cpu_malloc import tune_malloc
from ouromamba_fx.errors import (CaptureError, CheckpointError, DataError, InferenceOnlyError, InputError,
                                 OuroMambaError)
from ouromamba_fx.evaluate import EvalResult, evaluate
from ouromamba_fx.gen import SyntheticCalib, gen  # noqa: E402  (the function shadows the module name)
from ouromamba_fx.quantized import QuantizedModel
from ouromamba_fx.serialize import load, save
from ouromamba_fx.lowering.backend import register as _register_backend
from ouromamba_fx.version import __version__

_register_backend()  # torch.compile(q, backend="ouromamba")


__all__ = ["PRESETS", "W4A4O8", "W4A8", "W6A6", "W8A8", "W8A8_PER_TOKEN", "W8A8_RTN", "W8A8O8", "ActQuant",
           "KScale", "OutlierQuant", "QuantConfig", "QuantizedModel", "Refine", "Reparam", "WeightQuant", "convert", "CaptureError", "CheckpointError", "DataError", "EvalResult", "InferenceOnlyError", "InputError",
           "OuroMambaError",
           "SyntheticCalib", "capture", "evaluate", "gen", "load", "models", "save", "tune_malloc", "__version__"]
