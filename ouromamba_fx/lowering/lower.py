"""Lower a reference quantized graph to fused integer ops.

    >>> fast = q.lower()                      # a QuantizedModel running w8a8_linear / w4a4o8_linear ...  # doctest: +SKIP
    >>> print(fast.diff("quantize_activations", "lower_w8a8_linear"))                                  # doctest: +SKIP
    >>> y = torch.compile(q, backend="ouromamba")(x)   # the same rules on Dynamo's graph, then Inductor  # doctest: +SKIP

The rules live in :mod:`ouromamba_fx.lowering.rules`; :func:`lowering_passes` selects and orders
them and :func:`lower_graph` runs them with the package's pass manager (lint, recompile and a
snapshot after each rule, the failing rule named on error).
"""

from __future__ import annotations

from dataclasses import fields

import torch.fx as fx

from ouromamba_fx.lowering.rewrite import RewritePass
from ouromamba_fx.lowering.rules import LoweringOptions, lowering_rules
from ouromamba_fx.passes.base import Context, Pass, PassManager, Snapshot

#: The lowering options by name (the ``options=`` keys of the backend and of ``q.lower()``).
OPTION_NAMES = tuple(f.name for f in fields(LoweringOptions))


def lowering_passes(**options) -> list[Pass]:
    """The lowering pipeline for the :class:`~ouromamba_fx.lowering.rules.LoweringOptions` given by
    keyword (``TypeError`` for an unknown one):

    ``conv_silu`` (on): replace quantize -> conv1d -> slice -> SiLU (and a ``flip`` in front) by
    ``ouromamba::causal_conv1d_silu`` (one pass, channel-contiguous output for x_proj and the
    scan); off, the conv1d stays an mkldnn call between Inductor kernels.

    ``int8_conv2d`` (on): dense Conv2d (stems, downsampling, conv stages) with a symmetric
    activation scale per image row or per tensor as int8 im2col + integer GEMMs
    (:func:`~ouromamba_fx.ops.int8_conv2d.int8_conv2d_decomposed`), where one kernel row's
    reduction ``KW * C`` is at least ``conv2d_min_k`` (default 512; 0 takes every dense conv).
    The others stay float convs on the dequantized weights, each counted with its reason in the
    lowering log (``q.lower().log``): narrower convs (the float conv is faster there), depthwise /
    grouped convs, and every conv2d for ``target="cuda"`` (no Triton integer conv kernel).

    ``integer_scan`` (off): feed ``ouromamba::selective_scan_qi`` the int8 codes of delta/B/C
    instead of fake-quantized floats to the float scan. Same numbers up to float rounding; off by
    default because the float scan kernel is the faster one on the CPUs measured
    (``benchmarks/cpu_latency.md``).

    ``int8_inline`` (on): W8A8 linears as plain torch around ``torch._int_mm`` (Inductor fuses their
    quantization and epilogue) instead of the opaque ``w8a8_linear``/``int8_linear`` ops;
    ``int4_inline`` (on) likewise for W4A4O8 (two dense int8 GEMMs instead of the op's gathered
    one) when ``mixed_fused`` is off.

    ``mixed_fused`` (on): W4A4O8's run-time outlier channels in one C++ pass per activation
    (``ouromamba::w4a4o8_linear_rt`` for linears: mask, split, quantize, then the inlier GEMM and
    each token's outlier channels added in the epilogue; ``ouromamba::mixed_fake_quant`` for the
    scan's inputs, ``ouromamba::w4a4o8_linear_mixed`` for a dt_proj and the delta it feeds)
    instead of ``ouromamba::outlier_mask`` followed by plain-torch splitting.

    ``scan_cl`` (on): float scans whose output only reaches lowered linears (Vim's out_proj) write
    it channel-contiguous (``ouromamba::selective_scan_cl``), the layout those linears read.

    ``dt_scan`` (on): W8A8's dt_proj (the decomposed int8 linear of the x_proj output's dt columns)
    and the fake quantization of the delta it feeds, where the scan is their only reader, computed
    inside the scan (``ouromamba::selective_scan_dt``; the same numbers bit for bit) instead of a
    short-reduction GEMM and an epilogue pass over a (batch, L, d_inner) tensor; CPU targets only.
    Off, they stay as they are.

    ``conv_codes`` (on): where ``conv_silu`` made the mixer's conv an op and it feeds W8A8's
    decomposed x_proj (through the transpose to (batch, L, d_inner); a static scale per token or
    per tensor, int8 range), the conv also writes x_proj's int8 input codes
    (``ouromamba::causal_conv1d_silu_codes``) and x_proj runs on them
    (:func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed_codes`): the same numbers bit for
    bit, without a quantize pass over the conv's output; CPU targets only. Off, x_proj quantizes
    the conv's output itself.

    ``scan_combine`` (on): in a bidirectional (Vim) mixer the backward scan reads the gate ``z``
    time-reversed instead of a flipped copy (channel-contiguous scans: ``selective_scan_cl`` and
    ``selective_scan_dt``), and, where ``dt_scan`` fused it and out_proj is a W8A8 decomposed
    linear, writes out_proj's int8 input codes itself (``combine``: its output flipped,
    averaged with the forward scan's and quantized with the graph's operations in their order, the
    same codes bit for bit); out_proj then takes the codes. The flips, the mean and the quantization
    pass over the mixer's float output are gone (the codes: CPU targets only, as ``dt_scan``).

    ``inproj_epilogue`` (on): where ``conv_silu`` made the mixer's convs ops and a decomposed int8
    linear (in_proj) feeds them its first half through ``.transpose(1, 2).chunk(2, dim=1)``, the
    linear stops at its integer products
    (:func:`~ouromamba_fx.ops.int8_linear.int8_linear_decomposed_acc`) and the convs apply its
    epilogue ``((acc * x_scale) * w_scale) + bias`` as they load that half; the other half (Vim's
    z) goes the same way into the scans that read it as their gate (``selective_scan_dt`` /
    ``selective_scan_cl``, ``z_scale`` / ``z_wscale`` / ``z_bias``; rule ``fuse_z_epilogue``), or,
    where another op reads it, gets the epilogue alone (a pass over half the tensor, logged): the
    same numbers bit for bit, without the epilogue's pass over the linear's output; CPU targets
    only. Off, the linear runs its epilogue.

    ``target`` (``"auto"``: the device of the graph's weights; ``"cpu"``, ``"cuda"``): the device
    the lowered graph will run on. For ``"cuda"``, integer linears whose K or N cuBLAS's
    ``torch._int_mm`` refuses (not multiples of 8, e.g. Vim-T's x_proj and dt_proj) are not
    decomposed around it: they become the ops (the Triton int8 / W4A4O8 GEMMs), or, below
    ``SMALL_K`` input channels, an exact float GEMM of the codes. Lower with ``target="cuda"``
    when the model moves to a GPU afterwards (the decomposed linears check the shapes at run time
    too, so nothing fails either way; this only picks the faster path)."""
    return [RewritePass(rule) for rule in lowering_rules(LoweringOptions(**options))]


def lower_graph(gm: fx.GraphModule, passes: list[Pass] | None = None, ctx: Context | None = None,
                **options) -> tuple[fx.GraphModule, list[Snapshot], list[str]]:
    """Run the lowering rules on ``gm`` in place; returns (gm, snapshots, log lines)."""
    ctx = ctx if ctx is not None else Context(config=None, show_progress=False)
    pm = PassManager(passes if passes is not None else lowering_passes(**options))
    gm = pm.run(gm, ctx)
    return gm, pm.snapshots, ctx.log
