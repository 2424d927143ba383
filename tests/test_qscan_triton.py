"""The Triton quantized scan (``ouromamba_fx.kernels.triton.qscan``) against its plain-torch twin and the op
references, on CPU tensors under ``TRITON_INTERPRET=1`` (no GPU needed).

As in ``test_kernels_triton.py``: the interpreter must be chosen before triton is imported, so
the kernel tests (class ``TestInInterpreter``) run in a child pytest process started with
``TRITON_INTERPRET=1``; each side collects only its part.
"""

import pytest
import torch

pytest.importorskip("triton")

from tests.triton_child import INTERPRET, assert_passes_in_interpreter, pinned  # noqa: E402


def test_qscan_triton_in_interpreter():
    assert_passes_in_interpreter(__file__)


test_qscan_triton_in_interpreter.__test__ = not INTERPRET


@pytest.mark.parametrize("arch", [80, 90])
def test_qscan_compiles_for_nvidia(arch):
    """Ahead-of-time compilation (triton ships ptxas), the smallest and the largest autotune config,
    int8 and float inputs: catches what the interpreter does not."""
    from ouromamba_fx.kernels.triton import qscan as kqs
    from tests.triton_aot import compile_ptx, largest, nvidia_backend

    nvidia_backend()
    wide = kqs._prune(kqs.CONFIGS, {"DIM": 4096}, BLOCK_N=16)
    for config, quant in ((largest(wide, lambda c: c.kwargs["BLOCK_D"]), True), (kqs.CONFIGS[0], False)):
        constexprs = dict(DT_INT=quant, B_INT=quant, C_INT=quant, HAS_D=True, HAS_Z=True, HAS_BIAS=True,
                          SOFTPLUS=True, QUANT=quant, FINE_SCALES=quant, BLOCK_N=16)
        code = "*i8" if quant else "*fp32"
        ptrs = {"dt_ptr": code, "b_ptr": code, "c_ptr": code, "u_ptr": "*bf16", "z_ptr": "*bf16"}
        ptx = compile_ptx(kqs._qscan_kernel, arch, config, constexprs, ptrs, floats=("qmax",))
        assert ("div.rn.f32" in ptx) == quant  # the state quantization divides exactly


test_qscan_compiles_for_nvidia.__test__ = not INTERPRET


# --------------------------------------------------------------------------------------------------
# The kernel tests (child process). Kernels are imported inside the tests.

