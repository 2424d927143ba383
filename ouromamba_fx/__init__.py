"""ouromamba-fx: data-free post-training quantization of vision Mamba models.

    >>> import ouromamba_fx as of
    >>> model = of.models.reference_model()
    >>> gm = of.capture(model)          # torch.fx graph, one node per selective scan
"""

from ouromamba_fx import models  # noqa: F401  (registers the Vim variants in timm)
from ouromamba_fx.capture import capture
from ouromamba_fx.errors import CaptureError, CheckpointError, DataError, OuroMambaError
from ouromamba_fx.evaluate import EvalResult, evaluate

__version__ = "0.1.0"

__all__ = ["CaptureError", "CheckpointError", "DataError", "EvalResult", "OuroMambaError",
           "capture", "evaluate", "models", "__version__"]
