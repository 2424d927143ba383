"""Save and load quantized models: one ``.safetensors`` file, no pickle.

    >>> q.save("vim_w8a8.safetensors")                       # doctest: +SKIP
    >>> q2 = ouromamba_fx.load("vim_w8a8.safetensors")       # doctest: +SKIP
    >>> torch.equal(q(x), q2(x))                             # doctest: +SKIP
    True

The file format (``FORMAT_VERSION``):

* tensors: every parameter and buffer of the quantized GraphModule under its own name (int8
  weights, float scales and zero points, float parameters of the parts kept in float); 4-bit
  weights are packed two per byte (``ouromamba_fx.lowering.qlinear.pack_int4``) under
  ``<name>.int4``; statistics the report shows (outlier fractions per time-step, outlier maps per
  time-step x channel) under ``__stats__/...``.
* the safetensors header metadata key ``"ouromamba_fx"``: one JSON document with
  ``format_version``, the library version, the :class:`~ouromamba_fx.config.QuantConfig`, the
  model's identity (class, architecture config, preprocessing, a SHA-256 fingerprint of the float
  weights), the graph (node list: op, target, args, kwargs, role tags), the submodules kept as
  modules (type from an allow-list + constructor arguments), the pass snapshots and the report's
  data (SQNR, what stayed float and why, the conversion log).

Loading never unpickles: tensors come from safetensors, everything else from JSON. Call targets are
resolved by name from an allow-list (:data:`FUNCTIONS`, :data:`METHODS`, :data:`MODULES`) plus any
registered ``torch.ops.ouromamba.*`` op by its qualified name and any
module-level function of ``ouromamba_fx.lowering`` / ``ouromamba_fx.kernels`` by its import path,
so ops and lowering helpers added there need no change here. Extend the allow-lists for your own leaf modules
or functions with :func:`register_module` / :func:`register_function`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import operator
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ouromamba_fx.errors import CheckpointError, OuroMambaError

FORMAT = "ouromamba_fx.quantized"
FORMAT_VERSION = 1
META_KEY = "ouromamba_fx"
STATS = "__stats__/"
INT4 = ".int4"


class SerializationError(OuroMambaError):
    """A quantized model holds something the file format cannot describe safely."""


# --- allow-lists -----------------------------------------------------------------------------------

def _functions() -> dict[str, Callable]:
    fns: dict[str, Callable] = {"builtins.getattr": getattr}
    for name in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos",
                 "matmul", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs", "iadd",
                 "imul"):
        fns[f"operator.{name}"] = getattr(operator, name)
    for name in ("cat", "stack", "split", "chunk", "flip", "exp", "log", "sigmoid", "tanh", "softmax",
                 "flatten", "reshape", "transpose", "permute", "matmul", "bmm", "einsum", "add", "sub",
                 "mul", "div", "neg", "where", "clamp", "sum", "mean", "amax", "amin", "sqrt", "rsqrt",
                 "zeros", "ones", "zeros_like", "ones_like", "arange", "cumsum", "conv1d", "conv2d",
                 "unsqueeze", "squeeze", "narrow", "roll", "abs", "round", "softplus", "silu", "relu",
                 "layer_norm", "rms_norm", "linear", "adaptive_avg_pool1d", "cumprod", "gather",
                 "index_select", "full", "full_like", "tensor_split", "unbind"):
        if hasattr(torch, name):
            fns[f"torch.{name}"] = getattr(torch, name)
    for name in ("linear", "conv1d", "conv2d", "silu", "gelu", "relu", "softplus", "sigmoid",
                 "layer_norm", "rms_norm", "group_norm", "pad", "dropout", "softmax", "log_softmax",
                 "normalize", "interpolate", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "avg_pool2d", "scaled_dot_product_attention"):
        if hasattr(F, name):
            fns[f"torch.nn.functional.{name}"] = getattr(F, name)
    return fns


#: ``call_function`` targets a saved graph may name (besides ``torch.ops.ouromamba.*`` ops).
FUNCTIONS: dict[str, Callable] = _functions()

#: ``call_method`` targets (tensor methods) a saved graph may name.
METHODS: set[str] = {
    "transpose", "chunk", "float", "half", "bfloat16", "flip", "expand", "expand_as", "view",
    "reshape", "contiguous", "permute", "flatten", "unflatten", "mean", "sum", "amax", "amin",
    "size", "unsqueeze", "squeeze", "to", "softmax", "exp", "log", "sigmoid", "tanh", "clamp",
    "clamp_min", "split", "narrow", "mul", "add", "sub", "div", "neg", "abs", "type_as", "roll",
    "masked_fill", "repeat", "contiguous", "matmul", "sqrt", "rsqrt", "pow", "cumsum", "gather",
    "index_select", "new_zeros", "new_ones", "dim", "numel", "silu", "relu", "unbind",
}


def _linear(m: nn.Linear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _conv(m: nn.Conv1d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


def _layer_norm(m: nn.LayerNorm) -> dict:
    return {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps,
            "elementwise_affine": m.elementwise_affine, "bias": getattr(m, "bias", None) is not None}


def _rms_norm(m) -> dict:
    return {"channels": m.normalized_shape[0], "eps": m.eps, "affine": m.elementwise_affine}


def _patch_embed(m) -> dict:
    if not isinstance(m.norm, nn.Identity):
        raise SerializationError(f"PatchEmbed with a norm layer ({type(m.norm).__name__}) is not "
                                 f"supported by the file format")
    return {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.proj.in_channels,
            "embed_dim": m.proj.out_channels, "flatten": m.flatten,
            "output_fmt": None if m.flatten else m.output_fmt.value, "bias": m.proj.bias is not None,
            "strict_img_size": m.strict_img_size, "dynamic_img_pad": m.dynamic_img_pad}


def _modules() -> dict[str, tuple[type, Callable[[nn.Module], dict]]]:
    from timm.layers import PatchEmbed, RmsNorm

    return {
        "torch.nn.Linear": (nn.Linear, _linear),
        "torch.nn.Conv1d": (nn.Conv1d, _conv),
        "torch.nn.Conv2d": (nn.Conv2d, _conv),
        "torch.nn.LayerNorm": (nn.LayerNorm, _layer_norm),
        "torch.nn.Identity": (nn.Identity, lambda m: {}),
        "torch.nn.Dropout": (nn.Dropout, lambda m: {"p": m.p}),
        "torch.nn.SiLU": (nn.SiLU, lambda m: {}),
        "torch.nn.GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
        "timm.layers.RmsNorm": (RmsNorm, _rms_norm),
        "timm.layers.PatchEmbed": (PatchEmbed, _patch_embed),
    }


#: Module types a saved graph may hold as ``call_module`` submodules: name -> (class, its
#: constructor arguments from an instance). The module is rebuilt as ``cls(**kwargs)`` and its
#: tensors loaded strictly.
MODULES: dict[str, tuple[type, Callable[[nn.Module], dict]]] = _modules()


def register_module(cls: type, to_kwargs: Callable[[nn.Module], dict], name: str | None = None) -> None:
    """Allow ``cls`` as a submodule of saved graphs: ``cls(**to_kwargs(instance))`` must rebuild
    it (its tensors are then loaded from the file). Register before both save and load.

    Example:
        >>> register_module(MyGate, lambda m: {"dim": m.dim})   # doctest: +SKIP
    """
    MODULES[name or f"{cls.__module__}.{cls.__qualname__}"] = (cls, to_kwargs)


def register_function(fn: Callable, name: str | None = None) -> None:
    """Allow ``fn`` as a ``call_function`` target of saved graphs (register before save and load)."""
    FUNCTIONS[name or f"{fn.__module__}.{fn.__qualname__}"] = fn


# --- values: args, kwargs, tags, configs -----------------------------------------------------------

def encode(v, where: str = "value"):
    """A JSON-safe form of ``v`` that :func:`decode` turns back into an equal value (tuples,
    slices, dtypes, non-finite floats and graph-node references included)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if isinstance(v, torch.Size):
        return {"$tuple": [encode(x, where) for x in v]}
    if isinstance(v, tuple):
        return {"$tuple": [encode(x, where) for x in v]}
    if isinstance(v, list):
        return [encode(x, where) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise SerializationError(f"{where}: dict with non-string keys {list(v)[:4]}")
        return {"$dict": {k: encode(x, f"{where}.{k}") for k, x in v.items()}}
    if isinstance(v, slice):
        return {"$slice": [encode(v.start, where), encode(v.stop, where), encode(v.step, where)]}
    if v is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"$memory_format": str(v).removeprefix("torch.")}
    raise SerializationError(f"{where}: cannot store a value of type {type(v).__name__} ({v!r:.60})")


