"""Ahead-of-time compilation of a Triton kernel for an NVIDIA GPU, without a GPU (triton ships ptxas).

It catches what the interpreter does not check: that the kernel lowers to PTX and assembles for the
target (tile shapes ``tl.dot`` accepts, float64 math, atomics, register allocation). Pointers are
declared 16-byte aligned, as torch allocations are, so the code compiled is the code a launch gets.
"""

from __future__ import annotations

import pytest


def nvidia_backend():
    """Skips the calling test when this triton has no NVIDIA backend."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")


def compile_ptx(kernel, arch: int, config, constexprs: dict, pointer_types: dict, floats=(),
                fp_fusion: bool = True) -> str:
    """PTX of ``kernel`` (a JITFunction or an autotuned one) for ``sm_<arch>`` with ``config``'s
    meta-parameters, warps and stages; ``pointer_types``: arguments ending in ``_ptr`` that are not
    ``*fp32``; ``floats``: scalar arguments that are fp32 (the other scalars are i32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)
    consts = {**constexprs, **config.kwargs}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    unknown = set(pointer_types) - set(fn.arg_names)
    assert not unknown, f"not arguments of {fn.__name__}: {unknown}"
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                       "enable_fp_fusion": fp_fusion})
    return compiled.asm["ptx"]


def largest(configs, size):
    """The config with the largest tile (``size(config)``), more warps breaking ties."""
    return max(configs, key=lambda c: (size(c), c.num_warps, c.num_stages))
