"""The fused C++ CPU kernels of ``ouromamba::selective_scan_q`` and ``scan_state_stats`` vs their
plain-torch references."""

from __future__ import annotations

import pytest
import torch

from ouromamba_fx.kernels.cpu.build import SELECTIVE_SCAN_Q
from ouromamba_fx.ops import scan_quant as qscan
from tests.threads import assert_same_bits_at_thread_counts

pytestmark = pytest.mark.skipif(SELECTIVE_SCAN_Q.backend() != "cpp", reason="C++ quantized scan not built")

SCAN_Q = torch.ops.ouromamba.selective_scan_q.default


def make(b, d, length, n, dtype=torch.float32, calib_len=None, seed=0, optional=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    lc = calib_len or length
    u, delta = r(b, d, length), r(b, d, length, scale=0.5)
    A = -(torch.rand(d, n, generator=g) * 2 + 0.1).to(dtype)
    B, C = r(b, n, length), r(b, n, length)
    D, z, bias = (r(d), r(b, d, length), r(d, scale=0.1)) if optional else (None, None, None)
    r_c = torch.rand(d, generator=g) + 0.5
    r_l = torch.rand(lc, generator=g) + 0.5
    r_n = torch.rand(n, generator=g) + 0.5
    state_scale = torch.rand(lc, generator=g) * 0.05 + 0.02
    return [u, delta, A, B, C, D, z, bias, True, r_c, r_l, r_n, state_scale]


SHAPES = [
    (2, 37, 11, 16, None),   # d not a multiple of the vector width
    (1, 19, 1, 16, None),    # L = 1, batch 1
    (3, 8, 7, 1, None),      # d_state 1
    (2, 20, 9, 16, 13),      # run at another L than calibrated: r_l, state_scale resampled
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + (f"_cal{s[4]}" if s[4] else ""))
@pytest.mark.parametrize("state_bits", [4, 8, 16])
def test_forward_matches_reference(dtype, shape, state_bits):
    b, d, length, n, lc = shape
    args = make(b, d, length, n, dtype, lc, optional=state_bits != 4)
    out = SCAN_Q(*args, state_bits)
    ref = qscan.selective_scan_reparam_ref(*args, state_bits)
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    else:
        # A state code can flip at a near-tie created by float rounding; such flips are rare.
        close = torch.isclose(out, ref, rtol=1e-4, atol=1e-4)
        assert close.float().mean() >= 0.99, (out - ref).abs().max()
        if state_bits == 16:
            assert close.all()
    if state_bits < 16:  # state quantization really changes the output
        assert not torch.allclose(out, qscan.selective_scan_reparam_ref(*args, 16), rtol=1e-3, atol=1e-3)


def test_state_rounding_is_half_even_with_true_division_and_clamped():
    # L steps of a scan whose state is exactly B_t (A = -inf -> no carry, delta = u = 1), scale 0.5:
    # h / s = 2 * B_t. One step per case.
    vals = torch.tensor([1.25, 1.75, -1.25, 0.25, 0.75, 100.0, -100.0, 0.3])
    length = vals.numel()
    u = torch.ones(1, 1, length)
    delta = torch.ones(1, 1, length)
    A = torch.full((1, 1), -torch.inf)
    B = vals.reshape(1, 1, length)
    C = torch.ones(1, 1, length)
    ones1, onesl = torch.ones(1), torch.ones(length)
    state_scale = torch.full((length,), 0.5)
    out = SCAN_Q(u, delta, A, B, C, None, None, None, False, ones1, onesl, ones1, state_scale, 8)
    codes = torch.tensor([2.0, 4.0, -2.0, 0.0, 2.0, 127.0, -127.0, 1.0])  # 2.5 -> 2, 3.5 -> 4, 0.5 -> 0, 1.5 -> 2
    torch.testing.assert_close(out.flatten(), codes * 0.5, rtol=0, atol=0)
    ref = qscan.selective_scan_reparam_ref(u, delta, A, B, C, None, None, None, False, ones1, onesl, ones1, state_scale, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_strided_and_low_precision_inputs():
    b, d, length, n = 2, 24, 10, 16
    args = make(b, d, length, n)
    # channel-contiguous u / delta / z and time-major B / C, as after transposing projections
    for i in (0, 1, 6):
        args[i] = args[i].transpose(1, 2).contiguous().transpose(1, 2)
    for i in (3, 4):
        args[i] = args[i].transpose(1, 2).contiguous().transpose(1, 2)
    assert not args[0].is_contiguous()
    out = SCAN_Q(*args, 8)
    ref = qscan.selective_scan_reparam_ref(*args, 8)
    assert torch.isclose(out, ref, rtol=1e-4, atol=1e-4).float().mean() >= 0.99
    half = [a.bfloat16() if isinstance(a, torch.Tensor) and a.dim() == 3 else a for a in args]
    out_h = SCAN_Q(*half, 16)
    assert out_h.dtype == torch.bfloat16
    torch.testing.assert_close(out_h.float(), qscan.selective_scan_reparam_ref(*half, 16).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 37, 11, 16), (1, 8, 1, 1), (2, 5, 6, 3)])
