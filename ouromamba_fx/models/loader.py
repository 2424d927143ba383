"""Loading Vision Mamba checkpoints safely and strictly.

hustvl/Vim's released files are dicts with the weights under ``"model"`` and an
``argparse.Namespace`` under ``"args"``; ``torch.load(weights_only=True)`` refuses them as they
are. We allow exactly ``argparse.Namespace`` on top of torch's weights-only allow-list, so no
arbitrary pickled code runs. The model's configuration is read from the tensors' shapes, refined by
whatever the file says (a ``"config"`` dict, hustvl's ``args``), and checked against a registered
model name when one is given.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from ouromamba_fx.errors import CheckpointError
from ouromamba_fx.models.vim import VimConfig, VisionMamba


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the state dict and what it says about the model."""

    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # "config", "args", "mean", "std", "classes", ...
    path: str = ""


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a ``.pt``/``.pth`` (hustvl layout or a plain state dict) or ``.safetensors`` file.

    A ``.safetensors`` file may have a ``<same name>.json`` beside it with its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
        side = path.with_suffix(".json")
        meta = json.loads(side.read_text()) if side.is_file() else {}
        return Checkpoint(sd, meta, str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path.name}: refusing to unpickle it: it holds objects other than tensors, plain "
            f"containers and argparse.Namespace, and loading them could run arbitrary code. "
            f"Re-save the weights alone (torch.save(model.state_dict(), ...)) or as safetensors. "
            f"torch said: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: expected a dict, found {type(obj).__name__}")
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            sd, meta = obj[key], {k: v for k, v in obj.items() if k != key}
            break
    else:
        sd, meta = obj, {}
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path.name}: no state dict of tensors found (keys: {sorted(obj)[:8]})")
    if isinstance(meta.get("args"), argparse.Namespace):
        meta["args"] = vars(meta["args"])
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return Checkpoint(sd, meta, str(path))


def config_from_checkpoint(ckpt: Checkpoint) -> VimConfig:
    """Infer a :class:`VimConfig` from tensor shapes plus the file's own config or hustvl args."""
    sd, meta = ckpt.state_dict, ckpt.meta
    hints = {**(meta.get("args") or {}), **(meta.get("config") or {})}
    name = str(hints.get("model", ""))
    try:
        proj = sd["patch_embed.proj.weight"]
        d_inner, d_state = sd["layers.0.mixer.A_log"].shape
        n_pos = sd["pos_embed"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{Path(ckpt.path).name}: not a Vision Mamba state dict "
                              f"(no {e.args[0]!r})") from None
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    has_cls = "cls_token" in sd
    stride = int(hints.get("stride") or (8 if "stride8" in name else patch))
    if hints.get("img_size") or hints.get("input_size"):
        img_size = int(hints.get("img_size") or hints["input_size"])
    else:
        side = round((n_pos - has_cls) ** 0.5)
        img_size = (side - 1) * stride + patch
    # hustvl's released models all put the class token in the middle; a file can say otherwise.
    if not has_cls:
        cls_position = "none"
    else:
        cls_position = "middle" if hints.get("use_middle_cls_token", True) else "head"
    divide_out = bool(hints.get("if_divide_out", hints.get("if_devide_out", True)))
    head = sd.get("head.weight")
    cfg = dict(
        img_size=img_size, patch_size=patch, stride=stride if stride != patch else None,
        embed_dim=embed_dim, depth=depth, d_state=d_state, expand=d_inner // embed_dim,
        d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
        dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1], in_chans=in_chans,
        num_classes=head.shape[0] if head is not None else 0, cls_position=cls_position,
        bimamba="layers.0.mixer.A_b_log" in sd, divide_out=divide_out,
    )
    for key in ("mean", "std", "classes"):
        if meta.get(key) is not None:
            cfg[key] = meta[key]
    if "crop_pct" in hints:
        cfg["crop_pct"] = float(hints["crop_pct"])
    elif img_size <= 64:  # small-image (CIFAR-style) models are evaluated uncropped
        cfg["crop_pct"] = 1.0
    return VimConfig(**cfg)


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists every missing, unexpected or
    mis-shaped key by name."""
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
    ckpt = read_checkpoint(checkpoint)
    cfg = config_from_checkpoint(ckpt)
    if name is not None:
        from ouromamba_fx.models.registry import config_for

        expected = config_for(name)
        arch = ("img_size", "patch_size", "embed_dim", "depth", "d_state", "expand", "bimamba")
        diff = [f"{f}: checkpoint {getattr(cfg, f)} vs {name} {getattr(expected, f)}"
                for f in arch if getattr(cfg, f) != getattr(expected, f)]
        if diff:
            raise CheckpointError(f"{Path(checkpoint).name} is not a {name}: " + "; ".join(diff))
    if overrides:
        known = {f.name for f in fields(VimConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"load(): unknown VimConfig fields {bad}; known: {sorted(known)}")
        cfg = VimConfig(**{**cfg.to_dict(), **overrides})
    model = VisionMamba(cfg)
    load_state_dict_strict(model, ckpt.state_dict, Path(checkpoint).name)
    return model.eval()
