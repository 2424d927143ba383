"""int4 weights packed two per byte (plain torch, exact round trip).

Layout: two's-complement nibbles; byte ``j`` of a row holds column ``2j`` in its low nibble and
column ``2j + 1`` in its high nibble; for odd K the last high nibble is 0. The Triton GEMM
(:mod:`ouromamba_fx.kernels.triton.w4a4o8_gemm`) reads this layout directly, through any strides.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_int4(w_q: Tensor) -> Tensor:
    """Pack int8 values in [-8, 7] of shape (N, K) into uint8 (N, ceil(K / 2)), two per byte."""
    if w_q.dim() != 2 or w_q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects an int8 (N, K) tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if w_q.numel() and (int(w_q.min()) < -8 or int(w_q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(w_q.min())}, {int(w_q.max())}]")
    n, k = w_q.shape
    w = w_q.to(torch.int16)
    if k % 2:
        w = torch.cat([w, w.new_zeros(n, 1)], dim=1)
    lo = w[:, 0::2] & 0xF
    hi = w[:, 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(w_packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (N, ceil(k / 2)) -> int8 (N, k) in [-8, 7]."""
    check_packed(w_packed, k)
    # Sign extension by arithmetic right shifts on int8: the high nibble is byte >> 4, the low one
    # is moved up first (a uint8 shift, modulo 256) and shifted back. Three ops and no int16
    # temporary, as the W4A4O8 ops unpack on every call.
    lo = (w_packed << 4).view(torch.int8) >> 4
    hi = w_packed.view(torch.int8) >> 4
    w = torch.stack([lo, hi], dim=-1).reshape(w_packed.shape[0], 2 * w_packed.shape[1])
    return w if w.shape[1] == k else w[:, :k].contiguous()


def check_packed(w_packed: Tensor, k: int) -> None:
    if w_packed.dim() != 2 or w_packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 weight must be uint8 (N, ceil(K/2)), got {w_packed.dtype} "
                         f"{tuple(w_packed.shape)}")
    if not isinstance(k, int) or k < 0 or (k + 1) // 2 != w_packed.shape[1]:
        raise ValueError(f"k={k!r} does not match a packed weight with {w_packed.shape[1]} bytes per row "
                         f"(expected k in {{{2 * w_packed.shape[1] - 1}, {2 * w_packed.shape[1]}}})")


def dequantized_int4(w_packed: Tensor, w_scale: Tensor, k: int) -> Tensor:
    """The float (N, k) weight of packed int4 codes and their per-channel scales."""
    return unpack_int4(w_packed, k).float() * w_scale.detach().float().reshape(-1, 1)
