"""The C++ mixer ops (kernels/cpu/mixer_ops.cpp) against their plain-torch references."""

import pytest
import torch

from ouromamba_fx.kernels.cpu.build import MIXER_OPS
from ouromamba_fx.ops.conv1d_silu import causal_conv1d_silu_codes_ref, causal_conv1d_silu_ref, conv_epilogue_ref
from ouromamba_fx.ops.int4 import pack_int4
from ouromamba_fx.ops.mixed import quantize_mixed_ref, site_outlier_mask
from ouromamba_fx.ops.w4a4o8_linear import SMALL_K, w4a4o8_linear_detect, w4a4o8_linear_detect_requant
from tests.threads import assert_same_bits_at_thread_counts

CONV = torch.ops.ouromamba.causal_conv1d_silu.default
CONV_CODES = torch.ops.ouromamba.causal_conv1d_silu_codes.default
MIXED = torch.ops.ouromamba.mixed_fake_quant.default
W4 = torch.ops.ouromamba.w4a4o8_linear_rt.default


def test_the_cpp_kernels_are_in_use():
    assert MIXER_OPS.backend() == "cpp"


def _conv_case(b, d, length, k, per_step, quant):
    g = torch.Generator().manual_seed(b * 1000 + d + length)
    base = torch.randn(b, length, 2 * d, generator=g)
    x = base[..., :d].transpose(1, 2)  # channel-contiguous slice, as after in_proj
    w = torch.randn(d, 1, k, generator=g) * 0.4
    bias = torch.randn(d, generator=g)
    if not quant:
        return x, w, bias, None, None
    n = length if per_step else 1
    scale = (torch.rand(1, 1, n, generator=g) * 0.04 + 0.01)
    zp = torch.zeros(1, 1, n) if per_step else torch.tensor([[[2.0]]])
    return x, w, bias, scale, zp


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 48, 17, 4), (1, 37, 1, 4), (3, 16, 33, 3), (2, 5, 9, 1)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("quant", ["none", "tensor", "step"])
def test_causal_conv1d_silu_matches_the_reference(shape, reverse, quant):
    b, d, length, k = shape
    x, w, bias, scale, zp = _conv_case(b, d, length, k, quant == "step", quant != "none")
    y = CONV(x, w, bias, scale, zp, -127, 127, reverse)
    ref = causal_conv1d_silu_ref(x, w, bias, scale, zp, -127, 127, reverse)
    assert y.shape == (b, d, length) and y.stride() == (length * d, 1, d)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("quant", ["none", "step"])
def test_causal_conv1d_silu_channels_do_not_depend_on_the_row_width(quant):
    # The SiLU runs over a row's vectors four at a time with one-vector tails: channels 0-39 of a
    # 64-channel conv (all in groups of four vectors) equal a 40-channel conv of the same inputs
    # (where some are tails), bit for bit.
    x, w, bias, scale, zp = _conv_case(2, 64, 13, 4, True, quant != "none")
    for reverse in (False, True):
        y = CONV(x, w, bias, scale, zp, -127, 127, reverse)
        y40 = CONV(x[:, :40], w[:40], bias[:40], scale, zp, -127, 127, reverse)
        assert torch.equal(y40, y[:, :40])


@torch.no_grad()
def test_causal_conv1d_silu_reads_any_layout_and_no_bias():
    x, w, _, scale, zp = _conv_case(2, 24, 11, 4, True, True)
    xc = x.contiguous()  # time-contiguous (B, D, L)
    torch.testing.assert_close(CONV(xc, w, None, scale, zp, -15, 15, True),
                               causal_conv1d_silu_ref(xc, w, None, scale, zp, -15, 15, True), rtol=1e-5, atol=1e-5)


def test_causal_conv1d_silu_opcheck_and_errors():
    x, w, bias, scale, zp = _conv_case(2, 20, 7, 4, True, True)
    torch.library.opcheck(CONV, (x, w, bias, scale, zp, -127, 127, True))
    torch.library.opcheck(CONV, (x.contiguous(), w, None, None, None, -127, 127, False))
    with pytest.raises(ValueError, match="depthwise weight"):
        CONV(x, w[:, :, :2].reshape(10, 2, 2), bias, None, None, -127, 127, False)
    with pytest.raises(ValueError, match="both scale and zero_point"):
        CONV(x, w, bias, scale, None, -127, 127, False)
    with pytest.raises(ValueError, match="one per time step"):
        CONV(x, w, bias, scale[..., :3], zp[..., :3], -127, 127, False)


def _x_proj_codes(y, code_scale, qmin, qmax):
    """int8_linear_decomposed's quantization of x_proj's input y.transpose(1, 2) (what Inductor
    compiles on the unfused graph): a static scale per token broadcast from (1, L, 1) or one value."""
    x = y.transpose(1, 2)
    lead, k = x.shape[:-1], x.shape[-1]
    xs = code_scale.float().expand(*lead, 1).reshape(-1, 1)
    return torch.round(x.float().reshape(-1, k) / xs).clamp(qmin, qmax).reshape(*lead, k)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 48, 17, 4), (1, 37, 1, 4), (3, 29, 33, 3), (2, 5, 9, 2), (2, 19, 23, 21)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("quant", ["tensor", "step"])
