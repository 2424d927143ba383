"""Graph passes, one idea per file, run by :class:`ouromamba_fx.passes.base.PassManager`."""

from ouromamba_fx.passes.act_scales import ChooseActScales
from ouromamba_fx.passes.base import Context, Pass, PassError, PassManager, Snapshot
from ouromamba_fx.passes.calibrate import Calibrate
from ouromamba_fx.passes.observers import ActObserver, InsertObservers
from ouromamba_fx.passes.qdq import QuantizeActivations
from ouromamba_fx.passes.weights import QuantizeWeights

__all__ = ["ActObserver", "Calibrate", "ChooseActScales", "Context", "InsertObservers", "Pass",
           "PassError", "PassManager", "QuantizeActivations", "QuantizeWeights", "Snapshot"]
