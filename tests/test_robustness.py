"""Unusual and bad inputs: empty batches, non-finite images, other dtypes, gradients, the meta
device, 0-dim tensors in models, files that are not what they should be, and the CLI's answers
to user errors."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from ouromamba_fx.lowering.qlinear import pack_int4

OPS = torch.ops.ouromamba


# --- every custom op takes a batch of 0 rows ------------------------------------------------------

def _empty_batch_cases():
    """(name, op, args) with the batch axis of every activation of size 0 (weights, scales and
    other per-model tensors as in use)."""
    g = torch.Generator().manual_seed(0)
    b, length, c, n = 0, 9, 40, 6
    x = torch.randn(b, length, c, generator=g)
    s_in = torch.rand(length, generator=g) + 0.1
    wq = torch.randint(-8, 8, (n, c), dtype=torch.int8, generator=g)
    w4, w4s = pack_int4(wq), torch.rand(n, generator=g) * 0.01 + 1e-3
    w8, w8s, bias = wq * 9, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    small = torch.randn(b, length, 8, generator=g)  # K < SMALL_K: the float-GEMM CPU path
    w4_small = pack_int4(torch.randint(-8, 8, (n, 8), dtype=torch.int8, generator=g))
    rows = torch.randn(0, c, generator=g)
    mask = torch.zeros(0, c, dtype=torch.bool)
    # scan: u, delta (batch, d, L), A (d, N), B/C (batch, N, L)
    d, ns = 12, 4
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    A = -(torch.rand(d, ns, generator=g) + 0.1)
    B, C = torch.randn(b, ns, length, generator=g), torch.randn(b, ns, length, generator=g)
    D, z, dbias = torch.randn(d, generator=g), torch.randn(b, d, length, generator=g), torch.randn(d, generator=g)
    scan = (u, delta, A, B, C, D, z, dbias, True)
    r_c, r_l, r_n = torch.rand(d) + 0.5, torch.rand(length) + 0.5, torch.rand(ns) + 0.5
    state_scale = torch.rand(length) * 0.05 + 0.02
    dq, bq, cq = (torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=g) for t in (delta, B, C))
    step = lambda: (torch.rand(1, 1, length, generator=g) * 0.05 + 0.01, torch.zeros(1, 1, length))  # noqa: E731
    conv_x = torch.randn(b, length, 2 * d, generator=g)[..., :d].transpose(1, 2)
    conv_w = torch.randn(d, 1, 4, generator=g) * 0.4
    return [
        ("quantize", OPS.quantize.default, (x, torch.rand(length, 1) + 0.1, torch.zeros(length, 1), -7, 7)),
        ("dequantize", OPS.dequantize.default,
         (torch.zeros(b, length, c, dtype=torch.int8), torch.rand(length, 1) + 0.1, torch.zeros(length, 1))),
        ("quantize_mixed", OPS.quantize_mixed.default, (x, s_in, 1, 2, 4, 8, 3.0, 4)),
        ("quantize_mixed (B, C, L)", OPS.quantize_mixed.default,
         (x.transpose(1, 2).contiguous(), s_in, 2, 1, 4, 16, 3.0, 10)),
        ("outlier_mask", OPS.outlier_mask.default, (x, s_in, 1, 2, 4, 3.0, 4)),
        ("mixed_fake_quant", OPS.mixed_fake_quant.default, (x, s_in, 1, 2, 4, 8, 3.0, 4)),
        ("mixed_fake_quant (B, C, L)", OPS.mixed_fake_quant.default,
         (x.transpose(1, 2).contiguous(), s_in, 2, 1, 4, 8, 3.0, 10)),
        ("w4a4o8_linear_rt", OPS.w4a4o8_linear_rt.default, (x, s_in, w4, w4s, bias, c, 3.0, 4)),
        ("w4a4o8_linear_rt small K", OPS.w4a4o8_linear_rt.default, (small, s_in, w4_small, w4s, None, 8, 3.0, 4)),
        ("w4a4o8_linear_mixed", OPS.w4a4o8_linear_mixed.default,
         (small, s_in, w4_small, w4s, bias, 8, 3.0, 4, torch.rand(length) + 0.1, 1, 2, 4, 4.0, 10)),
        ("w4a4o8_linear_mixed long K", OPS.w4a4o8_linear_mixed.default,
         (x, s_in, w4, w4s, bias, c, 3.0, 4, torch.rand(length) + 0.1, 1, 2, 4, 4.0, 10)),
        ("quantize_per_token", OPS.quantize_per_token.default, (x, 8)),
        ("outlier_split", OPS.outlier_split.default, (rows, mask, None, 4)),
        ("outlier_split static", OPS.outlier_split.default, (rows, mask, torch.rand(0, 1) + 0.1, 4)),
        ("int8_linear", OPS.int8_linear.default,
         (torch.zeros(0, c, dtype=torch.int8), torch.rand(0, 1), w8, w8s, bias)),
        ("w8a8_linear", OPS.w8a8_linear.default, (x, w8, w8s, bias, None)),
        ("w8a8_linear static", OPS.w8a8_linear.default, (x, w8, w8s, None, torch.tensor([0.02]))),
        ("w4a4o8_linear", OPS.w4a4o8_linear.default,
         (x, torch.zeros(x.shape, dtype=torch.bool), s_in.reshape(1, length, 1), w4, w4s, bias, c)),
        ("causal_conv1d_silu", OPS.causal_conv1d_silu.default, (conv_x, conv_w, D, *step(), -127, 127, True)),
        ("causal_conv1d_silu float", OPS.causal_conv1d_silu.default,
         (conv_x.contiguous(), conv_w, None, None, None, -127, 127, False)),
        ("selective_scan", OPS.selective_scan.default, scan),
        ("selective_scan_cl", OPS.selective_scan_cl.default, scan),
        ("selective_scan_q", OPS.selective_scan_q.default, (*scan, r_c, r_l, r_n, state_scale, 8)),
        ("selective_scan_qi", OPS.selective_scan_qi.default,
         (u, dq, *step(), A, bq, *step(), cq, *step(), D, z, dbias, True, r_c, r_l, r_n, state_scale, 8)),
    ]


@pytest.mark.parametrize("case", _empty_batch_cases(), ids=lambda c: c[0])
def test_every_op_takes_an_empty_batch(case):
    _, op, args = case
    with torch.no_grad():
        out = op(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert outs[0].shape[0] == 0  # (outlier_mask's second output is the per-step scale)
    opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
