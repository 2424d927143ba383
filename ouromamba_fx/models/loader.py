"""Loading Vision Mamba checkpoints safely and strictly.

hustvl/Vim's released files are dicts with the weights under ``"model"`` and an
``argparse.Namespace`` under ``"args"``; ``torch.load(weights_only=True)`` refuses them as they
are. We allow exactly ``argparse.Namespace`` on top of torch's weights-only allow-list, so no
arbitrary pickled code runs. The model's configuration is read from the tensors' shapes, refined by
whatever the file says (a ``"config"`` dict, hustvl's ``args``), and checked against a registered
model name when one is given.

Everything taken from a file is checked before use, and every failure is a
:class:`~ouromamba_fx.errors.CheckpointError` naming the file and what was expected:

* the container: a regular, non-empty file; a torch zip checkpoint whose entries are stored
  uncompressed inside the file's own bytes (checked on the zip directory before torch reads an
  entry, so no entry size declared by the file is allocated unchecked); or a ``.safetensors`` file
  (its reader checks the header against the file's size). Legacy (pre-zip) torch pickles are
  refused: their reader allocates storages of the sizes the file declares before reading them.
  Quantized models and synthetic calibration images written by ouromamba-fx are recognised and
  sent to their own loaders;
* the content: a dict of string keys to dense floating-point tensors, all finite; the
  architecture hints (``config``, ``args``, ``mean``, ``std``, ``classes``, ``crop_pct``) of the
  right types and ranges; the shapes of the tensors the configuration is read from;
* the configuration against the tensors: the model is first built on the ``meta`` device (shapes,
  no memory) and compared key by key, so sizes a file declares are never allocated before they
  are known to match its tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ouromamba_fx.errors import CheckpointError
from ouromamba_fx.models.catalog import config_for
from ouromamba_fx.models.vim import VimConfig, VisionMamba
from ouromamba_fx.version import QUANTIZED_META_KEY, SYNTHETIC_FORMAT

EXPECTED = "a Vision Mamba checkpoint: a .pth/.pt state dict (torch.save) or a .safetensors file"
SIDE_JSON_LIMIT = 1 << 24  # bytes of a .safetensors file's .json side file
_SAFETENSORS_HEADER_LIMIT = 100 << 20  # the safetensors reader's own limit on the JSON header


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the state dict and what it says about the model."""

    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # "config", "args", "mean", "std", "classes", ...
    path: str = ""


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path.name}: {what}")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a ``.pt``/``.pth`` (hustvl layout or a plain state dict) or ``.safetensors`` file.

    A ``.safetensors`` file may have a ``<same name>.json`` beside it with its metadata.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; expected {EXPECTED}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file; expected {EXPECTED}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise _fail(path, f"the file is empty; expected {EXPECTED}")
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        sd, meta = _read_safetensors(path, head, size)
    elif head[:4] == b"PK\x03\x04":
        sd, meta = _read_torch_zip(path, size)
    elif head[:1] == b"\x80":
        raise _fail(path, "a legacy (pre-zip) torch pickle: its reader allocates whatever sizes the "
                          "file declares before reading them, so it is not read here. Re-save it where "
                          "you trust it (torch.save(torch.load(f), f2) with torch >= 1.6) or as safetensors")
    else:
        raise _fail(path, f"not a checkpoint (neither a torch zip file nor safetensors; it starts "
                          f"with {head[:8]!r}); expected {EXPECTED}")
    return Checkpoint(_check_tensors(path, sd), meta, str(path))


def _read_safetensors(path: Path, head: bytes, size: int) -> tuple[dict, dict]:
    from safetensors import safe_open

    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if size < 10 or not 2 <= n <= min(size - 8, _SAFETENSORS_HEADER_LIMIT):
        raise _fail(path, f"not a safetensors file (a {size}-byte file whose first 8 bytes declare a "
                          f"{n}-byte header); expected {EXPECTED}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            file_meta = f.metadata() or {}
            _refuse_other_ouromamba_files(path, file_meta)
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError and whatever the reader raises
        raise _fail(path, f"not a readable safetensors file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected {EXPECTED}") from None
    side = path.with_suffix(".json")
    meta: dict = {}
    if side.exists():
        meta = _read_side_json(side)
    return sd, meta


def _refuse_other_ouromamba_files(path: Path, file_meta: dict) -> None:
    if QUANTIZED_META_KEY in file_meta:
        raise _fail(path, "a quantized model saved by ouromamba-fx, not a float checkpoint: load it "
                          "with ouromamba_fx.load(path) (command line: --quantized FILE)")
    if file_meta.get("format") == SYNTHETIC_FORMAT:
        raise _fail(path, "synthetic calibration images written by 'ouromamba-fx gen', not a "
                          "checkpoint: pass it as calibration data (--calib FILE, or "
                          "ouromamba_fx.SyntheticCalib.load(path))")


def _read_side_json(side: Path) -> dict:
    if not side.is_file():
        raise CheckpointError(f"{side.name}: the metadata beside the checkpoint is not a file")
    if side.stat().st_size > SIDE_JSON_LIMIT:
        raise CheckpointError(f"{side.name}: {side.stat().st_size} bytes of metadata; a checkpoint's "
                              f".json side file holds at most {SIDE_JSON_LIMIT} (config, classes, mean, std)")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{side.name}: the metadata beside the checkpoint is not valid JSON "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{side.name}: expected a JSON object (config, classes, mean, std), "
                              f"found {type(meta).__name__}")
    return meta


