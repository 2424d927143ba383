"""What graph nodes carry in ``node.meta``: the role tag :func:`ouromamba_fx.capture.capture` writes
and the passes extend.

``node.meta[META]`` is a dict: ``role`` (one of :data:`ROLES`), ``direction`` (``"fwd"``, ``"bwd"``
or None), ``layer`` (mixer index) and ``module`` (the mixer's qualified name); nodes the passes
insert add a ``kind`` (observer, quantize, weight, ...) and what describes them.

No torch import at run time (annotations only), so :mod:`ouromamba_fx.config` can use the role
names without loading anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch.fx as fx

META = "ouromamba"
ROLES = ("in_proj", "conv1d", "x_proj", "dt_proj", "scan", "out_proj")
LINEAR_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj")
WEIGHT_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d")


def tag(node: "fx.Node") -> dict | None:
    """The ouromamba tag of a node (role, direction, layer, module, ...), or None."""
    return node.meta.get(META)


def scan_site(t: dict) -> str:
    """The site name of a tagged scan: ``<mixer>.scan``, ``<mixer>.scan_b`` for the backward one."""
    return f"{t['module']}.scan" + ("_b" if t["direction"] == "bwd" else "")


def site_key(site: str, input_name: str) -> str:
    """The name of one quantized activation: the site, or ``<site>:<input>`` for a scan input."""
    return site if input_name == "x" else f"{site}:{input_name}"


def op_nodes(gm: "fx.GraphModule") -> list["fx.Node"]:
    """The mixer operations of a graph (linear, conv, scan), not the nodes passes added around them."""
    return [n for n in gm.graph.nodes if tag(n) is not None and not tag(n).get("kind")]


def keep_tag(src: "fx.Node", dst: "fx.Node", **extra) -> None:
    """Give ``dst`` a copy of ``src``'s tag with ``extra`` keys (nothing if both are empty)."""
    t = dict(src.meta.get(META) or {})
    if t or extra:
        dst.meta[META] = {**t, **extra}
