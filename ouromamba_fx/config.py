"""Quantization configs: one dataclass per scheme, validated on construction; presets are instances.

    >>> import ouromamba_fx as of
    >>> of.W8A8.act.bits, of.W8A8.act.granularity
    (8, 'per_token')
    >>> cfg = of.W8A8.replace(overrides={"layers.0.*": {"act_bits": 16}})   # keep layer 0's inputs 16-bit
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from enum import Enum

from ouromamba_fx.numerics import FLOAT_BITS, is_float
from ouromamba_fx.tags import DEFAULT_ROLES, ROLES, Role

SCAN_INPUTS = ("u", "delta", "B", "C", "z")
ACT_GRANULARITIES = ("per_tensor", "per_token")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel")
ACT_METHODS = ("minmax", "mse")
WEIGHT_METHODS = ("minmax", "lp_clip")


STATE_GRANULARITIES = ("step", "step_channel", "step_state")


def _check_bits(owner: str, bits: int) -> None:
    if not (2 <= bits <= 8 or bits >= FLOAT_BITS):
        raise ValueError(f"{owner}: bits must be in 2..8 (integer) or >= {FLOAT_BITS} (float), got {bits}")


def _check_choice(owner: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner} must be one of {allowed}, got {value!r}")


_OVERRIDE_KEYS = ("act_bits", "weight_bits", "act_granularity", "skip")


def _check_override(owner: str, spec) -> None:
    if not isinstance(spec, dict) or set(spec) - set(_OVERRIDE_KEYS):
        raise ValueError(f"QuantConfig.{owner}: expected a dict with keys from {list(_OVERRIDE_KEYS)}, got {spec!r}")
    if "act_bits" in spec:
        _check_bits(f"{owner}.act_bits", spec["act_bits"])
    if "weight_bits" in spec:
        _check_bits(f"{owner}.weight_bits", spec["weight_bits"])
    _check_choice(f"{owner}.act_granularity", spec.get("act_granularity", "per_token"), ACT_GRANULARITIES)


def _names(roles) -> tuple:
    """Role names as plain strings (a config holds plain data: ``to_dict`` and JSON give back
    what ``from_dict`` takes), whether given as :class:`Role` members or strings."""
    return tuple(r.value if isinstance(r, Enum) else r for r in roles)


@dataclass(frozen=True)
class ActQuant:
    """How activations are quantized.

    granularity: ``per_tensor`` (one static scale) or ``per_token`` (one static scale per token
        position, PTQ4VM-style; the sequence length is fixed at calibration).
    method: ``minmax`` (scale from the observed max |x|) or ``mse`` (clipping ratio searched to
        minimise the quantization error on a calibration sample).
    """

    bits: int = 8
    granularity: str = "per_token"
    symmetric: bool = True
    method: str = "mse"

    def __post_init__(self) -> None:
        _check_bits("ActQuant", self.bits)
        _check_choice("ActQuant.granularity", self.granularity, ACT_GRANULARITIES)
        _check_choice("ActQuant.method", self.method, ACT_METHODS)

    @property
    def is_float(self) -> bool:
        return is_float(self.bits)


@dataclass(frozen=True)
class WeightQuant:
    """How weights are quantized: per output channel with an Lp clipping search by default."""

    bits: int = 8
    granularity: str = "per_channel"
    symmetric: bool = True
    method: str = "lp_clip"
    p: float = 2.4  # the Lp norm of the clipping search (PTQ4VM, OuroMamba)
    candidates: int = 100  # clipping ratios tried, evenly spaced in [min_ratio, 1]
    min_ratio: float = 0.5

    def __post_init__(self) -> None:
        _check_bits("WeightQuant", self.bits)
        _check_choice("WeightQuant.granularity", self.granularity, WEIGHT_GRANULARITIES)
        _check_choice("WeightQuant.method", self.method, WEIGHT_METHODS)
        if self.p <= 0 or self.candidates < 1 or not 0 < self.min_ratio <= 1:
            raise ValueError("WeightQuant: p > 0, candidates >= 1 and 0 < min_ratio <= 1 are required")

    @property
    def is_float(self) -> bool:
        return is_float(self.bits)


@dataclass(frozen=True)
class OutlierQuant:
    """OuroMamba-Quant mixed precision: outlier channels found per time-step at run time.

    bits: outlier bits (8: W4A4O8); >= 16 keeps outliers in floating point (W4A8O16).
    k, k_delta: threshold ``mean + k * std`` of |x| over channels (``k_delta`` for the scan's delta).
    n_refresh: the outlier mask is reset every ``n_refresh`` time-steps.
    roles: roles whose input activations get the mixed-precision treatment (``scan`` = its
        quantized inputs delta/B/C).
    """

    bits: int = 8
    k: float = 3.0
    k_delta: float = 4.0
    n_refresh: int = 10
    roles: tuple[str, ...] = (Role.IN_PROJ, Role.X_PROJ, Role.DT_PROJ, Role.OUT_PROJ, Role.SCAN, Role.MLP, Role.ATTN,
                              Role.CONV2D, Role.STEM, Role.DOWNSAMPLE)

    def __post_init__(self) -> None:
        _check_bits("OutlierQuant", self.bits)
        if self.k <= 0 or self.k_delta <= 0 or self.n_refresh < 1:
            raise ValueError("OutlierQuant: k > 0, k_delta > 0 and n_refresh >= 1 are required")
        object.__setattr__(self, "roles", _names(self.roles))
        bad = sorted(set(self.roles) - set(ROLES))
        if bad:
            raise ValueError(f"OutlierQuant.roles: unknown {bad}; known: {', '.join(ROLES)}")


@dataclass(frozen=True)
class KScale:
    """k-scaled quantization: ``k`` static scales per activation tensor, shared by groups of token
    positions found by 1-D k-means on mean |x|; each group's scale is searched among
    ``candidates`` multiples in ``[lo, hi]`` of ``max|x_group| / (qmax - 0.5)`` for the best cosine
    similarity of the layer output. ``pow2`` snaps group scales to powers of two of the first."""

    k: int = 4
    candidates: int = 101
    lo: float = 0.01
    hi: float = 1.2
    pow2: bool = False
    search_rows: int = 256

    def __post_init__(self) -> None:
        if self.k < 1 or self.candidates < 2 or not 0 < self.lo < self.hi or self.search_rows < 16:
            raise ValueError("KScale: k >= 1, candidates >= 2, 0 < lo < hi and search_rows >= 16 are required")


@dataclass(frozen=True)
class Reparam:
    """Scan hidden-state quantization, with the reparameterization of k-scaled PTQ (MLSP 2025):
    rank-1 factors (r_C, r_L, r_N) from calibration; the d_state factor is folded into x_proj's B
    and C rows (when ``fold``), the rest are constants of the scan; the rescaled state is quantized
    at ``state_bits`` (>= 16: state kept in float) with max-calibrated static scales.

    ``factors=False`` quantizes the state as it is (all factors 1: the ablation without the
    reparameterization). ``granularity`` of the state scales: ``"step_channel"`` (default) one
    per time-step and d_inner channel, ``"step"`` one per time-step (the paper's), ``"step_state"``
    one per time-step and d_state index. The default is the one whose 8-bit state stays within
    0.3 point of the float state at W8A8 on the reference model; one scale per time-step loses
    several points there (the state ablation in benchmarks/accuracy.md).
    """

    state_bits: int = 8
    fold: bool = True
    factors: bool = True
    granularity: str = "step_channel"

    def __post_init__(self) -> None:
        _check_bits("Reparam.state_bits", self.state_bits)
        _check_choice("Reparam.granularity", self.granularity, STATE_GRANULARITIES)


@dataclass(frozen=True)
class Refine:
    """Block-wise refinement of the weight scales after the clipping search (the released
    OuroMamba code's last step). Mixer by mixer in graph order, the per-channel scales of its
    quantized weights become learnable (``scale = s0 * exp(t)``, rounding passed through by a
    straight-through estimator) and are optimised with Adam (cosine learning-rate decay) on
    ``1 - cosine(float mixer output, quantized mixer output)`` per token: the quantized mixer is
    fed what the quantized model's earlier (already refined) mixers give, the float target is the
    float model's own mixer output.
    Activation scales and the outlier rule are left as calibrated. A mixer keeps its new scales
    only if they lower its loss on the refinement images.

    iters: Adam steps per mixer. lr: Adam learning rate of ``t`` (a relative scale change).
    batch: images per step. samples: calibration images used (the first ones; at most this many).
    budget: seconds for the whole refinement (None: no limit); when spent, refinement stops and
        the mixers not yet refined keep their clipping-search scales (the report says how many
        were refined).
    """

    iters: int = 40
    lr: float = 5e-3
    batch: int = 16
    samples: int = 256
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch < 1 or self.samples < 1:
            raise ValueError(f"Refine: iters, batch and samples must be >= 1, got iters={self.iters}, "
                             f"batch={self.batch}, samples={self.samples}")
        if not self.lr > 0 or self.lr != self.lr:
            raise ValueError(f"Refine: lr must be > 0, got {self.lr}")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"Refine: budget must be >= 0 seconds or None (no limit), got {self.budget}")


@dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme for vision Mamba models.

    Args:
        name: shown in reports.
        weight, act: default weight and activation quantization.
        roles: which parts are quantized (their input activations and weights): the mixers'
            ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``out_proj``, ``scan``, and the other
            layers of VMamba / MambaVision: ``mlp``, ``attn`` (qkv and proj linears), ``conv2d``,
            ``stem``, ``downsample``, ``head`` (see :mod:`ouromamba_fx.tags`). Default: all but
            ``head``.
        scan_inputs: which inputs of the scan are quantized when ``"scan"`` is in ``roles``.
        role_overrides: per-role settings, by role name (``{"conv2d": {"act_bits": 8}}``), each
            a dict with the keys ``overrides`` takes but ``skip`` (a role is kept float by leaving
            it out of ``roles``); ``overrides`` patterns win over them.
        overrides: per-module settings by glob pattern on the module name (``"layers.7.*"``,
            ``"*.out_proj"``; scan nodes are named ``<mixer>.scan`` / ``<mixer>.scan_b``), each a
            dict with any of ``act_bits``, ``weight_bits``, ``act_granularity``, ``skip`` (True:
            leave in float). Later patterns win.
        seed: seeds everything random in conversion (sampling of calibration rows).
        calib_sample: rows per tensor kept by observers for the scale searches.
        outliers: OuroMamba-Quant dynamic outlier channels (None: off).
        kscale: k-scaled static activation scales (None: one scale per token position).
        reparam: scan hidden-state reparameterization and quantization (None: off).
        refine: block-wise refinement of the weight scales after the clipping search (None: off).
    """

    name: str = "custom"
    weight: WeightQuant = field(default_factory=WeightQuant)
    act: ActQuant = field(default_factory=ActQuant)
    roles: tuple[str, ...] = DEFAULT_ROLES
    scan_inputs: tuple[str, ...] = ("delta", "B", "C")
    role_overrides: dict[str, dict] = field(default_factory=dict)
    overrides: dict[str, dict] = field(default_factory=dict)
    seed: int = 0
    calib_sample: int = 1024
    outliers: OutlierQuant | None = None
    kscale: KScale | None = None
    reparam: Reparam | None = None
    refine: Refine | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", _names(self.roles))
        bad = sorted(set(self.roles) - set(ROLES))
        if bad:
            raise ValueError(f"QuantConfig.roles: unknown {bad}; known: {', '.join(ROLES)}")
        bad = sorted(set(self.scan_inputs) - set(SCAN_INPUTS))
        if bad:
            raise ValueError(f"QuantConfig.scan_inputs: unknown {bad}; known: {SCAN_INPUTS}")
        if not isinstance(self.role_overrides, dict):
            raise ValueError(f"QuantConfig.role_overrides: expected a dict of role name -> settings, "
                             f"got {type(self.role_overrides).__name__}")
        object.__setattr__(self, "role_overrides", dict(zip(_names(self.role_overrides),
                                                            self.role_overrides.values())))
        bad = sorted(set(self.role_overrides) - set(ROLES))
        if bad:
            raise ValueError(f"QuantConfig.role_overrides: unknown roles {bad}; known: {', '.join(ROLES)}")
        for role, spec in self.role_overrides.items():
            if isinstance(spec, dict) and "skip" in spec:
                raise ValueError(f"QuantConfig.role_overrides[{role!r}]: 'skip' is not a role setting; "
                                 f"leave {role!r} out of QuantConfig.roles to keep that role float")
            _check_override(f"role_overrides[{role!r}]", spec)
        for pattern, spec in self.overrides.items():
            _check_override(f"overrides[{pattern!r}]", spec)
        if (self.outliers or self.kscale) and not self.act.symmetric:
            raise ValueError("QuantConfig: outliers and kscale need symmetric activations (act.symmetric=True)")
        if self.calib_sample < 16:
            raise ValueError("QuantConfig.calib_sample must be >= 16")
        if self.refine is not None and self.reparam is not None:
            raise ValueError("QuantConfig: refine and reparam cannot be combined yet (the reparameterized "
                             "scan has no backward for the refinement); set one of them to None")

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def for_module(self, name: str, role: str | None = None) -> tuple[ActQuant, WeightQuant, bool]:
        """(activation spec, weight spec, skipped) for the module or scan named ``name`` whose
        role is ``role``: the defaults, then ``role_overrides[role]``, then the ``overrides``
        patterns that match ``name`` in order."""
        act, weight, skip = self.act, self.weight, False
        specs = [self.role_overrides[role]] if role in self.role_overrides else []
        specs += [spec for pattern, spec in self.overrides.items() if fnmatch.fnmatchcase(name, pattern)]
        for spec in specs:
            if "act_bits" in spec:
                act = dataclasses.replace(act, bits=spec["act_bits"])
            if "act_granularity" in spec:
                act = dataclasses.replace(act, granularity=spec["act_granularity"])
            if "weight_bits" in spec:
                weight = dataclasses.replace(weight, bits=spec["weight_bits"])
            skip = bool(spec.get("skip", skip))
        return act, weight, skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Inverse of :meth:`to_dict`: every field type-checked, then validated like any config;
        unknown keys are an error (``ValueError``)."""
        from ouromamba_fx.plaindata import from_plain

        return from_plain(cls, d, "QuantConfig")


# Presets. The baselines reproduce what the literature compares against.
W8A8 = QuantConfig("W8A8", WeightQuant(8), ActQuant(8))
# W8A8 plus OuroMamba-Quant outlier channels at 8 bits (inliers keep their static per-step 8-bit
# scales; the run-time outlier channels get a dynamic 8-bit scale per token): the most accurate
# 8-bit scheme on the reference model (benchmarks/accuracy.md), at the cost of a second int8 GEMM
# over the outlier columns.
W8A8O8 = QuantConfig("W8A8O8", WeightQuant(8), ActQuant(8), outliers=OutlierQuant(8))
W6A6 = QuantConfig("W6A6", WeightQuant(6), ActQuant(6))
# OuroMamba-Quant: outlier channels found per time-step at run time; kept 16-bit at W4A8 (the
# paper's W4A8O16), 8-bit at W4A4O8. k-scales and the state reparameterization are switches
# (``.replace(kscale=KScale(), reparam=Reparam())``): on the reference model they did not add
# accuracy on top of outliers with per-token scales (benchmarks/accuracy.md).
# W4A4O8 keeps the convolution layers of VMamba / MambaVision (stem, downsampling, conv stages;
# Vim and Mamba stacks have none) at 8-bit activations without outlier channels, as 4-bit
# networks usually keep their first layers: on MambaVision the 4-bit activations of its conv
# stages were most of W4A4O8's loss (benchmarks/accuracy_families.md); 8-bit codes also run
# the integer Conv2d of the lowering.
CONV_ROLES = (Role.CONV2D, Role.STEM, Role.DOWNSAMPLE)
W4A8 = QuantConfig("W4A8", WeightQuant(4), ActQuant(8), outliers=OutlierQuant(16))
W4A4O8 = QuantConfig("W4A4O8", WeightQuant(4), ActQuant(4),
                     outliers=OutlierQuant(8, roles=tuple(r for r in OutlierQuant.roles if r not in CONV_ROLES)),
                     role_overrides={r: {"act_bits": 8} for r in CONV_ROLES})
# The baselines quantize the linear and convolution layers (the mixers' projections and, in
# VMamba / MambaVision, the MLP, attention, stem, downsampling and conv-stage layers), not the
# mixers' conv1d nor the scan.
_BASELINE_ROLES = (Role.IN_PROJ, Role.X_PROJ, Role.DT_PROJ, Role.OUT_PROJ, Role.MLP, Role.ATTN, Role.CONV2D, Role.STEM,
                   Role.DOWNSAMPLE)
# Round-to-nearest baseline: per-tensor min-max activations, linear inputs only, scan in float.
W8A8_RTN = QuantConfig("W8A8-RTN", WeightQuant(8, method="minmax"), ActQuant(8, "per_tensor", method="minmax"),
                       roles=_BASELINE_ROLES)
# PTQ4VM-style: per-token static min-max activations, Lp-clipped weights, scan in float.
W8A8_PER_TOKEN = QuantConfig("W8A8-per-token", WeightQuant(8), ActQuant(8, "per_token", method="minmax"),
                             roles=_BASELINE_ROLES)

PRESETS = {c.name: c for c in (W8A8, W8A8O8, W6A6, W4A8, W4A4O8, W8A8_RTN, W8A8_PER_TOKEN)}


def preset(name: str) -> QuantConfig:
    """The preset called ``name`` (``"W8A8"``, ``"W4A4O8"``, ...)."""
    from ouromamba_fx.errors import UnknownNameError

    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
