"""The Triton selective scan (``ouromamba_fx.kernels.triton.scan``), forward and backward, against
the plain-torch reference (``ouromamba_fx.kernels.scan_ref``) and its own twins, on CPU tensors under
``TRITON_INTERPRET=1``; and its ahead-of-time compilation for sm_80 and sm_90.

As in ``test_kernels_triton.py``, the interpreter is chosen before triton is imported, so the kernel
tests (class ``TestInInterpreter``) run in a child pytest process; each side collects only its part.
Under the interpreter the autotuned kernels run their first config (4 channels x 16 steps per
program), so the sequences below cross chunk boundaries (L = 37 = 2 * 16 + 5) and end in tails.
"""

import pytest
import torch

pytest.importorskip("triton")

from tests.triton_child import INTERPRET, assert_passes_in_interpreter, pinned  # noqa: E402


def test_triton_scan_in_interpreter():
    assert_passes_in_interpreter(__file__)


test_triton_scan_in_interpreter.__test__ = not INTERPRET


@pytest.mark.parametrize("arch", [80, 90])
def test_scan_kernels_compile_for_nvidia(arch):
    """Forward and backward, smallest and largest configs, bf16 and float64 inputs."""
    import triton.language as tl

    from ouromamba_fx.kernels.triton import scan as ks
    from tests.triton_aot import compile_ptx, largest, nvidia_backend

    nvidia_backend()
    seq = ("u_ptr", "delta_ptr", "z_ptr", "b_ptr", "c_ptr")
    tile = lambda c: c.kwargs["BLOCK_D"] * c.kwargs["BLOCK_L"]  # noqa: E731
    for kernel, configs, outs in ((ks._selective_scan_fwd_kernel, ks.FWD_CONFIGS, ("out_ptr",)),
                                  (ks._selective_scan_bwd_kernel, ks.BWD_CONFIGS,
                                   ("dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr"))):
        for config, on, acc in ((largest(configs, tile), True, tl.float32), (configs[0], False, tl.float32),
                                (configs[0], True, tl.float64)):
            flags = dict(HAS_D=on, HAS_Z=on, HAS_BIAS=on, SOFTPLUS=on, ACC=acc, BLOCK_N=16)
            half = "*bf16" if acc == tl.float32 else "*fp64"
            ptrs = {p: half for p in (*seq, *outs)}
            if acc == tl.float64:
                ptrs.update({p: "*fp64" for p in getattr(kernel, "fn", kernel).arg_names
                             if p.endswith("_ptr")})
            ptx = compile_ptx(kernel, arch, config, flags, ptrs)
            if kernel is ks._selective_scan_bwd_kernel:  # dB and dC summed over channel blocks
                assert "red.global" in ptx or "atom.global" in ptx


test_scan_kernels_compile_for_nvidia.__test__ = not INTERPRET


# --------------------------------------------------------------------------------------------------
# The kernel tests (child process). Kernels are imported inside the tests.

def _case(b, d, length, n, groups=None, dtype=torch.float64, seed=0, strided=False):
    """u, delta, A, B, C, D, z, delta_bias; with ``strided`` every sequence is a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    bc = (b, n, length) if groups is None else (b, groups, n, length)
    if strided:  # time-major storage seen transposed, every other step of a longer sequence
        u = r(b, length, d).transpose(1, 2)
        delta = r(b, d, 2 * length, scale=0.5)[..., ::2]
        z = r(b, length, d).transpose(1, 2)
        B = r(*bc[:-2], length, n).transpose(-1, -2)
        C = r(*bc[:-1], 2 * length)[..., 1::2]
        A = -(torch.rand(n, d, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype).t()
    else:
        u, delta, z = r(b, d, length), r(b, d, length, scale=0.5), r(b, d, length)
        B, C = r(*bc), r(*bc)
        A = -(torch.rand(d, n, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype)
    return u, delta, A, B, C, r(d), z, r(d, scale=0.1)


def _optional(args, with_d, with_z, with_bias):
    u, delta, A, B, C, D, z, bias = args
    return u, delta, A, B, C, D if with_d else None, z if with_z else None, bias if with_bias else None


def _close(got, want, rtol, atol):
    """Elementwise ``|got - want| <= atol + rtol |want|``, atol relative to the largest |want|."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        scale = b.double().abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * max(scale, 1e-30),
                                   msg=lambda m, i=i: f"output {i}: {m}")


