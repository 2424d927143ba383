"""Helpers shared by the Triton kernel modules: autotune config lists, the launch (device guard and
record), and the float32 rounding the quantizing kernels share.

* :func:`autotune_configs` -- a kernel's full config list on a GPU; under ``TRITON_INTERPRET=1`` only
  its first entry (the interpreter has nothing to time, and every extra config would run the
  kernel again). Tests pin other entries by assigning the autotuned kernel's ``configs``.
* :func:`fit_tiles` -- an ``early_config_prune`` for autotuned kernels: drops configs whose tiles
  are larger than the problem.
* :func:`launch` -- every wrapper launches through it: ``kernel[grid](...)`` under
  :func:`device_guard` (``torch.cuda.device(t.device)`` for a CUDA tensor, so launches go to the
  tensor's GPU and not the current one; nothing for CPU tensors), after checking that CPU
  tensors meet an interpreted kernel; each launch is recorded for :func:`record_launches`.
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
from contextvars import ContextVar
from typing import Iterator

import torch
import triton
import triton.language as tl

from ouromamba_fx.numerics import EPS

__all__ = ["INTERPRET", "autotune_configs", "fit_tiles", "device_guard", "launch", "record_launches",
           "kernel_name", "is_interpreted", "round_half_even", "tile_ids", "tile_offsets", "EPS"]

# Read where triton reads it: at import time, before the first launch.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """``configs`` on a GPU; its first entry alone under the interpreter."""
    return configs[:1] if INTERPRET else configs


def fit_tiles(sizes: dict[str, str], floor: int = 16):
    """An ``early_config_prune`` keeping the configs whose tile ``sizes`` (meta-parameter -> the
    kernel argument it tiles, e.g. ``{"BLOCK_M": "M"}``) are at most the argument rounded up to a
    power of two (and at least ``floor``); the config with the smallest tiles when none fits."""
    def prune(configs, named_args, **kwargs):
        def fits(c):
            return all(c.kwargs[meta] <= max(floor, triton.next_power_of_2(int(named_args[arg])))
                       for meta, arg in sizes.items())
        kept = [c for c in configs if fits(c)]
        return kept or [min(configs, key=lambda c: [c.kwargs[meta] for meta in sizes])]
    return prune


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s GPU current for a launch (nothing for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _jit_function(kernel):
    """The ``@triton.jit`` object under autotuners and heuristics."""
    fn = kernel
    while not isinstance(fn, (triton.runtime.JITFunction, _interpreted_type())) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _interpreted_type():
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction


def kernel_name(kernel) -> str:
    """The Python name of a Triton kernel (through autotuners), e.g. ``_int8_gemm_kernel``."""
    fn = _jit_function(kernel)
    return getattr(getattr(fn, "fn", fn), "__name__", repr(kernel))


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    return isinstance(_jit_function(kernel), _interpreted_type())


_LAUNCHES: ContextVar[list | None] = ContextVar("ouromamba_triton_launches", default=None)


@contextlib.contextmanager
def record_launches() -> Iterator[list[str]]:
    """Collect the names of the kernels :func:`launch` runs inside the block (nested blocks each
    see their own launches; the outer one sees them too)."""
    outer = _LAUNCHES.get()
    mine: list[str] = []
    token = _LAUNCHES.set(mine)
    try:
        yield mine
    finally:
        _LAUNCHES.reset(token)
        if outer is not None:
            outer.extend(mine)


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on the device of the first tensor argument (see the module
    docstring). CPU tensors need an interpreted kernel (``TRITON_INTERPRET=1`` set before this
    package's kernels were imported): otherwise a ``RuntimeError`` says so, instead of Triton's
    own error about pointer arguments."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if not first.is_cuda and not is_interpreted(kernel):
        raise RuntimeError(
            f"ouromamba_fx.kernels.triton: {kernel_name(kernel)} got tensors on {first.device}; Triton kernels run "
            "on CUDA tensors, or on CPU tensors under the interpreter: set TRITON_INTERPRET=1 in the environment "
            "before the kernels are imported (e.g. when starting Python)")
    with device_guard(first):
        kernel[grid](*args, **meta)
    record = _LAUNCHES.get()
    if record is not None:
        record.append(kernel_name(kernel))


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
