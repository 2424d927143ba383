"""The CPU integer GEMM paths (``ouromamba_fx.ops.gemm``): each exact against an int64
reference, the u8 x s8 exactness bound, the weight cache, and both modes giving the same numbers
end to end on lowered models, whichever mode this CPU picks by itself."""

import gc
import threading

import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx.ops import gemm as cpu_gemm
from ouromamba_fx.models import VisionMamba

from .conftest import tiny_config


def exact(a, b):
    return (a.long() @ b.long().t()).double()


def ints(shape, q, seed):
    return torch.randint(-q, q + 1, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def decomposed_twice(mode, a, w, qmax_w, kh, block):
    """decomposed_mm (prepacked path) of the codes ``a`` and of their first 5 rows in ``mode``:
    (out, again, cache entries added)."""
    before = cpu_gemm.cache_size()
    with cpu_gemm.use(mode):
        out = cpu_gemm.decomposed_mm(a.float(), w, 127, qmax_w, kh=kh, block=block, prepack=True)
        again = cpu_gemm.decomposed_mm(a[:5].float(), w, 127, qmax_w, kh=kh, block=block, prepack=True)
    return out, again, cpu_gemm.cache_size() - before


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 33, 5), (64, 384, 96)])
def test_float_mm_is_exact(m, k, n):
    a, b = ints((m, k), 127, 0), ints((n, k), 127, 1)
    assert torch.equal(cpu_gemm.float_mm(a, b, 127, 127).double(), exact(a, b))


def test_float_mm_splits_k_where_fp32_would_round(monkeypatch):
    # K * 127 * 127 >= 2^24 for K >= 1041: the same all-127 rows summed in one fp32 GEMM would
    # reach 2^24 and beyond; chunked, the result is the exact integer
    k = 3000
    a = torch.full((3, k), 127, dtype=torch.int8)
    b = torch.full((2, k), 127, dtype=torch.int8)
    b[1, ::7] = -127
    want = exact(a, b)
    assert want[0, 0] > 2 ** 24  # the case that needs the split
    assert torch.equal(cpu_gemm.float_mm(a, b, 127, 127), want.float())  # = torch._int_mm(...).float()
    with cpu_gemm.use("emulated"):
        assert torch.equal(cpu_gemm.int_mm(a, b).double(), want)


def test_int_mm_both_modes_exact():
    a, b = ints((17, 40), 127, 2), ints((9, 40), 127, 3)
    for mode in cpu_gemm.MODES:
        with cpu_gemm.use(mode):
            out = cpu_gemm.int_mm(a, b)
        assert out.dtype == torch.int32 and torch.equal(out.double(), exact(a, b)), mode


def test_u8_bound():
    assert cpu_gemm.u8_exact(7, 8) and cpu_gemm.u8_exact(127, 8) and cpu_gemm.u8_exact(127, 64)
    assert not cpu_gemm.u8_exact(127, 127) and not cpu_gemm.u8_exact(127, 65)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("qa", [7, 127])
@pytest.mark.parametrize("m,k,n", [(1, 2, 1), (13, 31, 7), (200, 384, 160)])
def test_u8_mm_exact_for_int4_weights(qa, m, k, n):
    # full-range codes: every int16 pair sum is as large as these ranges allow
    a = ints((m, k), qa, 4)
    b = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    a[0] = qa
    b[0] = 7
    key = torch.zeros(1)
    out = cpu_gemm.u8_mm(a, b, key)
    assert out.dtype == torch.float32 and torch.equal(out.double(), exact(a, b))


