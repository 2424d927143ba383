"""Argument checks shared by the linear ops' real and fake implementations (``ValueError`` naming
the argument, its shape and what was expected)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_float(name: str, t: Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")


def check_broadcast_scale(name: str, scale: Tensor, lead: tuple) -> None:
    """``scale`` is floating and broadcasts to ``(*lead, 1)``: one scale per row."""
    check_float(name, scale)
    target = torch.Size((*lead, 1))
    try:
        ok = torch.broadcast_shapes(scale.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(scale.shape)} does not broadcast to "
                         f"{tuple(target)} (one scale per row)")


def check_mask(mask: Tensor, x: Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(f"mask must be bool with x's shape {tuple(x.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")


def check_weight(w_scale: Tensor, bias: Optional[Tensor], n: int) -> None:
    """One weight scale per output channel (``(n,)`` or ``(n, 1)``) and a bias of ``(n,)`` or None."""
    check_float("w_scale", w_scale)
    if w_scale.numel() != n or w_scale.dim() > 2 or (w_scale.dim() == 2 and w_scale.shape[1] != 1):
        raise ValueError(f"w_scale must have one entry per output channel, shape ({n},) or ({n}, 1), "
                         f"got {tuple(w_scale.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
