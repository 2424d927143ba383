"""Helpers shared by the Triton kernel modules: autotune config lists, the device guard, and the
float32 rounding the quantizing kernels share.

* :func:`autotune_configs` -- a kernel's full config list on a GPU; under ``TRITON_INTERPRET=1`` only
  its first entry (the interpreter has nothing to time, and every extra config would run the
  kernel again). Tests pin other entries by assigning the autotuned kernel's ``configs``.
* :func:`device_guard` -- ``torch.cuda.device(t.device)`` for a CUDA tensor (launches go to the
  tensor's GPU, not the current one), a no-op for CPU tensors (the interpreter).
* :func:`round_half_even` -- ``torch.round`` of a float32 tile already clamped to ``|v| < 2**22``:
  ``(v + 1.5 * 2**23) - 1.5 * 2**23``. (``libdevice.rint`` would do on a GPU, but the interpreter
  has no libdevice.)
* :func:`tile_ids` -- grouped program order of a GEMM grid: ``GROUP_M`` row tiles share their
  column tiles while those are in L2; :func:`tile_offsets` -- the program's rows and columns and
  their bounds masks.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ouromamba_fx.numerics import EPS

__all__ = ["INTERPRET", "autotune_configs", "device_guard", "round_half_even", "tile_ids", "tile_offsets",
           "EPS"]

# Read where triton reads it: at import time, before the first launch.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` on a GPU; its first entry alone under the interpreter."""
    return configs[:1] if INTERPRET else configs


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s GPU current for a launch (nothing for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def round_half_even(v):
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows, columns, rows < M, columns < N) of this program's output tile."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N
