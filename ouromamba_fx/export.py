"""Deploying a quantized model: ``torch.export`` programs, a checked ``.pt2`` loader, AOTInductor.

    >>> ep = q.lower().export(x)                            # ExportedProgram, dynamic batch  # doctest: +SKIP
    >>> ouromamba_fx.export.save(ep, "vim.pt2")                                               # doctest: +SKIP
    >>> ep = ouromamba_fx.export.load("vim.pt2")            # checked before torch reads it    # doctest: +SKIP
    >>> ouromamba_fx.export.compile_aoti(ep, "vim_aoti.pt2")  # AOTInductor package (CPU)       # doctest: +SKIP

* :func:`export_program` (``QuantizedModel.export``) traces a quantized model, reference or
  lowered, with ``torch.export``: the graph holds the package's ops (``torch.ops.ouromamba.*``)
  as single nodes, aten ops around them, and a dynamic batch size (1 to ``max_batch``). Every
  call target must be in this module's allowlist (:data:`ALLOWED_TARGETS`): what is exported can
  be loaded back by :func:`load`.
* :func:`save` writes the program without its example inputs (which torch pickles) plus a text
  record ``extra/ouromamba.json`` (model, preset, input shape, normalisation, classes), and checks
  the written bytes as :func:`load` would.
* :func:`load` is the way to read a ``.pt2``: ``torch.export.load`` alone is not safe on files
  from elsewhere in torch 2.14 (a crafted archive runs code while it loads: pickled weights or
  sample inputs, ``sympy`` evaluation of size expressions, ``guards_code``, a native library in an
  AOTInductor record; or once it runs: ``aten::from_file`` reads and writes files). :func:`check`
  reads the archive with ``zipfile`` and ``json`` only and refuses anything outside what
  :func:`save` writes (:class:`~ouromamba_fx.errors.UnsafeFileError`), then the same bytes go to
  ``torch.export.load``. Loading needs the package imported (the ops' schemas), nothing else.
* :func:`compile_aoti` compiles a program into an AOTInductor package (a ``.pt2`` zip holding a
  native library): :func:`load_aoti` runs it from Python, ``examples/cpp/`` from C++ with the
  package's op library (``kernels/cpu``; :func:`cpp_missing_ops` lists the ops of a program that
  have no C++ kernel and so run only in a Python process). An AOTInductor package is native code:
  it cannot be checked like a program, only load packages you built.

The ``.pt2`` is a deployment artifact, not a replacement for :func:`ouromamba_fx.save`: it holds
the final program only (no pass snapshots for ``diff``, no report or outlier statistics), see
the README, "Deploying outside Python".
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path

import torch

from ouromamba_fx.errors import ExportError, UnsafeFileError
from ouromamba_fx.ops import gemm
from ouromamba_fx.version import __version__

__all__ = ["ALLOWED_TARGETS", "PACKAGE_OPS", "MAX_BATCH", "export_program", "save", "check", "load",
           "compile_aoti", "load_aoti", "cpp_missing_ops", "metadata_of"]

#: The largest batch an exported program accepts (the upper bound of its dynamic batch dimension).
MAX_BATCH = 4096

#: The package's ops that never appear in an exported program: ``s8_mm`` and ``s16_mm`` (the
#: decomposed linears' products on a weight packed once: oneDNN's matmul, or the AVX2 kernel of
#: CPUs without VNNI; Python-only ops) are traced as ``torch._int_mm`` there
#: (:func:`ouromamba_fx.ops.gemm.without_prepack`).
PYTHON_ONLY_OPS = ("s8_mm", "s16_mm")

#: Every other ``ouromamba::*`` op of the package (:mod:`ouromamba_fx.ops`).
PACKAGE_OPS = ("quantize", "dequantize", "quantize_per_token", "quantize_mixed", "mixed_fake_quant", "outlier_mask",
               "outlier_split", "int8_linear", "w8a8_linear", "w4a4o8_linear", "w4a4o8_linear_rt",
               "w4a4o8_linear_mixed", "causal_conv1d_silu", "causal_conv1d_silu_codes", "selective_scan",
               "selective_scan_bwd", "selective_scan_cl", "selective_scan_dt", "selective_scan_q", "selective_scan_qi")

# The aten overloads the package's exported programs use (its models at every preset, reference and
# lowered with every lowering option), reviewed one by one: tensor arithmetic, shapes and layouts,
# no file, memory or process access (aten also has from_file, save, _unsafe_index..., which are
# why this is a list and not a namespace).
_ATEN = ("__lshift__.Scalar", "__rshift__.Scalar", "_assert_tensor_metadata.default", "_int_mm.default", "abs.default",
         "add.Tensor", "alias.default", "all.dim", "amax.default", "bitwise_not.default", "cat.default",
         "chunk.default", "clamp.default", "clamp_.default", "clamp_min.default", "conv1d.default", "conv2d.default",
         "div.Tensor", "exp.default", "expand.default", "flatten.using_ints", "flip.default", "isfinite.default",
         "linear.default", "masked_fill.Scalar", "matmul.default", "mean.dim", "mul.Tensor", "neg.default",
         "reshape.default", "rms_norm.default", "round.default", "select.int", "silu.default", "slice.Tensor",
         "split_with_sizes.default", "stack.default", "sub.Tensor", "sym_size.int", "t.default", "to.dtype",
         "transpose.int", "view.default", "view.dtype", "where.ScalarOther", "where.self")

#: Call targets (as ``torch.export`` serialises them) a program may hold.
ALLOWED_TARGETS = frozenset(("_operator.getitem",) + tuple(f"torch.ops.aten.{a}" for a in _ATEN)
                            + tuple(f"torch.ops.ouromamba.{op}.default" for op in PACKAGE_OPS))

_METADATA = "ouromamba.json"


def _target_name(target) -> str:
    """A graph node's target as torch.export writes it into the file."""
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


