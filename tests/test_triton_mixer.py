"""The Triton kernels around the quantized mixer's GEMMs and scan (``ouromamba_fx.kernels.triton``:
``conv1d_silu``, ``mixed_quant``, ``w4a4o8_gemm``) against the references of the lowering and
their own twins, on CPU tensors under ``TRITON_INTERPRET=1``; and their ahead-of-time compilation
for sm_80 and sm_90.

As in ``test_kernels_triton.py``, the kernel tests (class ``TestInInterpreter``) run in a child
pytest process started with ``TRITON_INTERPRET=1``; each side collects only its part. Integer
arithmetic (quantization codes, outlier lists, the W4A4O8 products and, there, the whole float
epilogue) is compared bit for bit; the conv's float sums with a tolerance.
"""

import pytest
import torch

pytest.importorskip("triton")

from tests.triton_child import INTERPRET, assert_passes_in_interpreter, pinned  # noqa: E402


def test_triton_mixer_kernels_in_interpreter():
    assert_passes_in_interpreter(__file__)


test_triton_mixer_kernels_in_interpreter.__test__ = not INTERPRET


@pytest.mark.parametrize("arch", [80, 90])
def test_mixer_kernels_compile_for_nvidia(arch):
    """Each kernel at its smallest and largest config (features on for the largest)."""
    from ouromamba_fx.kernels.triton import conv1d_silu as kc
    from ouromamba_fx.kernels.triton import mixed_quant as km
    from ouromamba_fx.kernels.triton import w4a4o8_gemm as kw
    from tests.triton_aot import compile_ptx, largest, nvidia_backend

    nvidia_backend()
    conv_tile = lambda c: c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_L"]  # noqa: E731
    for config, on in ((largest(kc.CONFIGS, conv_tile), True), (kc.CONFIGS[0], False)):
        ptx = compile_ptx(kc._causal_conv1d_silu_kernel, arch, config,
                          dict(KW=4, HAS_BIAS=on, QUANT=on, REVERSE=on), {"x_ptr": "*bf16"}, floats=("qmin", "qmax"))
        assert ("div.rn.f32" in ptx) == on  # the quantization divides exactly

    mq_ptrs = {"x_ptr": "*bf16", "mask_in_ptr": "*u8", "mask_ptr": "*u8", "q_ptr": "*i8", "idx_ptr": "*i16",
               "qo_ptr": "*i8", "cnt_ptr": "*i32"}
    wide = km._prune(km.CONFIGS, {}, BLOCK_C=km.MAX_CHANNELS)
    for config, block_c, rule in ((max(wide, key=lambda c: c.num_warps), km.MAX_CHANNELS, True),
                                  (km.CONFIGS[0], 16, False)):
        flags = dict(RULE=rule, DYNAMIC_INLIER=not rule, FAKE=rule, OUTLIER_FLOAT=False, WRITE_MASK=rule,
                     CODES=True, BLOCK_C=block_c)
        ptx = compile_ptx(km._mixed_quant_kernel, arch, config, flags, mq_ptrs, floats=("qi", "qo", "k", "eps"),
                          fp_fusion=False)
        # true divisions and square root, no contraction: the reference's roundings
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "fma.rn.f32" not in ptx
        assert ("sqrt.rn.f32" in ptx) == rule

    gemm_tile = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_KP"]  # noqa: E731
    for config, bias in ((largest(kw.CONFIGS, gemm_tile), True), (kw.CONFIGS[0], False)):
        ptx = compile_ptx(kw._w4a4o8_gemm_kernel, arch, config, dict(HAS_BIAS=bias),
                          {"q_ptr": "*i8", "w_ptr": "*u8", "idx_ptr": "*i16", "qo_ptr": "*i8", "cnt_ptr": "*i32"},
                          fp_fusion=False)
        assert "mma" in ptx and "fma.rn.f32" not in ptx  # int8 tensor cores; the epilogue as written


test_mixer_kernels_compile_for_nvidia.__test__ = not INTERPRET


# --------------------------------------------------------------------------------------------------
# The kernel tests (child process). Kernels are imported inside the tests.