def decode(v, nodes: dict[str, fx.Node] | None = None):
    if isinstance(v, list):
        return [decode(x, nodes) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise CheckpointError(f"malformed value in the file's JSON: {v!r:.80}")
    (kind, x), = v.items()
    if kind == "$tuple":
        return tuple(decode(y, nodes) for y in x)
    if kind == "$dict":
        return {k: decode(y, nodes) for k, y in x.items()}
    if kind == "$node":
        if nodes is None or x not in nodes:
            raise CheckpointError(f"the graph refers to node {x!r} before it is defined")
        return nodes[x]
    if kind == "$float":
        return float(x)
    if kind == "$slice":
        return slice(*(decode(y, nodes) for y in x))
    if kind == "$ellipsis":
        return Ellipsis
    if kind == "$dtype":
        return _torch_attr(x, torch.dtype)
    if kind == "$memory_format":
        return _torch_attr(x, torch.memory_format)
    if kind == "$device":
        return torch.device(x)
    raise CheckpointError(f"unknown value kind {kind!r} in the file's JSON")


def _torch_attr(name: str, kind: type):
    v = getattr(torch, name, None) if re.fullmatch(r"[a-z0-9_]+", name) else None
    if not isinstance(v, kind):
        raise CheckpointError(f"unknown {kind.__name__} {name!r} in the file")
    return v


# --- targets ---------------------------------------------------------------------------------------

_FN_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
# Only our own ops: aten has file-reading ops (aten::from_file) a crafted file could name.
_OP_NAMESPACES = ("ouromamba",)
_PATH = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


def target_to_name(node: fx.Node) -> str:
    t = node.target
    if node.op in ("call_module", "get_attr", "placeholder", "output"):
        return t
    if node.op == "call_method":
        if t not in METHODS:
            raise SerializationError(f"node {node.name!r}: tensor method {t!r} is not in the "
                                     f"allow-list (ouromamba_fx.serialize.METHODS)")
        return t
    if isinstance(t, torch._ops.OpOverload):
        ns = t.namespace
        if ns in _OP_NAMESPACES:
            return f"torch.ops.{ns}.{t._opname}.{t._overloadname}"
    if isinstance(t, torch._ops.OpOverloadPacket) and t._qualified_op_name.split("::")[0] in _OP_NAMESPACES:
        ns, op = t._qualified_op_name.split("::")
        return f"torch.ops.{ns}.{op}"
    name = FUNCTIONS_BY_ID().get(id(t)) or _own_function_name(t)
    if name is None:
        raise SerializationError(
            f"node {node.name!r} calls {getattr(t, '__module__', '?')}.{getattr(t, '__name__', t)}, "
            f"which is not in the allow-list of functions a saved graph may call. If it is safe, "
            f"register it before saving and loading: ouromamba_fx.serialize.register_function(fn)")
    return name


# Module-level functions of these packages of ours are allowed by name (lowering rules use helpers
# such as ``ouromamba_fx.lowering.fused.fake_quant`` as graph targets; new ones need no change here).
_OWN_PACKAGES = ("ouromamba_fx.lowering", "ouromamba_fx.kernels")
_OWN_NAME = re.compile(r"(ouromamba_fx\.(?:lowering|kernels)(?:\.\w+)*)\.(\w+)")


def _own_function_name(t) -> str | None:
    mod, name = getattr(t, "__module__", None) or "", getattr(t, "__qualname__", "")
    if not mod.startswith(tuple(p + "." for p in _OWN_PACKAGES)) or not name.isidentifier():
        return None
    try:
        found = getattr(importlib.import_module(mod), name, None)
    except ImportError:
        return None
    return f"{mod}.{name}" if found is t else None


def _own_function(name: str):
    m = _OWN_NAME.fullmatch(name)
    if not m:
        return None
    try:
        fn = getattr(importlib.import_module(m.group(1)), m.group(2), None)
    except ImportError:
        return None
    return fn if callable(fn) and getattr(fn, "__module__", None) == m.group(1) else None


def FUNCTIONS_BY_ID() -> dict[int, str]:  # noqa: N802 - rebuilt when register_function adds one
    if len(_FN_NAMES) != len(FUNCTIONS):
        _FN_NAMES.clear()
        _FN_NAMES.update({id(fn): name for name, fn in FUNCTIONS.items()})
    return _FN_NAMES


def _import_lowering() -> None:
    """Import every module of ``ouromamba_fx.lowering`` so all our custom ops are registered."""
    import ouromamba_fx.lowering as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # noqa: BLE001 - an optional backend (e.g. a C++ build) may be missing
            pass


def name_to_target(op: str, name: str, node_name: str):
    if op in ("placeholder", "output"):
        return name
    if op in ("call_module", "get_attr"):
        if not isinstance(name, str) or not _PATH.fullmatch(name):
            raise CheckpointError(f"node {node_name!r}: invalid attribute path {name!r}")
        return name
    if op == "call_method":
        if name not in METHODS:
            raise CheckpointError(f"node {node_name!r}: tensor method {name!r} is not in the allow-list")
        return name
    if op != "call_function":
        raise CheckpointError(f"node {node_name!r}: unknown node op {op!r}")
    if name in FUNCTIONS:
        return FUNCTIONS[name]
    m = re.fullmatch(r"torch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?", name)
    if m and m.group(1) in _OP_NAMESPACES:
        ns, opname, overload = m.groups()
        if ns == "ouromamba" and not hasattr(getattr(torch.ops, ns), opname):
            _import_lowering()
        try:
            packet = getattr(getattr(torch.ops, ns), opname)
            return getattr(packet, overload) if overload else packet
        except (AttributeError, RuntimeError):
            raise CheckpointError(
                f"node {node_name!r} calls {ns}::{opname}, which is not registered in this "
                f"installation (a newer ouromamba-fx, or an op from a module not imported?)") from None
    own = _own_function(name)
    if own is not None:
        return own
    raise CheckpointError(f"node {node_name!r} calls {name!r}, which is not in the allow-list of "
                          f"functions a saved graph may call")


# --- graph and modules -----------------------------------------------------------------------------

def graph_to_json(gm: fx.GraphModule, meta_key: str) -> list[dict]:
    out = []
    for n in gm.graph.nodes:
        where = f"node {n.name!r}"
        entry = {"name": n.name, "op": n.op, "target": target_to_name(n),
                 "args": encode(tuple(n.args), where), "kwargs": encode(dict(n.kwargs), where)}
        if n.meta.get(meta_key) is not None:
            entry["tag"] = encode(n.meta[meta_key], f"{where} tag")
        out.append(entry)
    return out


def graph_from_json(entries: list[dict], meta_key: str) -> fx.Graph:
    g = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for e in entries:
        name = e["name"]
        target = name_to_target(e["op"], e["target"], name)
        args, kwargs = decode(e["args"], nodes), decode(e["kwargs"], nodes)
        if target is getattr and (len(args) != 2 or not isinstance(args[1], str) or args[1].startswith("_")):
            raise CheckpointError(f"node {name!r}: getattr of {args[1:]!r} is not allowed (only public "
                                  f"attributes such as 'shape')")
        if e["op"] == "output":
            node = g.output(args[0])
        else:
            node = g.create_node(e["op"], target, tuple(args), kwargs, name=name)
        if node.name != name and e["op"] != "output":
            raise CheckpointError(f"graph node {name!r} could not keep its name (got {node.name!r})")
        if "tag" in e:
            node.meta[meta_key] = decode(e["tag"])
        nodes[name] = node
    g.lint()
    return g


def _module_name(m: nn.Module) -> str | None:
    for name, (cls, _) in MODULES.items():
        if type(m) is cls:
            return name
    return None


def modules_to_json(gm: fx.GraphModule) -> list[dict]:
    """The allow-listed submodules (outermost only) with their constructor arguments."""
    specs, taken = [], []
    for path, m in gm.named_modules():
        if path == "" or any(path.startswith(p + ".") for p in taken):
            continue
        name = _module_name(m)
        if name is None:
            if type(m) is nn.Module:  # a plain container GraphModule made for nested attributes
                continue
            raise SerializationError(
                f"submodule {path!r} ({type(m).__name__}) cannot be saved: rebuilding it would need "
                f"its class, and only allow-listed classes are rebuilt ({', '.join(sorted(MODULES))}). "
                f"Register it with ouromamba_fx.serialize.register_module(cls, to_kwargs).")
        specs.append({"path": path, "type": name, "kwargs": encode(MODULES[name][1](m), path)})
        taken.append(path)
    return specs


def _set_path(root: nn.Module, path: str, value, kind: str) -> None:
    parent = root
    *parts, last = path.split(".")
    for p in parts:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    if kind == "module":
        parent.add_module(last, value)
    elif kind == "parameter":
        parent.register_parameter(last, nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        parent.register_buffer(last, value, persistent=kind == "buffer")


# --- tensors ---------------------------------------------------------------------------------------

def _int4_weights(gm: fx.GraphModule, meta_key: str) -> set[str]:
    """get_attr targets of int8 weights quantized to <= 4 bits (dequantize -> op with weight_bits)."""
    names = set()
    for n in gm.graph.nodes:
        t = n.meta.get(meta_key) or {}
        if t.get("weight_bits", 99) > 4:
            continue
        for a in n.all_input_nodes:
            if (a.meta.get(meta_key) or {}).get("kind") == "weight" and a.op == "call_function":
                wq = a.args[0]
                if isinstance(wq, fx.Node) and wq.op == "get_attr":
                    names.add(wq.target)
    return names


def _tensor_entries(gm: fx.GraphModule, module_paths: list[str]) -> dict[str, str]:
    """Every tensor of ``gm`` not owned by a rebuilt submodule -> parameter | buffer | buffer_np."""
    own = dict.fromkeys(gm.state_dict(keep_vars=True))
    entries = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        entries[name] = "parameter"
    for name, _ in gm.named_buffers(remove_duplicate=False):
        entries[name] = "buffer" if name in own else "buffer_np"
    return {k: v for k, v in entries.items() if not any(k.startswith(p + ".") for p in module_paths)}


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def model_identity(model: nn.Module, name: str | None = None) -> dict:
    """What a saved file says about the float model it came from."""
    cls = type(model)
    cfg = getattr(model, "cfg", None)
    pcfg = getattr(model, "pretrained_cfg", None)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "name": name or cls.__name__,
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
            "pretrained_cfg": dict(pcfg) if isinstance(pcfg, dict) else None,
            "fingerprint": model_fingerprint(model)}


# --- save / load -----------------------------------------------------------------------------------

def _stats(q) -> dict[str, torch.Tensor]:
    out = {}
    for site, f in (getattr(q, "outlier_fraction", None) or {}).items():
        out[f"{STATS}outlier_fraction/{site}"] = f.detach().float().contiguous()
    for site, m in (getattr(q, "outlier_maps", None) or {}).items():
        out[f"{STATS}outlier_map/{site}"] = m.detach().float().contiguous()
    return out


def save(q, path: str | Path) -> Path:
    """Write quantized model ``q`` (a :class:`~ouromamba_fx.QuantizedModel`) to ``path``
    (``.safetensors``). See the module docstring for what the file holds.

    Example:
        >>> ouromamba_fx.save(q, "vim_w4a4o8.safetensors")   # doctest: +SKIP
    """
    from safetensors.torch import save_file

    import ouromamba_fx
    from ouromamba_fx.capture import META
    from ouromamba_fx.lowering.qlinear import pack_int4

    gm = q.graph_module
    modules = modules_to_json(gm)
    kinds = _tensor_entries(gm, [m["path"] for m in modules])
    sd = dict(gm.state_dict())
    named = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    int4 = _int4_weights(gm, META)
    tensors: dict[str, torch.Tensor] = {}
    packed = {}
    for k in sorted(set(sd) | set(kinds)):
        v = (sd[k] if k in sd else named[k]).detach().cpu()
        if k in int4 and v.dtype == torch.int8 and v.dim() >= 2 and v.numel():
            packed[k] = list(v.shape)
            tensors[k + INT4] = pack_int4(v.reshape(v.shape[0], -1))
        else:
            tensors[k] = v.contiguous().clone()  # clone: safetensors refuses shared storage
    tensors.update(_stats(q))
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": ouromamba_fx.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "config": encode(q.config.to_dict(), "config"),
        "model": encode(getattr(q, "model_identity", None) or {"name": q.model_name}, "model"),
        "model_name": q.model_name,
        "input_shape": encode(tuple(q.input_shape) if q.input_shape is not None else None),
        "graph": {"class_name": type(gm).__name__ if type(gm).__name__ != "GraphModuleImpl" else
                  gm._get_name(), "nodes": graph_to_json(gm, META), "modules": modules,
                  "tensors": {k: kinds.get(k, "buffer") for k in sorted(set(sd) | set(kinds))},
                  "int4": packed},
        "report": {"sqnr_db": encode(dict(q.sqnr_db), "sqnr"), "float_reasons": dict(q.float_reasons),
                   "log": list(q.log),
                   # safetensors sorts tensor names; keep the graph order of the sites for the report
                   "outlier_sites": list(getattr(q, "outlier_fraction", None) or {}),
                   "outlier_map_sites": list(getattr(q, "outlier_maps", None) or {})},
        "snapshots": [{"pass": s.pass_name, "seconds": s.seconds, "changed": s.changed,
                       "nodes": [encode((i.name, i.op, i.target, i.args, i.tag), "snapshot") for i in s.nodes]}
                      for s in q.snapshots],
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(doc, separators=(",", ":"))})
    return path