def test_conv_codes_are_the_conv_output_quantized_bit_for_bit(shape, reverse, quant):
    """The codes-emitting conv: its float output equal to causal_conv1d_silu's, its codes equal to
    quantizing that output as x_proj does (per tensor and per step scales on both sides, odd D
    and L, the kernel widths of Vim (4) and MambaVision (3), a width over 16 (the reference path))."""
    b, d, length, k = shape
    x, w, bias, scale, zp = _conv_case(b, d, length, k, quant == "step", True)
    g = torch.Generator().manual_seed(d + length)
    y0 = CONV(x, w, bias, scale, zp, -127, 127, reverse)
    # scales putting each step's (or the tensor's) largest outputs beyond the clamp bounds
    per_step = y0.abs().amax((0, 1)).reshape(1, length, 1) / 150 + 1e-4
    code_scales = [per_step if quant == "step" else per_step.amax().reshape(1, 1, 1) * 0.5,
                   torch.rand(1, length if quant == "step" else 1, 1, generator=g) * 0.01 + 1e-3]
    for cs in code_scales:
        for qmin, qmax in ((-127, 127), (-31, 31), (-128, 127)):
            y, q = CONV_CODES(x, w, bias, scale, zp, -127, 127, reverse, cs, qmin, qmax)
            assert torch.equal(y, y0) and y.stride() == y0.stride()
            assert q.dtype == torch.int8 and q.shape == (b, length, d) and q.is_contiguous()
            ref = _x_proj_codes(y0, cs, qmin, qmax)
            assert torch.equal(q.float(), ref)
            assert int(q.min()) == qmin or int(q.max()) == qmax
    # the plain-torch twin agrees with the conv's reference
    yr, qr = causal_conv1d_silu_codes_ref(x, w, bias, scale, zp, -127, 127, reverse, code_scales[1], -127, 127)
    torch.testing.assert_close(yr, y0, rtol=1e-5, atol=1e-5)
    assert torch.equal(qr.float(), _x_proj_codes(yr, code_scales[1], -127, 127))


@torch.no_grad()
def test_conv_codes_ties_round_half_to_even():
    # a zero kernel: every output is silu(bias[c]); a scale of exactly twice an output puts it on
    # the tie +-0.5, which rounds to 0 (half away from zero would give +-1)
    d, length = 5, 3
    w = torch.zeros(d, 1, 4)
    bias = torch.tensor([1.0, -1.0, 0.3, 2.0, -0.7])
    x = torch.randn(1, d, length)
    y0 = CONV(x, w, bias, None, None, -127, 127, False)
    for c in (0, 1):
        cs = (2 * y0[0, c, 0].abs()).reshape(1)
        _, q = CONV_CODES(x, w, bias, None, None, -127, 127, False, cs, -127, 127)
        assert (y0[0, c] / cs).abs().eq(0.5).all() and q[0, :, c].eq(0).all()
        assert torch.equal(q.float(), _x_proj_codes(y0, cs, -127, 127))


@torch.no_grad()
@pytest.mark.parametrize("d", [40, 33])
def test_conv_codes_near_rounding_boundaries(d):
    # per-step scales that put one channel's output within a few ulp of a half-integer multiple
    # (where a multiply by the reciprocal scale instead of the division can round to the other
    # neighbour), the other channels anywhere: the codes equal the division's, element for element
    length = 96
    w = torch.zeros(d, 1, 4)
    bias = torch.linspace(-4.0, 6.0, d)
    x = torch.randn(1, d, length)
    y0 = CONV(x, w, bias, None, None, -127, 127, False)
    c = torch.arange(length) % d
    k = (torch.arange(length) * 7) % 127
    target = y0[0, c, 0].abs() / (k + 0.5)
    steps = torch.arange(length) % 7 - 3  # -3..3 ulp away from the exact boundary
    cs = target.clone()
    for i in range(length):
        for _ in range(abs(int(steps[i]))):
            cs[i] = torch.nextafter(cs[i], torch.tensor(float("inf") if steps[i] > 0 else 0.0))
    cs = cs.reshape(1, length, 1)
    _, q = CONV_CODES(x, w, bias, None, None, -127, 127, False, cs, -127, 127)
    ref = _x_proj_codes(y0, cs, -127, 127)
    assert torch.equal(q.float(), ref)
    # the boundary lanes split between both neighbours (the cases are not all rounded one way)
    picked = q[0, torch.arange(length), c].float().abs()
    assert (picked == k).any() and (picked == k + 1).any()


