"""Capture: trace a vision Mamba to a torch.fx GraphModule whose nodes know their role.

Every selective scan is one ``call_function`` node of ``torch.ops.ouromamba.selective_scan``; the
linear and conv layers stay ``call_module`` nodes; and each of those nodes carries
``node.meta["ouromamba"] = {"role", "direction", "layer", "module"}``:

* ``role``: ``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``scan`` or ``out_proj`` inside a
  mixer (Vim's :class:`MambaMixer` and mamba-ssm's ``Mamba`` rebuilt as one, VMamba's ``SS2D``,
  MambaVision's mixer); ``mlp``, ``attn``, ``conv2d``, ``stem``, ``downsample`` or ``head`` for
  the other layers (:mod:`ouromamba_fx.tags`);
* ``direction``: ``"fwd"``, ``"bwd"`` (Vim's flipped-sequence branch), VMamba's ``"hw"``,
  ``"wh"``, ``"hw_rev"``, ``"wh_rev"`` (one scan each), MambaVision's ``"x"`` / ``"z"`` conv
  branches, or ``None`` (shared);
* ``layer``: index of the mixer in module order (0-based), None outside the mixers;
* ``module``: qualified name of the mixer (of the owning block outside the mixers).

Upstream models are rebuilt first (:func:`ouromamba_fx.models.canonicalize`: MambaVision, VMamba,
mamba-ssm ``Mamba``), and the traced graph is put in a canonical form that computes the same:
``Linear2d`` (VMamba v2's linear over NCHW channels) becomes ``permute -> nn.Linear -> permute``,
so that it quantizes and lowers like any linear, and every eval-mode BatchNorm that only follows
a Conv2d is folded into that conv (``gm.meta["folded_bn"]`` maps the BatchNorm to the conv).

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
from ouromamba_fx.models import mambavision as _mv
from ouromamba_fx.models import vmamba as _vm
from ouromamba_fx.models.mixer import DIRECTIONS, MambaMixer
from ouromamba_fx.ops.scan import SCAN_OP
from ouromamba_fx.tags import META, tag

# Child name inside a MambaMixer -> (role, direction).
_CHILD_ROLES = {"in_proj": ("in_proj", None), "out_proj": ("out_proj", None)}
for _direction, (_conv, _xp, _dtp, _a, _d) in DIRECTIONS.items():
    _CHILD_ROLES.update({_conv: ("conv1d", _direction), _xp: ("x_proj", _direction),
                         _dtp: ("dt_proj", _direction)})

# Child names of VMamba's SS2D and MambaVision's mixer -> (role, direction).
_SS2D_ROLES = {"in_proj": ("in_proj", None), "conv2d": ("conv2d", None), "out_proj": ("out_proj", None)}
for _k, _direction in enumerate(_vm.DIRECTIONS):
    _SS2D_ROLES.update({f"x_proj.{_k}": ("x_proj", _direction), f"dt_projs.{_k}": ("dt_proj", _direction)})
_MV_ROLES = {"in_proj": ("in_proj", None), "conv1d_x": ("conv1d", "x"), "conv1d_z": ("conv1d", "z"),
             "x_proj": ("x_proj", None), "dt_proj": ("dt_proj", None), "out_proj": ("out_proj", None)}

#: Mixer classes whose children get mixer roles, with their child-name tables.
MIXER_TYPES: tuple[tuple[type[nn.Module], dict], ...] = (
    (MambaMixer, _CHILD_ROLES), (_vm.SS2D, _SS2D_ROLES), (_mv.MambaVisionMixer, _MV_ROLES))

# Modules traced as opaque leaves by default: they hold no quantizable mixer parts. Linear and
# convolution subclasses (VMamba's Linear2d) are leaves too, so that they stay one call_module.
DEFAULT_LEAVES: tuple[type[nn.Module], ...] = (RmsNorm, PatchEmbed, nn.LayerNorm, nn.Linear, nn.Conv1d,
                                               nn.Conv2d)

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
        model: a vision Mamba: built from :mod:`ouromamba_fx.models` (Vim, VMamba, MambaVision,
            Mamba stacks), or upstream code (rebuilt first, see the module docstring).
        leaf_modules: module names or types to keep opaque (traced as one call, left in float).
        example_inputs: if given, the graph is run once on them to record shapes
            (``node.meta["tensor_meta"]``) and checked to give the model's output.

    Example:
        >>> gm = capture(ouromamba_fx.models.reference_model())  # doctest: +SKIP
        >>> len(scan_nodes(gm))                                   # doctest: +SKIP
        16
    """
    from ouromamba_fx.models.families import canonical_copy

    model = canonical_copy(model)
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
    _linear2d_as_linear(gm)
    gm.meta["folded_bn"] = fold_batchnorm(gm)
    tag_roles(gm, model)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    return gm