def read_header(path: str | Path) -> dict:
    """The JSON document of a saved quantized model (no tensors read). Errors name the problem:
    missing file, not safetensors, a safetensors file not written by ouromamba-fx, another format
    version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path.name} is not a safetensors file, so not a quantized model "
                              f"saved by ouromamba-fx ({type(e).__name__}: {e})") from None
    if META_KEY not in meta:
        raise CheckpointError(
            f"{path.name} is a safetensors file but not a quantized model saved by ouromamba-fx "
            f"(no {META_KEY!r} metadata). A float checkpoint loads with ouromamba_fx.models.load(); "
            f"calibration images with SyntheticCalib.load().")
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path.name}: its ouromamba_fx metadata is not valid JSON ({e})") from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: unknown format {doc.get('format')!r} (expected {FORMAT!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        made = doc.get("library_version", "?")
        hint = ("upgrade ouromamba-fx" if isinstance(version, int) and version > FORMAT_VERSION
                else "convert the float model again with this version")
        raise CheckpointError(
            f"{path.name} has file format version {version} (written by ouromamba-fx {made}); this "
            f"ouromamba-fx reads version {FORMAT_VERSION}: {hint}")
    return doc


# Fields of a Vim config that make it another architecture (not preprocessing or class names).
_ARCH = ("img_size", "patch_size", "stride", "embed_dim", "depth", "d_state", "expand", "d_conv",
         "in_chans", "num_classes", "cls_position", "bimamba", "divide_out")


def _check_model(doc: dict, model: nn.Module, path: Path) -> None:
    saved = decode(doc.get("model")) or {}
    if saved.get("fingerprint") is None:
        return
    fp = model_fingerprint(model)
    if fp == saved["fingerprint"]:
        return
    diffs = []
    cfg, mine = saved.get("config") or {}, getattr(model, "cfg", None)
    if mine is not None and hasattr(mine, "to_dict"):
        mine = mine.to_dict()
        diffs = [f"{k}: file {cfg[k]!r} vs model {mine.get(k)!r}" for k in _ARCH
                 if k in cfg and k in mine and cfg[k] != mine[k]]
    what = "; ".join(diffs) if diffs else "same architecture, different weights"
    raise CheckpointError(
        f"{path.name} was quantized from a different model than the one given "
        f"({saved.get('name', '?')}, fingerprint {saved['fingerprint'][:12]} vs {fp[:12]}): {what}")


def load(path: str | Path, model: nn.Module | None = None):
    """Rebuild a :class:`~ouromamba_fx.QuantizedModel` saved with :func:`save`, with no pickle.

    Args:
        path: the ``.safetensors`` file.
        model: optionally the float model it was quantized from; an error if the file was made from
            another model (weights fingerprint).

    Example:
        >>> q = ouromamba_fx.load("vim_w8a8.safetensors")   # doctest: +SKIP
        >>> print(q.report())                               # doctest: +SKIP
    """
    from safetensors import safe_open

    from ouromamba_fx.capture import META
    from ouromamba_fx.config import QuantConfig
    from ouromamba_fx.convert import QuantizedModel
    from ouromamba_fx.lowering.qlinear import unpack_int4
    from ouromamba_fx.models.loader import load_state_dict_strict
    from ouromamba_fx.passes.base import NodeInfo, Snapshot

    path = Path(path)
    doc = read_header(path)
    if model is not None:
        _check_model(doc, model, path)
    with safe_open(str(path), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    g = doc["graph"]
    tensors: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k.startswith(STATS):
            continue
        if k.endswith(INT4) and k[: -len(INT4)] in g["int4"]:
            name, shape = k[: -len(INT4)], g["int4"][k[: -len(INT4)]]
            k_dim = math.prod(shape[1:])
            try:
                tensors[name] = unpack_int4(v, k_dim).reshape(shape)
            except ValueError as e:
                raise CheckpointError(f"{path.name}: packed int4 tensor {name!r}: {e}") from None
        else:
            tensors[k] = v
    expected = set(g["tensors"])
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        parts = [f"{path.name} is damaged or was edited: its tensors do not match its graph."]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
        raise CheckpointError("\n  ".join(parts))

    root = nn.Module()
    for spec in g["modules"]:
        if spec["type"] not in MODULES:
            raise CheckpointError(f"{path.name}: submodule {spec['path']!r} has type {spec['type']!r}, "
                                  f"which is not in the allow-list of rebuildable modules")
        cls, _ = MODULES[spec["type"]]
        mod = cls(**decode(spec["kwargs"]))
        prefix = spec["path"] + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_state_dict_strict(mod, own, f"{path.name} (submodule {spec['path']})")
        _set_path(root, spec["path"], mod, "module")
    for k, kind in g["tensors"].items():
        if not any(k.startswith(s["path"] + ".") for s in g["modules"]):
            _set_path(root, k, tensors[k], kind)
    graph = graph_from_json(g["nodes"], META)
    gm = fx.GraphModule(root, graph, g.get("class_name") or "GraphModule")
    gm.eval()

    config = QuantConfig.from_dict(decode(doc["config"]))
    snapshots = [Snapshot(s["pass"], [NodeInfo(*decode(i)) for i in s["nodes"]], s["seconds"], s["changed"])
                 for s in doc["snapshots"]]
    rep = doc["report"]
    input_shape = decode(doc["input_shape"])
    q = QuantizedModel(gm, config, snapshots, dict(rep["float_reasons"]), list(rep["log"]), input_shape,
                       decode(rep["sqnr_db"]), doc.get("model_name", "model"))
    q.outlier_fraction = {s: raw[f"{STATS}outlier_fraction/{s}"] for s in rep.get("outlier_sites", [])
                          if f"{STATS}outlier_fraction/{s}" in raw}
    q.outlier_maps = {s: raw[f"{STATS}outlier_map/{s}"] for s in rep.get("outlier_map_sites", [])
                      if f"{STATS}outlier_map/{s}" in raw}
    identity = decode(doc.get("model")) or {}
    q.model_identity = identity
    _attach_preprocessing(q, identity)
    q.eval()
    return q


def _attach_preprocessing(q, identity: dict) -> None:
    """Give a loaded model the float model's preprocessing (``pretrained_cfg``) and, for Vim,
    its config (class names), so ``evaluate(q, folder)`` works without the float model."""
    if identity.get("pretrained_cfg"):
        q.pretrained_cfg = dict(identity["pretrained_cfg"])
    if identity.get("class") == "ouromamba_fx.models.vim.VisionMamba" and identity.get("config"):
        from ouromamba_fx.models.vim import VimConfig

        try:
            q.cfg = VimConfig(**identity["config"])
        except (TypeError, ValueError):
            pass
