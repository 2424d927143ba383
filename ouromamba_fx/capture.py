"""Capture: trace a vision Mamba to a torch.fx GraphModule whose nodes know their role.

Every selective scan is one ``call_function`` node of ``torch.ops.ouromamba.selective_scan``; the
linear and conv layers of each mixer stay ``call_module`` nodes; and each of those nodes carries
``node.meta["ouromamba"] = {"role", "direction", "layer", "module"}``:

* ``role``: ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``scan`` or ``out_proj``;
* ``direction``: ``"fwd"``, ``"bwd"`` (Vim's flipped-sequence branch) or ``None`` (shared);
* ``layer``: index of the mixer in module order (0-based);
* ``module``: qualified name of the mixer.

The graph shares parameters with the model it was traced from (like ``torch.fx.symbolic_trace``);
:func:`ouromamba_fx.convert` copies the model before changing anything.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from timm.layers import PatchEmbed, RmsNorm

from ouromamba_fx.errors import CaptureError
from ouromamba_fx.models.mixer import DIRECTIONS, MambaMixer
from ouromamba_fx.ops.scan import SCAN_OP
from ouromamba_fx.tags import META, tag
# Child name inside a MambaMixer -> (role, direction).
_CHILD_ROLES = {"in_proj": ("in_proj", None), "out_proj": ("out_proj", None)}
for _direction, (_conv, _xp, _dtp, _a, _d) in DIRECTIONS.items():
    _CHILD_ROLES.update({_conv: ("conv1d", _direction), _xp: ("x_proj", _direction),
                         _dtp: ("dt_proj", _direction)})

# Modules traced as opaque leaves by default: they hold no quantizable mixer parts.
DEFAULT_LEAVES: tuple[type[nn.Module], ...] = (RmsNorm, PatchEmbed, nn.LayerNorm)

_FX_DIR = os.path.dirname(fx.__file__)
_TORCH_DIR = os.path.dirname(torch.__file__)


def scan_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SCAN_OP]


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.module_path: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.module_path.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the module named
            raise _capture_error(e, self.module_path[-1]) from e
        finally:
            self.module_path.pop()


def _describe_operation(e: Exception) -> str:
    msg = str(e)
    if "control flow" in msg:
        return "data-dependent Python control flow (an `if`/`while` on a traced tensor's value)"
    if "cannot be iterated" in msg:
        return "iterating over a traced tensor (unpacking or a `for` loop over a tensor)"
    if "len(" in msg or "__len__" in msg:
        return "len() of a traced tensor"
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


def _user_frame(e: Exception) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith((_FX_DIR, _TORCH_DIR))]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


def _capture_error(e: Exception, where: tuple[str, str]) -> CaptureError:
    name, type_name = where
    label = f"'{name}' ({type_name})" if name else f"the root module ({type_name})"
    err = CaptureError(
        f"cannot trace module {label}: {_describe_operation(e)}{_user_frame(e)}.\n"
        f"What to do: keep it as an opaque float module with "
        f"capture(model, leaf_modules=[{name or type_name!r}]) (it will not be quantized), or "
        f"rewrite its forward without data-dependent control flow. Upstream Mamba blocks "
        f"(mamba_ssm, hustvl/Vim) should be rebuilt with ouromamba_fx.models first.")
    err.module = name  # the qualified name of the module that failed ("" for the root)
    return err


def capture(
    model: nn.Module,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
    example_inputs: tuple[torch.Tensor, ...] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` to an FX GraphModule with every scan as one node and role tags on nodes.

    Args:
        model: a model built from :class:`ouromamba_fx.models.MambaMixer` (e.g. a Vim).
        leaf_modules: module names or types to keep opaque (traced as one call, left in float).
        example_inputs: if given, the graph is run once on them to record shapes
            (``node.meta["tensor_meta"]``) and checked to give the model's output.

    Example:
        >>> gm = capture(ouromamba_fx.models.reference_model())  # doctest: +SKIP
        >>> len(scan_nodes(gm))                                   # doctest: +SKIP
        16
    """
    leaf_names = {x for x in leaf_modules if isinstance(x, str)}
    leaf_types = DEFAULT_LEAVES + tuple(x for x in leaf_modules if isinstance(x, type))
    unknown = leaf_names - {n for n, _ in model.named_modules()}
    if unknown:
        raise CaptureError(f"leaf_modules names not found in the model: {sorted(unknown)}")
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(model)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - failure in the root module's own forward
        raise _capture_error(e, ("", type(model).__name__)) from e
    for node in graph.nodes:  # calls of the op packet -> its one overload, so targets compare
        if node.op == "call_function" and node.target is torch.ops.ouromamba.selective_scan:
            node.target = SCAN_OP
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    annotate(gm, model)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    return gm


def annotate(gm: fx.GraphModule, model: nn.Module) -> None:
    """Tag the mixer nodes of ``gm`` (traced from ``model``) with role, direction, layer, module."""
    mixers = [name for name, m in model.named_modules() if isinstance(m, MambaMixer)]
    layer_of = {name: i for i, name in enumerate(mixers)}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            parent, _, child = node.target.rpartition(".")
            if parent in layer_of and child in _CHILD_ROLES:
                role, direction = _CHILD_ROLES[child]
                node.meta[META] = {"role": role, "direction": direction,
                                   "layer": layer_of[parent], "module": parent}
    for node in scan_nodes(gm):
        conv = _nearest_producer(node.args[0], "conv1d")
        if conv is not None:
            t = tag(conv)
            node.meta[META] = {"role": "scan", "direction": t["direction"], "layer": t["layer"],
                               "module": t["module"]}
        else:  # the op used directly, outside a MambaMixer
            node.meta[META] = {"role": "scan", "direction": None, "layer": None, "module": None}


def _nearest_producer(start: fx.Node, role: str, max_depth: int = 8) -> fx.Node | None:
    """Breadth-first search up the inputs of ``start`` for a node tagged with ``role``."""
    frontier, seen = [start], set()
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            t = tag(n)
            if t is not None and t["role"] == role:
                return n
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None