def _case(b, d, length, n, seed=0, optional=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    u, delta = r(b, d, length), r(b, d, length, scale=0.5)
    A = -(torch.rand(d, n, generator=g) * 2 + 0.1)
    B, C = r(b, n, length), r(b, n, length)
    D, z, bias = (r(d), r(b, d, length), r(d, scale=0.1)) if optional else (None, None, None)
    r_c, r_l, r_n = torch.rand(d, generator=g) + 0.5, torch.rand(length, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    ss = torch.rand(length, generator=g) * 0.05 + 0.02
    return [u, delta, A, B, C, D, z, bias, True, r_c, r_l, r_n, ss]


def _codes(x, per_step, zp=0.0):
    length = x.shape[-1]
    amax = x.abs().amax(dim=(0, 1)) if per_step else x.abs().amax().expand(length)
    scale = (amax / 127).clamp_min(1e-6).float().contiguous()
    zpv = torch.full((length,), zp)
    q = torch.round(x / scale + zpv).clamp(-128, 127).to(torch.int8)
    return q, scale, zpv


def _mostly_close(a, b, tol=1e-4):
    # a state code can flip at a near-tie made by float rounding; such flips are rare
    close = torch.isclose(a, b, rtol=tol, atol=tol)
    return close.float().mean().item() >= 0.99


class TestInInterpreter:
    __test__ = INTERPRET

    @pytest.mark.parametrize("shape", [(2, 37, 11, 16), (1, 5, 1, 1), (2, 9, 6, 3)])
    @pytest.mark.parametrize("state_bits", [8, 16])
    @pytest.mark.parametrize("optional", [True, False])
    def test_float_inputs(self, shape, state_bits, optional):
        from ouromamba_fx.kernels.triton.qscan import qscan, qscan_ref
        from ouromamba_fx.ops.scan_quant import selective_scan_reparam_ref as selective_scan_q_ref

        args = _case(*shape, optional=optional)
        y = qscan(*args, state_bits)
        twin = qscan_ref(*args, state_bits)
        assert y.dtype == torch.float32 and y.shape == twin.shape
        op_ref = selective_scan_q_ref(*args, state_bits)
        if state_bits == 16:
            torch.testing.assert_close(y, twin, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y, op_ref, rtol=1e-5, atol=1e-5)
        else:
            assert _mostly_close(y, twin) and _mostly_close(y, op_ref)
            assert not torch.allclose(y, qscan_ref(*args, 16), rtol=1e-3, atol=1e-3)

    @pytest.mark.parametrize("granularity", ["step_channel", "step_state"])
    def test_fine_state_scales(self, granularity):
        """Scales per time-step and channel / state index: the kernel reads them through strides."""
        from ouromamba_fx.kernels.triton.qscan import qscan, qscan_ref
        from ouromamba_fx.ops.scan_quant import selective_scan_reparam_ref as selective_scan_q_ref

        b, d, length, n = 2, 19, 7, 5
        args = _case(b, d, length, n)
        g = torch.Generator().manual_seed(3)
        shape = (d, length, 1) if granularity == "step_channel" else (1, length, n)
        args[-1] = torch.rand(*shape, generator=g) * 0.05 + 0.01
        y = qscan(*args, 8)
        assert _mostly_close(y, qscan_ref(*args, 8)) and _mostly_close(y, selective_scan_q_ref(*args, 8))
        # a per-step scale equal to the fine scales' mean gives another result: the fine ones are read
        per_step = args[-1].mean(dim=(0, 2))
        assert not torch.allclose(y, qscan(*args[:-1], per_step, 8), rtol=1e-3, atol=1e-3)

    def test_state_rounding_half_even_and_clamp(self):
        from ouromamba_fx.kernels.triton.qscan import qscan

        vals = torch.tensor([1.25, 1.75, -1.25, 0.25, 0.75, 100.0, -100.0, 0.3])
        length = vals.numel()
        o1, ol = torch.ones(1), torch.ones(length)
        y = qscan(torch.ones(1, 1, length), torch.ones(1, 1, length), torch.full((1, 1), -torch.inf),
                  vals.reshape(1, 1, length), torch.ones(1, 1, length), None, None, None, False, o1, ol, o1,
                  torch.full((length,), 0.5), 8)
        want = torch.tensor([2.0, 4.0, -2.0, 0.0, 2.0, 127.0, -127.0, 1.0]) * 0.5
        torch.testing.assert_close(y.flatten(), want, rtol=0, atol=0)

    @pytest.mark.parametrize("per_step", [True, False])
    def test_int8_inputs_strided(self, per_step):
        from ouromamba_fx.kernels.triton.qscan import qscan, qscan_ref

        args = _case(2, 21, 9, 16)
        dq, ds, dz = _codes(args[1], per_step, zp=2.0)
        bq, bs, bz = _codes(args[3], per_step)
        cq, cs, cz = _codes(args[4], not per_step)
        bq = bq.transpose(1, 2).contiguous().transpose(1, 2)  # time-major codes seen through a transpose
        args[1], args[3], args[4] = dq, bq, cq
        kw = dict(delta_scale=ds, delta_zp=dz, B_scale=bs, B_zp=bz, C_scale=cs, C_zp=cz)
        y = qscan(*args, 16, **kw)
        torch.testing.assert_close(y, qscan_ref(*args, 16, **kw), rtol=1e-5, atol=1e-5)
        assert _mostly_close(qscan(*args, 8, **kw), qscan_ref(*args, 8, **kw))

    def test_cuda_op_glue(self):
        """The functions registered for CUDA tensors, run on CPU tensors through the interpreter."""
        from ouromamba_fx.ops import scan_quant as lq

        args = _case(2, 10, 7, 4)
        lc = [*args[:10], torch.rand(5) + 0.5, args[11], torch.rand(5) * 0.05 + 0.02]  # calibrated at L = 5
        torch.testing.assert_close(lq._selective_scan_reparam_cuda(*lc, 16), lq.selective_scan_reparam_ref(*lc, 16),
                                   rtol=1e-5, atol=1e-5)
        assert _mostly_close(lq._selective_scan_reparam_cuda(*lc, 8), lq.selective_scan_reparam_ref(*lc, 8))
        fine = [*lc[:12], torch.rand(10, 5, 1) * 0.05 + 0.02]  # per step x channel, calibrated at L = 5
        assert _mostly_close(lq._selective_scan_reparam_cuda(*fine, 8), lq.selective_scan_reparam_ref(*fine, 8))
        quant = torch.ops.ouromamba.quantize.default
        u, delta, A, B, C, D, z, bias, sp, r_c, r_l, r_n, ss = args
        s_d, s_b = torch.tensor([0.01]), (B.abs().amax(dim=(0, 1)) / 127).reshape(1, 7)
        zero_d, zero_b = torch.zeros(1), torch.zeros(1, 7)
        qargs = [u, quant(delta, s_d, zero_d, -128, 127), s_d, zero_d, A, quant(B, s_b, zero_b, -128, 127), s_b,
                 zero_b, C, None, None, D, z, bias, sp]
        torch.testing.assert_close(lq._selective_scan_int8_inputs_cuda(*qargs, None, None, None, None, 16),
                                   lq.selective_scan_int8_inputs_ref(*qargs, None, None, None, None, 16), rtol=1e-5, atol=1e-5)
        assert _mostly_close(lq._selective_scan_int8_inputs_cuda(*qargs, r_c, r_l, r_n, ss, 8),
                             lq.selective_scan_int8_inputs_ref(*qargs, r_c, r_l, r_n, ss, 8))

    def test_every_autotune_config(self):
        from ouromamba_fx.kernels.triton import qscan as kqs

        args = _case(2, 70, 5, 4)
        want = kqs.qscan_ref(*args, 8)
        for config in kqs.CONFIGS:
            with pinned(kqs._qscan_kernel, config):
                assert _mostly_close(kqs.qscan(*args, 8), want)

    def test_wrapper_checks(self):
        from ouromamba_fx.kernels.triton.qscan import qscan

        args = _case(1, 4, 3, 2)
        bad = list(args)
        bad[1] = torch.zeros(1, 4, 3, dtype=torch.int8)
        with pytest.raises(ValueError, match="scale"):
            qscan(*bad, 16)
        bad = list(args)
        bad[3] = torch.zeros(1, 3, 3)
        with pytest.raises(ValueError, match="B must"):
            qscan(*bad, 16)
        bad = list(args)
        bad[-1] = torch.ones(4, 3, 3)  # (d_inner, L, d_state): one of the two axes must broadcast
        with pytest.raises(ValueError, match="state_scale"):
            qscan(*bad, 8)