@pytest.mark.skipif(not cpu_gemm.onednn_s8(), reason="needs an x86 CPU with oneDNN")
@pytest.mark.parametrize("qa,w_lo,w_hi", [(7, -8, 7), (127, -127, 127)])  # W4A4O8's inliers, W8A8's ranges
@pytest.mark.parametrize("m,k,n", [(1, 2, 1), (13, 31, 7), (200, 384, 160), (300, 768, 56)])
def test_s8_mm_exact(qa, w_lo, w_hi, m, k, n):
    if not cpu_gemm.u8_exact(qa, max(-w_lo, w_hi)) and not cpu_gemm.int8_dot():
        # without VNNI / AMX oneDNN adds u8 x s8 pairs in saturating int16 (gemm.u8_exact): s8_mm is
        # used only in mode int_mm, which such CPUs do not pick
        pytest.skip("8-bit x 8-bit s8_mm is exact only on CPUs with VNNI or AMX")
    # full-range codes of both signs, a row and a weight row at the extremes
    a = ints((m, k), qa, 6)
    b = torch.randint(w_lo, w_hi + 1, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(7))
    a[0], a[-1] = qa, -qa
    b[0] = w_lo
    key, made = torch.zeros(1), []
    out = cpu_gemm.s8_mm(a, lambda: made.append(1) or b, key)
    assert out.dtype == torch.float32 and torch.equal(out.double(), exact(a, b).float().double())
    assert torch.equal(cpu_gemm.s8_mm(a[:5], lambda: made.append(1) or b, key).double(), exact(a[:5], b).float().double())
    assert len(made) == 1 and "onednn" in cpu_gemm.cache_tags(key)  # prepacked once


