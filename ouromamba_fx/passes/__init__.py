"""Graph passes, one idea per file, run by :class:`ouromamba_fx.passes.base.PassManager`.

:class:`AnnotateSites` decides (one :class:`~ouromamba_fx.passes.spec.SiteSpec` per mixer op);
the passes after it carry the decisions out; :func:`default_passes` is the usual order."""

from ouromamba_fx.passes.act_scales import ChooseActScales
from ouromamba_fx.passes.annotate import AnnotateSites
from ouromamba_fx.passes.base import Context, Pass, PassError, PassManager, Snapshot
from ouromamba_fx.passes.calibrate import Calibrate
from ouromamba_fx.passes.observers import ActObserver, InsertObservers
from ouromamba_fx.passes.pipeline import default_passes
from ouromamba_fx.passes.qdq import QuantizeActivations
from ouromamba_fx.passes.spec import ActSpec, KeptFloat, OutlierSpec, SiteSpec, StateSpec, WeightSpec
from ouromamba_fx.passes.weights import QuantizeWeights

__all__ = ["ActObserver", "ActSpec", "AnnotateSites", "Calibrate", "ChooseActScales", "Context",
           "InsertObservers", "KeptFloat", "OutlierSpec", "Pass", "PassError", "PassManager",
           "QuantizeActivations", "QuantizeWeights", "SiteSpec", "Snapshot", "StateSpec", "WeightSpec",
           "default_passes"]
