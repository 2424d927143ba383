"""What graph nodes carry in ``node.meta``: the role tag :func:`ouromamba_fx.capture.capture` writes
and the passes extend.

``node.meta[META]`` is a dict: ``role`` (one of :data:`ROLES`), ``direction`` (Vim's ``"fwd"`` /
``"bwd"``, one of VMamba's four cross-scan directions ``"hw"``, ``"wh"``, ``"hw_rev"``, ``"wh_rev"``,
MambaVision's ``"x"`` / ``"z"`` conv branches, or None), ``layer`` (mixer index, None outside the
mixers) and ``module`` (the mixer's, or for the other layers the owning block's, qualified name);
nodes the passes insert add a ``kind`` (observer, quantize, weight, ...) and what describes them.

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

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch.fx as fx

META = "ouromamba"
SPEC = "ouromamba_spec"  # the SiteSpec of a mixer op node (ouromamba_fx.passes.spec), from AnnotateSites
SPEC_NODE = "ouromamba_spec_node"  # on a fused node: the reference-graph node its spec was on
MIXER_ROLES = ("in_proj", "conv1d", "x_proj", "dt_proj", "scan", "out_proj")
ROLES = MIXER_ROLES + ("conv2d", "mlp", "attn", "stem", "downsample", "head")
#: What a config quantizes unless told otherwise: everything but the classifier head.
DEFAULT_ROLES = tuple(r for r in ROLES if r != "head")
#: Roles whose op is a linear layer (input: channels last, tokens on the axis before).
LINEAR_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj", "mlp", "attn", "head")
#: Roles whose op may be a linear or a convolution (stem, downsample): decided by the module.
WEIGHT_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d", "conv2d", "mlp", "attn", "stem",
                "downsample", "head")


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


def carry(src: "fx.Node", dst: "fx.Node", **extra) -> None:
    """For a pass that replaces ``src`` by ``dst``: the tag (with ``extra`` keys) and the site spec
    move along, so that later passes and the report still find the decisions."""
    dst.meta[META] = {**(src.meta.get(META) or {}), **extra}
    if SPEC in src.meta:
        dst.meta[SPEC] = src.meta[SPEC]
