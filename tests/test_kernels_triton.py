"""Triton kernels against their plain-torch twins and the op references, on CPU tensors under
``TRITON_INTERPRET=1`` (no GPU needed).

The interpreter has to be chosen before triton is first imported, and in a pytest process torch
has usually imported triton already, so the kernel tests (class ``TestInInterpreter``) run in a
child pytest process started with ``TRITON_INTERPRET=1`` by
:func:`test_triton_kernels_in_interpreter`. Each side collects only its part (``__test__``): the
parent shows one test, the child the kernel tests. Running this file with ``TRITON_INTERPRET=1``
already set runs the kernel tests in place.
"""

import pytest
import torch

pytest.importorskip("triton")

from ouromamba_fx.ops import gemm, int4, mixed, quant  # noqa: E402
from ouromamba_fx.ops import int8_linear as i8  # noqa: E402
from ouromamba_fx.ops import w4a4o8_linear as w4  # noqa: E402
from tests.triton_child import INTERPRET, assert_passes_in_interpreter, pinned  # noqa: E402


def test_triton_kernels_in_interpreter():
    assert_passes_in_interpreter(__file__)


test_triton_kernels_in_interpreter.__test__ = not INTERPRET


# Ahead-of-time compilation for NVIDIA targets (no GPU needed: triton ships ptxas). This catches
# what the interpreter does not check, e.g. that 8-bit tl.dot needs K >= 32 on NVIDIA GPUs.
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia(arch):
    """Each kernel at its smallest (the interpreter's) and largest autotune config."""
    from ouromamba_fx.kernels.triton import int8_gemm as k8
    from ouromamba_fx.kernels.triton import quantize_rows as kq
    from tests.triton_aot import compile_ptx, largest, nvidia_backend

    nvidia_backend()
    rows = {"_quantize_rows_kernel": {"x_ptr": "*bf16", "q_ptr": "*i8"},
            "_outlier_split_kernel": {"x_ptr": "*bf16", "mask_ptr": "*u8", "q_in_ptr": "*i8", "q_out_ptr": "*i8"}}
    for name, ptrs in rows.items():
        kernel = getattr(kq, name)
        flag = "STATIC_SCALE" if name == "_quantize_rows_kernel" else "STATIC_INLIER"
        wide = kq._prune(kq.CONFIGS, {"M": 4096}, BLOCK_K=256)
        for config, block_k, static in ((largest(wide, lambda c: c.kwargs["BLOCK_M"]), 256, False),
                                        (kq.CONFIGS[0], 16, True)):
            ptx = compile_ptx(kernel, arch, config, {flag: static, "BLOCK_K": block_k}, ptrs,
                              floats=("qmax", "qmax_in", "eps"))
            assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx, name
    tile = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]  # noqa: E731
    for config, bias in ((largest(k8.CONFIGS, tile), True), (k8.CONFIGS[0], False)):
        ptx = compile_ptx(k8._int8_gemm_kernel, arch, config, dict(HAS_BIAS=bias), {"x_ptr": "*i8", "w_ptr": "*i8"})
        assert "mma" in ptx  # int8 tensor-core products


test_kernels_compile_for_nvidia.__test__ = not INTERPRET


# --------------------------------------------------------------------------------------------------
# The kernel tests. The kernels are imported inside the tests, so that the parent never loads them.

def _kernels():
    from ouromamba_fx.kernels.triton import int8_gemm, quantize_rows
    return quantize_rows, int8_gemm


def _x(m, k, ties=True):
    x = torch.randn(m, k) * 2
    if ties and k >= 5:  # row 0: 8-bit scale exactly 2**-5, four values exactly on .5 quanta
        x[0] = (torch.rand(k) * 2 - 1) * 100 * 2.0 ** -5
        x[0, :5] = torch.tensor([127.0, 0.5, 2.5, -0.5, -3.5]) * 2.0 ** -5
    return x


def _gemm_case(m, k, n, per_row, with_bias):
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    x_scale = torch.rand(m, 1) + 0.5 if per_row else torch.tensor([0.7])
    w_scale = torch.rand(n) * 0.01 + 1e-3
    bias = torch.randn(n) if with_bias else None
    return x_q, x_scale, w_scale, bias


