"""Lowering of traced vision-Mamba graphs to fast kernels.

``ouromamba_fx.lowering.scan`` registers the ``ouromamba::selective_scan`` custom op (and its
backward, ``ouromamba::selective_scan_bwd``); importing it is enough to make
``torch.ops.ouromamba.selective_scan`` available.
"""
