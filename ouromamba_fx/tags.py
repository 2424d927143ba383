"""What graph nodes carry in ``node.meta``: the role tag :func:`ouromamba_fx.capture.capture` writes
and the passes extend.

``node.meta[META]`` is a dict: ``role`` (a :class:`Role`), ``direction`` (Vim's ``"fwd"`` /
``"bwd"``, one of VMamba's four cross-scan directions ``"hw"``, ``"wh"``, ``"hw_rev"``, ``"wh_rev"``,
MambaVision's ``"x"`` / ``"z"`` conv branches, or None), ``layer`` (mixer index, None outside the
mixers) and ``module`` (the mixer's, or for the other layers the owning block's, qualified name);
nodes the passes insert add a ``kind`` (a :class:`Kind`) and what describes them.

Roles beyond the mixers (issue: every layer of VMamba / MambaVision): ``mlp`` (MLP fc1/fc2),
``attn`` (attention qkv/proj; the attention matmuls themselves stay float), ``conv2d`` (Conv2d
inside the blocks: MambaVision's conv stages, VMamba's depthwise conv), ``stem`` (patch-embedding
convs), ``downsample`` (strided convs / patch-merging linears between stages) and ``head``
(the classifier; not in the default roles).
``node.meta[SPEC]`` holds what the config decided for an op (written by the annotate pass).

No torch import at run time (annotations only), so :mod:`ouromamba_fx.config` can use the role
names without loading anything.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch.fx as fx

META = "ouromamba"
SPEC = "ouromamba_spec"  # the SiteSpec of a mixer op node (ouromamba_fx.passes.spec), from AnnotateSites
SPEC_NODE = "ouromamba_spec_node"  # on a fused node: the reference-graph node its spec was on
# on a fused node that absorbed another site (a scan computing its dt_proj): that site's
# (spec, tag, reference-graph node name) entries, so the report keeps its row
ABSORBED = "ouromamba_absorbed_sites"


class _Name(StrEnum):
    """A ``str`` enum that also reads as its string (``repr`` included): members equal their values,
    so configs, saved files, JSON and printed configs keep using ``"in_proj"`` etc."""

    def __repr__(self) -> str:
        return repr(self.value)


class Role(_Name):
    """What a captured op does in the model (``tag(node)["role"]``)."""

    IN_PROJ = "in_proj"
    CONV1D = "conv1d"
    X_PROJ = "x_proj"
    DT_PROJ = "dt_proj"
    SCAN = "scan"
    OUT_PROJ = "out_proj"
    CONV2D = "conv2d"
    MLP = "mlp"
    ATTN = "attn"
    STEM = "stem"
    DOWNSAMPLE = "downsample"
    HEAD = "head"


class Kind(_Name):
    """What a node a pass inserted is (``tag(node)["kind"]``); the captured ops themselves have none."""

    OBSERVER = "observer"                  # records an activation's range during calibration
    ACT_QPARAM = "act_qparam"              # a calibrated activation scale (get_attr)
    QUANTIZE = "quantize"                  # static quantization of an activation
    QUANTIZE_MIXED = "quantize_mixed"      # inlier/outlier quantization with the run-time outlier rule
    DEQUANTIZE = "dequantize"
    WEIGHT = "weight"                      # a quantized weight and its dequantization
    SCAN_CONST = "scan_const"              # a reparameterized scan's folded constants
    FUSED = "fused"                        # a lowering rule's fused op (carries ``op``)
    OUTLIER_MASK = "outlier_mask"          # the run-time outlier rule as its own op
    FAKE_QUANT = "fake_quant"              # quantize + dequantize fused into one op
    FAKE_QUANT_MIXED = "fake_quant_mixed"
    WEIGHT_FOLDED = "weight_folded"        # a weight dequantized once at lowering


MIXER_ROLES = (Role.IN_PROJ, Role.CONV1D, Role.X_PROJ, Role.DT_PROJ, Role.SCAN, Role.OUT_PROJ)
ROLES = MIXER_ROLES + (Role.CONV2D, Role.MLP, Role.ATTN, Role.STEM, Role.DOWNSAMPLE, Role.HEAD)
#: What a config quantizes unless told otherwise: everything but the classifier head.
DEFAULT_ROLES = tuple(r for r in ROLES if r != Role.HEAD)
#: Roles whose op is a linear layer (input: channels last, tokens on the axis before).
LINEAR_ROLES = (Role.IN_PROJ, Role.X_PROJ, Role.DT_PROJ, Role.OUT_PROJ, Role.MLP, Role.ATTN, Role.HEAD)
#: Roles whose op may be a linear or a convolution (stem, downsample): decided by the module.
WEIGHT_ROLES = (Role.IN_PROJ, Role.X_PROJ, Role.DT_PROJ, Role.OUT_PROJ, Role.CONV1D, Role.CONV2D, Role.MLP,
                Role.ATTN, Role.STEM, Role.DOWNSAMPLE, Role.HEAD)


def tag(node: "fx.Node") -> dict | None:
    """The ouromamba tag of a node (role, direction, layer, module, ...), or None."""
    return node.meta.get(META)


def scan_site(t: dict) -> str:
    """The site name of a tagged scan: ``<mixer>.scan`` (one direction, or Vim's forward one),
    ``<mixer>.scan_b`` for Vim's backward one, ``<mixer>.scan_<direction>`` for VMamba's four."""
    d = t["direction"]
    return f"{t['module']}.scan" + ("" if d in (None, "fwd") else "_b" if d == "bwd" else f"_{d}")


def site_key(site: str, input_name: str) -> str:
    """The name of one quantized activation: the site, or ``<site>:<input>`` for a scan input."""
    return site if input_name == "x" else f"{site}:{input_name}"


def op_nodes(gm: "fx.GraphModule") -> list["fx.Node"]:
    """The mixer operations of a graph (linear, conv, scan), not the nodes passes added around them."""
    return [n for n in gm.graph.nodes if tag(n) is not None and not tag(n).get("kind")]


def keep_tag(src: "fx.Node", dst: "fx.Node", **extra) -> None:
    """Give ``dst`` a copy of ``src``'s tag with ``extra`` keys (nothing if both are empty), and
    ``src``'s site spec (:func:`carry_spec`)."""
    t = dict(src.meta.get(META) or {})
    if t or extra:
        dst.meta[META] = {**t, **extra}
    carry_spec(src, dst)


def carry_spec(src: "fx.Node", dst: "fx.Node") -> None:
    """For a lowering rule that fuses ``src`` into ``dst``: the site spec, and the name of the
    reference-graph node it belongs to (what the SQNR table is keyed by), so the lowered model's
    report still has a row for the site."""
    if SPEC in src.meta:
        dst.meta[SPEC] = src.meta[SPEC]
        dst.meta[SPEC_NODE] = src.meta.get(SPEC_NODE, src.name)


def absorb_site(src: "fx.Node", dst: "fx.Node") -> None:
    """For a lowering rule that computes the site ``src`` inside the fused node ``dst``, which
    carries a site spec of its own: ``src``'s spec, tag and reference node (and those it absorbed)
    are kept on ``dst`` under :data:`ABSORBED` for the report."""
    entries = list(dst.meta.get(ABSORBED, ())) + list(src.meta.get(ABSORBED, ()))
    if SPEC in src.meta:
        entries.append((src.meta[SPEC], dict(src.meta.get(META) or {}), src.meta.get(SPEC_NODE, src.name)))
    if entries:
        dst.meta[ABSORBED] = entries


def carry(src: "fx.Node", dst: "fx.Node", **extra) -> None:
    """For a pass that replaces ``src`` by ``dst``: the tag (with ``extra`` keys) and the site spec
    move along, so that later passes and the report still find the decisions."""
    dst.meta[META] = {**(src.meta.get(META) or {}), **extra}
    if SPEC in src.meta:
        dst.meta[SPEC] = src.meta[SPEC]
