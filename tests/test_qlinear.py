"""The integer linear custom ops (CPU paths) against their plain-torch references."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from ouromamba_fx import numerics
from ouromamba_fx.ops import gemm, int4, mixed, quant
from ouromamba_fx.ops import int8_linear as i8
from ouromamba_fx.ops import w4a4o8_linear as w4
from ouromamba_fx.ops.quant import quantize as quantize_op

OPS = torch.ops.ouromamba
SHAPES = [(1, 5, 3), (3, 33, 17), (17, 33, 70), (16, 64, 32)]  # (M, K, N)


def _weights(n, k, bits=8):
    qmax = 2 ** (bits - 1) - 1
    return (torch.randint(-qmax, qmax + 1, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-3,
            torch.randn(n))


def _with_ties(x, qmax):
    """Put exact .5 quanta (and a -0.5, 2.5) into row 0, so round-half-even is exercised."""
    x = x.clone()
    if x.shape[-1] >= 5:
        step = 2.0 ** -4  # amax / qmax = step exactly
        x[0] = (torch.rand(x.shape[-1]) * 2 - 1) * (qmax - 1) * step
        x[0, :5] = torch.tensor([qmax, 0.5, 2.5, -0.5, -3.5]) * step
    return x


# --- int4 packing -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (4, 8), (7, 33)])
def test_pack_int4_round_trip(n, k):
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    p = int4.pack_int4(w)
    assert p.dtype == torch.uint8 and p.shape == (n, (k + 1) // 2)
    assert torch.equal(int4.unpack_int4(p, k), w)


def test_pack_int4_layout_and_errors():
    p = int4.pack_int4(torch.tensor([[1, -2, 3]], dtype=torch.int8))
    assert p.tolist() == [[0xE1, 0x03]]  # column 0 low nibble, column 1 high nibble, pad 0
    every = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    assert torch.equal(int4.unpack_int4(int4.pack_int4(every), 16), every)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128)
    assert torch.equal(int4.pack_int4(int4.unpack_int4(every_byte, 256)), every_byte)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        int4.pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match="k=5"):
        int4.unpack_int4(p, 5)


# --- quantization ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 5), (3, 33), (2, 3, 17)])
def test_quantize_per_token_matches_ref(bits, shape):
    qmax = 2 ** (bits - 1) - 1
    x = torch.randn(shape) * 3
    if x.dim() == 2:
        x = _with_ties(x, qmax)
    q, s = OPS.quantize_per_token(x, bits)
    q_ref, s_ref = quant.quantize_per_token_ref(x, bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (*shape[:-1], 1)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.abs().max() <= qmax
    if x.dim() == 2 and shape[-1] >= 5:
        assert s[0, 0].item() == 2.0 ** -4 and q[0, :5].tolist() == [qmax, 0, 2, 0, -4]
    # Same numbers as the package-wide reference quantize op with this scale.
    assert torch.equal(q, quantize_op(x, s, torch.zeros(1), -qmax, qmax))


def test_quantize_per_token_round_half_even_and_zero_rows():
    x = torch.zeros(2, 6)
    x[1] = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -2.5])  # scale exactly 1
    q, s = OPS.quantize_per_token(x, 8)
    assert s[0, 0].item() == pytest.approx(numerics.EPS) and q[0].eq(0).all()
    assert s[1, 0].item() == 1.0
    assert q[1].tolist() == [127, 0, 2, 2, 0, -2]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m,k", [(1, 5), (3, 33), (17, 64)])
def test_outlier_split_matches_ref(static, m, k):
    x = torch.randn(m, k)
    mask = torch.rand(m, k) < 0.1
    mask[0] = False  # a row without outliers: s_out = eps, q_out = 0
    if m > 2:
        mask[2] = True  # a row of outliers only
    inlier_scale = torch.rand(m, 1) * 0.1 + 0.05 if static else None
    out = OPS.outlier_split(x, mask, inlier_scale, 4)
    ref = mixed.outlier_split_ref(x, mask, inlier_scale, 4)
    for got, want in zip(out, ref):
        assert torch.equal(got, want)
    q_in, s_in, q_out, s_out = out
    assert q_in[mask].eq(0).all() and q_out[~mask].eq(0).all()
    assert q_in.abs().max() <= 7 and q_out.abs().max() <= 127
    assert s_out[0, 0].item() == pytest.approx(numerics.EPS)
    if static:
        assert torch.equal(s_in, inlier_scale)
    else:  # dequantized inliers + outliers reconstruct x within half a step per element
        x_hat = q_in.float() * s_in + q_out.float() * s_out
        assert ((x_hat - x).abs() <= torch.where(mask, s_out, s_in) / 2 + 1e-6).all()


def test_outlier_split_static_scale_broadcasts():
    x, mask = torch.randn(4, 8), torch.rand(4, 8) < 0.2
    a = OPS.outlier_split(x, mask, torch.tensor([0.1]), 4)
    b = OPS.outlier_split(x, mask, torch.full((4, 1), 0.1), 4)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert a[1].shape == (4, 1)


# --- int8 GEMM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_matches_ref(m, k, n, per_row, with_bias):
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    x_scale = torch.rand(m, 1) + 0.5 if per_row else torch.tensor([0.3])
    w_q, w_scale, bias = _weights(n, k)
    bias = bias if with_bias else None
    y = OPS.int8_linear(x_q, x_scale, w_q, w_scale, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, i8.int8_linear_ref(x_q, x_scale, w_q, w_scale, bias), rtol=1e-6, atol=0)


def test_int8_linear_integer_part_exact():
    # unit scales, no bias: the output is the int32 product itself (|acc| < 2**24 stays exact in fp32)
    x_q = torch.full((5, 1000), -127, dtype=torch.int8)
    x_q[1::2] = torch.randint(-127, 128, (2, 1000), dtype=torch.int8)
    w_q = torch.full((7, 1000), 127, dtype=torch.int8)
    y = OPS.int8_linear(x_q, torch.ones(1), w_q, torch.ones(7), None)
    acc = x_q.long() @ w_q.long().t()
    assert torch.equal(y, acc.float()) and y[0, 0].item() == -127 * 127 * 1000
    assert torch.equal(gemm.exact_int_mm(x_q, w_q), acc.int())


@pytest.mark.parametrize("m,n", [(1, 1), (3, 17), (64, 40)])
def test_int_mm_k1(m, n):
    # torch._int_mm on CPU is wrong for K == 1 (torch 2.14); the op must not be
    a, b = torch.randint(-127, 128, (m, 1), dtype=torch.int8), torch.randint(-127, 128, (n, 1), dtype=torch.int8)
    assert torch.equal(gemm.exact_int_mm(a, b), (a.long() @ b.long().t()).int())
    y = OPS.int8_linear(a, torch.ones(1), b, torch.ones(n), None)
    assert torch.equal(y, (a.long() @ b.long().t()).float())


def test_int8_linear_weight_scale_shapes_and_noncontiguous():
    x_q = torch.randint(-127, 128, (9, 12), dtype=torch.int8)
    w_q, w_scale, bias = _weights(6, 12)
    want = i8.int8_linear_ref(x_q, torch.ones(9, 1), w_q, w_scale, bias)
    assert torch.equal(OPS.int8_linear(x_q, torch.ones(9, 1), w_q, w_scale.reshape(6, 1), bias), want)
    xt = x_q.t().contiguous().t()  # column-major x_q
    wt = w_q.t().contiguous().t()
    assert torch.equal(OPS.int8_linear(xt, torch.ones(9), wt, w_scale, bias), want)


@pytest.mark.parametrize("bad", ["k", "dtype", "x_scale", "w_scale", "bias"])
def test_int8_linear_rejects_bad_shapes(bad):
    x_q = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
    args = dict(x_q=x_q, x_scale=torch.ones(4, 1), w_q=torch.randint(-127, 128, (3, 8), dtype=torch.int8),
                w_scale=torch.ones(3), bias=torch.zeros(3))
    args.update({"k": dict(w_q=torch.zeros(3, 7, dtype=torch.int8)), "dtype": dict(x_q=x_q.float()),
                 "x_scale": dict(x_scale=torch.ones(2, 1)), "w_scale": dict(w_scale=torch.ones(4)),
                 "bias": dict(bias=torch.zeros(3, 1))}[bad])
    with pytest.raises(ValueError):
        i8.int8_linear(**args)


# --- W8A8 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a8_dynamic_matches_ref_and_float(m, k, n):
    x = _with_ties(torch.randn(m, k), 127)
    w = torch.randn(n, k)
    w_scale = w.abs().amax(dim=1) / 127
    w_q = torch.round(w / w_scale[:, None]).to(torch.int8)
    bias = torch.randn(n)
    y = OPS.w8a8_linear(x, w_q, w_scale, bias, None)
    torch.testing.assert_close(y, i8.w8a8_linear_ref(x, w_q, w_scale, bias, None), rtol=1e-6, atol=0)
    # and it is a good approximation of the float linear
    y_f = F.linear(x, w, bias)
    assert (y - y_f).norm() / y_f.norm() < 0.02


@pytest.mark.parametrize("scale_shape", [(1,), (5, 1), (2, 5, 1)])
def test_w8a8_static_scale_and_leading_dims(scale_shape):
    x = torch.randn(2, 5, 33)
    w_q, w_scale, bias = _weights(17, 33)
    x_scale = torch.rand(scale_shape) * 0.02 + 0.01
    y = OPS.w8a8_linear(x, w_q, w_scale, bias, x_scale)
    assert y.shape == (2, 5, 17)
    want = i8.w8a8_linear_ref(x, w_q, w_scale, bias, x_scale)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=0)
    # the same as quantizing with the reference op and running int8_linear
    xs = x_scale.expand(2, 5, 1)
    x_q = quantize_op(x, xs, torch.zeros(1), -127, 127)
    y2 = OPS.int8_linear(x_q.reshape(10, 33), xs.reshape(10, 1), w_q, w_scale, bias)
    assert torch.equal(y.reshape(10, 17), y2)


def test_w8a8_rejects_bad_static_scale():
    w_q, w_scale, _ = _weights(4, 8)
    with pytest.raises(ValueError, match="broadcast"):
        i8.w8a8_linear(torch.randn(6, 8), w_q, w_scale, None, torch.ones(6))


# --- W4A4 + 8-bit outliers -------------------------------------------------------------------------------

def _w4(n, k):
    w_q = torch.randint(-7, 8, (n, k), dtype=torch.int8)
    return w_q, int4.pack_int4(w_q), torch.rand(n) * 0.01 + 1e-3, torch.randn(n)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "channels", "random", "dense"])
@pytest.mark.parametrize("static", [False, True])
def test_w4a4o8_matches_ref(m, k, n, mask_kind, static):
    x = torch.randn(m, k)
    mask = {"none": torch.zeros(m, k, dtype=torch.bool),
            "channels": (torch.arange(k) % 16 == 3).expand(m, k),  # fixed outlier channels (gather path)
            "random": torch.rand(m, k) < 0.05,
            "dense": torch.rand(m, k) < 0.7}[mask_kind]  # > half of the columns: full-K path
    x = torch.where(mask, x * 20, x)
    _, w_packed, w_scale, bias = _w4(n, k)
    inlier_scale = torch.rand(m, 1) * 0.3 + 0.2 if static else None
    y = OPS.w4a4o8_linear(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    want = w4.w4a4o8_linear_masked_ref(x, mask, inlier_scale, w_packed, w_scale, bias, k)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_w4a4o8_integer_parts_and_definition():
    """The op equals w_scale * (s_in * (q_in @ Wq^T) + s_out * (q_out @ Wq^T)) + bias, built from
    outlier_split and unpack_int4."""
    m, k, n = 6, 33, 10
    x = torch.randn(m, k)
    mask = torch.rand(m, k) < 0.1
    w_q, w_packed, w_scale, bias = _w4(n, k)
    q_in, s_in, q_out, s_out = OPS.outlier_split(x, mask, None, 4)
    acc_in = (q_in.long() @ w_q.long().t()).float()
    acc_out = (q_out.long() @ w_q.long().t()).float()
    want = (acc_in * s_in + acc_out * s_out) * w_scale + bias
    y = OPS.w4a4o8_linear(x, mask, None, w_packed, w_scale, bias, k)
    assert torch.equal(y, want)


@pytest.mark.parametrize("n_cols", [1, 5, 30])  # gathered outlier columns (fp32 GEMM), and > K/2 (int8)
def test_w4a4o8_outlier_paths_bit_exact(n_cols):
    m, k, n = 40, 48, 24
    x = torch.randn(m, k) * 4
    mask = torch.zeros(m, k, dtype=torch.bool)
    mask[:, torch.randperm(k)[:n_cols]] = torch.rand(m, n_cols) < 0.7
    x = torch.where(mask, x * 30, x)
    _, w_packed, w_scale, bias = _w4(n, k)
    y = OPS.w4a4o8_linear(x, mask, None, w_packed, w_scale, bias, k)
    assert torch.equal(y, w4.w4a4o8_linear_masked_ref(x, mask, None, w_packed, w_scale, bias, k))


def test_w4a4o8_leading_dims_odd_k_and_accuracy():
    b, l, k, n = 2, 5, 33, 12
    x = torch.randn(b, l, k)
    mask = torch.zeros(b, l, k, dtype=torch.bool)
    mask[..., 7] = True
    x[..., 7] *= 50  # a large outlier channel, kept at 8 bits
    w = torch.randn(n, k)
    w_scale = w.abs().amax(dim=1) / 7
    w_q = torch.round(w / w_scale[:, None]).clamp(-7, 7).to(torch.int8)
    inlier_scale = torch.rand(l, 1) * 0.1 + 0.4  # per token position, broadcast over batch
    y = OPS.w4a4o8_linear(x, mask, inlier_scale, int4.pack_int4(w_q), w_scale, None, k)
    assert y.shape == (b, l, n)
    want = w4.w4a4o8_linear_masked_ref(x, mask, inlier_scale, int4.pack_int4(w_q), w_scale, None, k)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    w_hat = w_q.float() * w_scale[:, None]
    y_f = F.linear(x, w_hat)  # only activation quantization error is left
    assert (y - y_f).norm() / y_f.norm() < 0.25


def test_w4a4o8_rejects_bad_k_and_mask():
    _, w_packed, w_scale, _ = _w4(4, 9)
    with pytest.raises(ValueError, match="k=8"):
        w4.w4a4o8_linear_masked(torch.randn(3, 8), torch.zeros(3, 8, dtype=torch.bool), None, w_packed, w_scale, None, 8)
    with pytest.raises(ValueError, match="mask"):
        w4.w4a4o8_linear_masked(torch.randn(3, 9), torch.zeros(3, 9), None, w_packed, w_scale, None, 9)


# --- registration ---------------------------------------------------------------------------------------

def _opcheck_cases():
    x = torch.randn(5, 33)
    mask = torch.rand(5, 33) < 0.1
    x_q, s = quant.quantize_per_token_ref(x, 8)
    w_q, w_scale, bias = _weights(17, 33)
    _, w_packed, w4_scale, _ = _w4(17, 33)
    return [
        (OPS.quantize_per_token.default, (torch.randn(2, 3, 33), 8)),
        (OPS.quantize_per_token.default, (x, 4)),
        (OPS.outlier_split.default, (x, mask, None, 4)),
        (OPS.outlier_split.default, (x, mask, torch.rand(5, 1) + 0.1, 4)),
        (OPS.int8_linear.default, (x_q, s, w_q, w_scale, bias)),
        (OPS.int8_linear.default, (x_q, torch.tensor([0.1]), w_q, w_scale, None)),
        (OPS.w8a8_linear.default, (torch.randn(2, 3, 33), w_q, w_scale, bias, None)),
        (OPS.w8a8_linear.default, (x, w_q, w_scale, None, torch.tensor([0.02]))),
        (OPS.w4a4o8_linear.default, (x, mask, None, w_packed, w4_scale, bias, 33)),
        (OPS.w4a4o8_linear.default, (x.reshape(1, 5, 33), mask.reshape(1, 5, 33), torch.rand(5, 1) + 0.1,
                                     w_packed, w4_scale, None, 33)),
    ]


def test_opcheck_all_ops():
    for op, args in _opcheck_cases():
        opcheck(op, args)


def test_schemas_and_cuda_kernels_registered():
    schemas = {name: str(getattr(OPS, name).default._schema) for name in
               ("quantize_per_token", "outlier_split", "int8_linear", "w8a8_linear", "w4a4o8_linear")}
    assert schemas["quantize_per_token"] == "ouromamba::quantize_per_token(Tensor x, int bits) -> (Tensor q, Tensor scale)"
    assert schemas["w4a4o8_linear"] == ("ouromamba::w4a4o8_linear(Tensor x, Tensor mask, Tensor? inlier_scale, "
                                        "Tensor w_packed, Tensor w_scale, Tensor? bias, int k) -> Tensor")
    for name in schemas:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ouromamba::{name}", "CUDA"), name


def test_ops_compile_fullgraph():
    """Opaque to torch.compile (fake impls give the shapes), no graph break."""
    w_q, w_scale, bias = _weights(17, 33)
    _, w_packed, w4_scale, _ = _w4(17, 33)

    def f(x, mask):
        return OPS.w8a8_linear(x, w_q, w_scale, bias, None) + OPS.w4a4o8_linear(
            x, mask, None, w_packed, w4_scale, None, 33)

    x, mask = torch.randn(2, 3, 33), torch.rand(2, 3, 33) < 0.1
    got = torch.compile(f, backend="eager", fullgraph=True)(x, mask)
    assert torch.equal(got, f(x, mask))
