"""The quantized-model file: one ``.safetensors`` file of tensors and plain data, written from and
read back into a graph's tensors. What the file holds, not how a graph is built from it (that
is :mod:`ouromamba_fx.serialize`).

The file (``FORMAT_VERSION`` 2):

* tensors: every parameter and buffer of the reference quantized graph under its own name (int8
  weights, scales, zero points, the float parameters of what stayed float); weights of <= 4 bits
  packed two per byte under ``<name>.int4``; outlier statistics under ``__stats__/...``.
* the header's metadata key ``"ouromamba_fx"``: one JSON document of plain data (:class:`Header`):
  the :class:`~ouromamba_fx.config.QuantConfig`, the float model's identity (class, architecture
  config, weights fingerprint), the calibration image shape, the sub-modules kept as float
  leaves, the lowering options of a lowered model, the report's numbers and log lines, and a
  checksum: SHA-256 of the rest of the header and of the tensors. It catches damaged files and
  files mixed up with another model's (the model fingerprint is part of what it covers), not a
  deliberate edit (anyone can recompute it): safety does not rest on it.

Reading checks everything it takes: the header field by field against its annotation
(:func:`ouromamba_fx.plaindata.from_plain`), the checksum, and each tensor before it is copied into
a graph (:func:`load_tensors`: name, dtype, shape, finite, positive scales, integer range).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ouromamba_fx import numerics
from ouromamba_fx.config import QuantConfig
from ouromamba_fx.errors import CheckpointError, OuroMambaError
from ouromamba_fx.models.identity import ARCHITECTURES
from ouromamba_fx.ops.int4 import pack_int4, unpack_int4
from ouromamba_fx.plaindata import PlainDataError, from_plain
from ouromamba_fx.tags import tag
from ouromamba_fx.version import QUANTIZED_FORMAT, QUANTIZED_FORMAT_VERSION, QUANTIZED_META_KEY, __version__

FORMAT = QUANTIZED_FORMAT
FORMAT_VERSION = QUANTIZED_FORMAT_VERSION
META_KEY = QUANTIZED_META_KEY
STATS = "__stats__/"
INT4 = ".int4"
MAX_HEADER = 64 * 2**20  # characters of the JSON document
# Suffixes of the tensors the passes create as scales or scan factors: they must be > 0.
_POSITIVE = ("_scale", "_r_c", "_r_l", "_r_n")


class SerializationError(OuroMambaError):
    """A quantized model cannot be written in the file format."""


@dataclass(frozen=True)
class ModelRecord:
    """The float model a file was quantized from."""

    class_path: str
    fingerprint: str
    config: dict[str, Any] | None = None  # architecture config, for classes the library can rebuild


@dataclass(frozen=True)
class ReportRecord:
    sqnr_db: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    pass_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Header:
    """The JSON document of a saved file; every field typed (see the module docstring)."""

    format: str
    format_version: int
    library_version: str
    torch_version: str
    config: QuantConfig
    model: ModelRecord
    example_shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    checksum: str
    leaf_modules: list[str] = field(default_factory=list)
    lowered: dict[str, bool | str] | None = None
    report: ReportRecord = field(default_factory=ReportRecord)


# --- tensors of a graph ----------------------------------------------------------------------------

def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``gm`` by qualified name (shared ones under each name)."""
    return {**dict(gm.named_parameters(remove_duplicate=False)),
            **dict(gm.named_buffers(remove_duplicate=False))}


def weight_bits(gm: fx.GraphModule) -> dict[str, int]:
    """get_attr target of each quantized weight -> its bit width (from the consumer's tag)."""
    out = {}
    for n in gm.graph.nodes:
        bits = (tag(n) or {}).get("weight_bits")
        if bits is None:
            continue
        for a in n.all_input_nodes:
            if (tag(a) or {}).get("kind") == "weight" and a.op == "call_function":
                wq = a.args[0]
                if isinstance(wq, fx.Node) and wq.op == "get_attr":
                    out[wq.target] = bits
    return out


def _int4_names(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, b in weight_bits(gm).items()
            if b <= 4 and tensors[k].dtype == torch.int8 and tensors[k].dim() >= 2 and tensors[k].numel()}


