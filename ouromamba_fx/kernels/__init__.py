"""Kernels of the lowering, one family per module, each beside a plain-torch twin (``*_ref``).

* ``scan_ref``: the plain-torch selective scan (numerical reference of the fused scan kernels).
* ``quantize``: Triton per-row (per-token) quantization and the inlier/outlier split.
* ``int8_gemm``: Triton int8 x int8 -> int32 GEMM with a fused dequantization epilogue.
* ``int4_gemm``: Triton GEMM on int4 weights packed two per byte (nibbles unpacked in the kernel),
  with an optional second, 8-bit outlier activation operand.

The Triton modules import ``triton`` at import time; :mod:`ouromamba_fx.lowering.qlinear` imports
them only when a CUDA tensor reaches one of its ops.
"""