def _check_zip(path: Path, size: int) -> None:
    """The zip directory of a torch checkpoint: every entry stored uncompressed within the file."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise _fail(path, f"a damaged or truncated zip file ({e}); expected {EXPECTED}") from None
    if not any(i.filename.endswith("data.pkl") for i in infos):
        raise _fail(path, f"a zip file without data.pkl: not a torch.save checkpoint; expected {EXPECTED}")
    total = 0
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size:
            raise _fail(path, f"zip entry {i.filename[:80]!r} is compressed; torch.save stores entries "
                              f"uncompressed (not a torch checkpoint, or altered)")
        total += i.file_size
        if i.header_offset + i.file_size > size or total > size:
            raise _fail(path, f"zip entry {i.filename[:80]!r} declares {i.file_size} bytes beyond the "
                              f"file's {size} (truncated or altered)")


def _read_torch_zip(path: Path, size: int) -> tuple[dict, dict]:
    _check_zip(path, size)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            detail = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                          text.splitlines()[0])
            raise _fail(path, f"refusing to unpickle it: it holds objects other than tensors, plain "
                              f"containers and argparse.Namespace, and loading them could run arbitrary "
                              f"code. Re-save the weights alone (torch.save(model.state_dict(), ...)) or as "
                              f"safetensors. torch said: {detail[:200]}") from None
        raise _fail(path, f"cannot be unpickled ({text.splitlines()[0][:200] if text else 'UnpicklingError'}); "
                          f"expected {EXPECTED}") from None
    except Exception as e:  # noqa: BLE001 - torch's reader raises RuntimeError, EOFError, KeyError...
        raise _fail(path, f"cannot be read as a torch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected {EXPECTED}") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a dict (a state dict, or one holding it under 'model'), found "
                          f"{type(obj).__name__}")
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            sd, meta = obj[key], {k: v for k, v in obj.items() if k != key}
            break
    else:
        sd, meta = obj, {}
    if isinstance(meta.get("args"), argparse.Namespace):
        meta["args"] = vars(meta["args"])
    return sd, meta


def _check_tensors(path: Path, sd) -> dict[str, torch.Tensor]:
    """String keys (``module.`` prefixes dropped) to dense, finite floating-point tensors."""
    if not isinstance(sd, dict) or not sd:
        raise _fail(path, "no state dict of tensors found")
    bad_keys = [k for k in sd if not isinstance(k, str)]
    if bad_keys:
        raise _fail(path, f"state dict keys must be strings, found {[repr(k)[:40] for k in bad_keys[:5]]}")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise _fail(path, f"no state dict of tensors found: {len(not_tensors)} entries are not tensors "
                          f"({', '.join(repr(k[:60]) for k in not_tensors[:8])})")
    odd = [f"{k} ({v.dtype}, {v.layout})" for k, v in sd.items()
           if v.layout != torch.strided or v.is_quantized or not v.is_floating_point()]
    if odd:
        raise _fail(path, f"{len(odd)} tensors are not dense floating point, as every Vision Mamba "
                          f"weight is: {'; '.join(odd[:5])}")
    non_finite = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
    if non_finite:
        raise _fail(path, f"{len(non_finite)} tensors hold NaN or infinite values "
                          f"({', '.join(non_finite[:5])}); the checkpoint is damaged or from a diverged run")
    out = {k.removeprefix("module."): v for k, v in sd.items()}
    if len(out) != len(sd):
        raise _fail(path, "the same key appears with and without a 'module.' prefix")
    return out


# -------------------------------------------------------------------------------------------------
# The configuration

def _hint_int(where: str, hints: dict, key: str, lo: int, hi: int) -> int | None:
    v = hints.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise CheckpointError(f"{where}: {key} must be an integer, got {type(v).__name__}")
    try:
        iv = int(v)
        if isinstance(v, float) and v != iv:
            raise ValueError
    except (ValueError, OverflowError):
        raise CheckpointError(f"{where}: {key} must be an integer, got {str(v)[:40]!r}") from None
    if not lo <= iv <= hi:
        raise CheckpointError(f"{where}: {key}={iv} is out of range [{lo}, {hi}]")
    return iv


def _hint_bool(where: str, hints: dict, key: str, default: bool) -> bool:
    v = hints.get(key, default)
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    raise CheckpointError(f"{where}: {key} must be true or false, got {str(v)[:40]!r}")


def _floats(where: str, key: str, v, n: int, positive: bool) -> tuple[float, ...]:
    ok = (isinstance(v, (list, tuple)) and len(v) == n
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))
    if not ok or (positive and min(v) <= 0):
        need = f"{n} finite numbers" + (" > 0" if positive else "")
        raise CheckpointError(f"{where}: {key} must be {need} (one per input channel), got {str(v)[:60]}")
    return tuple(float(x) for x in v)


def _shape(where: str, sd: dict, key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{where}: not a Vision Mamba state dict (no {key!r})")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"{where}: {key} has shape {shape}; a Vision Mamba's is {ndim}-dimensional "
                              f"and not empty")
    return shape


def config_from_checkpoint(ckpt: Checkpoint) -> VimConfig:
    """Infer a :class:`VimConfig` from tensor shapes plus the file's own config or hustvl args."""
    sd, meta = ckpt.state_dict, ckpt.meta
    where = Path(ckpt.path).name or "checkpoint"
    hints = _hints(where, meta)
    cfg = _layer_shapes(where, sd)
    cfg.update(_grid(where, sd, hints, cfg["embed_dim"], cfg["patch_size"]))
    # hustvl's released models all put the class token in the middle; a file can say otherwise.
    if "cls_token" not in sd:
        cfg["cls_position"] = "none"
    else:
        cfg["cls_position"] = "middle" if _hint_bool(where, hints, "use_middle_cls_token", True) else "head"
    cfg["divide_out"] = _hint_bool(where, hints, "if_divide_out", _hint_bool(where, hints, "if_devide_out", True))
    cfg["bimamba"] = "layers.0.mixer.A_b_log" in sd
    cfg["num_classes"] = _num_classes(where, sd, cfg["embed_dim"])
    cfg.update(_preprocessing(where, meta, hints, cfg))
    try:
        return VimConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _hints(where: str, meta: dict) -> dict:
    """The file's settings: hustvl's ``args`` overridden by a ``config`` mapping."""
    for key in ("args", "config"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise CheckpointError(f"{where}: {key!r} must be a mapping of settings, got {type(meta[key]).__name__}")
    hints = {**(meta.get("args") or {}), **(meta.get("config") or {})}
    if isinstance(hints.get("input_size"), (list, tuple)) and len(hints["input_size"]) == 3:
        hints["input_size"] = hints["input_size"][-1]  # timm's (C, H, W)
    return hints


def _layer_shapes(where: str, sd: dict) -> dict:
    """Widths, kernel sizes and depth, from the shapes of the patch embedding and the first mixer."""
    embed_dim, in_chans, patch, patch_w = _shape(where, sd, "patch_embed.proj.weight", 4)
    if patch != patch_w:
        raise CheckpointError(f"{where}: patch_embed.proj.weight has a {patch}x{patch_w} kernel; only square "
                              f"patches are supported")
    d_inner, d_state = _shape(where, sd, "layers.0.mixer.A_log", 2)
    if d_inner % embed_dim:
        raise CheckpointError(f"{where}: the mixers' inner width {d_inner} is not a multiple of the "
                              f"embedding width {embed_dim}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    depth = max(layers) + 1
    if len(layers) != depth:  # before anything is built from depth
        missing = sorted(set(range(depth)) - layers)
        raise CheckpointError(f"{where}: layers {missing[:10]} are missing (the file has layer keys up to "
                              f"{depth - 1}, {len(layers)} layers in all)")
    return dict(embed_dim=embed_dim, in_chans=in_chans, patch_size=patch, depth=depth, d_state=d_state,
                expand=d_inner // embed_dim, d_conv=_shape(where, sd, "layers.0.mixer.conv1d.weight", 3)[-1],
                dt_rank=_shape(where, sd, "layers.0.mixer.dt_proj.weight", 2)[1])


def _grid(where: str, sd: dict, hints: dict, embed_dim: int, patch: int) -> dict:
    """``img_size`` and ``stride`` from the position embedding's square patch grid and the file's hints."""
    one, n_pos, pos_dim = _shape(where, sd, "pos_embed", 3)
    if one != 1 or pos_dim != embed_dim:
        raise CheckpointError(f"{where}: pos_embed has shape {(one, n_pos, pos_dim)}, expected (1, tokens, "
                              f"{embed_dim})")
    has_cls = "cls_token" in sd
    name = hints.get("model", "")
    name = name if isinstance(name, str) else ""
    stride = _hint_int(where, hints, "stride", 1, patch) or (8 if "stride8" in name and patch >= 8 else patch)
    side = math.isqrt(max(n_pos - has_cls, 0))
    if side * side != n_pos - has_cls:
        raise CheckpointError(f"{where}: pos_embed has {n_pos} positions, not a square grid of patches"
                              f"{' plus a class token' if has_cls else ''}")
    grid_img = (side - 1) * stride + patch
    img_size = _hint_int(where, hints, "img_size", 1, 1 << 16) or _hint_int(where, hints, "input_size", 1, 1 << 16)
    if img_size is None:
        img_size = grid_img
    elif img_size != grid_img:
        raise CheckpointError(f"{where}: the file says img_size {img_size}, but pos_embed holds a "
                              f"{side}x{side} patch grid (img_size {grid_img} with patch {patch}, stride {stride})")
    return dict(img_size=img_size, stride=stride if stride != patch else None)


def _num_classes(where: str, sd: dict, embed_dim: int) -> int:
    head = sd.get("head.weight")
    if head is None:
        return 0
    if head.dim() != 2 or head.shape[1] != embed_dim:
        raise CheckpointError(f"{where}: head.weight has shape {tuple(head.shape)}, expected "
                              f"(classes, {embed_dim})")
    return head.shape[0]


def _preprocessing(where: str, meta: dict, hints: dict, cfg: dict) -> dict:
    """Normalisation, class names and crop fraction, checked against the channels and classes."""
    out = {}
    for key in ("mean", "std"):
        if meta.get(key) is not None:
            out[key] = _floats(where, key, meta[key], cfg["in_chans"], key == "std")
    classes = meta.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise CheckpointError(f"{where}: classes must be a list of names, got {str(classes)[:60]}")
        if classes and len(classes) != cfg["num_classes"]:
            raise CheckpointError(f"{where}: {len(classes)} class names for a head of {cfg['num_classes']} classes")
        out["classes"] = classes
    if "crop_pct" in hints:
        crop = hints["crop_pct"]
        if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
            raise CheckpointError(f"{where}: crop_pct must be a number in (0, 1], got {str(crop)[:40]!r}")
        out["crop_pct"] = float(crop)
    elif cfg["img_size"] <= 64:  # small-image (CIFAR-style) models are evaluated uncropped
        out["crop_pct"] = 1.0
    return out


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists every missing, unexpected or
    mis-shaped key by name. ``model`` may be on the ``meta`` device: then only the check runs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
        parts.append("Check that the checkpoint is for this architecture and configuration.")
        raise CheckpointError("\n  ".join(parts))
    if not any(t.is_meta for t in own.values()):
        model.load_state_dict(sd, strict=True)


def load(checkpoint: str | Path, name: str | None = None, **overrides) -> VisionMamba:
    """Build a :class:`VisionMamba` for ``checkpoint`` and load its weights strictly.

    Args:
        checkpoint: hustvl/Vim ``.pth``, a plain state-dict file, or ``.safetensors``.
        name: optional registered model name (e.g. ``"vim_small_patch16_224"``); the checkpoint's
            shapes must agree with it.
        overrides: :class:`VimConfig` fields to set (e.g. ``mean``/``std`` the file does not say).

    Example:
        >>> model = load("vim_s_midclstok_80p5acc.pth", name="vim_small_patch16_224")  # doctest: +SKIP
    """
    if name is not None:
        expected = config_for(name)  # an unknown name is an error before the file is read
    ckpt = read_checkpoint(checkpoint)
    cfg = config_from_checkpoint(ckpt)
    source = Path(checkpoint).name
    if name is not None:
        arch = ("img_size", "patch_size", "embed_dim", "depth", "d_state", "expand", "bimamba")
        diff = [f"{f}: checkpoint {getattr(cfg, f)} vs {name} {getattr(expected, f)}"
                for f in arch if getattr(cfg, f) != getattr(expected, f)]
        if diff:
            raise CheckpointError(f"{source} is not a {name}: " + "; ".join(diff))
    if overrides:
        known = {f.name for f in fields(VimConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"load(): unknown VimConfig fields {bad}; known: {sorted(known)}")
        cfg = VimConfig(**{**cfg.to_dict(), **overrides})
    with torch.device("meta"):  # shapes first: nothing the file declares is allocated unchecked
        load_state_dict_strict(VisionMamba(cfg), ckpt.state_dict, source)
    model = VisionMamba(cfg)
    load_state_dict_strict(model, ckpt.state_dict, source)
    return model.eval()