def test_state_stats_match_reference(dtype, shape):
    args = make(*shape, dtype)
    u, delta, A, B, C, _, _, bias = args[:8]
    h_sum, h_max = qscan.scan_state_stats(u, delta, A, B, C, bias, True)
    r_sum, r_max = qscan.scan_state_stats_ref(u, delta, A, B, C, bias, True)
    assert h_sum.shape == (shape[1], shape[2], shape[3]) and h_sum.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_sum, r_sum, **tol)
    torch.testing.assert_close(h_max, r_max, **tol)
    assert (h_max > 0).any() and (h_sum >= h_max - 1e-6).all()
    # without bias / softplus too
    torch.testing.assert_close(qscan.scan_state_stats(u, delta.abs(), A, B, C)[0],
                               qscan.scan_state_stats_ref(u, delta.abs(), A, B, C)[0], **tol)


@pytest.mark.parametrize("optional", [True, False])
def test_opcheck(optional):
    args = make(2, 20, 5, 4, optional=optional)
    torch.library.opcheck(SCAN_Q, (*args, 8))


# ---------------------------------------------------------------------------------------------
# ouromamba::selective_scan_qi: int8 delta / B / C codes

SCAN_QI = torch.ops.ouromamba.selective_scan_qi.default
QUANTIZE = torch.ops.ouromamba.quantize.default
DEQUANTIZE = torch.ops.ouromamba.dequantize.default


def quantized(x, per_step, asym=False):
    """(codes, scale, zero_point) as the reference graph's quantize node makes them (8 bit)."""
    length = x.shape[-1]
    amax = x.abs().amax(dim=(0, 1)) if per_step else x.abs().amax().reshape(1)
    scale = (amax / 127).clamp_min(1e-6).float()
    scale = scale.reshape(1, length) if per_step else scale
    zp = torch.full_like(scale, 3.0 if asym else 0.0)
    return QUANTIZE(x, scale, zp, -128, 127), scale, zp


def qi_args(b, d, length, n, per_step=True, dtype=torch.float32, calib_len=None):
    args = make(b, d, length, n, dtype, calib_len)
    u, delta, A, B, C, D, z, bias, sp, r_c, r_l, r_n, ss = args
    dq = quantized(delta, per_step, asym=True)
    bq = quantized(B, per_step)
    cq = quantized(C, not per_step)  # mix per-tensor and per-step scales in one call
    return [u, *dq, A, *bq, *cq, D, z, bias, sp], (r_c, r_l, r_n, ss)


def dequant_inputs(qargs):
    u, dq, ds, dz, A, bq, bs, bz, cq, cs, cz, D, z, bias, sp = qargs
    return [u, DEQUANTIZE(dq, ds, dz), A, DEQUANTIZE(bq, bs, bz), DEQUANTIZE(cq, cs, cz), D, z, bias, sp]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + (f"_cal{s[4]}" if s[4] else ""))