def mixer_table(model: nn.Module) -> dict[str, dict]:
    """Qualified name of every mixer in ``model`` (module order) -> its child-role table."""
    found = {}
    for name, m in model.named_modules():
        for cls, table in MIXER_TYPES:
            if isinstance(m, cls):
                found[name] = table
                break
    return found


def _other_role(gm: fx.GraphModule, target: str) -> str | None:
    """The role of a linear or conv outside the mixers, from its type and where it sits."""
    m = gm.get_submodule(target)
    parent, _, child = target.rpartition(".")
    path = target.split(".")
    if isinstance(m, nn.Conv2d):
        if path[0] == "patch_embed":
            return "stem"
        return "downsample" if "downsample" in path else "conv2d"
    if not isinstance(m, nn.Linear):
        return None
    if child in ("fc1", "fc2"):
        return "mlp"
    owner = type(_owner(gm, parent)).__name__.lower()
    if child in ("qkv", "proj") and ("attn" in owner or "attention" in owner):
        return "attn"
    if "downsample" in path:
        return "downsample"
    if child == "head" or target in ("classifier.head", "head.fc"):
        return "head"
    return None


def _owner(gm: fx.GraphModule, parent: str) -> nn.Module:
    return gm.meta.get("_source_modules", {}).get(parent, nn.Module())


def tag_roles(gm: fx.GraphModule, model: nn.Module) -> None:
    """Tag the nodes of ``gm`` (traced from ``model``) with role, direction, layer, module."""
    tables = mixer_table(model)
    layer_of = {name: i for i, name in enumerate(tables)}
    gm.meta["_source_modules"] = dict(model.named_modules())
    try:
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            owner = next((p for p in tables if node.target.startswith(p + ".")), None)
            if owner is not None:
                child = node.target[len(owner) + 1:]
                if child in tables[owner]:
                    role, direction = tables[owner][child]
                    node.meta[META] = {"role": role, "direction": direction,
                                       "layer": layer_of[owner], "module": owner}
                continue
            role = _other_role(gm, node.target)
            if role is not None:
                node.meta[META] = {"role": role, "direction": None, "layer": None,
                                   "module": node.target.rpartition(".")[0]}
    finally:
        del gm.meta["_source_modules"]
    for node in scan_nodes(gm):
        src = _nearest_producer(node.args[0], "conv1d")
        if src is None or tag(src)["direction"] not in ("fwd", "bwd"):
            # VMamba / MambaVision: the direction is the dt_proj's that makes delta
            src = _nearest_producer(node.args[1], "dt_proj")
        if src is not None:
            t = tag(src)
            node.meta[META] = {"role": "scan", "direction": t["direction"], "layer": t["layer"],
                               "module": t["module"]}
        else:  # the op used directly, outside a known mixer
            node.meta[META] = {"role": "scan", "direction": None, "layer": None, "module": None}


def _plain_linear(m: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` holding ``m``'s own parameters (no copy)."""
    lin = nn.Linear(1, 1, bias=m.bias is not None, device="meta")
    lin.in_features, lin.out_features = m.in_features, m.out_features
    lin.weight = m.weight
    if m.bias is not None:
        lin.bias = m.bias
    return lin.train(m.training)


def _linear2d_as_linear(gm: fx.GraphModule) -> None:
    """``Linear2d(x)`` on NCHW -> ``permute -> Linear -> permute``: the same numbers (up to
    rounding), and a linear over the last axis like every other one."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if not (isinstance(m, nn.Linear) and getattr(m, "channel_axis", -1) == 1):
            continue
        with g.inserting_before(node):
            cl = g.call_method("permute", (node.args[0], 0, 2, 3, 1))
        node.args = (cl,)
        with g.inserting_after(node):
            back = g.call_method("permute", (node, 0, 3, 1, 2))
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        gm.add_submodule(node.target, _plain_linear(m))
    gm.recompile()


def fold_batchnorm(gm: fx.GraphModule) -> dict[str, str]:
    """Fold every eval-mode ``BatchNorm2d`` whose input is a ``Conv2d`` used by nothing else into
    that conv (a new module in ``gm``; the traced model's conv is not changed). Returns
    BatchNorm name -> conv name."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = {}
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module" or not isinstance(bn := gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        conv_n = node.args[0]
        if not (isinstance(conv_n, fx.Node) and conv_n.op == "call_module" and len(conv_n.users) == 1):
            continue
        conv = gm.get_submodule(conv_n.target)
        if not isinstance(conv, nn.Conv2d) or bn.training or conv.training or bn.running_mean is None:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        for p in fused.parameters():
            p.requires_grad_(False)
        gm.add_submodule(conv_n.target, fused)
        node.replace_all_uses_with(conv_n)
        g.erase_node(node)
        folded[node.target] = conv_n.target
    if folded:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded


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