@pytest.mark.skipif(not cpu_gemm.onednn_s8(), reason="needs an x86 CPU with oneDNN")
@pytest.mark.parametrize("kh,block", [(0, 0), (3, 0), (3, 2), (3, -1)])
def test_s8_mm_op_weight_operands_exact_and_prepacked_once(kh, block):
    """The op of the decomposed linears / convs: a linear's weight, one kernel row of a conv's
    rows, or all its rows side by side; exact, and the operand prepacked once per weight."""
    n, kwc = 24, 40
    w = torch.randint(-127, 128, ((kh or 1) * n, kwc), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    operand = cpu_gemm.weight_operand(w, kh, block)
    assert operand.shape == (n, kwc * (kh if block == -1 else 1))
    if kh and block >= 0:
        assert torch.equal(operand, w[block * n:(block + 1) * n])
    a = ints((37, operand.shape[1]), 127, 9)
    out, again, added = decomposed_twice("int_mm", a, w, 127, kh, block)
    assert torch.equal(out.double(), exact(a, operand).float().double())
    assert torch.equal(again, out[:5])
    # prepacked once; on a CPU without VNNI / AMX (where 8-bit products through oneDNN are not exact)
    # forced mode int_mm keeps them on torch._int_mm, with nothing prepacked
    assert added == (1 if cpu_gemm.int8_dot() else 0)
    with pytest.raises(ValueError, match="s8_mm expects"):
        cpu_gemm.S8_MM_OP(a, w, 5, 0)


@pytest.mark.skipif(not cpu_gemm.s16(), reason="needs the C++ kernels built with AVX2 and FMA")
@pytest.mark.parametrize("kh,block", [(0, 0), (3, 0), (3, 2), (3, -1)])
def test_s16_mm_op_weight_operands_exact_and_packed_once(kh, block):
    """The emulated mode's op for the decomposed linears / convs (AVX2 int16 pairs): exact for
    8-bit codes and the whole int8 weight range, -128 included, and the operand packed once per
    weight."""
    n, kwc = 24, 41
    w = torch.randint(-128, 128, ((kh or 1) * n, kwc), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    w.view(-1)[:7] = -128
    operand = cpu_gemm.weight_operand(w, kh, block)
    a = ints((37, operand.shape[1]), 127, 9)
    a[0], a[1] = -127, 127
    out, again, added = decomposed_twice("emulated", a, w, 128, kh, block)
    assert torch.equal(out.double(), exact(a, operand).float().double())
    assert torch.equal(again, out[:5])
    assert added == 1
    assert any(t.startswith("s16") for t in cpu_gemm.cache_tags(w))
    with pytest.raises(ValueError, match="ouromamba::s16_mm expects"):
        cpu_gemm.S16_MM_OP(a, w, 5, 0)


@pytest.mark.skipif(not cpu_gemm.s16(), reason="needs the C++ kernels built with AVX2 and FMA")
@pytest.mark.parametrize("m,k,n", [(0, 8, 4), (1, 1, 1), (3, 7, 17), (130, 33, 16), (197, 24, 769), (613, 384, 40)])
def test_s16_mm_exact_at_every_edge(m, k, n):
    """Rows past the 4-row tiles and 64-row blocks, odd K (a zero pair), columns past the 16-column
    panels, and few row blocks (the panels split among the threads): float32 of the exact integers."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(m + k))
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    out = cpu_gemm.S16_MM_OP(a, b, 0, 0)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert torch.equal(out.double(), exact(a, b).float().double())
    # a non-contiguous q (a column slice) is taken as its values
    wide = torch.randint(-128, 128, (m, k + 3), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cpu_gemm.S16_MM_OP(wide[:, 3:], b, 0, 0).double(), exact(wide[:, 3:], b).float().double())


@pytest.mark.skipif(not cpu_gemm.s16(), reason="needs the C++ kernels built with AVX2 and FMA")
def test_s16_kernel_checks_its_operands():
    from ouromamba_fx.kernels.cpu.build import MIXER_OPS

    ext = MIXER_OPS.get()
    w = torch.randint(-128, 128, (20, 10), dtype=torch.int8)
    packed = ext.s16_pack(w)
    assert packed.shape == (2, 5, 16, 2) and packed.dtype == torch.int16
    with pytest.raises(RuntimeError, match="s16_pack: w must be an int8"):
        ext.s16_pack(w.float())
    with pytest.raises(RuntimeError, match="packed weights were made for 9 or 10"):
        ext.s16_mm(torch.zeros(3, 12, dtype=torch.int8), packed, 20)
    with pytest.raises(RuntimeError, match="do not have 40 rows"):
        ext.s16_mm(torch.zeros(3, 10, dtype=torch.int8), packed, 40)
    with pytest.raises(RuntimeError, match="q must be an int8"):
        ext.s16_mm(torch.zeros(3, 10), packed, 20)


@pytest.mark.skipif(not cpu_gemm.s16(), reason="needs the C++ kernels built with AVX2 and FMA")
def test_s16_mm_not_taken_beyond_8_bits_or_without_prepack():
    """Codes over 127 in magnitude (qmax_a, which int8 cannot hold) and unprepacked calls keep the
    exact fp32 GEMMs."""
    w = torch.randint(-127, 128, (16, 40), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    a = ints((9, 40), 127, 5)
    with cpu_gemm.use("emulated"):
        for qa, prepack in ((255, True), (127, False)):
            out = cpu_gemm.decomposed_mm(a.float(), w, qa, 127, prepack=prepack)
            assert torch.equal(out.double(), exact(a, w).float().double())
    assert not any(t.startswith("s16") for t in cpu_gemm.cache_tags(w))


@pytest.mark.skipif(not cpu_gemm.onednn_s8(), reason="needs an x86 CPU with oneDNN")
def test_short_reductions_skip_the_prepacked_matmul():
    """Below PREPACK_MIN_K the product stays on torch._int_mm (oneDNN's prepacked matmul is
    pathologically slow there): exact, and nothing prepacked."""
    k = cpu_gemm.PREPACK_MIN_K - 1
    w = torch.randint(-127, 128, (64, k), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    a = ints((50, k), 127, 5)
    before = cpu_gemm.cache_size()
    with cpu_gemm.use("int_mm"):
        out = cpu_gemm.decomposed_mm(a.float(), w, 127, 127, prepack=True)
    assert torch.equal(out.double(), exact(a, w).float().double())
    assert cpu_gemm.cache_size() == before


@torch.no_grad()
@pytest.mark.skipif(not cpu_gemm.onednn_s8(), reason="needs an x86 CPU with oneDNN")
def test_compiled_w8a8_prepacks_each_weight_once():
    """Compiled, the W8A8 linears call the prepacked op with the graph's own weights: a second
    call makes no new prepacked copies."""
    torch.manual_seed(0)
    model = VisionMamba(tiny_config(depth=2)).eval()
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    q = of.convert(model, calib=calib, config=of.W8A8, show_progress=False)
    fast = torch.compile(q, backend="ouromamba")
    n0 = cpu_gemm.cache_size()
    y = fast(x)
    n = cpu_gemm.cache_size()
    assert n >= n0 + 2 * 4  # at least in_proj, x_proj, dt_proj, out_proj of both layers prepacked
    torch.testing.assert_close(fast(x), y, rtol=0, atol=0)
    assert cpu_gemm.cache_size() == n
    ref = q(x)
    assert torch.allclose(y, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@torch.no_grad()
@pytest.mark.skipif(not cpu_gemm.onednn_s8(), reason="needs an x86 CPU with oneDNN")
def test_w4a4o8_detect_runs_onednn_prepacked_in_int_mm_mode():
    from ouromamba_fx.ops.int4 import pack_int4
    from ouromamba_fx.ops.mixed import outlier_split_ref, site_outlier_mask_ref
    from ouromamba_fx.ops.w4a4o8_linear import w4a4o8_linear_detect, w4a4o8_linear_masked_ref

    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 20, 96, generator=g)
    x[:, :, 5] *= 30  # an outlier channel
    s = torch.rand(20, generator=g) * 0.1 + 0.2
    wq = torch.randint(-8, 8, (40, 96), dtype=torch.int8, generator=g)
    wp, ws, b = pack_int4(wq), torch.rand(40, generator=g) * 0.01 + 1e-3, torch.randn(40, generator=g)
    with cpu_gemm.use("int_mm"):
        y = w4a4o8_linear_detect(x, s, wp, ws, b, 96, 2.0, 4)
    assert "onednn" in cpu_gemm.cache_tags(wp) and "int4:kn" not in cpu_gemm.cache_tags(wp)
    mask, step = site_outlier_mask_ref(x, s, 1, 2, 4, 2.0, 4)
    assert mask.any()
    ref = w4a4o8_linear_masked_ref(x, mask, step, wp, ws, b, 96)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_cache_reuses_rebuilds_and_forgets():
    key = torch.zeros(3)
    made = []

    def make():
        made.append(1)
        return torch.ones(2) * len(made)

    first = cpu_gemm.cached(key, "t", make)
    assert cpu_gemm.cached(key, "t", make) is first and len(made) == 1
    key.add_(1)  # modified in place: rebuilt
    assert cpu_gemm.cached(key, "t", make) is not first and len(made) == 2
    before = cpu_gemm.cache_size()
    del key
    gc.collect()
    assert cpu_gemm.cache_size() == before - 1


def test_mode_is_scoped_to_the_block_and_checked():
    auto = cpu_gemm.mode()
    assert auto in cpu_gemm.MODES
    with cpu_gemm.use("emulated"):
        assert cpu_gemm.mode() == "emulated" and "emulated" in cpu_gemm.describe()
        with cpu_gemm.use("int_mm"):
            assert cpu_gemm.mode() == "int_mm"
        assert cpu_gemm.mode() == "emulated"
        with cpu_gemm.use("auto"):
            assert cpu_gemm.mode() == auto
    assert cpu_gemm.mode() == auto
    with pytest.raises(ValueError, match="cpu_gemm='fast'"):
        with cpu_gemm.use("fast"):
            pass
    with pytest.raises(ValueError, match="cpu_gemm='fast'"):
        of.convert(VisionMamba(tiny_config(depth=1)).eval(), calib=torch.randn(2, 3, 16, 16),
                   show_progress=False).lower(cpu_gemm="fast")


def test_mode_is_per_thread():
    # a context variable: another thread does not see this block's choice
    seen = {}
    with cpu_gemm.use("emulated" if cpu_gemm.mode() == "int_mm" else "int_mm"):
        inner = cpu_gemm.mode()
        t = threading.Thread(target=lambda: seen.setdefault("mode", cpu_gemm.mode()))
        t.start()
        t.join()
    assert seen["mode"] == cpu_gemm.mode() != inner


@torch.no_grad()
@pytest.mark.parametrize("preset", ["W8A8", "W4A4O8"])
def test_lowered_models_same_numbers_in_both_modes(preset):
    torch.manual_seed(0)
    model = VisionMamba(tiny_config(depth=2)).eval()
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    q = of.convert(model, calib=calib, config=getattr(of, preset), show_progress=False)
    outs = {mode: q.lower(cpu_gemm=mode)(x) for mode in cpu_gemm.MODES}
    ref = q(x)
    assert torch.equal(outs["int_mm"], outs["emulated"])
    assert torch.allclose(outs["emulated"], ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
