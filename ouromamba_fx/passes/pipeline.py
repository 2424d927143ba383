"""The default pass pipeline of :func:`ouromamba_fx.convert`."""

from __future__ import annotations

from ouromamba_fx.config import QuantConfig
from ouromamba_fx.passes.act_scales import ChooseActScales
from ouromamba_fx.passes.annotate import AnnotateSites
from ouromamba_fx.passes.base import Pass
from ouromamba_fx.passes.calibrate import Calibrate
from ouromamba_fx.passes.observers import InsertObservers
from ouromamba_fx.passes.qdq import QuantizeActivations
from ouromamba_fx.passes.refine import RefineWeights
from ouromamba_fx.passes.reparam import ObserveScanStates, ReparameterizeScan
from ouromamba_fx.passes.weights import QuantizeWeights


def default_passes(config: QuantConfig, input_shape: tuple[int, ...] | None = None) -> list[Pass]:
    """The pipeline for ``config``: decide every site first (annotate), then carry it out.
    Weights are quantized before calibration so that activation statistics see the quantized
    weights upstream. With ``config.refine`` the weight scales are then refined mixer by mixer
    on the finished reference graph (activation scales unchanged)."""
    passes: list[Pass] = [AnnotateSites()]
    if config.reparam is not None:
        passes += [ObserveScanStates(),
                   Calibrate(input_shape, "calibrate_states", ("state_observers",), ("states_calibrated",)),
                   ReparameterizeScan()]
    passes += [InsertObservers(), QuantizeWeights(), Calibrate(input_shape), ChooseActScales(),
               QuantizeActivations()]
    return passes + ([RefineWeights()] if config.refine is not None else [])