class TestInInterpreter:
    """Collected only when TRITON_INTERPRET=1 (the child process), so the parent run shows one test."""

    __test__ = INTERPRET

    @pytest.mark.parametrize("m,k", [(1, 1), (1, 5), (3, 33), (17, 300)])
    @pytest.mark.parametrize("bits", [4, 8])
    def test_quantize_rows(self, m, k, bits):
        kq, _ = _kernels()
        qmax = 2 ** (bits - 1) - 1
        x = _x(m, k)
        x[-1] = 0.0  # a zero row: scale eps
        q, s = kq.quantize_rows(x, qmax)
        q_twin, s_twin = kq.quantize_rows_ref(x, qmax)
        q_op, s_op = quant.quantize_per_token_ref(x, bits)
        assert q.dtype == torch.int8 and s.shape == (m, 1)
        assert torch.equal(q, q_twin) and torch.equal(s, s_twin)
        assert torch.equal(q, q_op) and torch.equal(s, s_op)
        if bits == 8 and k >= 5 and m > 1:  # round half to even on exact ties (row 0 not zeroed)
            assert s[0, 0].item() == 2.0 ** -5 and q[0, :5].tolist() == [127, 0, 2, 0, -4]
        static = torch.rand(m, 1) * 0.05 + 0.01  # small: clamps at +-qmax
        q, s = kq.quantize_rows(x, qmax, static)
        assert torch.equal(q, kq.quantize_rows_ref(x, qmax, static)[0]) and torch.equal(s, static)

    def test_quantize_rows_strided_and_half_input(self):
        kq, _ = _kernels()
        x = _x(40, 24).t()  # (24, 40), column-major
        assert torch.equal(kq.quantize_rows(x, 127)[0], quant.quantize_per_token_ref(x, 8)[0])
        xh = torch.randn(5, 33).half()
        for a, b in zip(kq.quantize_rows(xh, 7), quant.quantize_per_token_ref(xh, 4)):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("m,k", [(1, 5), (3, 33), (17, 300)])
    @pytest.mark.parametrize("static", [False, True])
    def test_outlier_split(self, m, k, static):
        kq, _ = _kernels()
        x = _x(m, k)
        mask = torch.rand(m, k) < 0.1
        mask[0] = False  # no outliers: s_out = eps
        if m > 1:
            mask[-1, : k // 2 + 1] = True
        inlier_scale = torch.rand(m, 1) * 0.3 + 0.1 if static else None
        got = kq.outlier_split(x, mask, inlier_scale, 7)
        for a, b, c in zip(got, kq.outlier_split_ref(x, mask, inlier_scale, 7), mixed.outlier_split_ref(x, mask, inlier_scale, 4)):
            assert torch.equal(a, b) and torch.equal(a, c)

    @pytest.mark.parametrize("m,k,n", [(1, 5, 3), (3, 33, 17), (17, 1, 70), (17, 200, 130), (200, 64, 300)])
    @pytest.mark.parametrize("per_row,with_bias", [(True, True), (False, False)])
    def test_int8_gemm(self, m, k, n, per_row, with_bias):
        _, k8 = _kernels()
        x_q, x_scale, w_scale, bias = _gemm_case(m, k, n, per_row, with_bias)
        w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        y = k8.int8_gemm(x_q, x_scale, w_q, w_scale, bias)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        torch.testing.assert_close(y, k8.int8_gemm_ref(x_q, x_scale, w_q, w_scale, bias), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y, i8.int8_linear_ref(x_q, x_scale, w_q, w_scale, bias), rtol=1e-6, atol=1e-6)

    def test_int8_gemm_integer_part_exact_and_strided(self):
        _, k8 = _kernels()
        x_q = torch.full((19, 1000), -127, dtype=torch.int8)
        x_q[1::2] = torch.randint(-127, 128, (9, 1000), dtype=torch.int8)
        w_q = torch.randint(-127, 128, (1000, 21), dtype=torch.int8).t()  # (21, 1000) column-major
        y = k8.int8_gemm(x_q, torch.ones(1), w_q, torch.ones(21))
        assert torch.equal(y, (x_q.long() @ w_q.long().t()).float())  # |acc| < 2**24: exact in fp32

    def test_every_autotune_config(self):
        """The configs a GPU's autotuner picks from give the interpreter's numbers: integer products
        (odd K, N and few rows, which cuBLAS refuses) and row quantization."""
        kq, k8 = _kernels()
        x_q, x_scale, w_scale, bias = _gemm_case(40, 150, 36, True, True)
        w_q = torch.randint(-127, 128, (36, 150), dtype=torch.int8)
        want = k8.int8_gemm_ref(x_q, x_scale, w_q, w_scale, bias)
        few = x_q[:5]
        for config in k8.CONFIGS:
            with pinned(k8._int8_gemm_kernel, config):
                torch.testing.assert_close(k8.int8_gemm(x_q, x_scale, w_q, w_scale, bias), want, rtol=1e-6, atol=1e-6)
                assert torch.equal(k8.int8_gemm(few, torch.ones(1), w_q, torch.ones(36)),
                                   (few.long() @ w_q.long().t()).float())
        x = _x(21, 300)
        mask = torch.rand(21, 300) < 0.05
        for config in kq.CONFIGS:
            with pinned(kq._quantize_rows_kernel, config), pinned(kq._outlier_split_kernel, config):
                for a, b in zip(kq.quantize_rows(x, 127), kq.quantize_rows_ref(x, 127)):
                    assert torch.equal(a, b)
                for a, b in zip(kq.outlier_split(x, mask, None, 7), kq.outlier_split_ref(x, mask, None, 7)):
                    assert torch.equal(a, b)

    @pytest.mark.parametrize("static", [False, True])
    def test_cuda_op_glue_w8a8(self, static):
        """The functions registered for CUDA tensors, run on CPU tensors through the interpreter."""
        _kernels()
        x = torch.randn(2, 9, 33)
        w_q = torch.randint(-127, 128, (17, 33), dtype=torch.int8)
        w_scale, bias = torch.rand(17) * 0.01, torch.randn(17)
        x_scale = torch.rand(9, 1) * 0.02 + 0.01 if static else None
        y = i8._w8a8_linear_cuda(x, w_q, w_scale, bias, x_scale)
        torch.testing.assert_close(y, i8.w8a8_linear_ref(x, w_q, w_scale, bias, x_scale), rtol=1e-6, atol=1e-6)
        q, s = quant._quantize_per_token_cuda(x, 8)
        q_ref, s_ref = quant.quantize_per_token_ref(x, 8)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        x_q = q.reshape(18, 33)
        torch.testing.assert_close(i8._int8_linear_cuda(x_q, s.reshape(18, 1), w_q, w_scale, None),
                                   i8.int8_linear_ref(x_q, s.reshape(18, 1), w_q, w_scale, None), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("static", [False, True])
    def test_cuda_op_glue_w4a4o8(self, static):
        _kernels()
        x = torch.randn(2, 9, 33)
        mask = torch.zeros(2, 9, 33, dtype=torch.bool)
        mask[..., [3, 20]] = True
        x = torch.where(mask, x * 30, x)
        w_packed = int4.pack_int4(torch.randint(-7, 8, (17, 33), dtype=torch.int8))
        w_scale, bias = torch.rand(17) * 0.01, torch.randn(17)
        inlier_scale = torch.rand(9, 1) * 0.3 + 0.3 if static else None
        y = w4._w4a4o8_linear_masked_cuda(x, mask, inlier_scale, w_packed, w_scale, bias, 33)
        want = w4.w4a4o8_linear_masked_ref(x, mask, inlier_scale, w_packed, w_scale, bias, 33)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        split = mixed._outlier_split_cuda(x[0], mask[0], None if inlier_scale is None else inlier_scale, 4)
        for a, b in zip(split, mixed.outlier_split_ref(x[0], mask[0], inlier_scale, 4)):
            assert torch.equal(a, b)
        # the packed weight is read through a K-major copy, made once per weight
        assert gemm.cached(w_packed, "int4:kmajor", lambda: None).stride() == (1, 17)

    def test_wrappers_check_shapes(self):
        kq, k8 = _kernels()
        i8 = lambda *s: torch.zeros(*s, dtype=torch.int8)  # noqa: E731
        with pytest.raises(ValueError, match="K=5"):
            k8.int8_gemm(i8(3, 4), torch.ones(1), i8(2, 5), torch.ones(2))
        with pytest.raises(ValueError, match="x_scale"):
            k8.int8_gemm(i8(3, 4), torch.ones(2), i8(2, 4), torch.ones(2))
        with pytest.raises(ValueError, match="mask"):
            kq.outlier_split(torch.randn(3, 4), torch.zeros(3, 4), None, 7)
        with pytest.raises(ValueError, match="qmax"):
            kq.quantize_rows(torch.randn(3, 4), 128)