def checksum(doc: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a header document (without its ``checksum`` field) and of named tensors
    (names, dtypes, shapes, bytes, in name order)."""
    h = hashlib.sha256()
    rest = {k: v for k, v in doc.items() if k != "checksum"}
    h.update(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"|{k}|{v.dtype}|{tuple(tensors[k].shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# --- save ------------------------------------------------------------------------------------------

def write(q, path: str | Path) -> Path:
    """Write quantized model ``q`` (a :class:`~ouromamba_fx.QuantizedModel`, reference or lowered)
    to ``path`` (``.safetensors``). See the module docstring for what the file holds.

    Example:
        >>> ouromamba_fx.save(q, "vim_w4a4o8.safetensors")   # doctest: +SKIP
    """
    from safetensors.torch import save_file

    if getattr(q, "custom_passes", False):
        raise SerializationError(
            f"{q.model_name} was converted with a custom passes= list; a saved file is rebuilt at "
            f"load by the default pipeline, so it cannot describe this model")
    ref = q.reference if getattr(q, "lower_options", None) is not None else q
    ident = q.model_identity or {}
    if not ident.get("fingerprint") or not ident.get("class"):
        raise SerializationError(f"{q.model_name} has no record of its float model (model_identity)")
    gm = ref.graph_module
    named = graph_tensors(gm)
    int4 = _int4_names(gm, named)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in named.items():
        v = v.detach().cpu()
        if k in int4:
            tensors[k + INT4] = pack_int4(v.reshape(v.shape[0], -1))
        else:
            tensors[k] = v.contiguous().clone()  # clone: safetensors refuses shared storage
    for site, f in (ref.outlier_fraction or {}).items():
        tensors[f"{STATS}outlier_fraction/{site}"] = f.detach().float().contiguous()
    for site, m in (ref.outlier_maps or {}).items():
        tensors[f"{STATS}outlier_map/{site}"] = m.detach().float().contiguous()
    example = ref.example_shape or ref.input_shape
    header = Header(
        format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
        torch_version=torch.__version__.split("+")[0], config=q.config,
        model=ModelRecord(ident["class"], ident["fingerprint"],
                          ident.get("config") if ident["class"] in ARCHITECTURES else None),
        example_shape=tuple(example), input_shape=tuple(ref.input_shape) if ref.input_shape else None,
        checksum="", leaf_modules=list(ref.leaf_modules),
        lowered=dict(q.lower_options) if getattr(q, "lower_options", None) is not None else None,
        report=ReportRecord({k: float(v) for k, v in ref.sqnr_db.items()}, list(ref.log),
                            [s.seconds for s in ref.snapshots]))
    doc = json.loads(json.dumps(asdict(header)))  # tuples as lists: what load will see
    doc["checksum"] = checksum(doc, tensors)
    path = Path(path)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(doc, separators=(",", ":"))})
    return path


# --- read and check --------------------------------------------------------------------------------

def _open_metadata(path: Path) -> dict:
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a file (a quantized model is one .safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path.name} is not a safetensors file, so not a quantized model "
                              f"saved by ouromamba-fx ({type(e).__name__}: {str(e)[:200]})") from None


def read_header(path: str | Path) -> Header:
    """The checked header of a saved quantized model (no tensors read). Errors name the problem:
    missing file, not safetensors, not written by ouromamba-fx, another format version, a field
    of the wrong type."""
    return _read_header(Path(path))[1]


def _read_header(path: Path) -> tuple[dict, Header]:
    meta = _open_metadata(path)
    if META_KEY not in meta:
        raise CheckpointError(
            f"{path.name} is a safetensors file but not a quantized model saved by ouromamba-fx "
            f"(no {META_KEY!r} metadata). A float checkpoint loads with ouromamba_fx.models.load(); "
            f"calibration images with SyntheticCalib.load().")
    text = meta[META_KEY]
    if len(text) > MAX_HEADER:
        raise CheckpointError(f"{path.name}: its {META_KEY} metadata is {len(text):,} characters long "
                              f"(at most {MAX_HEADER:,})")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path.name}: its {META_KEY} metadata is not valid JSON "
                              f"({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{path.name}: unknown format {str(got)[:60]!r} (expected {FORMAT!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        made = str(doc.get("library_version", "?"))[:20]
        if version == 1:
            hint = ("version 1 files carry graph code, which this version no longer reads (loading "
                    "must not run code from a file): convert the float model again")
        elif type(version) is int and version > FORMAT_VERSION:
            hint = "upgrade ouromamba-fx"
        else:
            hint = "convert the float model again with this version"
        raise CheckpointError(
            f"{path.name} has file format version {str(version)[:20]} (written by ouromamba-fx "
            f"{made}); this ouromamba-fx reads version {FORMAT_VERSION}: {hint}")
    try:
        header = from_plain(Header, doc, "header")
        _check_header(header)
    except (PlainDataError, RecursionError) as e:
        raise CheckpointError(f"{path.name} is damaged or was edited: {str(e)[:300]}") from None
    return doc, header


def _check_header(h: Header) -> None:
    for shape, name in ((h.example_shape, "example_shape"), (h.input_shape, "input_shape")):
        if shape is not None and (not 1 <= len(shape) <= 4 or min(shape) < 1 or math.prod(shape) > 2**24):
            raise PlainDataError(f"header.{name}: {shape} is not an image shape")
    if h.input_shape is not None and tuple(h.input_shape) != tuple(h.example_shape):
        raise PlainDataError(f"header: input_shape {h.input_shape} differs from example_shape {h.example_shape}")
    for digest, name in ((h.checksum, "checksum"), (h.model.fingerprint, "model.fingerprint")):
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise PlainDataError(f"header.{name} is not a SHA-256 hex digest")
    bad = [s for s in h.report.pass_seconds if not (math.isfinite(s) and s >= 0)]
    if bad:
        raise PlainDataError(f"header.report.pass_seconds: {bad[:3]} are not durations")


def read(path: str | Path) -> tuple[dict, Header, dict[str, torch.Tensor]]:
    """(header document, checked :class:`Header`, every tensor) of a file, after checking the
    header and the tensors against the checksum."""
    path = Path(path)
    doc, header = _read_header(path)
    return doc, header, _read_tensors(path, doc)


def _read_tensors(path: Path, doc: dict) -> dict[str, torch.Tensor]:
    """All tensors of the file, after checking them and the header against its checksum."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path.name}: its tensors cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if checksum(doc, raw) != doc["checksum"]:
        raise CheckpointError(f"{path.name} is damaged or was edited: its header and tensors do not "
                              f"match its checksum")
    return raw


def _check_value(name: str, v: torch.Tensor, bits: int | None, where: str) -> None:
    if v.is_floating_point():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{where}: tensor {name!r} holds NaN or Inf values")
        if name.endswith(_POSITIVE) and v.numel() and not bool((v > 0).all()):
            raise CheckpointError(f"{where}: scale tensor {name!r} holds values <= 0")
    elif bits is not None and v.numel():
        qmax = numerics.qmax(bits)  # weights are quantized symmetrically: [-qmax, qmax]
        lo, hi = int(v.min()), int(v.max())
        if lo < -qmax or hi > qmax:
            raise CheckpointError(f"{where}: {bits}-bit weight {name!r} holds values in [{lo}, {hi}]")


def load_tensors(gm: fx.GraphModule, raw: dict[str, torch.Tensor], where: str) -> None:
    """Copy the file's tensors into the rebuilt graph's, each checked first."""
    own = graph_tensors(gm)
    int4 = _int4_names(gm, own)
    bits = weight_bits(gm)
    expected = {k + INT4 if k in int4 else k for k in own}
    found = {k for k in raw if not k.startswith(STATS)}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = [f"{where} is damaged or was edited: its tensors do not match the rebuilt graph."]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(k[:80] for k in unexpected[:10])}")
        raise CheckpointError("\n  ".join(parts))
    for name, dst in own.items():
        if name in int4:
            packed = raw[name + INT4]
            k = math.prod(dst.shape[1:])
            if packed.dtype != torch.uint8 or tuple(packed.shape) != (dst.shape[0], (k + 1) // 2):
                raise CheckpointError(f"{where}: packed int4 tensor {name!r} is {packed.dtype} "
                                      f"{tuple(packed.shape)}, expected uint8 {(dst.shape[0], (k + 1) // 2)}")
            v = unpack_int4(packed, k).reshape(dst.shape)
        else:
            v = raw[name]
            if v.dtype != dst.dtype or v.shape != dst.shape:
                raise CheckpointError(f"{where}: tensor {name!r} is {v.dtype} {tuple(v.shape)}, the "
                                      f"rebuilt graph expects {dst.dtype} {tuple(dst.shape)}")
        _check_value(name, v, bits.get(name), where)
        with torch.no_grad():
            dst.copy_(v)


def stats(raw: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], kind: str,
           where: str) -> dict[str, torch.Tensor]:
    """The file's outlier statistics of ``kind``, for the sites the rebuilt graph has (same
    shapes, fractions in [0, 1]), in the graph's order."""
    prefix = f"{STATS}{kind}/"
    names = {k[len(prefix):] for k in raw if k.startswith(prefix)}
    unknown = sorted(names - set(expected))
    if unknown:
        raise CheckpointError(f"{where}: outlier statistics for sites the graph does not have: "
                              f"{', '.join(s[:80] for s in unknown[:5])}")
    out = {}
    for site, ref in expected.items():
        if site not in names:
            continue
        v = raw[prefix + site]
        if v.dtype != torch.float32 or v.shape != ref.shape or not bool(((v >= 0) & (v <= 1)).all()):
            raise CheckpointError(f"{where}: {kind} of {site!r} is not a float32 {tuple(ref.shape)} "
                                  f"tensor of fractions")
        out[site] = v
    return out
