"""Triton kernels (GPU; also run on CPU tensors under ``TRITON_INTERPRET=1``), one family per module,
each beside a plain-torch twin (``*_ref``) with the same arguments. Importing a module imports
``triton``; the ops import them only when a CUDA tensor reaches them."""
