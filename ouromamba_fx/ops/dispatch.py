"""The ops' CUDA implementations in one table, and a switch that runs them on CPU tensors.

Each op module registers its CUDA implementation with :func:`register_cuda`, which hands it to
``torch.library`` for the ``cuda`` dispatch key and records it in :data:`CUDA_KERNELS` (qualified
op name -> function). The implementations launch Triton kernels
(:mod:`ouromamba_fx.kernels.triton`, imported on first use, so the package works where triton is
absent).

:func:`cuda_kernels_on_cpu` is for tests and debugging: inside it, every ``ouromamba::`` op that has
a CUDA implementation runs that implementation on its CPU tensors, the Triton kernels interpreted.
A whole lowered model then runs the GPU path on a machine without a GPU::

    with cuda_kernels_on_cpu() as calls:     # in a process started with TRITON_INTERPRET=1
        y = lowered(x)
    calls.summary()   # {"ouromamba::w8a8_linear": (calls, calls that launched a Triton kernel), ...}

Triton reads ``TRITON_INTERPRET`` when a kernel's decorator runs, i.e. when the kernels are
imported, so it has to be set in the environment before that (when Python starts). Inside the
block, the plain-torch parts of a lowered graph make the choices they make on a GPU too
(:func:`on_cuda`): e.g. the decomposed integer linears follow cuBLAS's shape rules.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CUDA_KERNELS", "register_cuda", "cuda_kernels_on_cpu", "on_cuda", "OpCalls"]

#: qualified op name (``ouromamba::w8a8_linear``) -> the function registered for CUDA tensors
CUDA_KERNELS: dict[str, Callable] = {}

_ON_CPU: ContextVar[bool] = ContextVar("ouromamba_cuda_kernels_on_cpu", default=False)


def register_cuda(op) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` is the CUDA implementation of custom op ``op`` (a ``torch.library``
    custom op). Returns ``fn`` unchanged."""
    def deco(fn: Callable) -> Callable:
        op.register_kernel("cuda")(fn)
        CUDA_KERNELS[op._qualname] = fn
        return fn
    return deco


def on_cuda(t: Tensor) -> bool:
    """Whether code working on ``t`` should decide as on a GPU: ``t`` is a CUDA tensor, or a
    :func:`cuda_kernels_on_cpu` block is running."""
    return t.is_cuda or _ON_CPU.get()


@dataclass
class OpCalls:
    """What ran inside a :func:`cuda_kernels_on_cpu` block: one entry per op call, in order, with
    the Triton kernels it launched."""

    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def summary(self) -> dict[str, tuple[int, int]]:
        """op -> (calls, calls that launched at least one Triton kernel)."""
        out: dict[str, tuple[int, int]] = {}
        for name, kernels in self.calls:
            n, hit = out.get(name, (0, 0))
            out[name] = (n + 1, hit + bool(kernels))
        return out

    def kernels(self) -> dict[str, int]:
        """Triton kernel -> launches."""
        out: dict[str, int] = {}
        for _, kernels in self.calls:
            for k in kernels:
                out[k] = out.get(k, 0) + 1
        return out


class _CudaKernelsOnCpu(TorchDispatchMode):
    def __init__(self, calls: OpCalls) -> None:
        super().__init__()
        self.record = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        fn = CUDA_KERNELS.get(name) if func._overloadname == "default" else None
        if fn is None:
            return func(*args, **kwargs)
        from ouromamba_fx.kernels.triton.common import record_launches

        with record_launches() as launched:
            out = fn(*args, **kwargs)
        self.record.calls.append((name, tuple(launched)))
        return out


@contextlib.contextmanager
def cuda_kernels_on_cpu() -> Iterator[OpCalls]:
    """Run the ops' CUDA implementations on CPU tensors inside the block (module docstring); yields
    the :class:`OpCalls` record. ``RuntimeError`` when the Triton kernels are not interpreted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ouromamba_fx.ops.dispatch.cuda_kernels_on_cpu runs Triton kernels on CPU tensors, which "
                           "needs the Triton interpreter: start Python with TRITON_INTERPRET=1 in the environment")
    from ouromamba_fx.kernels.triton import common

    if not common.INTERPRET:
        raise RuntimeError("ouromamba_fx.ops.dispatch.cuda_kernels_on_cpu: the Triton kernels were imported before "
                           "TRITON_INTERPRET=1 was set, so they are compiled for a GPU; set it when Python starts")
    calls = OpCalls()
    token = _ON_CPU.set(True)
    try:
        with _CudaKernelsOnCpu(calls):
            yield calls
    finally:
        _ON_CPU.reset(token)