def test_conv_codes_opcheck_and_errors():
    x, w, bias, scale, zp = _conv_case(2, 20, 7, 4, True, True)
    cs = torch.rand(1, 7, 1) * 0.01 + 1e-3
    torch.library.opcheck(CONV_CODES, (x, w, bias, scale, zp, -127, 127, True, cs, -127, 127))
    torch.library.opcheck(CONV_CODES, (x.contiguous(), w, None, None, None, -127, 127, False, cs[:, :1], -15, 15))
    with pytest.raises(ValueError, match="int8"):
        CONV_CODES(x, w, bias, scale, zp, -127, 127, False, cs, -255, 255)
    with pytest.raises(ValueError, match="one per time step"):
        CONV_CODES(x, w, bias, scale, zp, -127, 127, False, cs[:, :3], -127, 127)
    with pytest.raises(ValueError, match="depthwise weight"):
        CONV_CODES(x, w[:, :, :2].reshape(10, 2, 2), bias, None, None, -127, 127, False, cs, -127, 127)


def _in_proj_case(b, d, length, per_step, with_bias, seed=0):
    """in_proj's raw accumulator (B, L, 2D) (integer-valued float32, magnitudes as a K of a few
    hundred gives), its row scale, weight scales and bias, and its output computed as
    int8_linear_decomposed's epilogue does: ((acc * xs) * ws) + bias on (M, 2D) rows."""
    g = torch.Generator().manual_seed(seed + d + length)
    acc = torch.randint(-3_000_000, 3_000_001, (b, length, 2 * d), generator=g).float()
    xs = torch.rand(1, length if per_step else 1, 1, generator=g) * 1e-3 + 1e-5
    ws = torch.rand(2 * d, generator=g) * 1e-3 + 1e-5
    bias = torch.randn(2 * d, generator=g) if with_bias else None
    rows = acc.reshape(-1, 2 * d)
    y = rows * xs.expand(b, length, 1).reshape(-1, 1) * ws.reshape(1, -1)
    if bias is not None:
        y = y + bias
    return acc, xs, ws, bias, y.reshape(b, length, 2 * d)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 48, 17, 4), (1, 37, 1, 4), (3, 29, 33, 3), (2, 19, 23, 21)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("xs_kind", ["token", "tensor"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_applies_in_proj_epilogue_bit_for_bit(shape, reverse, xs_kind, with_bias):
    """The convs given in_proj's raw accumulator (its x half, the transposed (B, D, L) view) and the
    epilogue's scales: the same outputs (and codes) bit for bit as the epilogue followed by the
    conv, per-token and per-tensor row scales, odd D and L, with and without the fake quantization
    of the conv's input, widths 4, 3 and over 16 (the reference path)."""
    b, d, length, k = shape
    acc, xs, ws, bias, y = _in_proj_case(b, d, length, xs_kind == "token", with_bias)
    x_acc, x_out = acc.transpose(1, 2)[:, :d], y.transpose(1, 2)[:, :d]
    wsx, bx = ws[:d], None if bias is None else bias[:d]
    _, w, cbias, scale, zp = _conv_case(b, d, length, k, True, True)
    cs = torch.rand(1, length, 1, generator=torch.Generator().manual_seed(5)) * 0.01 + 1e-3
    for sc, z in ((scale, zp), (None, None)):
        want = CONV(x_out, w, cbias, sc, z, -127, 127, reverse)
        got = CONV(x_acc, w, cbias, sc, z, -127, 127, reverse, xs, wsx, bx)
        assert torch.equal(got, want) and got.stride() == want.stride()
        wy, wq = CONV_CODES(x_out, w, cbias, sc, z, -127, 127, reverse, cs, -127, 127)
        gy, gq = CONV_CODES(x_acc, w, cbias, sc, z, -127, 127, reverse, cs, -127, 127, xs, wsx, bx)
        assert torch.equal(gy, wy) and torch.equal(gq, wq)
        # the plain-torch twin takes the same arguments (its conv's rounding depends on the input's
        # memory layout: close, not equal)
        torch.testing.assert_close(causal_conv1d_silu_ref(x_acc, w, cbias, sc, z, -127, 127, reverse, xs, wsx, bx),
                                   want, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv_epilogue_ref(x_acc, xs, wsx, bx), x_out)
    # the epilogue matters (a conv on the raw accumulator is another tensor)
    assert not torch.equal(CONV(x_acc, w, cbias, None, None, -127, 127, reverse), want)


def test_conv_in_proj_epilogue_opcheck_and_errors():
    b, d, length = 2, 20, 7
    acc, xs, ws, bias, _ = _in_proj_case(b, d, length, True, True)
    x, w, cbias, scale, zp = _conv_case(b, d, length, 4, True, True)
    x = acc.transpose(1, 2)[:, :d]
    cs = torch.rand(1, length, 1) * 0.01 + 1e-3
    torch.library.opcheck(CONV, (x, w, cbias, scale, zp, -127, 127, True, xs, ws[:d], bias[:d]))
    torch.library.opcheck(CONV_CODES, (x, w, cbias, None, None, -127, 127, False, cs, -127, 127, xs[:, :1], ws[:d],
                                       None))
    with pytest.raises(ValueError, match="in_scale has 3 values"):
        CONV(x, w, cbias, scale, zp, -127, 127, False, xs[:, :3], ws[:d], None)
    with pytest.raises(ValueError, match="in_wscale has 40 values"):
        CONV(x, w, cbias, scale, zp, -127, 127, False, xs, ws, None)
    with pytest.raises(ValueError, match="in_bias has 40 values"):
        CONV_CODES(x, w, cbias, scale, zp, -127, 127, False, cs, -127, 127, xs, ws[:d], bias)
    with pytest.raises(ValueError, match="together"):
        CONV(x, w, cbias, scale, zp, -127, 127, False, xs, None, None)


def _planted(b, length, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, c, generator=g)
    x[:, :, 3 % c] *= 25.0  # a persistent outlier channel
    x[0, length // 2, c - 1] = 60.0  # a lone one
    s_in = (x.abs().amax((0, 2)) / 7 * 0.4).contiguous()
    return x, s_in


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 17, 40), (1, 1, 37), (3, 9, 16), (2, 41, 70)])
@pytest.mark.parametrize("n_refresh", [1, 3, 4])
def test_mixed_fake_quant_is_the_reference_bit_for_bit(shape, n_refresh):
    x, s_in = _planted(*shape)
    ref = quantize_mixed_ref(x, s_in, 1, 2, 4, 8, 2.0, n_refresh)
    assert torch.equal(MIXED(x, s_in, 1, 2, 4, 8, 2.0, n_refresh), ref)
    # channels-first layout (the scan's delta): same values, seen through a transpose
    xt = x.transpose(1, 2).contiguous()
    out = MIXED(xt, s_in, 2, 1, 4, 8, 2.0, n_refresh)
    assert torch.equal(out, quantize_mixed_ref(xt, s_in, 2, 1, 4, 8, 2.0, n_refresh))
    assert torch.equal(out.transpose(1, 2), ref)
    # channels strided, time steps not contiguous either (every other channel of a wider tensor)
    wide = torch.stack((x, torch.randn_like(x)), dim=-1).flatten(-2)
    xs = wide[..., ::2]
    assert xs.stride(-1) == 2 and torch.equal(xs, x)
    assert torch.equal(MIXED(xs, s_in, 1, 2, 4, 8, 2.0, n_refresh), ref)