class TestInInterpreter:
    __test__ = INTERPRET

    @pytest.mark.parametrize("shape,optional", [
        ((2, 5, 37, 4, None), (True, True, True, True)),
        ((2, 5, 37, 4, None), (False, False, False, False)),
        ((1, 3, 1, 16, None), (True, True, True, True)),
        ((2, 6, 16, 1, None), (True, False, True, False)),
        ((1, 9, 21, 4, 3), (True, True, True, True)),
        ((2, 4, 7, 16, 2), (False, True, False, True)),
    ])
    def test_float64_forward_and_backward(self, shape, optional):
        """Odd dims, L = 1, one chunk exactly, tails, N in {1, 4, 16}, grouped B/C (groups narrower
        than a program's channel block), with and without D / z / delta_bias / softplus."""
        from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
        from ouromamba_fx.kernels.triton.scan import selective_scan_bwd, selective_scan_fwd

        *dims, groups = shape
        with_d, with_z, with_bias, softplus = optional
        args = (*_optional(_case(*dims, groups), with_d, with_z, with_bias), softplus)
        y = selective_scan_fwd(*args)
        _close([y], [selective_scan_ref(*args)], 1e-12, 1e-12)
        dout = torch.randn_like(y)
        _close(selective_scan_bwd(dout, *args), selective_scan_ref_backward(dout, *args), 1e-11, 1e-11)

    @pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
    def test_low_precision_inputs(self, dtype, rtol):
        """float32 / float16 / bfloat16 inputs: float32 maths, outputs and gradients in the inputs'
        dtype, against the reference on the same inputs (which also computes in float32)."""
        from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
        from ouromamba_fx.kernels.triton.scan import selective_scan_bwd, selective_scan_fwd

        args = (*_case(1, 5, 37, 4, dtype=dtype), True)
        y = selective_scan_fwd(*args)
        assert y.dtype == dtype
        _close([y], [selective_scan_ref(*args)], rtol, rtol)
        dout = torch.randn(y.shape, dtype=torch.float64).to(dtype)
        got = selective_scan_bwd(dout, *args)
        assert [g.dtype for g in got] == [dtype] * 8
        _close(got, selective_scan_ref_backward(dout, *args), rtol, rtol)
        if dtype == torch.float32:  # and against float64 maths on the same numbers
            up = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
            _close([y.double()], [selective_scan_ref(*up)], 1e-5, 1e-5)

    @pytest.mark.parametrize("groups", [None, 3])
    def test_strided_inputs_and_channels_last_output(self, groups):
        from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
        from ouromamba_fx.kernels.triton.scan import selective_scan_bwd, selective_scan_fwd

        args = (*_case(2, 6, 19, 4, groups, strided=True), True)
        assert not any(a.is_contiguous() for a in args[:5] if a.dim() >= 2)
        want = selective_scan_ref(*args)
        y = selective_scan_fwd(*args, channels_last=True)
        assert y.stride() == (19 * 6, 1, 6)
        _close([y], [want], 1e-12, 1e-12)
        dout = torch.randn(2, 19, 6, dtype=torch.float64).transpose(1, 2)
        _close(selective_scan_bwd(dout, *args), selective_scan_ref_backward(dout, *args), 1e-11, 1e-11)

    def test_other_config(self):
        """A second tiling (8 channels x 64 / 32 steps) gives the same numbers."""
        from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
        from ouromamba_fx.kernels.triton import scan as ks

        args = (*_case(1, 11, 70, 4), True)
        dout = torch.randn(1, 11, 70, dtype=torch.float64)
        with pinned(ks._selective_scan_fwd_kernel, ks.FWD_CONFIGS[1]), \
                pinned(ks._selective_scan_bwd_kernel, ks.BWD_CONFIGS[1]):
            _close([ks.selective_scan_fwd(*args)], [selective_scan_ref(*args)], 1e-12, 1e-12)
            _close(ks.selective_scan_bwd(dout, *args), selective_scan_ref_backward(dout, *args), 1e-11, 1e-11)

    def test_twins(self):
        """The plain-torch twins (chunked like the kernels) agree with the reference."""
        from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
        from ouromamba_fx.kernels.triton.scan import selective_scan_bwd_ref, selective_scan_fwd_ref

        for groups in (None, 2):
            args = (*_case(2, 4, 37, 4, groups), True)
            dout = torch.randn(2, 4, 37, dtype=torch.float64)
            _close([selective_scan_fwd_ref(*args)], [selective_scan_ref(*args)], 1e-12, 1e-12)
            _close(selective_scan_bwd_ref(dout, *args), selective_scan_ref_backward(dout, *args), 1e-11, 1e-11)

    def test_softplus_threshold_and_small_values(self):
        """delta + bias far below 0 (softplus ~ e^x, where log(1 + e^x) would lose all digits) and
        above the threshold 20 (identity)."""
        from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
        from ouromamba_fx.kernels.triton.scan import selective_scan_bwd, selective_scan_fwd

        u, delta, A, B, C, D, z, bias = _case(1, 4, 9, 2)
        delta = torch.tensor([-40.0, -20.0, 19.5, 25.0], dtype=torch.float64)[:, None].expand(1, 4, 9).contiguous()
        args = (u, delta, A, B, C, D, z, None, True)
        _close([selective_scan_fwd(*args)], [selective_scan_ref(*args)], 1e-12, 1e-12)
        dout = torch.randn(1, 4, 9, dtype=torch.float64)
        _close(selective_scan_bwd(dout, *args), selective_scan_ref_backward(dout, *args), 1e-11, 1e-11)

    def test_empty_and_errors(self):
        from ouromamba_fx.kernels.triton.scan import selective_scan_bwd, selective_scan_fwd

        u, delta, A, B, C, D, z, bias = _case(2, 3, 5, 4)
        empty = [t[..., :0] for t in (u, delta, B, C, z)]
        assert selective_scan_fwd(empty[0], empty[1], A, empty[2], empty[3], D, empty[4], bias).shape == (2, 3, 0)
        grads = selective_scan_bwd(empty[0], empty[0], empty[1], A, empty[2], empty[3], D, empty[4], bias)
        assert grads[2].shape == A.shape and torch.equal(grads[2], torch.zeros_like(A))
        with pytest.raises(ValueError, match="constant B"):
            selective_scan_fwd(u, delta, A, torch.randn(3, 4, dtype=torch.float64), C)
        with pytest.raises(ValueError, match="G dividing 3"):
            selective_scan_fwd(u, delta, A, B.reshape(2, 1, 4, 5).expand(2, 2, 4, 5), C)
        with pytest.raises(ValueError, match="delta has shape"):
            selective_scan_fwd(u, delta[..., :4], A, B, C)

    def test_cuda_ops(self):
        """The scan ops' CUDA implementations on CPU tensors: forward (also channel-contiguous),
        backward in the op's convention (empty for absent inputs), and constant 2-d B / C, which the
        Triton kernels do not take, on the reference."""
        from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
        from ouromamba_fx.ops import scan

        args = (*_case(2, 6, 20, 4), True)
        want = selective_scan_ref(*args)
        _close([scan._selective_scan_cuda(*args)], [want], 1e-12, 1e-12)
        y = scan._selective_scan_cl_cuda(*args)
        assert y.stride() == (20 * 6, 1, 6)
        _close([y], [want], 1e-12, 1e-12)
        dout = torch.randn(2, 6, 20, dtype=torch.float64)
        u, delta, A, B, C, D, z, bias, sp = args
        grads = scan._selective_scan_bwd_cuda(dout, u, delta, A, B, C, None, z, None, sp)
        want = selective_scan_ref_backward(dout, u, delta, A, B, C, None, z, None, sp)
        assert grads[5].shape == (0,) and grads[7].shape == (0,)
        _close([g for i, g in enumerate(grads) if i not in (5, 7)],
               [g for i, g in enumerate(want) if i not in (5, 7)], 1e-11, 1e-11)
        const = (u, delta, A, torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), D, z,
                 bias, sp)
        _close([scan._selective_scan_cuda(*const)], [selective_scan_ref(*const)], 0, 0)
