"""Lower a reference quantized graph to fused integer ops.

    >>> fast = q.lower()                      # a QuantizedModel running w8a8_linear / w4a4o8_linear ...  # doctest: +SKIP
    >>> print(fast.diff("quantize_activations", "lower_w8a8_linear"))                                  # doctest: +SKIP
    >>> y = torch.compile(q, backend="ouromamba")(x)   # the same rules on Dynamo's graph, then Inductor  # doctest: +SKIP

The rules live in :mod:`ouromamba_fx.lowering.rules`; :func:`lowering_passes` orders them and
:func:`lower_graph` runs them with the package's pass manager (lint, recompile and a snapshot
after each rule, the failing rule named on error).
"""

from __future__ import annotations

import torch.fx as fx

from ouromamba_fx.lowering.rules import (ChannelsLastScan, FoldWeightDequant, FuseLinearMixedFakeQuant,
                                         InlineFakeQuant, InlineMixedFakeQuant, LowerConv1dSilu,
                                         LowerIntegerScan, LowerW4A4O8Linear, LowerW8A8Linear)
from ouromamba_fx.passes.base import Context, Pass, PassManager, Snapshot


def lowering_passes(conv_silu: bool = True, integer_scan: bool = False, int8_inline: bool = True,
                    int4_inline: bool = True, mixed_fused: bool = True, scan_cl: bool = True) -> list[Pass]:
    """The lowering pipeline. Linear rules first (they consume the quantize/dequantize pairs and
    weight dequantizations they fuse), then the scan, then what is left: the optional conv1d+SiLU
    fusion, the remaining pairs inlined as plain-torch fake quantization, and the remaining
    weight dequantizations folded into float constants.

    ``conv_silu``: replace quantize -> conv1d -> slice -> SiLU (and a ``flip`` in front) by the
    C++ op ``ouromamba::causal_conv1d_silu`` (one pass, channel-contiguous output for x_proj and
    the scan); off, the conv1d stays an mkldnn call between Inductor kernels.

    ``integer_scan``: feed ``ouromamba::selective_scan_qi`` the int8 codes of delta/B/C instead of
    fake-quantized floats to the float scan. Off by default on measurement: on this CPU the
    integer-input scan kernel is slower than the float scan kernel, and the whole W8A8 model ran
    faster with the float scan (reference model 70.9 vs 81.8 ms, Vim-S 2440 vs 2542 ms, batch
    16, one thread; ``benchmarks/cpu_latency.md``). Same numbers up to float rounding.

    ``int8_inline``: W8A8 linears as plain torch around ``torch._int_mm`` (Inductor fuses their
    quantization and epilogue) instead of the opaque ``w8a8_linear``/``int8_linear`` ops;
    ``int4_inline`` likewise for W4A4O8 (two dense int8 GEMMs instead of the op's gathered one)
    when ``mixed_fused`` is off.

    ``mixed_fused``: W4A4O8's run-time outlier channels in one C++ pass per activation
    (``ouromamba::w4a4o8_linear_rt`` for linears: mask, split, quantize, then the inlier GEMM and
    each token's outlier channels added in the epilogue; ``ouromamba::mixed_fake_quant`` for the
    scan's inputs, ``ouromamba::w4a4o8_linear_mixed`` for a dt_proj and the delta it feeds)
    instead of ``ouromamba::outlier_mask`` followed by plain-torch splitting.

    ``scan_cl``: float scans whose output only reaches lowered linears (Vim's out_proj) write it
    channel-contiguous (``ouromamba::selective_scan_cl``), the layout those linears read."""
    passes: list[Pass] = [LowerW8A8Linear(inline=int8_inline),
                          LowerW4A4O8Linear(inline=int4_inline, fused=mixed_fused)]
    if integer_scan:
        passes.append(LowerIntegerScan())
    if scan_cl:
        passes.append(ChannelsLastScan())
    if conv_silu:
        passes.append(LowerConv1dSilu())
    passes += [InlineFakeQuant(), InlineMixedFakeQuant(fused=mixed_fused)]
    if mixed_fused:
        passes.append(FuseLinearMixedFakeQuant())
    return passes + [FoldWeightDequant()]


def lower_graph(gm: fx.GraphModule, passes: list[Pass] | None = None, ctx: Context | None = None,
                **options) -> tuple[fx.GraphModule, list[Snapshot], list[str]]:
    """Run the lowering rules on ``gm`` in place; returns (gm, snapshots, log lines)."""
    ctx = ctx if ctx is not None else Context(config=None, show_progress=False)
    pm = PassManager(passes if passes is not None else lowering_passes(**options))
    gm = pm.run(gm, ctx)
    return gm, pm.snapshots, ctx.log
