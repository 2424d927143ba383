"""The public ops' C++ CPU kernels (``kernels/cpu/ops.cpp``) against their Python implementations.

Once the kernel library is loaded, a CPU call of ``ouromamba::quantize``, ``w8a8_linear``,
``causal_conv1d_silu``, the scans, ``mixed_fake_quant`` or the W4A4O8 linears runs C++ from end to
end; the Python implementations (which call the same kernels) run where the library is not
loaded. Both must give the same tensors bit for bit (values, dtype, strides), raise the same
errors, and the C++ library must define the ops with exactly the Python schemas (a C++ process
defines them from its own list).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ouromamba_fx.kernels.cpu.build import CPU_LIBRARY, MIXER_OPS
from ouromamba_fx.ops import gemm
from ouromamba_fx.ops.int4 import pack_int4

pytestmark = pytest.mark.skipif(MIXER_OPS.backend() != "cpp", reason="C++ kernels not built")

OPS = torch.ops.ouromamba


@contextlib.contextmanager
def python_impl():
    """The block's CPU calls run the ops' Python implementations."""
    CPU_LIBRARY.dispatching = False
    try:
        yield
    finally:
        CPU_LIBRARY.dispatching = True


def both(op, *args):
    """(C++ result, Python result) of one call."""
    assert CPU_LIBRARY.dispatching
    cpp = op(*args)
    with python_impl():
        py = op(*args)
    return cpp, py


def assert_same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_schemas_are_the_python_ones():
    cpp = torch.ops.ouromamba_cpu.public_schemas()
    assert len(cpp) == 14
    for s in cpp:
        name = s.split("(")[0].split("::")[1]
        assert str(getattr(OPS, name).default._schema) == s


def test_dispatch_switches_between_cpp_and_python():
    # with the C++ kernel the op's Python implementation is not called at all
    import ouromamba_fx.ops.quant as quant

    calls = []
    real = quant.quantize_ref
    x, s, z = torch.randn(4, 5), torch.tensor([0.1]), torch.zeros(1)
    try:
        quant.quantize_ref = lambda *a: calls.append(1) or real(*a)
        OPS.quantize.default(x, s, z, -8, 7)
        assert calls == []
        with python_impl():
            OPS.quantize.default(x, s, z, -8, 7)
        assert calls == [1]
    finally:
        quant.quantize_ref = real


def test_gemm_choice_reaches_the_cpp_kernels():
    auto = torch.ops.ouromamba_cpu.gemm_mode()
    assert auto == (1 if gemm.mode() == "int_mm" else 2)
    with gemm.use("emulated"):
        assert torch.ops.ouromamba_cpu.gemm_mode() == 2
        with gemm.use("int_mm"):
            assert torch.ops.ouromamba_cpu.gemm_mode() == 1
        assert torch.ops.ouromamba_cpu.gemm_mode() == 2
    assert torch.ops.ouromamba_cpu.gemm_mode() == auto


@pytest.mark.parametrize("shape,scale_shape", [((3, 7, 5), (1,)), ((2, 6, 4), (6, 1)), ((0, 4), (1,))])
def test_quantize_dequantize(shape, scale_shape):
    x = torch.randn(shape, generator=gen(0)) * 3
    s = torch.rand(scale_shape, generator=gen(1)) + 0.05
    z = torch.round(torch.randn(scale_shape, generator=gen(2)))
    xt = x.transpose(-1, -2) if x.dim() == 3 and scale_shape == (1,) else x  # strided input
    q, q_py = both(OPS.quantize.default, xt, s, z, -8, 7)
    assert_same(q, q_py)
    assert_same(*both(OPS.dequantize.default, q, s, z))
    assert_same(*both(OPS.quantize_per_token.default, x * 10, 4))
    assert_same(*both(OPS.quantize_per_token.default, x.double(), 8))


@pytest.mark.parametrize("mode", gemm.MODES)
@pytest.mark.parametrize("m,k,n", [(5, 1, 3), (7, 33, 9), (65, 128, 40)])
def test_int8_linears(mode, m, k, n):
    x = torch.randn(2, m, k, generator=gen(3)) * 4
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen(4))
    w_s = torch.rand(n, generator=gen(5)) * 0.01
    b = torch.randn(n, generator=gen(6))
    xs = torch.rand(m, 1, generator=gen(7)) * 0.05 + 0.01
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen(8))
    with gemm.use(mode):
        for bias in (b, None):
            assert_same(*both(OPS.w8a8_linear.default, x, w_q, w_s, bias, None))
            assert_same(*both(OPS.w8a8_linear.default, x, w_q, w_s.reshape(n, 1), bias, xs))
            assert_same(*both(OPS.int8_linear.default, x_q, xs, w_q, w_s, bias))
            assert_same(*both(OPS.int8_linear.default, x_q, xs[:1], w_q, w_s, bias))


@pytest.mark.parametrize("k", [4, 21])  # 21 > 16 taps: the ATen path
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("quant", [None, "tensor", "step"])
def test_causal_conv1d_silu(k, reverse, quant):
    b, d, length = 2, 24, 13
    x = torch.randn(b, length, d, generator=gen(9)).transpose(1, 2)  # channel-contiguous, as lowered
    w = torch.randn(d, 1, k, generator=gen(10)) * 0.3
    bias = torch.randn(d, generator=gen(11))
    n = {None: 0, "tensor": 1, "step": length}[quant]
    s = torch.rand(n, generator=gen(12)) * 0.05 + 0.02 if n else None
    z = torch.round(torch.randn(n, generator=gen(13))) if n else None
    assert_same(*both(OPS.causal_conv1d_silu.default, x, w, bias, s, z, -128, 127, reverse))
    assert_same(*both(OPS.causal_conv1d_silu.default, x.contiguous(), w, None, s, z, -8, 7, reverse))
    # the variant that also emits x_proj's codes (per-step and per-tensor code scales)
    for cs, qmin, qmax in ((torch.rand(1, length, 1, generator=gen(15)) * 0.01 + 1e-3, -127, 127),
                           (torch.full((1,), 0.02), -31, 31)):
        assert_same(*both(OPS.causal_conv1d_silu_codes.default, x, w, bias, s, z, -128, 127, reverse, cs, qmin, qmax))
    # on in_proj's raw accumulator with its epilogue's scales (and bias), as the lowering calls them
    acc = torch.randint(-90000, 90001, (b, length, 2 * d), generator=gen(16)).float().transpose(1, 2)[:, :d]
    ws, ib = torch.rand(d, generator=gen(17)) * 1e-2, torch.randn(d, generator=gen(18))
    for xs, b_in in ((torch.rand(1, length, 1, generator=gen(19)) * 1e-3, None), (torch.full((1,), 3e-4), ib)):
        assert_same(*both(OPS.causal_conv1d_silu.default, acc, w, bias, s, z, -128, 127, reverse, xs, ws, b_in))
        assert_same(*both(OPS.causal_conv1d_silu_codes.default, acc, w, bias, s, z, -128, 127, reverse,
                          torch.full((1,), 0.02), -127, 127, xs, ws, b_in))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scans(dtype):
    b, d, length, n = 2, 20, 9, 4
    g = gen(14)
    u, delta, z = (torch.randn(b, d, length, generator=g).to(dtype) for _ in range(3))
    A = -torch.rand(d, n, generator=g).to(dtype)
    B, C = (torch.randn(b, n, length, generator=g).to(dtype) for _ in range(2))
    D, bias = torch.randn(d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    for args in ((u, delta, A, B, C, D, z, bias, True), (u, delta, A, B, C, None, None, None, False)):
        assert_same(*both(OPS.selective_scan.default, *args))
        assert_same(*both(OPS.selective_scan_cl.default, *args))
        assert_same(*both(OPS.selective_scan_bwd.default, torch.randn_like(u), *args))
    if dtype is torch.float32:  # the scan computing its delta from the x_proj columns (lowered W8A8)
        r = 5
        dt_in = torch.randn(b, length, r + 2 * n, generator=g)[..., :r] * 2
        dt = (dt_in, torch.rand(1, length, 1, generator=g) * 0.02 + 0.005, -127, 127,
              torch.randint(-127, 128, (d, r), dtype=torch.int8, generator=g), torch.rand(d, generator=g) * 0.01,
              bias, torch.rand(1, 1, length, generator=g) * 0.05 + 0.01, torch.zeros(1, 1, length), -127, 127)
        for cl in (False, True):
            assert_same(*both(OPS.selective_scan_dt.default, u, *dt, A, B, C, D, z, bias, True, cl))


def _planted(batch, length, c, seed):
    """Activations with a few large channels per token (outliers) and per-step inlier scales."""
    g = gen(seed)
    x = torch.randn(batch, length, c, generator=g)
    x[..., torch.randint(0, c, (3,), generator=g)] *= 25
    s = torch.rand(length, generator=g) * 0.2 + 0.1
    return x, s


@pytest.mark.parametrize("bits,obits", [(4, 8), (8, 8), (3, 8), (4, 16), (10, 8)])
def test_mixed_fake_quant(bits, obits):
    x, s = _planted(2, 11, 32, seed=15)
    # channels last (the lowered layout) and channels on axis 1, calibrated for another length
    assert_same(*both(OPS.mixed_fake_quant.default, x, s, 1, 2, bits, obits, 2.0, 4))
    xt = x.transpose(1, 2)
    assert_same(*both(OPS.mixed_fake_quant.default, xt, s[:7], 2, 1, bits, obits, 1.5, 1))


@pytest.mark.parametrize("mode", gemm.MODES)
@pytest.mark.parametrize("k", [16, 40])  # below SMALL_K: float product; above: the integer GEMM
def test_w4a4o8_linears(mode, k):
    x, s = _planted(2, 9, k, seed=16)
    n = 24
    w_q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen(17))
    w_p, w_s = pack_int4(w_q), torch.rand(n, generator=gen(18)) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen(19))
    out_s = torch.rand(9, generator=gen(20)) * 0.1 + 0.05
    with gemm.use(mode):
        for b in (bias, None):
            assert_same(*both(OPS.w4a4o8_linear_rt.default, x, s, w_p, w_s, b, k, 2.0, 4))
            # fused (k < 32, output axes last) and unfused (other axes or bits) requantization
            for axes, bits in (((1, 2), 4), ((-2, -1), 8), ((2, 1), 4), ((1, 2), 12)):
                assert_same(*both(OPS.w4a4o8_linear_mixed.default, x, s, w_p, w_s, b, k, 2.0, 4, out_s, *axes, bits,
                                  1.5, 3))
    # a cached layout is rebuilt after the weight changes in place (the numbers follow the weight)
    y1 = OPS.w4a4o8_linear_rt.default(x, s, w_p, w_s, None, k, 2.0, 4)
    w_s.mul_(2)
    y2 = OPS.w4a4o8_linear_rt.default(x, s, w_p, w_s, None, k, 2.0, 4)
    with python_impl():
        assert_same(y2, OPS.w4a4o8_linear_rt.default(x, s, w_p, w_s, None, k, 2.0, 4))
    assert not torch.equal(y1, y2)


def _error(op, *args):
    try:
        op(*args)
    except Exception as e:  # noqa: BLE001 - the type and message are what is compared
        return type(e), str(e).split("\n")[0]
    return None


@pytest.mark.parametrize("case", range(13))
def test_errors_are_the_python_ones(case):
    x8 = torch.zeros(3, 4, dtype=torch.int8)
    calls = [
        (OPS.quantize.default, torch.randn(3), torch.ones(1), torch.zeros(1), -200, 7),
        (OPS.quantize_per_token.default, torch.ones(3, 4, dtype=torch.int64), 8),
        (OPS.quantize_per_token.default, torch.ones(3, 4), 9),
        (OPS.int8_linear.default, x8, torch.ones(2, 1), x8, torch.ones(3), None),
        (OPS.w8a8_linear.default, torch.randn(2, 4), x8, torch.ones(5), None, None),
        (OPS.w8a8_linear.default, torch.randn(2, 4), x8, torch.ones(3), torch.ones(4), torch.ones(3, 1)),
        (OPS.causal_conv1d_silu.default, torch.randn(2, 3, 5), torch.randn(3, 1, 4), None, torch.ones(2), torch.ones(2),
         -8, 7, False),
        (OPS.w4a4o8_linear_rt.default, torch.randn(2, 5, 7), torch.ones(5), torch.zeros(3, 4, dtype=torch.uint8),
         torch.ones(3), None, 8, 2.0, 4),
        (OPS.causal_conv1d_silu_codes.default, torch.randn(2, 3, 5), torch.randn(3, 1, 4), None, None, None, -8, 7,
         False, torch.ones(3), -127, 127),
        (OPS.causal_conv1d_silu_codes.default, torch.randn(2, 3, 5), torch.randn(3, 1, 4), None, None, None, -8, 7,
         False, torch.ones(1), -127, 200),
        (OPS.causal_conv1d_silu_codes.default, torch.randn(2, 3), torch.randn(3, 1, 4), None, None, None, -8, 7,
         False, torch.ones(1), -127, 127),
        (OPS.causal_conv1d_silu.default, torch.randn(2, 3, 5), torch.randn(3, 1, 4), None, None, None, -8, 7, False,
         torch.ones(2), torch.ones(3), None),
        (OPS.causal_conv1d_silu_codes.default, torch.randn(2, 3, 5), torch.randn(3, 1, 4), None, None, None, -8, 7,
         False, torch.ones(1), -127, 127, torch.ones(5), torch.ones(3), torch.ones(4)),
    ]
    op, *args = calls[case]
    cpp = _error(op, *args)
    with python_impl():
        py = _error(op, *args)
    assert cpp is not None and cpp == py


@pytest.mark.parametrize("n", [56, 70, 384])
def test_w4a4o8_linear_rt_dense_outlier_term_is_the_tiles_bit_for_bit(n, monkeypatch):
    # many outliers per token (a low threshold): on CPUs with AMX the outlier term is a second
    # oneDNN GEMM (w4a4o8_linear.DENSE_OUTLIER_RATIO); the Python path told there is no AMX keeps
    # the epilogue's tiles, and both give the same numbers
    from ouromamba_fx.ops import w4a4o8_linear as w4

    k = 96
    x = torch.randn(2, 19, k, generator=gen(40)) * torch.rand(k, generator=gen(41)) * 3
    s = torch.rand(19, generator=gen(42)) * 0.2 + 0.05
    w_q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen(43))
    w_p, w_s = pack_int4(w_q), torch.rand(n, generator=gen(44)) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen(45))
    ext = MIXER_OPS.get()
    rows, s_in = w4.mixed_rows(x, s, 1, 2)
    _, q_out, _ = ext.mixed_quant(rows, s_in, 7, 0.5, 8, False, 0)
    assert ext.outlier_density(q_out.view(-1, k)) > 0.2
    with gemm.use("int_mm"):
        dense_here = gemm.onednn_s8() and gemm.amx()
        assert w4._dense_outliers(ext, q_out.view(-1, k), n) == dense_here
        # the tiles' weight layout is made only when the tiles run
        OPS.w4a4o8_linear_rt.default(x, s, w_p, w_s, bias, k, 0.5, 8)
        assert ("int4:outlier" in gemm.cache_tags(w_p)) == (not dense_here)
        for b in (bias, None):
            cpp = OPS.w4a4o8_linear_rt.default(x, s, w_p, w_s, b, k, 0.5, 8)
            monkeypatch.setattr(gemm, "amx", lambda: False)
            with python_impl():
                tiles = OPS.w4a4o8_linear_rt.default(x, s, w_p, w_s, b, k, 0.5, 8)
            monkeypatch.undo()
            assert_same(cpp, tiles)
            mask, step = w4.site_outlier_mask(x, s, 1, 2, 4, 0.5, 8)
            ref = OPS.w4a4o8_linear.default(x, mask, step, w_p, w_s, b, k)
            torch.testing.assert_close(cpp, ref, rtol=1e-6, atol=1e-5)