def _planted(shape, channel_axis, seed=0, n_big=3, scale=20.0):
    """Normal data with a few channels scaled up (heavy rows, as the rule expects to find)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    big = torch.randperm(shape[channel_axis], generator=g)[:n_big]
    gain = torch.ones(shape[channel_axis])
    gain[big] = scale
    view = [1] * len(shape)
    view[channel_axis] = -1
    return x * gain.reshape(view)


def _step_scales(length, seed=1):
    """Step scales at which most steps trigger the rule (max / 7 > s) and every third does not."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(length, generator=g) * 0.1 + 0.05
    s[1::3] = 100.0
    return s


class TestInInterpreter:
    __test__ = INTERPRET

    # -- conv1d + SiLU ---------------------------------------------------------------------------

    @pytest.mark.parametrize("shape,width", [((2, 5, 37), 4), ((1, 33, 7), 4), ((2, 3, 1), 4), ((1, 6, 9), 2)])
    @pytest.mark.parametrize("quant", [None, "tensor", "step"])
    @pytest.mark.parametrize("reverse", [False, True])
    def test_conv1d_silu(self, shape, width, quant, reverse):
        from ouromamba_fx.kernels.triton.conv1d_silu import causal_conv1d_silu, causal_conv1d_silu_ref
        from ouromamba_fx.ops.conv1d_silu import causal_conv1d_silu_ref as op_ref

        b, d, length = shape
        g = torch.Generator().manual_seed(length)
        x = torch.randn(b, d, length, generator=g)
        w, bias = torch.randn(d, 1, width, generator=g), torch.randn(d, generator=g)
        if quant == "tensor":
            s, zp = torch.tensor([0.05]), torch.tensor([3.0])
        elif quant == "step":  # one per step of x' (the flipped sequence when reverse)
            s, zp = torch.rand(length, generator=g) * 0.05 + 0.01, torch.randint(-3, 4, (length,), generator=g).float()
        else:
            s = zp = None
        args = (x, w, bias, s, zp, -128, 127, reverse)
        y = causal_conv1d_silu(*args)
        want = op_ref(*args)
        assert y.dtype == torch.float32 and y.shape == want.shape
        if length > 1:
            assert y.stride() == (length * d, 1, d)
        torch.testing.assert_close(y, want, rtol=4e-6, atol=1e-6)
        torch.testing.assert_close(causal_conv1d_silu_ref(*args), want, rtol=4e-6, atol=1e-6)

    @pytest.mark.parametrize("reverse", [False, True])
    def test_conv1d_silu_codes_cuda_path(self, reverse):
        # ouromamba::causal_conv1d_silu_codes on a GPU: the Triton conv, then its codes in torch
        from ouromamba_fx.kernels.triton.conv1d_silu import causal_conv1d_silu
        from ouromamba_fx.ops.conv1d_silu import _causal_conv1d_silu_codes_cuda

        g = torch.Generator().manual_seed(4)
        x = torch.randn(2, 9, 5, generator=g).transpose(1, 2)  # (2, 5, 9), channel-contiguous
        w, bias = torch.randn(5, 1, 4, generator=g), torch.randn(5, generator=g)
        s, zp = torch.rand(9, generator=g) * 0.05 + 0.01, torch.zeros(9)
        cs = torch.rand(1, 9, 1, generator=g) * 0.01 + 1e-3
        y, q = _causal_conv1d_silu_codes_cuda(x, w, bias, s, zp, -127, 127, reverse, cs, -31, 31)
        y0 = causal_conv1d_silu(x, w, bias, s, zp, -127, 127, reverse)
        assert torch.equal(y, y0) and q.dtype == torch.int8 and q.shape == (2, 9, 5) and q.is_contiguous()
        assert torch.equal(q.float(), torch.round(y0.transpose(1, 2) / cs).clamp(-31, 31))
        # on in_proj's raw accumulator: its epilogue in torch, then the same Triton conv
        from ouromamba_fx.ops.conv1d_silu import conv_epilogue_ref

        xs, ws, b = torch.rand(1, 9, 1, generator=g) * 1e-2, torch.rand(5, generator=g), torch.randn(5, generator=g)
        acc = torch.randint(-500, 501, (2, 9, 10), generator=g).float().transpose(1, 2)[:, :5]
        y, q = _causal_conv1d_silu_codes_cuda(acc, w, bias, s, zp, -127, 127, reverse, cs, -31, 31, xs, ws, b)
        y0 = causal_conv1d_silu(conv_epilogue_ref(acc, xs, ws, b), w, bias, s, zp, -127, 127, reverse)
        assert torch.equal(y, y0) and torch.equal(q.float(), torch.round(y0.transpose(1, 2) / cs).clamp(-31, 31))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_conv1d_silu_low_precision_strided_no_bias(self, dtype):
        from ouromamba_fx.kernels.triton.conv1d_silu import causal_conv1d_silu
        from ouromamba_fx.ops.conv1d_silu import causal_conv1d_silu_ref as op_ref

        x = torch.randn(2, 21, 6).to(dtype).transpose(1, 2)  # (2, 6, 21), channel-contiguous
        w = torch.randn(6, 1, 4)
        args = (x, w, None, torch.rand(21) * 0.05 + 0.01, torch.zeros(21), -8, 7, True)
        torch.testing.assert_close(causal_conv1d_silu(*args), op_ref(*args), rtol=4e-6, atol=1e-6)

    def test_conv1d_quantization_exact(self):
        """One unit tap: out = silu(fake_quant(x)), ties at .5 rounding to even, clamped at the
        range (a wrong code would be off by a whole step, 0.5 here)."""
        from ouromamba_fx.kernels.triton.conv1d_silu import causal_conv1d_silu
        from ouromamba_fx.ops.quant import dequantize_ref, quantize_ref

        codes = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.49, 200.0, -200.0, 0.0])
        s, zp = torch.tensor([0.5]), torch.tensor([1.0])
        x = (codes * 0.5).reshape(1, 1, -1)
        w = torch.tensor([0.0, 0.0, 0.0, 1.0]).reshape(1, 1, 4)
        y = causal_conv1d_silu(x, w, None, s, zp, -8, 7, False)
        fq = dequantize_ref(quantize_ref(x, s, zp, -8, 7), s, zp)
        assert fq.flatten().tolist() == [0.0, 1.0, 1.0, -0.0, -1.0, 1.5, 3.0, -4.5, 0.0]
        torch.testing.assert_close(y, torch.nn.functional.silu(fq), rtol=1e-6, atol=1e-7)

    def test_conv1d_other_config_and_errors(self):
        from ouromamba_fx.kernels.triton import conv1d_silu as kc
        from ouromamba_fx.ops.conv1d_silu import causal_conv1d_silu_ref as op_ref

        args = (torch.randn(1, 40, 70), torch.randn(40, 1, 4), torch.randn(40), None, None, -128, 127, True)
        with pinned(kc._causal_conv1d_silu_kernel, kc.CONFIGS[2]):
            torch.testing.assert_close(kc.causal_conv1d_silu(*args), op_ref(*args), rtol=4e-6, atol=1e-6)
        with pytest.raises(ValueError, match="depthwise"):
            kc.causal_conv1d_silu(torch.randn(1, 4, 5), torch.randn(4, 2, 4), None, None, None, -128, 127, False)
        with pytest.raises(ValueError, match="one per time step"):
            kc.causal_conv1d_silu(torch.randn(1, 4, 5), torch.randn(4, 1, 4), None, torch.ones(3), torch.zeros(3),
                                  -128, 127, False)

    # -- outlier rule + mixed quantization -------------------------------------------------------

    @pytest.mark.parametrize("shape,token_axis,channel_axis,n_refresh,bits", [
        ((2, 13, 37), 1, 2, 5, (4, 8)),
        ((2, 37, 13), 2, 1, 1, (4, 8)),  # the scan's (batch, D, L) inputs: channels on axis 1
        ((3, 10, 64), 1, 2, 10, (4, 16)),  # W4A8O16: outliers kept in float
        ((1, 7, 1), 1, 2, 3, (8, 8)),  # one channel
        ((2, 3, 11, 24), 2, 3, 4, (4, 8)),  # more leading axes
    ])
    def test_mixed_fake_quant_and_mask(self, shape, token_axis, channel_axis, n_refresh, bits):
        from ouromamba_fx.kernels.triton import mixed_quant as km
        from ouromamba_fx.ops.mixed import site_outlier_mask
        from ouromamba_fx.ops.mixed import quantize_mixed_ref

        x = _planted(shape, channel_axis)
        s = _step_scales(shape[token_axis])
        args = (x, s, token_axis, channel_axis, *bits, 3.0, n_refresh)
        y = km.mixed_fake_quant(*args)
        want = quantize_mixed_ref(*args)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert torch.equal(y, want) and torch.equal(km.mixed_fake_quant_ref(*args), want)
        mask = km.outlier_mask(x, s, token_axis, channel_axis, bits[0], 3.0, n_refresh)
        want_mask, _ = site_outlier_mask(x, s, token_axis, channel_axis, bits[0], 3.0, n_refresh)
        assert mask.dtype == torch.bool and mask.is_contiguous() and torch.equal(mask, want_mask)
        assert torch.equal(km.outlier_mask_ref(x, s, token_axis, channel_axis, bits[0], 3.0, n_refresh), want_mask)
        if shape[channel_axis] > 1:
            assert mask.any() and not mask.all()  # the data exercises both sides of the rule

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_mixed_fake_quant_low_precision_strided(self, dtype):
        from ouromamba_fx.kernels.triton.mixed_quant import mixed_fake_quant
        from ouromamba_fx.ops.mixed import quantize_mixed_ref

        x = _planted((2, 40, 19), 1).to(dtype).transpose(1, 2)  # (2, 19, 40): tokens on 1, channels on 2
        s = _step_scales(19)
        args = (x, s, 1, 2, 4, 8, 3.0, 4)
        assert torch.equal(mixed_fake_quant(*args), quantize_mixed_ref(*args))

    def test_rule_windows_by_hand(self):
        """One channel far out at step 1 only: flagged at steps 1 and 2 (the window 0..2 keeps it),
        not at step 3 (a new window); at step 4 the step scale is so large that nothing triggers."""
        from ouromamba_fx.kernels.triton.mixed_quant import outlier_mask

        x = torch.ones(1, 6, 8)
        x[0, 1, 2] = 50.0
        x[0, 4, 5] = 50.0
        s = torch.tensor([0.1, 0.1, 0.1, 0.1, 1e3, 0.1])
        mask = outlier_mask(x, s, 1, 2, 4, 2.0, 3)[0]
        want = torch.zeros(6, 8, dtype=torch.bool)
        want[1:3, 2] = True
        assert torch.equal(mask, want)
        assert torch.equal(outlier_mask(x, s, 1, 2, 4, 2.0, 1)[0], want & (torch.arange(6) == 1)[:, None])

    def test_mixed_codes(self):
        """The W4A4O8 input by the rule: q_in / scales / lists against the reference mask and split."""
        from ouromamba_fx.kernels.triton import mixed_quant as km
        from ouromamba_fx.ops.mixed import site_outlier_mask
        from ouromamba_fx.ops.mixed import outlier_split_ref

        x = _planted((2, 9, 40), 2)
        s = _step_scales(9)
        codes = km.mixed_codes(x, s, 4, 3.0, 4)
        mask, step = site_outlier_mask(x, s, 1, 2, 4, 3.0, 4)
        q_in, s_in, q_out, s_out = outlier_split_ref(x.reshape(18, 40), mask.reshape(18, 40),
                                                     step.expand(2, 9, 1).reshape(18, 1), 4)
        assert torch.equal(codes.q_in, q_in) and torch.equal(codes.s_in, s_in.flatten())
        assert torch.equal(km.dense_outliers(codes, 40), q_out) and torch.equal(codes.s_out, s_out.flatten())
        assert torch.equal(codes.count, mask.reshape(18, 40).sum(1).to(torch.int32)) and codes.count.max() > 0
        twin = km.mixed_codes_ref(x, s, 4, 3.0, 4)
        live = torch.arange(40)[None, :] < codes.count[:, None]
        assert torch.equal(codes.idx[live], twin.idx[live]) and torch.equal(codes.q_out[live], twin.q_out[live])
        for got, want in zip((codes.q_in, codes.s_in, codes.count, codes.s_out),
                             (twin.q_in, twin.s_in, twin.count, twin.s_out)):
            assert torch.equal(got, want)
        for i in range(18):  # lists in increasing channel order
            assert torch.equal(codes.idx[i, :codes.count[i]].long(), mask.reshape(18, 40)[i].nonzero().flatten())
        # a capacity holding the largest count gives the same lists; a smaller one raises
        cap = int(codes.count.max())
        small = km.mixed_codes(x, s, 4, 3.0, 4, max_outliers=cap)
        assert small.idx.shape == (18, cap) and torch.equal(km.dense_outliers(small, 40), q_out)
        with pytest.raises(ValueError, match="larger max_outliers"):
            km.mixed_codes(x, s, 4, 3.0, 4, max_outliers=cap - 1)

    @pytest.mark.parametrize("scale", ["dynamic", "per_row", "one"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_split_codes(self, scale, dtype):
        from ouromamba_fx.kernels.triton import mixed_quant as km
        from ouromamba_fx.ops.mixed import outlier_split_ref

        g = torch.Generator().manual_seed(3)
        x = (torch.randn(13, 35, generator=g) * 3).to(dtype)
        mask = torch.rand(13, 35, generator=g) < 0.15
        mask[0] = False  # no outliers: s_out = eps
        mask[1] = True  # all outliers: q_in = 0, dynamic s_in = eps
        inlier = {"dynamic": None, "per_row": torch.rand(13, 1, generator=g) * 0.3 + 0.1,
                  "one": torch.tensor([0.2])}[scale]
        codes = km.split_codes(x, mask, inlier, 4)
        want = outlier_split_ref(x, mask, inlier, 4)
        got = (codes.q_in, codes.s_in.reshape(13, 1), km.dense_outliers(codes, 35), codes.s_out.reshape(13, 1))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        twin = km.split_codes_ref(x, mask, inlier, 4)
        assert torch.equal(km.dense_outliers(twin, 35), want[2]) and torch.equal(twin.count, codes.count)

    def test_mixed_quant_errors(self):
        from ouromamba_fx.kernels.triton import mixed_quant as km

        x = torch.randn(2, 5, 8)
        with pytest.raises(ValueError, match="resample"):
            km.mixed_fake_quant(x, torch.ones(4), 1, 2, 4, 8, 3.0, 2)
        with pytest.raises(ValueError, match="inlier_bits"):
            km.mixed_codes(x, torch.ones(5), 9, 3.0, 2)
        with pytest.raises(ValueError, match="mask must be bool"):
            km.split_codes(x[0], torch.zeros(5, 8), None, 4)

    # -- W4A4O8 linear ---------------------------------------------------------------------------

    @pytest.mark.parametrize("b,length,k,n", [(2, 9, 33, 17), (1, 5, 64, 70), (2, 3, 1, 5), (1, 40, 130, 40)])
    @pytest.mark.parametrize("static", [False, True])
    def test_w4a4o8_linear(self, b, length, k, n, static):
        """Given the mask (ouromamba::w4a4o8_linear's semantics): equal to the reference, bit for bit."""
        from ouromamba_fx.kernels.triton import w4a4o8_gemm as kw
        from ouromamba_fx.ops.int4 import pack_int4
        from ouromamba_fx.ops.w4a4o8_linear import w4a4o8_linear_masked_ref as w4a4o8_linear_ref

        g = torch.Generator().manual_seed(k)
        x = _planted((b, length, k), 2, seed=k, n_big=min(2, k))
        mask = torch.rand(b, length, k, generator=g) < 0.1
        w_packed = pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
        w_scale, bias = torch.rand(n, generator=g) * 0.01, (torch.randn(n, generator=g) if static else None)
        inlier = torch.rand(length, 1, generator=g) * 0.3 + 0.3 if static else None
        args = (x, mask, inlier, w_packed, w_scale, bias, k)
        y = kw.w4a4o8_linear(*args)
        want = w4a4o8_linear_ref(*args)
        assert y.shape == (b, length, n) and torch.equal(y, want)
        assert torch.equal(kw.w4a4o8_linear_ref(*args), want)
        # the weight stored K-major (the layout that makes each token's gather contiguous)
        k_major = w_packed.t().contiguous().t()
        assert torch.equal(kw.w4a4o8_linear(x, mask, inlier, k_major, w_scale, bias, k), want)

    def test_w4a4o8_linear_detect(self):
        """With the rule (ouromamba::w4a4o8_linear_rt's semantics): the reference's mask op, then the
        reference linear."""
        from ouromamba_fx.kernels.triton import w4a4o8_gemm as kw
        from ouromamba_fx.ops.mixed import site_outlier_mask
        from ouromamba_fx.ops.int4 import pack_int4
        from ouromamba_fx.ops.w4a4o8_linear import w4a4o8_linear_masked_ref as w4a4o8_linear_ref

        x = _planted((2, 11, 48), 2)
        s = _step_scales(11)
        w_packed = pack_int4(torch.randint(-8, 8, (24, 48), dtype=torch.int8))
        w_scale, bias = torch.rand(24) * 0.01, torch.randn(24)
        y = kw.w4a4o8_linear_detect(x, s, w_packed, w_scale, bias, 48, 3.0, 5)
        mask, step = site_outlier_mask(x, s, 1, 2, 4, 3.0, 5)
        assert mask.any()
        want = w4a4o8_linear_ref(x, mask, step, w_packed, w_scale, bias, 48)
        assert torch.equal(y, want)
        assert torch.equal(kw.w4a4o8_linear_detect_ref(x, s, w_packed, w_scale, bias, 48, 3.0, 5), want)

    def test_w4a4o8_gemm_reads_only_listed_outliers(self):
        """Entries past a token's count are never read (poisoned here); counts beyond the capacity
        are clamped to it; a token whose channels are all outliers and one without any."""
        from ouromamba_fx.kernels.triton import w4a4o8_gemm as kw
        from ouromamba_fx.kernels.triton.mixed_quant import split_codes

        g = torch.Generator().manual_seed(5)
        x = torch.randn(21, 37, generator=g)
        mask = torch.rand(21, 37, generator=g) < 0.2
        mask[0], mask[1] = True, False
        w_packed = torch.randint(0, 256, (19, 19), generator=g, dtype=torch.uint8)
        w_scale = torch.rand(19, generator=g)
        codes = split_codes(x, mask, None, 4)
        live = torch.arange(37)[None, :] < codes.count[:, None]
        idx, q_out = codes.idx.clone(), codes.q_out.clone()
        idx[~live], q_out[~live] = 36, 127
        poisoned = codes._replace(idx=idx, q_out=q_out)
        y = kw.w4a4o8_gemm(*poisoned, w_packed, w_scale)
        assert torch.equal(y, kw.w4a4o8_gemm_ref(*codes, w_packed, w_scale))
        with pinned(kw._w4a4o8_gemm_kernel, kw.CONFIGS[1]):
            assert torch.equal(kw.w4a4o8_gemm(*poisoned, w_packed, w_scale), y)
        cut = codes._replace(idx=codes.idx[:, :5].contiguous(), q_out=codes.q_out[:, :5].contiguous())
        assert torch.equal(kw.w4a4o8_gemm(*cut, w_packed, w_scale), kw.w4a4o8_gemm_ref(*cut, w_packed, w_scale))
        assert not torch.equal(kw.w4a4o8_gemm(*cut, w_packed, w_scale), y)

    def test_w4a4o8_errors(self):
        from ouromamba_fx.kernels.triton import w4a4o8_gemm as kw

        x, mask = torch.randn(3, 8), torch.zeros(3, 8, dtype=torch.bool)
        with pytest.raises(ValueError, match="w_packed must be uint8"):
            kw.w4a4o8_linear(x, mask, None, torch.zeros(5, 3, dtype=torch.uint8), torch.ones(5), None, 8)
        with pytest.raises(ValueError, match="w_scale"):
            kw.w4a4o8_linear(x, mask, None, torch.zeros(5, 4, dtype=torch.uint8), torch.ones(4), None, 8)

    # -- the ops' CUDA implementations (ouromamba_fx.ops.dispatch.CUDA_KERNELS) on CPU tensors -----

    def test_cuda_ops_of_the_outlier_rule(self):
        """quantize_mixed (the fake's layout: x's strides), mixed_fake_quant (the rows' layout),
        outlier_mask (mask and step scale), with scales calibrated for another length."""
        from ouromamba_fx.ops import mixed

        x = _planted((2, 40, 13), 1).transpose(1, 2)  # (2, 13, 40) seen through a transpose
        s = _step_scales(9)  # calibrated for L = 9: resampled to 13
        args = (x, s, 1, 2, 4, 8, 3.0, 5)
        want = mixed.quantize_mixed_ref(*args)
        y = mixed._quantize_mixed_cuda(*args)
        assert torch.equal(y, want) and y.stride() == torch.empty_like(x).stride()
        y = mixed._mixed_fake_quant_cuda(*args)
        assert torch.equal(y, want) and y.is_contiguous()  # rows (batch, L, C), as the fake says
        xs = _planted((2, 24, 13), 1)  # the scan's (batch, D, L): channels on axis 1
        sargs = (xs, s, 2, 1, 4, 8, 3.0, 1)
        y = mixed._mixed_fake_quant_cuda(*sargs)
        assert torch.equal(y, mixed.quantize_mixed_ref(*sargs))
        assert y.stride() == mixed.mixed_fake_quant(*sargs).stride() == (13 * 24, 1, 24)
        mask, step = mixed._site_outlier_mask_cuda(x, s, 1, 2, 4, 3.0, 5)
        want_mask, want_step = mixed.site_outlier_mask_ref(x, s, 1, 2, 4, 3.0, 5)
        assert torch.equal(mask, want_mask) and torch.equal(step, want_step) and step.shape == (1, 13, 1)
        # W4A8's 16-bit outliers: the kernel keeps them in float
        fargs = (x, s, 1, 2, 4, 16, 3.0, 5)
        assert torch.equal(mixed._quantize_mixed_cuda(*fargs), mixed.quantize_mixed_ref(*fargs))

    def test_cuda_ops_of_the_w4a4o8_linears(self):
        """w4a4o8_linear_rt against the CPU op (the C++ rule and epilogue); w4a4o8_linear_mixed
        against the references composed: the rule's mask, the masked linear, the output's mixed
        quantization."""
        from ouromamba_fx.ops import mixed
        from ouromamba_fx.ops import w4a4o8_linear as w4
        from ouromamba_fx.ops.int4 import pack_int4

        x = _planted((2, 11, 48), 2)
        s = _step_scales(7)
        w_packed = pack_int4(torch.randint(-8, 8, (24, 48), dtype=torch.int8))
        w_scale, bias = torch.rand(24) * 0.01, torch.randn(24)
        args = (x, s, w_packed, w_scale, bias, 48, 3.0, 5)
        y = w4._w4a4o8_linear_detect_cuda(*args)
        torch.testing.assert_close(y, w4.w4a4o8_linear_detect(*args), rtol=1e-6, atol=1e-6)
        xd = _planted((2, 11, 6), 2)  # dt_proj: K = 6 < SMALL_K; its output (batch, L, 24) re-quantized
        wd = pack_int4(torch.randint(-8, 8, (24, 6), dtype=torch.int8))
        out_s = _step_scales(11, seed=3)
        req = (xd, s, wd, w_scale, bias, 6, 3.0, 5, out_s, 1, 2, 4, 3.0, 4)
        y = w4._w4a4o8_linear_detect_requant_cuda(*req)
        mask, step = mixed.site_outlier_mask_ref(xd, s, 1, 2, 4, 3.0, 5)
        lin = w4.w4a4o8_linear_masked_ref(xd, mask, step, wd, w_scale, bias, 6)
        assert y.is_contiguous() and torch.equal(y, mixed.quantize_mixed_ref(lin, out_s, 1, 2, 4, 8, 3.0, 4))