@pytest.mark.parametrize("per_step", [True, False])
def test_qi_equals_dequantize_then_scan(dtype, shape, per_step):
    b, d, length, n, lc = shape
    qargs, (r_c, r_l, r_n, ss) = qi_args(b, d, length, n, per_step, dtype, lc)
    assert qargs[1].dtype == torch.int8
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    # no reparameterization, float state: dequantize -> ouromamba::selective_scan
    out = SCAN_QI(*qargs, None, None, None, None, 16)
    torch.testing.assert_close(out, torch.ops.ouromamba.selective_scan(*dequant_inputs(qargs)), **tol)
    # reparameterized, quantized state: dequantize -> ouromamba::selective_scan_q
    out = SCAN_QI(*qargs, r_c, r_l, r_n, ss, 8)
    ref = qscan.selective_scan_reparam_ref(*dequant_inputs(qargs), r_c, r_l, r_n, ss, 8)
    torch.testing.assert_close(qscan.selective_scan_int8_inputs_ref(*qargs, r_c, r_l, r_n, ss, 8), ref, rtol=0, atol=0)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, **tol)
    else:
        assert torch.isclose(out, ref, **tol).float().mean() >= 0.99


def test_qi_strided_codes_and_float_passthrough():
    b, d, length, n = 2, 21, 12, 16
    qargs, (r_c, r_l, r_n, ss) = qi_args(b, d, length, n)
    ref = SCAN_QI(*qargs, r_c, r_l, r_n, ss, 16)
    # codes of B / C produced time-major (as x_proj's output is), seen through a transpose
    for i in (5, 8):
        qargs[i] = qargs[i].transpose(1, 2).contiguous().transpose(1, 2)
    assert not qargs[5].is_contiguous()
    torch.testing.assert_close(SCAN_QI(*qargs, r_c, r_l, r_n, ss, 16), ref, rtol=1e-5, atol=1e-5)
    # B as floats (not quantized): same numbers as passing its dequantized values
    mixed = list(qargs)
    mixed[5:8] = [DEQUANTIZE(qargs[5], qargs[6], qargs[7]), None, None]
    torch.testing.assert_close(SCAN_QI(*mixed, r_c, r_l, r_n, ss, 16), ref, rtol=1e-5, atol=1e-5)


def test_qi_rejects_bad_quantization_params():
    qargs, _ = qi_args(1, 8, 6, 4)
    bad = list(qargs)
    bad[2] = None  # int8 delta without its scale
    with pytest.raises(ValueError, match="scale"):
        SCAN_QI(*bad, None, None, None, None, 16)
    bad = list(qargs)
    bad[6] = torch.ones(1, 5)  # neither per tensor nor per step
    with pytest.raises(ValueError, match="per time-step"):
        SCAN_QI(*bad, None, None, None, None, 16)
    with pytest.raises(ValueError, match="state_scale"):
        SCAN_QI(*qargs, None, None, None, None, 8)


@pytest.mark.parametrize("reparam", [True, False])
def test_qi_opcheck(reparam):
    qargs, factors = qi_args(2, 20, 5, 4)
    torch.library.opcheck(SCAN_QI, (*qargs, *(factors if reparam else (None,) * 4), 8 if reparam else 16))


def test_reference_fallback_when_kernel_unavailable(monkeypatch):
    # as after a failed build or OUROMAMBA_SCAN_BACKEND=reference: the ops still work, via the references
    args = make(2, 9, 5, 3)
    want_q = SCAN_Q(*args, 8)
    qargs, factors = qi_args(2, 9, 5, 3)
    want_qi = SCAN_QI(*qargs, *factors, 8)
    monkeypatch.setattr(SELECTIVE_SCAN_Q, "_ext", None)
    assert SELECTIVE_SCAN_Q.backend() == "reference"
    assert torch.isclose(SCAN_Q(*args, 8), want_q, rtol=1e-4, atol=1e-4).float().mean() >= 0.99
    assert torch.isclose(SCAN_QI(*qargs, *factors, 8), want_qi, rtol=1e-4, atol=1e-4).float().mean() >= 0.99
    s, m = qscan.scan_state_stats(*args[:5], args[7], True)
    torch.testing.assert_close(s, qscan.scan_state_stats_ref(*args[:5], args[7], True)[0])


def test_same_bits_whichever_thread_runs_a_block():
    # Blocks go to threads as they come free (om_parallel.h): 1, 2 and 3 threads, and 3 again,
    # give the same scan output and state statistics (200 channels: 13 blocks of 16).
    args = make(3, 200, 40, 16)
    u, delta, A, B, C, _, _, bias = args[:8]

    def run():
        return [SCAN_Q(*args, 8), *qscan.scan_state_stats(u, delta, A, B, C, bias, True)]

    assert_same_bits_at_thread_counts(run)
