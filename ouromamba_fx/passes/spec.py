"""What the config decides for one site, written once by :class:`~ouromamba_fx.passes.annotate.AnnotateSites`.

Every mixer op node (linear, conv1d, scan) gets a :class:`SiteSpec` in ``node.meta[tags.SPEC]``:
how its weight is quantized, each activation input, and the scan's hidden state, or why each of
them stays float. The passes that insert observers, quantize weights, choose scales or
reparameterize scans only read these specs; the report reads them too. Deciding in one place
means a new model family adds its roles and sites here once instead of in every pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ouromamba_fx.config import ActQuant, KScale, Reparam, WeightQuant
from ouromamba_fx.numerics import is_float
from ouromamba_fx.tags import site_key


class FloatReason(str, Enum):
    """Why something stays float. The texts are user-visible (report, saved files): keep them."""

    ROLE = "role {role} not in config.roles"
    SCAN_INPUT = "scan input {input} not in config.scan_inputs"
    OVERRIDE = "skipped by config.overrides"
    ACT_BITS = "activation bits {bits} (float) by config"
    WEIGHT_BITS = "weight bits {bits} (float) by config"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class KeptFloat:
    """One thing left in float: its ``float_reasons`` key and the reason."""

    key: str  # site key, module name, or "<scan site>:state"
    reason: FloatReason
    detail: tuple[tuple[str, object], ...] = ()

    @property
    def text(self) -> str:
        return self.reason.value.format(**dict(self.detail))


@dataclass(frozen=True)
class OutlierSpec:
    """The OuroMamba outlier rule at one site."""

    bits: int  # outlier bits, or >= FLOAT_BITS: outliers kept in float
    k: float  # threshold mean + k * std of |x| over channels (k_delta for the scan's delta)
    n_refresh: int  # the mask is recomputed every n_refresh time-steps


@dataclass(frozen=True)
class ActSpec:
    """One quantized activation: an input of a mixer op."""

    site: str  # "layers.3.mixer.in_proj", "layers.3.mixer.scan_b"
    input: str  # "x", or the scan input name
    arg_index: int  # argument of the consumer node
    token_axis: int
    channel_axis: int
    quant: ActQuant  # after overrides
    kscale: KScale | None
    outliers: OutlierSpec | None
    calib_sample: int  # rows kept for the clipping / k-scale searches
    seed: int  # of the observer's sampler: config.seed + index among quantized sites, graph order
    feeds_linear: bool  # the k-scale search scores the consuming linear's output

    @property
    def key(self) -> str:
        return site_key(self.site, self.input)

    @property
    def search(self) -> str:
        """How :class:`~ouromamba_fx.passes.act_scales.ChooseActScales` picks the scales."""
        if self.kscale is not None:
            return "kscale"
        return "mixed" if self.outliers is not None else "affine"

    def granularity_text(self) -> str:
        """What the scales are: ``per_token``, ``k4-scaled+outliers``, ... (report, qdq tags)."""
        text = {"kscale": f"k{self.kscale.k}-scaled" if self.kscale else "",
                "mixed": "per_token", "affine": self.quant.granularity}[self.search]
        return text + ("+outliers" if self.outliers is not None else "")

    def bits_text(self) -> str:
        """``8``, or ``4O8`` / ``4O16`` with outlier channels."""
        if self.outliers is None:
            return str(self.quant.bits)
        return f"{self.quant.bits}O{16 if is_float(self.outliers.bits) else self.outliers.bits}"


@dataclass(frozen=True)
class WeightSpec:
    module: str
    quant: WeightQuant  # after overrides


@dataclass(frozen=True)
class StateSpec:
    """The scan hidden state, when the config reparameterizes scans."""

    site: str
    reparam: Reparam


@dataclass(frozen=True)
class SiteSpec:
    """``node.meta[tags.SPEC]`` of a mixer op node."""

    name: str  # the op's site: module name, or "<mixer>.scan" / ".scan_b"
    role: str
    weight: WeightSpec | KeptFloat | None  # None: the op has no weight (scan)
    inputs: tuple[ActSpec | KeptFloat, ...]  # argument order
    state: StateSpec | KeptFloat | None  # scans with config.reparam only

    def acts(self) -> list[ActSpec]:
        return [a for a in self.inputs if isinstance(a, ActSpec)]

    def float_reasons(self) -> list[KeptFloat]:
        return [x for x in (self.state, *self.inputs, self.weight) if isinstance(x, KeptFloat)]