# ---------------------------------------------------------------------------------------------
# Export

def _example(q, example_input) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ExportError(f"export: the example input must be a batch of images (a tensor of shape "
                          f"(batch, C, H, W)), got {type(example_input).__name__}")
    x = example_input.detach()
    if x.dtype != torch.float32:
        raise ExportError(f"export: the example input must be float32 images, got {x.dtype}")
    # torch.export specialises a dimension whose example size is 0 or 1: a batch of one is doubled
    # (the program still accepts batch 1)
    return torch.cat([x, x]) if x.shape[0] < 2 else x


def export_program(q, example_input: torch.Tensor, max_batch: int = MAX_BATCH) -> torch.export.ExportedProgram:
    """``torch.export`` of a :class:`~ouromamba_fx.QuantizedModel` (reference or lowered) for inputs
    shaped like ``example_input`` with any batch size from 1 to ``max_batch``. Raises
    :class:`~ouromamba_fx.errors.ExportError` when the model cannot be exported or its graph calls
    an op outside :data:`ALLOWED_TARGETS` (which :func:`load` would refuse)."""
    x = _example(q, example_input)
    if not 1 <= x.shape[0] <= max_batch:
        raise ExportError(f"export: max_batch={max_batch} must be at least the example's batch ({x.shape[0]})")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        # the integer products as torch._int_mm: the prepacked-matmul op is Python-only
        with torch.no_grad(), gemm.without_prepack():
            ep = torch.export.export(q, (x,), dynamic_shapes={"x": {0: batch}}, strict=False)
    except Exception as e:  # noqa: BLE001 - torch's many export errors, named with the model
        raise ExportError(f"export: torch.export could not trace {getattr(q, 'model_name', 'the model')} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    outside = sorted({_target_name(n.target) for n in ep.graph.nodes if n.op == "call_function"} - ALLOWED_TARGETS)
    if outside:
        raise ExportError(f"export: the exported graph calls {', '.join(outside)}, outside the ops "
                          f"ouromamba_fx.export.load accepts (ALLOWED_TARGETS in ouromamba_fx/export.py); "
                          f"such a file would be refused on load")
    return ep


def metadata_of(q, ep: torch.export.ExportedProgram | None = None) -> dict:
    """What a deployed program says about its model (plain data: names, shapes, normalisation)."""
    ident = getattr(q, "model_identity", None) or {}
    cfg = ident.get("config") or {}
    shape = getattr(q, "input_shape", None) or getattr(q, "example_shape", None)
    return {"format": "ouromamba-fx exported program", "version": __version__,
            "model": getattr(q, "model_name", None), "preset": getattr(getattr(q, "config", None), "name", None),
            "lowered": bool(getattr(q, "lowered", False)),
            "input_shape": list(shape) if shape else None,
            "mean": list(cfg["mean"]) if cfg.get("mean") else None,
            "std": list(cfg["std"]) if cfg.get("std") else None,
            "crop_pct": cfg.get("crop_pct"),
            "classes": list(cfg.get("classes") or [])}


# ---------------------------------------------------------------------------------------------
# Save, check, load

def save(ep: torch.export.ExportedProgram, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``ep`` as a ``.pt2`` without its example inputs and its nodes' stack traces, with
    ``metadata`` as the text record ``extra/ouromamba.json``; the bytes are checked as :func:`load`
    checks them before they are written (an :class:`~ouromamba_fx.errors.UnsafeFileError` then means the program holds
    something :func:`load` would refuse)."""
    path = Path(path)
    buf = io.BytesIO()
    examples = ep.example_inputs
    ep.example_inputs = None  # torch pickles them; the file then has no pickle at all
    # Python stack traces of the exporting process: about half the graph's JSON, and they name
    # that machine's source paths; not needed to load or run the program.
    traces = {n: n.meta.pop("stack_trace") for n in ep.graph.nodes if "stack_trace" in n.meta}
    try:
        torch.export.save(ep, buf, extra_files={_METADATA: json.dumps(metadata or {}, sort_keys=True)})
    finally:
        ep.example_inputs = examples
        for n, t in traces.items():
            n.meta["stack_trace"] = t
    data = buf.getvalue()
    check(data, where=str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


MAX_FILE_BYTES = 8 * 2**30
MAX_JSON_BYTES = 256 * 2**20

# records of an archive (after its root folder)
_FIXED = frozenset((".data/version", ".data/serialization_id", "archive_format", "archive_version", "byteorder",
                    "models/model.json", "data/weights/model_weights_config.json",
                    "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"))
_REQUIRED = ("archive_format", "models/model.json", "data/weights/model_weights_config.json",
             "data/constants/model_constants_config.json")
_WEIGHT = re.compile(r"^data/weights/weight_[0-9]{1,9}$")
_CONST = re.compile(r"^data/constants/tensor_[0-9]{1,9}$")
_EXTRA = re.compile(r"^extra/[A-Za-z0-9_.-]{1,100}$")
_ROOT = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

# Symbolic sizes are read by sympy.sympify, which evaluates Python: only the token grammar torch
# writes them in passes (sympy constructor names, quoted symbol names, integers, operators).
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>[0-9]{1,19})|(?P<str>'[su][0-9]{1,9}')"
                    r"|(?P<op>[()+\-*/,=]))")
_EXPR_NAMES = frozenset(("Symbol", "Integer", "Add", "Mul", "Max", "Min", "FloorDiv", "Mod", "PythonMod",
                         "CleanDiv", "CeilDiv", "ModularIndexing", "Identity", "positive", "integer", "nonnegative",
                         "True", "False"))
_SYMBOL = re.compile(r"^[su][0-9]{1,9}$")
_NODE_META = frozenset(("stack_trace", "nn_module_stack", "torch_fn", "custom", "source_fn_stack", "from_node"))
_ARG_KINDS_REFUSED = frozenset(("as_graph", "as_operator", "as_custom_obj", "as_opaque_obj"))


class _Refused(Exception):
    pass


def _refuse(msg: str):
    raise _Refused(msg)


def _check_expr(s, where: str) -> None:
    if not isinstance(s, str) or len(s) > 2000 or "**" in s:
        _refuse(f"a symbolic size at {where} is not a plain size expression")
    pos = 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            _refuse(f"the symbolic size {s[:80]!r} at {where} has unexpected text at character {pos}")
        name = m.group("name")
        if name is not None and not (name in _EXPR_NAMES or _SYMBOL.match(name)):
            _refuse(f"the symbolic size {s[:80]!r} at {where} names {name!r}")
        pos = m.end()


def _walk(obj, where: str, depth: int = 0) -> None:
    """Every value of the program JSON: size expressions checked, graph / operator / object
    arguments refused."""
    if depth > 200:
        _refuse("the program JSON is nested too deeply")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _ARG_KINDS_REFUSED and v is not None:
                _refuse(f"an argument of kind {k!r} at {where}")
            if k == "expr_str":
                _check_expr(v, where)
            _walk(v, f"{where}.{k}", depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _walk(v, f"{where}[{i}]", depth + 1)


def _check_payloads(cfg_bytes: bytes, rx: re.Pattern, prefix: str, names: set[str]) -> None:
    try:
        cfg = json.loads(cfg_bytes)
    except ValueError:
        _refuse(f"{prefix} holds an unreadable index")
    if not isinstance(cfg, dict) or set(cfg) != {"config"} or not isinstance(cfg["config"], dict):
        _refuse(f"{prefix} has an index of unexpected structure")
    for fqn, meta in cfg["config"].items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            _refuse(f"the tensor {fqn!r} of {prefix} is pickled (use_pickle must be false)")
        path = meta.get("path_name")
        if not isinstance(path, str) or not rx.match(prefix + path) or prefix + path not in names:
            _refuse(f"the tensor {fqn!r} of {prefix} points to {path!r}")
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            _refuse(f"the tensor {fqn!r} of {prefix} has no tensor metadata")
        for key in ("sizes", "strides"):
            for s in tm.get(key) or []:
                if not (isinstance(s, dict) and set(s) == {"as_int"} and isinstance(s["as_int"], int)
                        and s["as_int"] >= 0):
                    _refuse(f"the tensor {fqn!r} of {prefix}: {key} must be plain non-negative integers")
        if (tm.get("device") or {}).get("type") not in ("cpu", "cuda"):
            _refuse(f"the tensor {fqn!r} of {prefix} is on an unexpected device")


def _check_bytes(data: bytes) -> None:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        _refuse(f"it is not a .pt2 archive ({e})")
    full = [i.filename for i in infos]
    if not infos or len(set(full)) != len(full):
        _refuse("it is empty or holds records of the same name twice")
    root = full[0].split("/", 1)[0]
    if not _ROOT.match(root):
        _refuse(f"unexpected root folder {root[:80]!r}")
    names: set[str] = set()
    for i in infos:
        if not i.filename.startswith(root + "/") or "\\" in i.filename or ".." in i.filename.split("/"):
            _refuse(f"the record {i.filename[:120]!r} lies outside the archive's root folder (the layout of "
                    "an older torch, which its loader reads with pickle)")
        if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size:
            _refuse(f"the record {i.filename[:120]!r} is compressed")
        rel = i.filename[len(root) + 1:]
        if not (rel in _FIXED or _WEIGHT.match(rel) or _CONST.match(rel) or _EXTRA.match(rel)):
            _refuse(f"unexpected record {rel[:120]!r}: only one exported program named 'model' with its raw "
                    "weights and constants and extra/ text files are accepted (no AOTInductor binaries, "
                    "pickled objects or other programs)")
        names.add(rel)
    for req in _REQUIRED:
        if req not in names:
            _refuse(f"the record {req!r} is missing")

    def read(rel: str) -> bytes:
        return zf.read(f"{root}/{rel}")

    if read("archive_format") != b"pt2":
        _refuse("archive_format is not pt2")
    if "data/sample_inputs/model.pt" in names and read("data/sample_inputs/model.pt") != b"":
        _refuse("it carries pickled sample inputs")
    _check_payloads(read("data/weights/model_weights_config.json"), _WEIGHT, "data/weights/", names)
    _check_payloads(read("data/constants/model_constants_config.json"), _CONST, "data/constants/", names)
    for rel in sorted(names):
        if rel.startswith("extra/"):
            try:
                read(rel).decode("utf-8")
            except UnicodeDecodeError:
                _refuse(f"{rel} is not UTF-8 text")
    info = zf.getinfo(f"{root}/models/model.json")
    if info.file_size > MAX_JSON_BYTES:
        _refuse("its program is too large")
    try:
        prog = json.loads(read("models/model.json"))
        nodes = prog["graph_module"]["graph"]["nodes"]
    except (ValueError, KeyError, TypeError):
        _refuse("its program is not readable JSON of an exported program")
    if prog.get("guards_code"):
        _refuse("the program carries guards_code (Python source that ExportedProgram.module() would run)")
    _walk(prog, "program")
    if not isinstance(nodes, list):
        _refuse("its program has no node list")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            _refuse(f"node #{i} is not an object")
        target = node.get("target")
        if not isinstance(target, str) or target not in ALLOWED_TARGETS:
            _refuse(f"node #{i} ({str(node.get('name'))[:60]}) calls {str(target)[:120]!r}, which is outside the "
                    "ops of ouromamba_fx and the aten ops it exports (ALLOWED_TARGETS in ouromamba_fx/export.py)")
        extra = set(node.get("metadata") or {}) - _NODE_META
        if extra:
            _refuse(f"node #{i} has unknown metadata {sorted(extra)}")


def check(data: bytes, where: str = "the .pt2 file") -> None:
    """Refuse (:class:`~ouromamba_fx.errors.UnsafeFileError`) a ``.pt2`` archive holding anything
    :func:`save` does not write; reads it with ``zipfile`` and ``json`` only. Accepts: one exported
    program named ``model`` whose node targets are all in :data:`ALLOWED_TARGETS`, whose symbolic
    sizes are plain size expressions and which has no ``guards_code`` nor graph, operator or object
    arguments; its weights and constants as raw bytes (no pickles); an empty sample-input record;
    UTF-8 ``extra/`` files. Everything stored uncompressed under one root folder."""
    if len(data) > MAX_FILE_BYTES:
        raise UnsafeFileError(f"{where}: refused before loading: larger than {MAX_FILE_BYTES:,} bytes")
    try:
        _check_bytes(data)
    except _Refused as e:
        raise UnsafeFileError(f"{where}: refused before loading: {e}. ouromamba_fx.export.load reads only the "
                              f".pt2 programs ouromamba_fx.export.save writes") from None


def load(path: str | Path, extra_files: dict | None = None) -> torch.export.ExportedProgram:
    """Read a ``.pt2`` written by :func:`save`: the file is read once, :func:`check` refuses it
    unless it holds only what :func:`save` writes, and then ``torch.export.load`` gets the same
    bytes. ``extra_files`` (names -> anything) is filled with the text records, as by
    ``torch.export.load``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UnsafeFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not path.is_file():
        raise UnsafeFileError(f"{path}: not a regular file")
    if size > MAX_FILE_BYTES:
        raise UnsafeFileError(f"{path}: refused before loading: larger than {MAX_FILE_BYTES:,} bytes")
    data = path.read_bytes()
    check(data, where=str(path))
    extra = {_METADATA: ""}
    if extra_files:
        extra.update({k: "" for k in extra_files})
    ep = torch.export.load(io.BytesIO(data), extra_files=extra)
    if extra_files is not None:
        extra_files.update({k: extra[k] for k in extra_files})
    return ep


def read_metadata(path: str | Path) -> dict:
    """The ``extra/ouromamba.json`` record of a checked ``.pt2`` (empty if it has none)."""
    extra = {_METADATA: ""}
    load(path, extra)
    try:
        return json.loads(extra[_METADATA] or "{}")
    except ValueError:
        raise UnsafeFileError(f"{path}: extra/{_METADATA} is not JSON") from None


# ---------------------------------------------------------------------------------------------
# AOTInductor

def cpp_missing_ops(ep: torch.export.ExportedProgram) -> list[str]:
    """The package ops ``ep`` calls that have no C++ kernel in ``kernels/cpu`` (they run in a
    Python process only; a C++ program fails to load a package that calls them)."""
    from ouromamba_fx.kernels.cpu.build import CPU_LIBRARY

    CPU_LIBRARY.load()
    in_cpp = {s.split("(")[0].split("::")[1] for s in torch.ops.ouromamba_cpu.public_schemas()}
    used = {n.target._opname for n in ep.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "ouromamba"}
    return sorted(used - in_cpp)


def _meta_text(v) -> str:
    """A metadata value as the C++ runner reads it: lists of numbers comma-separated, lists of
    names one per line, anything else as text."""
    if isinstance(v, (list, tuple)):
        if all(isinstance(e, str) for e in v):
            return "\n".join(v)
        return ",".join(repr(e) for e in v)
    return str(v).lower() if isinstance(v, bool) else str(v)


def compile_aoti(ep: torch.export.ExportedProgram, path: str | Path, metadata: dict | None = None) -> Path:
    """Compile ``ep`` (from :func:`export_program`, which keeps its example inputs in memory) with
    AOTInductor into a package at ``path``, for the device of the program's tensors (the CPU, or
    CUDA for a model and example moved there). ``metadata`` (plain data) is stored in the package,
    each value as text under ``ouromamba.<key>`` (lists of numbers comma-separated, lists of
    names one per line), for the C++ runner (``examples/cpp``)."""
    if ep.example_inputs is None:
        raise ExportError("compile_aoti: the program has no example inputs (a program read from a file has "
                          "none): export the model again with QuantizedModel.export(example)")
    meta = {f"ouromamba.{k}": _meta_text(v) for k, v in (metadata or {}).items() if v is not None}
    path = Path(path).resolve()
    try:
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                        inductor_configs={"aot_inductor.metadata": meta})
    except Exception as e:  # noqa: BLE001 - a compiler failure, named
        raise ExportError(f"compile_aoti: AOTInductor could not compile the program ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); it needs a C++ compiler") from e
    return Path(out)


def load_aoti(path: str | Path):
    """Run an AOTInductor package from Python (``torch._inductor.aoti_load_package``): a callable
    taking the input batch. The package is a native library: only load packages you built."""
    return torch._inductor.aoti_load_package(str(Path(path).resolve()))