def test_mixed_fake_quant_flags_planted_outliers_and_passes_opcheck():
    x, s_in = _planted(2, 17, 40)
    y = MIXED(x, s_in, 1, 2, 4, 8, 2.0, 4)
    step = s_in.reshape(1, -1, 1)
    # the lone 60.0 is kept at 8 bits (a 4-bit inlier would clip it to 7 * step)
    assert abs(float(y[0, 8, 39]) - 60.0) < 60.0 / 127
    assert float(step[0, 8, 0]) * 7 < 59.0
    torch.library.opcheck(MIXED, (x, s_in, 1, 2, 4, 8, 2.0, 4))
    torch.library.opcheck(MIXED, (x.transpose(1, 2).contiguous(), s_in, 2, 1, 4, 8, 2.0, 1))
    # another bit-width for the inliers, and 16-bit outliers go to the reference
    assert torch.equal(MIXED(x, s_in, 1, 2, 6, 8, 2.0, 4), quantize_mixed_ref(x, s_in, 1, 2, 6, 8, 2.0, 4))
    assert torch.equal(MIXED(x, s_in, 1, 2, 4, 16, 2.0, 4), quantize_mixed_ref(x, s_in, 1, 2, 4, 16, 2.0, 4))


RT_SHAPES = [(2, 17, 40, 24), (1, 1, 37, 5), (3, 9, 16, 16), (1, 41, 70, 33), (2, 9, 12, 40)]


def test_w4a4o8_linear_rt_shapes_cover_both_cpu_paths():
    # K < SMALL_K: float GEMM of the dequantized values; else the integer GEMM + epilogue
    assert {shape[2] < SMALL_K for shape in RT_SHAPES} == {True, False}


@torch.no_grad()
@pytest.mark.parametrize("shape", RT_SHAPES)
def test_w4a4o8_linear_rt_equals_mask_then_linear(shape):
    b, length, k, n = shape
    x, s_in = _planted(b, length, k, seed=1)
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    ws, bias = torch.rand(n) * 0.01 + 1e-3, torch.randn(n)
    y = w4a4o8_linear_detect(x, s_in, pack_int4(wq), ws, bias, k, 2.0, 4)
    mask, step = site_outlier_mask(x, s_in, 1, 2, 4, 2.0, 4)
    assert mask.any()
    ref = torch.ops.ouromamba.w4a4o8_linear(x, mask, step, pack_int4(wq), ws, bias, k)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
    # and the float model of it: quantize_mixed -> linear with the dequantized weights
    deq = quantize_mixed_ref(x, s_in, 1, 2, 4, 8, 2.0, 4) @ (wq.float() * ws[:, None]).t() + bias
    torch.testing.assert_close(y, deq, rtol=1e-4, atol=1e-3)
    # the float path keeps one dequantized copy of the weight while the packed weight lives;
    # changing the weight scale in place makes a new one
    if k < SMALL_K:
        wp = pack_int4(wq)
        y1 = w4a4o8_linear_detect(x, s_in, wp, ws, bias, k, 2.0, 4)
        ws.mul_(2.0)
        y2 = w4a4o8_linear_detect(x, s_in, wp, ws, bias, k, 2.0, 4)
        torch.testing.assert_close(y2 - bias, 2.0 * (y1 - bias), rtol=1e-5, atol=1e-5)


