"""A float model's identity (class, architecture config, weights fingerprint), and rebuilding a
model of a known architecture from that identity alone.

A quantized file records the identity of the model it came from; loading it either checks a
model the user passes against the fingerprint, or rebuilds the architecture (random weights:
every tensor of the quantized graph comes from the file) for the classes in
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from ouromamba_fx.models.mamba_blocks import MambaStack, MambaStackConfig
from ouromamba_fx.models.mambavision import MambaVision, MambaVisionConfig
from ouromamba_fx.models.vim import VimConfig, VisionMamba
from ouromamba_fx.models.vmamba import VSSM, VMambaConfig
from ouromamba_fx.plaindata import PlainDataError, from_plain

#: Classes :func:`rebuild` can build from an architecture config: class path -> (class, config
#: dataclass). Each class takes its config as the first argument and has a static
#: ``largest_activation(cfg)`` (elements of the largest tensor one image's forward pass makes).
ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    "ouromamba_fx.models.vim.VisionMamba": (VisionMamba, VimConfig),
    "ouromamba_fx.models.vmamba.VSSM": (VSSM, VMambaConfig),
    "ouromamba_fx.models.mambavision.MambaVision": (MambaVision, MambaVisionConfig),
    "ouromamba_fx.models.mamba_blocks.MambaStack": (MambaStack, MambaStackConfig),
}

#: One image's largest activation a rebuilt model may have (elements): 1 GiB in fp32, about
#: 50 times a Vim-B forward pass at 224 px.
MAX_ACTIVATION = 2**28


def class_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous().reshape(-1)  # 0-dim tensors (BatchNorm's counter) too
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def model_identity(model: nn.Module, name: str | None = None) -> dict:
    """What a saved file says about the float model it came from."""
    cfg = getattr(model, "cfg", None)
    pcfg = getattr(model, "pretrained_cfg", None)
    return {"class": class_path(model), "name": name or type(model).__name__,
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
            "pretrained_cfg": dict(pcfg) if isinstance(pcfg, dict) else None,
            "fingerprint": model_fingerprint(model)}


def rebuild(cls_path: str, config: dict | None, max_bytes: int) -> nn.Module:
    """A model of architecture ``cls_path`` with ``config`` (random weights), checked before
    anything is allocated: the config is typed and validated, the parameters (counted on the
    ``meta`` device) take at most ``max_bytes`` in fp32, and one image's largest activation at
    most :data:`MAX_ACTIVATION` elements. Raises ``ValueError`` naming the problem."""
    if cls_path not in ARCHITECTURES:
        raise ValueError(f"ouromamba-fx cannot rebuild a {cls_path!r} by itself (it rebuilds "
                         f"{', '.join(ARCHITECTURES)}): pass the float model, load(path, model=...)")
    cls, cfg_cls = ARCHITECTURES[cls_path]
    try:
        cfg = from_plain(cfg_cls, config, "model config")
    except PlainDataError as e:
        raise ValueError(str(e)) from None
    if cls.largest_activation(cfg) > MAX_ACTIVATION:
        raise ValueError(f"model config: one image would need a {cls.largest_activation(cfg):,}-element "
                         f"activation (at most {MAX_ACTIVATION:,}); pass the float model with model=...")
    with torch.device("meta"):
        nbytes = sum(p.numel() * 4 for p in cls(cfg).parameters())
    if nbytes > max_bytes:
        raise ValueError(f"model config describes {nbytes:,} bytes of fp32 parameters, more than the "
                         f"file's tensors can hold ({max_bytes:,})")
    return cls(cfg).eval()
