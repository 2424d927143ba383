"""Lowering of traced vision-Mamba graphs to fast kernels.

``ouromamba_fx.lowering.scan`` registers the ``ouromamba::selective_scan`` custom op (and its
backward, ``ouromamba::selective_scan_bwd``); importing it is enough to make
``torch.ops.ouromamba.selective_scan`` available.

From the reference quantized graph to fused integer ops: ``rules`` (one pattern each), ``lower``
(the pipeline, ``QuantizedModel.lower()``), ``fused`` (the plain-torch and custom-op building
blocks the rules emit) and ``backend`` (``torch.compile(q, backend="ouromamba")``).
"""