def test_w4a4o8_linear_rt_opcheck_and_errors():
    x, s_in = _planted(2, 9, 20, seed=3)
    wq = torch.randint(-8, 8, (6, 20), dtype=torch.int8)
    args = (x, s_in, pack_int4(wq), torch.rand(6) * 0.01, None, 20, 2.0, 4)
    torch.library.opcheck(W4, args)
    with pytest.raises(ValueError, match=r"\(\.\.\., L, 21\)"):
        W4(x, s_in, pack_int4(wq), torch.rand(6), None, 21, 2.0, 4)


def _exact_small_linear(b, length, k, n, seed):
    """A short-reduction linear whose float products and sums are exact in any order: inputs on
    power-of-two step scales below their rule's trigger (inliers only), weights and bias on
    power-of-two grids; output channel 3 is 16x the others (an outlier of the output's rule)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, k, generator=g)
    s_in = torch.exp2(torch.ceil(torch.log2(x.abs().amax((0, 2)) / 7)))
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    ws = torch.full((n,), 2.0 ** -5)
    ws[3 % n] = 0.5
    bias = torch.randint(-20, 20, (n,), generator=g).float() * 2.0 ** -6
    return x, s_in, pack_int4(wq), ws, bias, torch.full((length,), 0.05)


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 17, 24, 40), (1, 1, 5, 7), (3, 23, 12, 768), (2, 30, 8, 33), (2, 9, 20, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w4a4o8_linear_mixed_is_the_linear_then_its_mixed_quantization(shape, with_bias):
    b, length, k, n = shape
    x, s_in, wp, ws, bias, out_s = _exact_small_linear(*shape, seed=k + n)
    bias = bias if with_bias else None
    y = w4a4o8_linear_detect_requant(x, s_in, wp, ws, bias, k, 3.0, 10, out_s, 1, 2, 4, 4.0, 10)
    lin = w4a4o8_linear_detect(x, s_in, wp, ws, bias, k, 3.0, 10)
    ref = MIXED(lin, out_s, 1, 2, 4, 8, 4.0, 10)
    assert y.shape == (b, length, n) and y.is_contiguous()
    assert torch.equal(y, ref)  # exact products: the same floats, hence the same codes
    if n > 3 and length > 1:  # the output's outlier channel kept at 8 bits, not clipped at 7 steps
        assert float(y[..., 3].abs().max()) > 7 * 0.05 * 1.01


@torch.no_grad()
def test_w4a4o8_linear_mixed_on_general_inputs_opcheck_and_long_reductions():
    x, s_in = _planted(2, 30, 24, seed=4)
    wq = torch.randint(-8, 8, (50, 24), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    wp, ws, bias = pack_int4(wq), torch.rand(50) * 0.01 + 1e-3, torch.randn(50)
    out_s = torch.full((30,), 0.02)
    y = w4a4o8_linear_detect_requant(x, s_in, wp, ws, bias, 24, 2.0, 4, out_s, 1, 2, 4, 3.0, 4)
    ref = MIXED(w4a4o8_linear_detect(x, s_in, wp, ws, bias, 24, 2.0, 4), out_s, 1, 2, 4, 8, 3.0, 4)
    # products summed in another order: equal up to float rounding (an outlier's per-token scale
    # moves by an ulp) and, rarely, a code moved across a rounding boundary
    moved = (y - ref).abs() > 1e-5 * ref.abs().max()
    assert moved.float().mean() < 0.002
    torch.testing.assert_close(y, ref, rtol=0, atol=float(out_s[0]) * 1.01)
    op = torch.ops.ouromamba.w4a4o8_linear_mixed.default
    torch.library.opcheck(op, (x, s_in, wp, ws, bias, 24, 2.0, 4, out_s, 1, 2, 4, 3.0, 4))
    # K >= SMALL_K: the two ops in turn, exactly
    x2, s2 = _planted(1, 9, SMALL_K + 3, seed=6)
    wq2 = torch.randint(-8, 8, (10, SMALL_K + 3), dtype=torch.int8)
    args = (x2, s2, pack_int4(wq2), torch.rand(10) * 0.01, None, SMALL_K + 3, 2.0, 4)
    assert torch.equal(op(*args, out_s[:9], 1, 2, 4, 3.0, 4), MIXED(W4(*args), out_s[:9], 1, 2, 4, 8, 3.0, 4))
    # tokens and channels not on the output's last two axes (a 4-d output quantized along its
    # second and last): the two ops in turn, exactly, contiguous as the fake implementation says
    x4 = x.reshape(2, 5, 6, 24).transpose(1, 2)  # (2, 6, 5, 24): the site's tokens on axis 1
    s5 = torch.full((6,), 0.02)
    y4 = op(x4, s_in[:5], wp, ws, bias, 24, 2.0, 4, s5, 1, 3, 4, 3.0, 4)
    ref4 = MIXED(W4(x4, s_in[:5], wp, ws, bias, 24, 2.0, 4), s5, 1, 3, 4, 8, 3.0, 4)
    assert y4.is_contiguous() and torch.equal(y4, ref4)
    with pytest.raises(ValueError, match=r"\(\.\.\., L, 25\)"):
        op(x, s_in, wp, ws, bias, 25, 2.0, 4, out_s, 1, 2, 4, 3.0, 4)


def _u4_ext():
    from ouromamba_fx.kernels.cpu.build import MIXER_OPS

    ext = MIXER_OPS.get()
    if not ext.u4_available():
        pytest.skip("u4_mm needs a build with AVX2 and FMA")
    return ext


# M past the 4-row tiles and 64-row blocks; K odd, at and past the 128 pairs summed in int16; N
# past the 32-column panels
U4_SHAPES = [(1, 1, 1), (5, 7, 3), (67, 256, 32), (13, 257, 33), (70, 600, 65), (3, 513, 95), (4, 2, 31)]


@pytest.mark.parametrize("m,k,n", U4_SHAPES)
def test_u4_mm_is_exact(m, k, n):
    ext = _u4_ext()
    g = torch.Generator().manual_seed(m * 31 + k + n)
    q = torch.randint(-7, 8, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-8, 9, (n, k), dtype=torch.int8, generator=g)
    # the extremes: the largest int16 pair sums the ranges allow, of both signs
    q[0] = 7
    w[0] = 8
    w[-1] = -8
    panels, colsum = ext.u4_pack(w)
    out = ext.u4_mm((q + 8).view(torch.uint8), panels, colsum)
    assert out.dtype == torch.int32 and torch.equal(out, q.int() @ w.int().t())
    # a strided view of the codes is read as well
    wide = torch.full((m, k + 3), 8, dtype=torch.uint8)
    wide[:, :k] = (q + 8).view(torch.uint8)
    assert torch.equal(ext.u4_mm(wide[:, :k], panels, colsum), out)


# (150, 384, 1536): too few row blocks, the panel-major GEMM then the epilogue; (3152, 40, 100):
# the GEMM and epilogue block by block
@pytest.mark.parametrize("m,k,n", U4_SHAPES + [(150, 384, 1536), (3152, 40, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_u4_linear_is_u4_mm_then_the_epilogue_bit_for_bit(m, k, n, with_bias):
    ext = _u4_ext()
    g = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    q = torch.randint(-7, 8, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-8, 9, (n, k), dtype=torch.int8, generator=g)
    # a few outlier codes per row, none in some rows (row 0 among them)
    q_out = torch.where(torch.rand(m, k, generator=g) < 0.05, torch.randint(-127, 128, (m, k), generator=g), 0)
    q_out = q_out.to(torch.int8)
    q_out[0] = 0
    steps = 1 if m % 5 else 5
    s_in = torch.rand(steps, generator=g) * 0.1 + 0.01
    s_out = torch.rand(m, generator=g) * 0.5
    w_scale = torch.rand(n, generator=g) * 0.02
    bias = torch.randn(n, generator=g) if with_bias else torch.empty(0)
    panels, colsum = ext.u4_pack(w)
    a = (q + 8).view(torch.uint8)
    w_o = ext.outlier_weights(w)
    expect = ext.w4a4o8_epilogue(ext.u4_mm(a, panels, colsum), s_in, q_out, s_out, w_o, w_scale, bias)
    got = ext.u4_linear(a, panels, colsum, s_in, q_out, s_out, w_o, w_scale, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got, expect)
    # and the formula itself, in float64 (the products are exact integers)
    ref = (q.double() @ w.double().t()) * s_in.double().repeat(m // steps)[:, None]
    ref = (ref + (q_out.double() @ w.double().t()) * s_out.double()[:, None]) * w_scale.double()
    if with_bias:
        ref = ref + bias.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


# K up to Vim-small's 1536 (the largest exact sum: K * 128 * 8 < 2^24); N at, below and past the
# 64-column tiles; densities from one outlier per row (odd counts: a padded pair) to every channel
@pytest.mark.parametrize("k,n", [(1, 1), (2, 31), (3, 33), (40, 56), (768, 384), (1536, 100), (97, 64), (5, 65), (64, 130)])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 1.0])
def test_epilogue_outlier_term_is_exact(k, n, density):
    from ouromamba_fx.kernels.cpu.build import MIXER_OPS

    ext = MIXER_OPS.get()
    m = 9
    g = torch.Generator().manual_seed(k * 13 + n + int(density * 100))
    q_out = torch.randint(-128, 128, (m, k), generator=g)
    q_out = torch.where(torch.rand(m, k, generator=g) < density, q_out, 0).to(torch.int8)
    q_out[1] = 0
    q_out[2, : min(k, 3)] = torch.tensor([-128, 127, -128][: min(k, 3)], dtype=torch.int8)  # odd counts, extremes
    w = torch.randint(-8, 9, (n, k), dtype=torch.int8, generator=g)
    w[:, 0] = -8
    w[:, -1] = 8
    w_o = ext.outlier_weights(w)
    assert w_o.dtype == torch.uint8 and w_o.shape == (k, (n + 63) // 64 * 64)
    assert torch.equal(w_o[:, :n].int() - 8, w.t().int()) and bool((w_o[:, n:] == 8).all())
    # acc 0, s_in 0, s_out 1, w_scale 1, no bias: y = fma(0, 0, o * 1) * 1 is the outlier term o
    y = ext.w4a4o8_epilogue(torch.zeros(m, n, dtype=torch.int32), torch.zeros(1), q_out, torch.ones(m), w_o,
                            torch.ones(n), torch.empty(0))
    assert torch.equal(y.double(), q_out.double() @ w.double().t())


def test_u4_linear_rejects_mismatched_epilogue_operands():
    ext = _u4_ext()
    panels, colsum = ext.u4_pack(torch.ones(3, 10, dtype=torch.int8))
    a = torch.full((4, 10), 8, dtype=torch.uint8)
    ok = dict(s_in=torch.ones(2), q_out=torch.zeros(4, 10, dtype=torch.int8), s_out=torch.ones(4),
              w_o=ext.outlier_weights(torch.ones(3, 10, dtype=torch.int8)), w_scale=torch.ones(3),
              bias=torch.empty(0))
    assert ext.u4_linear(a, panels, colsum, *ok.values()).shape == (4, 3)
    for name, bad, msg in [("s_in", torch.ones(3), "one value per time step"),
                           ("q_out", torch.zeros(4, 9, dtype=torch.int8), "w_o must be"),
                           ("w_o", torch.ones(10, 3, dtype=torch.int8), "w_o must be outlier_weights"),
                           ("s_out", torch.ones(3), "one value per row"),
                           ("w_scale", torch.ones(2), "w_scale"),
                           ("bias", torch.ones(2), "bias")]:
        with pytest.raises(RuntimeError, match=msg):
            ext.u4_linear(a, panels, colsum, *{**ok, name: bad}.values())


def test_u4_pack_and_mm_reject_what_they_cannot_compute():
    ext = _u4_ext()
    with pytest.raises(RuntimeError, match=r"\[-8, 8\]"):
        ext.u4_pack(torch.tensor([[9, 0]], dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"\[-8, 8\]"):
        ext.outlier_weights(torch.tensor([[-9, 0]], dtype=torch.int8))
    panels, colsum = ext.u4_pack(torch.ones(3, 10, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="made for 9 or 10"):
        ext.u4_mm(torch.zeros(2, 12, dtype=torch.uint8), panels, colsum)
    with pytest.raises(RuntimeError, match="uint8"):
        ext.u4_mm(torch.zeros(2, 10, dtype=torch.int8), panels, colsum)


@torch.no_grad()
def test_w4a4o8_linear_rt_runs_u4_mm_without_vnni():
    from ouromamba_fx.ops import gemm as cpu_gemm

    _u4_ext()
    x, s_in = _planted(2, 17, 40, seed=4)
    wq = torch.randint(-8, 8, (24, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    wp, ws = pack_int4(wq), torch.rand(24) * 0.01 + 1e-3
    outs = {}
    for mode in cpu_gemm.MODES:
        with cpu_gemm.use(mode):
            outs[mode] = w4a4o8_linear_detect(x, s_in, wp, ws, None, 40, 2.0, 4)
    assert "u4" in cpu_gemm.cache_tags(wp)
    assert torch.equal(outs["emulated"], outs["int_mm"])


# (1, 1, 1): one row; odd M (not a multiple of the 8-row sample), K and N past and below the
# 64-byte vectors and tiles
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 3, 33), (37, 65, 56), (64, 130, 384), (150, 768, 70)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w4a4o8_finish_is_the_epilogue_bit_for_bit(m, k, n, with_bias):
    ext = MIXER_OPS.get()
    g = torch.Generator().manual_seed(m * 5 + k * 3 + n)
    w = torch.randint(-8, 9, (n, k), dtype=torch.int8, generator=g)
    acc = (torch.randint(-7, 8, (m, k), generator=g).double() @ w.double().t()).float()
    q_out = torch.where(torch.rand(m, k, generator=g) < 0.3, torch.randint(-128, 128, (m, k), generator=g), 0)
    q_out = q_out.to(torch.int8)
    q_out[0] = 0  # a row without outliers (its term 0 is not added, as in the epilogue)
    o = (q_out.double() @ w.double().t()).float()  # exact: integers below 2^24
    steps = 1 if m % 3 else 3
    s_in = torch.rand(steps, generator=g) * 0.1 + 0.01
    s_out = torch.rand(m, generator=g) * 0.5
    s_out[0] = float("inf")  # the epilogue never multiplies a row's absent term by its scale
    w_scale = torch.rand(n, generator=g) * 0.02
    bias = torch.randn(n, generator=g) if with_bias else torch.empty(0)
    expect = ext.w4a4o8_epilogue(acc.clone(), s_in, q_out, s_out, ext.outlier_weights(w), w_scale, bias)
    got = acc.clone()
    out = ext.w4a4o8_finish(got, o, s_in, q_out, s_out, w_scale, bias)
    assert out.data_ptr() == got.data_ptr()  # in place
    assert torch.equal(out, expect)
    assert not out.isnan().any()
    with pytest.raises(RuntimeError, match="o must be"):
        ext.w4a4o8_finish(acc.clone(), o[:, :-1] if n > 1 else o[:0], s_in, q_out, s_out, w_scale, bias)


@pytest.mark.parametrize("m,k", [(1, 1), (8, 64), (9, 65), (17, 130), (3152, 768)])
def test_outlier_density_counts_every_eighth_row(m, k):
    ext = MIXER_OPS.get()
    g = torch.Generator().manual_seed(m + k)
    q = torch.where(torch.rand(m, k, generator=g) < 0.1, torch.randint(-128, 128, (m, k), generator=g), 0)
    q = q.to(torch.int8)
    sample = q[::8]
    assert ext.outlier_density(q) == pytest.approx((sample != 0).sum().item() / sample.numel(), rel=1e-12)
    assert ext.outlier_density(torch.zeros(m, k, dtype=torch.int8)) == 0.0
    assert ext.outlier_density(torch.zeros(0, k, dtype=torch.int8)) == 0.0


@torch.no_grad()
def test_kernels_give_the_same_bits_whichever_thread_runs_an_item():
    # The kernels hand their work items (row blocks, chunks of time steps) to threads as they come
    # free (om_parallel.h): 1, 2 and 3 threads, and 3 threads again, must give identical outputs.
    ext = MIXER_OPS.get()
    g = torch.Generator().manual_seed(5)
    m, k, n = 2000, 64, 64  # u4_linear: 32 blocks of 64 rows, the block-by-block path at 3 threads
    x, w, bias, scale, zp = _conv_case(4, 40, 70, 4, True, True)
    code_scale = torch.rand(1, 1, 70, generator=g) * 0.05 + 0.01
    xm, s_mixed = _planted(3, 45, 70)
    q = torch.randint(-7, 8, (m, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-8, 9, (n, k), dtype=torch.int8, generator=g)
    q_out = torch.where(torch.rand(m, k, generator=g) < 0.1, torch.randint(-127, 128, (m, k), generator=g), 0)
    q_out = q_out.to(torch.int8)
    s_in, s_out = torch.rand(10, generator=g) * 0.1 + 0.01, torch.rand(m, generator=g) * 0.5
    w_scale, b = torch.rand(n, generator=g) * 0.02, torch.randn(n, generator=g)
    w_o = ext.outlier_weights(wq)
    # a W4A4O8 linear with its output quantized by the rule (K below SMALL_K: linear_mixed_fake)
    xl = torch.randn(2, 33, 24, generator=g)
    wp = pack_int4(torch.randint(-7, 8, (48, 24), dtype=torch.int8, generator=g))
    lin_args = (xl, torch.full((33,), 0.2), wp, torch.rand(48, generator=g) * 0.1, torch.randn(48, generator=g), 24,
                3.0, 4, torch.full((33,), 0.3), 1, 2, 4, 3.0, 4)

    def run():
        out = list(CONV_CODES(x, w, bias, scale, zp, -127, 127, False, code_scale, -127, 127))
        out += ext.mixed_quant(xm, s_mixed, 7, 2.0, 4, False, 8)
        out += ext.mixed_quant(xm, s_mixed, 7, 2.0, 4, True, 0)
        out.append(torch.ops.ouromamba.w4a4o8_linear_mixed.default(*lin_args))
        acc = (q.double() @ wq.double().t()).float()
        out.append(ext.w4a4o8_epilogue(acc.clone(), s_in, q_out, s_out, w_o, w_scale, b))
        out.append(ext.w4a4o8_finish(acc.clone(), (q_out.double() @ wq.double().t()).float(), s_in, q_out, s_out,
                                     w_scale, b))
        if ext.u4_available():
            panels, colsum = ext.u4_pack(wq)
            a = (q + 8).view(torch.uint8)
            out.append(ext.u4_mm(a, panels, colsum))
            out.append(ext.u4_linear(a, panels, colsum, s_in, q_out, s_out, w_o, w_scale, b))
            out.append(ext.s16_mm(q, ext.s16_pack(wq), n))
        return out

    assert_same_bits_at_thread_counts(run)
