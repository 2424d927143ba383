"""The compiler: from the reference quantized graph to fused ops.

``rules`` (one rewrite each: what to match, what to build), ``lower`` (their order and options,
``lower_graph``) and ``backend`` (``torch.compile(q, backend="ouromamba")``: freeze, lower,
Inductor). The ops the rules emit live in :mod:`ouromamba_fx.ops`.
"""
