"""Kernels behind the ops of :mod:`ouromamba_fx.ops`, by device; nothing here knows about graphs.

* ``cpu/``: C++ kernels (``selective_scan.cpp``, ``selective_scan_q.cpp``, ``mixer_ops.cpp`` on the
  vector helpers of ``om_vec.h``), built on first use by :mod:`ouromamba_fx.kernels.cpu.build`.
* ``triton/``: Triton kernels for CUDA GPUs (also run on CPU tensors under ``TRITON_INTERPRET=1``),
  one family per module, each beside a plain-torch twin (``*_ref``) with the same arguments.
  Importing one imports ``triton``, so the ops import them only when a CUDA tensor reaches them.
"""
