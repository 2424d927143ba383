"""The ``ouromamba::selective_scan`` custom op against the plain-torch reference.

The fused CPU kernel is JIT-built on first use (cached in the torch extensions directory); the
first run of this file therefore includes one C++ build.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ouromamba_fx.kernels.cpu.build import CPU_LIBRARY, SELECTIVE_SCAN
from ouromamba_fx.kernels.scan_ref import selective_scan_ref, selective_scan_ref_backward
from ouromamba_fx.ops.scan import scan_backend, selective_scan
from tests.threads import assert_same_bits_at_thread_counts

OPT_NAMES = ("D", "z", "delta_bias")


def make_inputs(batch, dim, L, N, dtype=torch.float64, form="var", D=True, z=True, delta_bias=True,
                groups=2, seed=0, requires_grad=False, positive_delta=False):
    """Random inputs in the ranges a Mamba layer sees (A < 0, modest delta).

    ``positive_delta``: delta in [0.01, 0.31] (for runs without softplus in float32, where a
    negative step makes the state grow past float32's range over long sequences)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    u = rnd(batch, dim, L)
    if positive_delta:
        delta = (torch.rand(batch, dim, L, generator=g, dtype=torch.float64) * 0.3 + 0.01).to(dtype)
    else:
        delta = rnd(batch, dim, L, scale=0.5, shift=-1.0)
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64).add(0.1).mul(2).to(dtype)
    if form == "var":
        B, C = rnd(batch, N, L), rnd(batch, N, L)
    elif form == "const":
        B, C = rnd(dim, N), rnd(dim, N)
    elif form == "group":
        B, C = rnd(batch, groups, N, L), rnd(batch, groups, N, L)
    elif form == "mixed":  # variable B, constant C
        B, C = rnd(batch, N, L), rnd(dim, N)
    else:
        raise ValueError(form)
    args = {
        "u": u, "delta": delta, "A": A, "B": B, "C": C,
        "D": rnd(dim) if D else None,
        "z": rnd(batch, dim, L) if z else None,
        "delta_bias": (None if not delta_bias else
                       torch.rand(dim, generator=g, dtype=torch.float64).mul(0.1).to(dtype) if positive_delta else
                       rnd(dim, scale=0.5)),
    }
    if requires_grad:
        args = {k: None if v is None else v.requires_grad_(True) for k, v in args.items()}
    return args


def run_both(args, softplus, grad_seed=1):
    """Outputs and input gradients of the op and of the reference."""
    names = [k for k, v in args.items() if v is not None]
    results = []
    for fn in (selective_scan, selective_scan_ref):
        leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in args.items()}
        out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"],
                 leaves["delta_bias"], delta_softplus=softplus)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
        grads = torch.autograd.grad(out, [leaves[k] for k in names], dout)
        results.append((out, dict(zip(names, grads))))
    return results


def assert_close_rel(actual, expected, rtol, atol=0.0, what=""):
    """|a - e| <= atol + rtol * max|e| (relative to the tensor's scale, robust to cancellation)."""
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max err {err:.3e} (scale {scale:.3e})"


def test_backend_is_cpp():
    # The fused kernel must be in use on this machine (a failed build would silently slow
    # everything down; scan_backend() makes that visible).
    assert scan_backend() == "cpp", SELECTIVE_SCAN.reason


def test_reference_matches_elementwise_definition():
    # The reference itself against a literal loop over (b, d, t, n), for every B / C form.
    for form in ("var", "const", "group"):
        a = make_inputs(2, 4, 5, 3, form=form, groups=2)
        out = selective_scan_ref(**a, delta_softplus=True)
        u, delta, A, B, C = a["u"], a["delta"], a["A"], a["B"], a["C"]
        expected = torch.empty_like(u)
        for b, d in itertools.product(range(2), range(4)):
            h = [0.0] * 3
            for t in range(5):
                dt = F.softplus(delta[b, d, t] + a["delta_bias"][d]).item()
                y = 0.0
                for n in range(3):
                    if form == "var":
                        bv, cv = B[b, n, t].item(), C[b, n, t].item()
                    elif form == "const":
                        bv, cv = B[d, n].item(), C[d, n].item()
                    else:
                        bv, cv = B[b, d // 2, n, t].item(), C[b, d // 2, n, t].item()
                    h[n] = torch.exp(torch.tensor(dt * A[d, n].item(), dtype=torch.float64)).item() * h[n] \
                        + dt * bv * u[b, d, t].item()
                    y += cv * h[n]
                y += a["D"][d].item() * u[b, d, t].item()
                expected[b, d, t] = y * F.silu(a["z"][b, d, t]).item()
        assert_close_rel(out, expected, 1e-12, what=form)


@pytest.mark.parametrize("form", ["var", "const", "group", "mixed"])
@pytest.mark.parametrize("softplus", [True, False])
def test_reference_backward_matches_autograd(form, softplus):
    # The explicit reference gradients (used where autograd is unavailable) against autograd.
    for opts in [(True, True, True), (False, False, False)]:
        a = make_inputs(2, 6, 9, 3, form=form, groups=3, **dict(zip(OPT_NAMES, opts)))
        leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in a.items()}
        out = selective_scan_ref(*leaves.values(), delta_softplus=softplus)
        dout = torch.randn_like(out)
        present = [k for k, v in leaves.items() if v is not None]
        expected = dict(zip(present, torch.autograd.grad(out, [leaves[k] for k in present], dout)))
        got = selective_scan_ref_backward(dout, *a.values(), delta_softplus=softplus)
        for k, g in zip(a, got):
            if a[k] is None:
                assert g is None
            else:
                assert_close_rel(g, expected[k], 1e-12, what=f"d{k}")


FLOAT64_CASES = [
    # (batch, dim, L, N)
    (2, 5, 7, 3),
    (1, 5, 1, 3),
    (1, 1, 1, 1),
    (3, 17, 65, 16),
    (2, 40, 9, 17),
]


@pytest.mark.parametrize("shape", FLOAT64_CASES)
@pytest.mark.parametrize("opts", [(True, True, True), (False, False, False), (True, False, True),
                                  (False, True, False)])
@pytest.mark.parametrize("softplus", [True, False])
def test_float64_matches_reference(shape, opts, softplus):
    args = make_inputs(*shape, dtype=torch.float64, **dict(zip(OPT_NAMES, opts)))
    (out, grads), (ref, ref_grads) = run_both(args, softplus)
    assert_close_rel(out, ref, 1e-10, what="out")
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert_close_rel(grads[k], ref_grads[k], 1e-10, what=f"d{k}")


@pytest.mark.parametrize("form", ["const", "group", "mixed"])
@pytest.mark.parametrize("shape", [(2, 6, 11, 4), (1, 40, 13, 16), (3, 36, 5, 5)])
def test_float64_bc_forms(form, shape):
    args = make_inputs(*shape, dtype=torch.float64, form=form, groups=2)
    (out, grads), (ref, ref_grads) = run_both(args, True)
    assert_close_rel(out, ref, 1e-10, what="out")
    for k in ref_grads:
        assert_close_rel(grads[k], ref_grads[k], 1e-10, what=f"d{k}")


@pytest.mark.parametrize("shape", [(1, 5, 1, 3), (2, 5, 65, 3), (3, 33, 65, 16), (2, 24, 20, 33)])
@pytest.mark.parametrize("opts", [(True, True, True), (False, False, False)])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("form", ["var", "const"])
def test_float32_matches_reference(shape, opts, softplus, form):
    args = make_inputs(*shape, dtype=torch.float32, form=form, positive_delta=not softplus,
                       **dict(zip(OPT_NAMES, opts)))
    (out, grads), (ref, ref_grads) = run_both(args, softplus)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for k in ref_grads:
        # Gradients sum many terms (dA over batch and time, dB over channels): compare relative
        # to the tensor's scale.
        assert_close_rel(grads[k], ref_grads[k], 1e-4, atol=1e-5, what=f"d{k}")


@pytest.mark.parametrize("case", ["positive_A", "negative_delta"])
def test_float32_growing_states_match_reference(case):
    # Decays above 1 (dt * A > 0): A > 0 in some channels, or negative steps without softplus. The
    # CPU kernel leaves exp2's upper clamp out only in blocks of channels whose dt * A are all <= 0,
    # so the blocks with these channels take the clamped path, next to blocks that do not.
    args = make_inputs(2, 40, 24, 16, dtype=torch.float32, positive_delta=True)
    if case == "positive_A":
        args["A"][3] = args["A"][3].abs() * 0.5
        args["A"][37, ::2] *= -0.5
    else:
        args["delta"][:, 5] *= -1
        args["delta"][1, 33, 7] *= -1
    (out, grads), (ref, ref_grads) = run_both(args, False)
    assert ref.abs().max() > 50  # the states did grow
    assert_close_rel(out, ref, 1e-5, what="out")
    for k in ref_grads:
        assert_close_rel(grads[k], ref_grads[k], 1e-4, what=f"d{k}")


def test_float32_decay_past_float_range_saturates():
    # One step with dt * A * log2(e) > 127 (A > 0 in channel 3): exp2 must take its clamped path
    # there (2^127.5) and not wrap the exponent into a tiny or negative number.
    args = make_inputs(2, 40, 4, 16, dtype=torch.float32, positive_delta=True, D=False, z=False)
    args["A"][3] = 1.0
    args["delta"][:, 3, 2] = 100.0
    out = selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], None, None,
                         args["delta_bias"], delta_softplus=False)
    ref = selective_scan_ref(args["u"], args["delta"], args["A"], args["B"], args["C"], None, None,
                             args["delta_bias"], delta_softplus=False)
    def blown_up(v):  # past float range (inf - inf in the sum over states gives NaN), or nearly
        return bool((~torch.isfinite(v) | (v.abs() > 1e30)).all())

    assert blown_up(ref[:, 3, 2])
    assert blown_up(out[:, 3, 2]), out[:, 3, 2]
    others = torch.ones(40, dtype=torch.bool)
    others[3] = False
    torch.testing.assert_close(out[:, others], ref[:, others], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fast_decay", [False, True])
def test_float32_decays_beyond_the_product_range(fast_decay):
    # The kernel computes a block's decays 2^(dt * A log2 e) with the product's rounding folded
    # into multiply-adds only where every |dt * A log2 e| of the block is <= 2^22, and otherwise
    # with exp2's clamps: A = -1e8 (channel 3) and A = -inf (channel 20) put two blocks on the
    # clamped path, where those channels' decays are 0 as in the reference; the third block
    # (channels 32-39) stays on the other path.
    a = make_inputs(2, 40, 33, 16, dtype=torch.float32)
    a["A"][3, 5] = -1e8
    a["A"][20, :] = -float("inf")
    args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
    out = SCAN_CL(*args, fast_decay=fast_decay)
    ref = selective_scan_ref(*args[:-1], delta_softplus=True)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["time", "channels_last"])
def test_float32_lanes_do_not_depend_on_their_block_or_length(layout):
    # A channel's outputs do not depend on the other channels of its 16-channel block nor on the
    # sequence's length past its own steps, bit for bit. The kernel picks a block's decay path
    # from all of its decays (on AVX2: without clamps when every dt * A log2 e is within
    # [-125, 0], channel 3's dt of about 200 below takes block 0 off it) and works on a tile's
    # steps four vectors at a time with one-vector tails (33 steps against 34); every path must
    # give each lane the same numbers.
    a = make_inputs(2, 40, 34, 16, dtype=torch.float32)

    def run(x, length):
        args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"]]
        args = [v[..., :length].contiguous() if v is not None and v.dim() == 3 else v for v in args]
        if layout == "time":
            return selective_scan(*args, delta_softplus=True)
        args = [v.transpose(1, 2).contiguous().transpose(1, 2) if v is not None and v.dim() == 3 and v.shape[1] == 40
                else v for v in args]
        return SCAN_CL(*args, True)

    out = run(a, 34)
    assert torch.equal(run(a, 33), out[..., :33])
    b = {k: None if v is None else v.clone() for k, v in a.items()}
    b["delta"][:, 3, 5] = 200.0
    out_b = run(b, 34)
    others = torch.ones(40, dtype=torch.bool)
    others[3] = False
    assert not torch.equal(out_b[:, 3], out[:, 3])
    assert torch.equal(out_b[:, others], out[:, others])
    ref = selective_scan_ref(b["u"], b["delta"], b["A"], b["B"], b["C"], b["D"], b["z"], b["delta_bias"],
                             delta_softplus=True)
    torch.testing.assert_close(out_b, ref, rtol=1e-4, atol=1e-4)


def test_float32_lane_gradients_do_not_depend_on_their_block():
    # The backward's forward recomputation picks its decay path per block as the forward does (on
    # AVX2: without clamps when every decay exponent is within [-125, 0]); a channel's gradients
    # must not depend on the path its block took, bit for bit. Channel 3's dt of about 200 takes
    # block 0 off the clamp-free path; every other channel's own gradients stay the same.
    a = make_inputs(2, 40, 34, 16, dtype=torch.float32, requires_grad=True)
    names = ["u", "delta", "A", "D", "z", "delta_bias"]  # per-channel inputs (B and C are shared)
    dout = torch.randn(2, 40, 34, generator=torch.Generator().manual_seed(3))

    def grads(x):
        out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                             delta_softplus=True)
        return dict(zip(names, torch.autograd.grad(out, [x[k] for k in names], dout)))

    g = grads(a)
    b = {k: None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for k, v in a.items()}
    with torch.no_grad():
        b["delta"][:, 3, 5] = 200.0
    g_b = grads(b)
    others = torch.ones(40, dtype=torch.bool)
    others[3] = False
    assert not torch.equal(g_b["u"][:, 3], g["u"][:, 3])
    for k in names:
        channels = (slice(None), others) if g[k].dim() == 3 else (others,)
        assert torch.equal(g_b[k][channels], g[k][channels]), k


def test_float32_many_threads_of_work():
    # Enough channels and batch for several blocks per task and several tasks per thread, and a
    # batch of one (channel blocks split across tasks).
    for shape in [(1, 100, 30, 16), (9, 48, 12, 8)]:
        args = make_inputs(*shape, dtype=torch.float32, form="group", groups=4)
        (out, grads), (ref, ref_grads) = run_both(args, True)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for k in ref_grads:
            assert_close_rel(grads[k], ref_grads[k], 1e-4, atol=1e-5, what=f"d{k}")


def test_non_contiguous_inputs():
    # As the mixer produces them: z and u slices of a transposed projection, B / C transposed views.
    batch, dim, L, N, R = 2, 12, 9, 4, 3
    xz = torch.randn(batch, L, 2 * dim, dtype=torch.float64).transpose(1, 2)
    u, z = xz.chunk(2, dim=1)
    x_dbl = torch.randn(batch, L, R + 2 * N, dtype=torch.float64)
    _, B, C = torch.split(x_dbl, [R, N, N], dim=-1)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    delta = torch.randn(dim, batch, L, dtype=torch.float64).permute(1, 0, 2)
    A = -torch.rand(N, dim, dtype=torch.float64).t()
    D = torch.randn(2 * dim, dtype=torch.float64)[::2]
    assert not any(t.is_contiguous() for t in (u, z, B, C, delta, A, D))
    args = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": None}
    (out, grads), (ref, ref_grads) = run_both(args, True)
    assert_close_rel(out, ref, 1e-10, what="out")
    for k in ref_grads:
        assert grads[k].shape == args[k].shape
        assert_close_rel(grads[k], ref_grads[k], 1e-10, what=f"d{k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_layouts(dtype):
    # Channel-contiguous (transposed) and row-strided time-contiguous inputs and gradient are read
    # in place by the kernel; other layouts are copied. All must agree with the reference.
    batch, dim, L, N = 3, 40, 37, 16
    g = torch.Generator().manual_seed(3)

    def chan_contig(scale=1.0, shift=0.0):  # (batch, dim, L) view of a (batch, L, dim) tensor
        return (torch.randn(batch, L, dim, generator=g, dtype=dtype) * scale + shift).transpose(1, 2)

    def row_strided():  # time-contiguous rows with a gap (a slice of a longer sequence)
        return torch.randn(batch, dim, L + 3, generator=g, dtype=dtype)[..., :L]

    def odd():  # neither time- nor channel-contiguous
        return torch.randn(L, batch, dim, generator=g, dtype=dtype).permute(1, 2, 0)

    layouts = {
        "u": row_strided(), "delta": chan_contig(0.5, -1.0), "z": odd(),
    }
    a = make_inputs(batch, dim, L, N, dtype=dtype)
    a.update(layouts)
    for dout_layout in (chan_contig, row_strided, odd):
        dout = dout_layout()
        outs = []
        for fn in (selective_scan, selective_scan_ref):
            leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in a.items()}
            out = fn(*leaves.values(), delta_softplus=True)
            grads = torch.autograd.grad(out, list(leaves.values()), dout)
            outs.append((out, grads))
        (out, grads), (ref, ref_grads) = outs
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert_close_rel(out, ref, tol, what="out")
        for k, gk, rk in zip(a, grads, ref_grads):
            assert_close_rel(gk, rk, tol, what=f"d{k}")


def test_low_precision_inputs():
    # bf16 activations with float32 A / D (as Vim passes them): float32 maths, bf16 output and
    # gradients in each input's dtype.
    a = make_inputs(2, 8, 10, 4, dtype=torch.float32)
    for k in ("u", "delta", "B", "C", "z"):
        a[k] = a[k].to(torch.bfloat16)
    (out, grads), (ref, ref_grads) = run_both(a, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for k in ref_grads:
        assert grads[k].dtype == a[k].dtype
        assert_close_rel(grads[k].float(), ref_grads[k].float(), 2e-2, what=f"d{k}")


def test_empty_sequence():
    a = make_inputs(2, 3, 0, 4, dtype=torch.float32, requires_grad=True)
    out = selective_scan(**a, delta_softplus=True)
    assert out.shape == (2, 3, 0)
    out.sum().backward()
    assert a["A"].grad is not None and torch.all(a["A"].grad == 0)
    assert a["D"].grad is not None and torch.all(a["D"].grad == 0)


def test_gradcheck_float64():
    for form, opts in [("var", (True, True, True)), ("const", (False, False, False)), ("group", (True, True, False))]:
        a = make_inputs(2, 3, 4, 2, dtype=torch.float64, form=form, groups=3, requires_grad=True,
                        **dict(zip(OPT_NAMES, opts)))
        names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
        inputs = tuple(a[k] for k in names)

        def fn(*xs):
            return selective_scan(*xs, delta_softplus=True)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("opts", [(True, True, True), (False, False, False)])
@pytest.mark.parametrize("form", ["var", "const"])
def test_opcheck(opts, form):
    a = make_inputs(2, 5, 6, 3, dtype=torch.float32, form=form, requires_grad=True, **dict(zip(OPT_NAMES, opts)))
    args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
    torch.library.opcheck(torch.ops.ouromamba.selective_scan.default, args)
    dout = torch.randn(2, 5, 6)
    bwd_args = (dout,) + tuple(None if t is None else t.detach() for t in args[:-1]) + (False,)
    torch.library.opcheck(torch.ops.ouromamba.selective_scan_bwd.default, bwd_args)


SCAN_CL = torch.ops.ouromamba.selective_scan_cl.default


@pytest.mark.parametrize("shape", [(1, 6, 1, 3), (2, 34, 65, 16), (3, 18, 9, 4)])  # partial channel blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("form", ["var", "const", "group"])
def test_channels_last_op_is_the_scan_in_channel_contiguous_memory(shape, dtype, form):
    a = make_inputs(*shape, dtype=dtype, form=form)
    args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
    out = SCAN_CL(*args)
    batch, dim, length, _ = shape
    assert out.shape == (batch, dim, length) and out.dtype == dtype
    assert out.stride() == (length * dim, 1, dim)
    assert torch.equal(out, torch.ops.ouromamba.selective_scan.default(*args))  # the same kernel, bit for bit


@pytest.mark.parametrize("shape", [(2, 34, 65, 16), (2, 20, 33, 5)])  # registers (d_state 16) / memory states
@pytest.mark.parametrize("form", ["var", "const"])
def test_channels_last_fast_decay_is_close_to_exact(shape, form):
    if scan_backend() != "cpp":
        pytest.skip("the C++ scan kernel is not built")
    a = make_inputs(*shape, dtype=torch.float64, form=form)
    args64 = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
    args = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in args64)
    exact, fast = SCAN_CL(*args), SCAN_CL(*args, fast_decay=True)
    truth = selective_scan_ref(*args64[:-1], delta_softplus=True)
    assert fast.stride() == exact.stride()
    assert not torch.equal(fast, exact)  # the flag reaches the kernel
    err = lambda y: ((y.double() - truth).norm() / truth.norm()).item()
    # degree-4 decays: relative error 2.9e-6 per decay, compounding over at most L steps (the
    # degree-3 polynomial it replaced, 1e-4 per decay, gave 1e-4 to 2e-4 here)
    assert err(exact) < 1e-6 and err(fast) < 2e-5
    # float64 computes exact decays whatever the flag says
    assert torch.equal(SCAN_CL(*args64, fast_decay=True), SCAN_CL(*args64))
    torch.library.opcheck(SCAN_CL, args, {"fast_decay": True})


def test_channels_last_op_opcheck_and_other_devices(monkeypatch):
    a = make_inputs(2, 20, 7, 3, dtype=torch.float32)
    args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
    torch.library.opcheck(SCAN_CL, args)
    # without the C++ kernel: the reference, in the same layout
    without_kernels(monkeypatch, SELECTIVE_SCAN)
    ref = SCAN_CL(*args)
    assert ref.stride() == (7 * 20, 1, 20)
    torch.testing.assert_close(ref, selective_scan_ref(*args[:-1], delta_softplus=True), rtol=1e-4, atol=1e-5)


def test_bwd_op_returns_empty_for_absent_inputs():
    a = make_inputs(2, 5, 6, 3, dtype=torch.float32, D=False, z=False, delta_bias=False)
    grads = torch.ops.ouromamba.selective_scan_bwd.default(
        torch.ones(2, 5, 6), a["u"], a["delta"], a["A"], a["B"], a["C"], None, None, None, True)
    assert len(grads) == 8
    for g, k in zip(grads[:5], ("u", "delta", "A", "B", "C")):
        assert g.shape == a[k].shape and g.dtype == a[k].dtype
    for g in grads[5:]:
        assert g.shape == (0,)


class _ScanModule(nn.Module):
    def __init__(self, dim=6, N=3):
        super().__init__()
        self.A_log = nn.Parameter(torch.rand(dim, N))
        self.D = nn.Parameter(torch.ones(dim))

    def forward(self, u, delta, B, C, z):
        return selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D, z, None, True)


def test_symbolic_trace_is_one_node():
    m = _ScanModule()
    gm = torch.fx.symbolic_trace(m)
    scans = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.ouromamba.selective_scan.default]
    assert len(scans) == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "selective_scan" in str(n.target)
                and n.target is not torch.ops.ouromamba.selective_scan.default]
    a = make_inputs(2, 6, 7, 3, dtype=torch.float32)
    inputs = (a["u"], a["delta"], a["B"], a["C"], a["z"])
    torch.testing.assert_close(gm(*inputs), m(*inputs))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a = make_inputs(2, 6, 7, 3, dtype=torch.float32, form="group", groups=3)
    with FakeTensorMode() as mode:
        fa = {k: None if v is None else mode.from_tensor(v) for k, v in a.items()}
        fa["u"] = fa["u"].to(torch.bfloat16)
        out = torch.ops.ouromamba.selective_scan.default(*fa.values(), True)
        assert out.shape == (2, 6, 7) and out.dtype == torch.bfloat16
        grads = torch.ops.ouromamba.selective_scan_bwd.default(out, *fa.values(), True)
        for g, (k, v) in zip(grads, fa.items()):
            assert g.shape == v.shape and g.dtype == v.dtype, k


def _compiled_matches_eager(backend, extra_ops):
    a = make_inputs(2, 6, 5, 3, dtype=torch.float32, requires_grad=True)

    def fn(u, delta, A, B, C, D, z, delta_bias):
        if extra_ops:  # pointwise ops around the scan, for the backend to fuse or lower
            return selective_scan(u * 2, delta, A, B, C, D, z, delta_bias, True).sum(dim=1)
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, True)

    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    eager = fn(*(a[k] for k in names))
    dout = torch.randn_like(eager)
    eager_grads = torch.autograd.grad(eager, [a[k] for k in names], dout)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    out = compiled(*(a[k] for k in names))
    grads = torch.autograd.grad(out, [a[k] for k in names], dout)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_torch_compile_eager_backend():
    torch._dynamo.reset()
    _compiled_matches_eager("eager", extra_ops=True)


def test_torch_compile_inductor():
    # Inductor on CPU needs a C++ compiler (present wherever the fused kernel builds). The graph is
    # the scan alone (an extern call to the op, forward and backward), so that no inductor C++
    # kernel has to be compiled: with pointwise ops around it a cold run takes ~20 s.
    if scan_backend() != "cpp":
        pytest.skip("no working C++ toolchain")
    torch._dynamo.reset()
    _compiled_matches_eager("inductor", extra_ops=False)


def without_kernels(monkeypatch, ext, build=None):
    """``ext`` as if it had not been built yet (``build``: what building it does) or, without
    ``build``, as after a failed build; monkeypatch restores the built module afterwards. The
    library's C++ kernels of the public ops are taken out of the dispatcher meanwhile (the ops
    then run their Python implementations, which consult ``ext``)."""
    monkeypatch.setattr(CPU_LIBRARY, "dispatching", False)
    monkeypatch.setattr(ext, "_tried", build is None)
    monkeypatch.setattr(ext, "_ext", None)
    monkeypatch.setattr(ext, "_reason", None if build else "simulated")
    if build is not None:
        monkeypatch.setattr(ext, "_build", build)


def test_build_failure_warns_and_falls_back(monkeypatch):
    # A failing build must not be silent: one RuntimeWarning naming the reason, scan_backend()
    # says "reference", and the results are still right.
    def broken_build():
        raise OSError("no C++ compiler found (simulated)")

    monkeypatch.delenv("OUROMAMBA_SCAN_BACKEND", raising=False)
    without_kernels(monkeypatch, SELECTIVE_SCAN, broken_build)
    a = make_inputs(2, 5, 6, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = selective_scan(**a, delta_softplus=True)
        out2 = selective_scan(**a, delta_softplus=True)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "simulated" in msgs[0] and "reference" in msgs[0]
    assert "kernels/cpu/selective_scan.cpp" in msgs[0]
    assert scan_backend() == "reference" and "simulated" in SELECTIVE_SCAN.reason
    ref = selective_scan_ref(**a, delta_softplus=True)
    assert_close_rel(out, ref, 1e-12)
    assert torch.equal(out, out2)
    # The backward also runs on the reference.
    (o, grads), (r, ref_grads) = run_both(a, True)
    for k in ref_grads:
        assert_close_rel(grads[k], ref_grads[k], 1e-10, what=f"d{k}")


def test_env_selects_reference(monkeypatch):
    def no_build():
        raise AssertionError("OUROMAMBA_SCAN_BACKEND=reference must not build anything")

    monkeypatch.setenv("OUROMAMBA_SCAN_BACKEND", "reference")
    without_kernels(monkeypatch, SELECTIVE_SCAN, no_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_backend() == "reference"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_reference():
    a = make_inputs(2, 5, 6, 3, dtype=torch.float32)
    cuda = {k: None if v is None else v.cuda() for k, v in a.items()}
    out = selective_scan(**cuda, delta_softplus=True)
    torch.testing.assert_close(out.cpu(), selective_scan_ref(**a, delta_softplus=True), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ouromamba::selective_scan_dt: delta computed inside the scan from the x_proj columns

SCAN_DT = torch.ops.ouromamba.selective_scan_dt.default


def dt_chain_inputs(batch, dim, L, N, R, scale="step", zero_point=False, dt_bias=True, seed=0):
    """The inputs of a lowered W8A8 mixer's dt path: dt_in the first R columns of an x_proj output
    (batch, L, R + 2N) (strided, as the graph slices it), static per-token input scales, int8
    weight codes, delta's scale per step (1, 1, L), per tensor (1,) or per channel (1, dim, 1)."""
    g = torch.Generator().manual_seed(seed)
    a = make_inputs(batch, dim, L, N, dtype=torch.float32, seed=seed)
    xp = torch.randn(batch, L, R + 2 * N, generator=g) * 2
    shape = {"step": (1, 1, L), "tensor": (1,), "channel": (1, dim, 1)}[scale]
    ds = torch.rand(shape, generator=g) * 0.05 + 0.02
    return dict(u=a["u"], dt_in=xp[..., :R], dt_scale=torch.rand(1, L, 1, generator=g) * 0.02 + 0.005,
                dt_weight=torch.randint(-127, 128, (dim, R), dtype=torch.int8, generator=g),
                dt_wscale=torch.rand(dim, generator=g) * 0.01 + 0.001,
                dt_bias=torch.randn(dim, generator=g) - 3.0 if dt_bias else None, delta_scale=ds,
                delta_zp=torch.round(torch.randn(shape, generator=g) * 4) if zero_point else torch.zeros(shape),
                A=a["A"], B=a["B"], C=a["C"], D=a["D"], z=a["z"], delta_bias=a["delta_bias"])


def unfused_dt_chain(i, softplus, channels_last, delta_bias=True, qmax=127, dqmax=127):
    """The graph the lowering replaces: int8_linear_decomposed -> transpose -> fake_quantize -> scan."""
    from ouromamba_fx.ops.int8_linear import int8_linear_decomposed
    from ouromamba_fx.ops.quant import fake_quantize

    y = int8_linear_decomposed(i["dt_in"], i["dt_scale"], -qmax, qmax, i["dt_weight"], i["dt_wscale"], i["dt_bias"])
    delta = fake_quantize(y.transpose(1, 2), i["delta_scale"], i["delta_zp"], -dqmax, dqmax)
    scan = SCAN_CL if channels_last else torch.ops.ouromamba.selective_scan.default
    return scan(i["u"], delta, i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"] if delta_bias else None,
                softplus)


def dt_args(i, softplus, channels_last, delta_bias=True, qmax=127, dqmax=127):
    return ((i["u"], i["dt_in"], i["dt_scale"], -qmax, qmax, i["dt_weight"], i["dt_wscale"], i["dt_bias"],
             i["delta_scale"], i["delta_zp"], -dqmax, dqmax, i["A"], i["B"], i["C"], i["D"], i["z"],
             i["delta_bias"] if delta_bias else None, softplus), {"channels_last": channels_last})


@pytest.mark.parametrize("shape", [(2, 64, 17, 16, 24), (3, 37, 13, 4, 5), (1, 50, 1, 16, 3), (2, 19, 66, 5, 48)])
@pytest.mark.parametrize("scale,zero_point", [("step", False), ("tensor", True), ("channel", True)])
@pytest.mark.parametrize("softplus,channels_last", [(True, True), (False, False)])
def test_dt_scan_equals_the_unfused_chain(shape, scale, zero_point, softplus, channels_last):
    # odd channel counts (partial blocks), L = 1 and L not a multiple of 4 (the tile's step groups),
    # every delta scale shape; the kernel follows the graph's operations: the same bits
    i = dt_chain_inputs(*shape, scale=scale, zero_point=zero_point, dt_bias=scale != "tensor", seed=sum(shape))
    for delta_bias in (True, False):
        ref = unfused_dt_chain(i, softplus, channels_last, delta_bias)
        args, kw = dt_args(i, softplus, channels_last, delta_bias)
        out = SCAN_DT(*args, **kw)
        assert out.stride() == ref.stride() and out.dtype == ref.dtype
        # (without softplus a negative delta grows the states: the same infinities and NaNs too)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
        assert softplus is False or ref.isfinite().all()


def test_dt_scan_narrower_codes_and_saturation():
    # 6-bit input codes and 4-bit delta codes, inputs large enough that codes saturate at both ends
    i = dt_chain_inputs(2, 40, 21, 16, 24, zero_point=True, seed=5)
    i["dt_in"] = i["dt_in"] * 40
    args, kw = dt_args(i, True, True, qmax=31, dqmax=7)
    assert torch.equal(SCAN_DT(*args, **kw), unfused_dt_chain(i, True, True, qmax=31, dqmax=7))


def test_dt_scan_other_dtypes_and_fast_decay():
    i = dt_chain_inputs(2, 34, 19, 16, 24, seed=3)
    args, kw = dt_args(i, True, True)
    # float64 scans: delta from ATen in float32 (as the graph computes it), the scan in float64
    args64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and k in (0, 12, 13, 14, 15, 16, 17)
                   else t for k, t in enumerate(args))
    i64 = {k: (v.double() if k in ("u", "A", "B", "C", "D", "z", "delta_bias") else v) for k, v in i.items()}
    out64 = SCAN_DT(*args64, **kw)
    assert out64.dtype == torch.float64 and torch.equal(out64, unfused_dt_chain(i64, True, True))
    exact = SCAN_DT(*args, **kw)
    fast = SCAN_DT(*args, channels_last=True, fast_decay=True)
    ref_fast = unfused_dt_chain(i, True, True)  # (exact decays)
    assert not torch.equal(fast, exact) and torch.allclose(fast, ref_fast, rtol=1e-4, atol=1e-5)


def test_dt_scan_opcheck_fake_and_without_kernels(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    i = dt_chain_inputs(2, 20, 7, 3, 4, seed=1)
    for cl in (False, True):
        args, kw = dt_args(i, True, cl)
        torch.library.opcheck(SCAN_DT, args, kw)
        with FakeTensorMode() as mode:
            fake = SCAN_DT(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args), **kw)
        assert fake.shape == (2, 20, 7) and fake.stride() == SCAN_DT(*args, **kw).stride()
    # without the C++ kernel: the plain-torch delta and the reference scan, in the same layout
    ref = unfused_dt_chain(i, True, True)
    without_kernels(monkeypatch, SELECTIVE_SCAN)
    args, kw = dt_args(i, True, True)
    out = SCAN_DT(*args, **kw)
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_dt_scan_checks_its_inputs():
    i = dt_chain_inputs(2, 20, 7, 3, 4)
    args, kw = dt_args(i, True, True)
    bad = list(args)
    bad[5] = i["dt_weight"].float()
    with pytest.raises(RuntimeError, match="dt_weight must be int8"):
        SCAN_DT(*bad, **kw)
    bad = list(args)
    bad[1] = i["dt_in"][:, :5]
    with pytest.raises(RuntimeError, match="dt_in has shape"):
        SCAN_DT(*bad, **kw)


# ---------------------------------------------------------------------------------------------
# selective_scan_dt as a bidirectional mixer's backward scan: z read reversed, out_proj's codes


def combine_inputs(i, scale="token", seed=0):
    """The forward scan's output (channel-contiguous, as the lowered graph's) and out_proj's static
    input scale: per token (1, L, 1) or per tensor (1,), sized so that codes saturate at both ends."""
    g = torch.Generator().manual_seed(seed)
    b, d, L = i["u"].shape
    yf = (torch.randn(b, L, d, generator=g) * 3).transpose(1, 2)
    shape = (1, L, 1) if scale == "token" else (1,)
    return yf, torch.rand(shape, generator=g) * 0.02 + 0.01


def unfused_mixer_codes(i, softplus, yf, xs, qmax=127, z_given=True):
    """The graph the rule replaces: the backward scan on the flipped z, flip, add, / 2, transpose and
    int8_linear_decomposed's quantization (the codes it hands its integer product)."""
    args, kw = dt_args(i, softplus, True)
    args = list(args)
    args[16] = i["z"].flip(-1) if z_given else None
    yb = SCAN_DT(*args, **kw)
    x = ((yf + yb.flip(-1)) / 2).transpose(1, 2)
    codes = torch.round(x.reshape(-1, x.shape[-1]) / xs.float().expand(*x.shape[:-1], 1).reshape(-1, 1))
    # (int8_linear_decomposed's first lines)
    return codes.clamp(-qmax, qmax).reshape(x.shape), yb


@pytest.mark.parametrize("shape", [(2, 64, 17, 16, 24), (3, 37, 13, 4, 5), (1, 50, 1, 16, 3), (2, 19, 66, 5, 48)])
@pytest.mark.parametrize("scale", ["token", "tensor"])
@pytest.mark.parametrize("z_given", [True, False])
def test_dt_scan_reversed_z_and_out_proj_codes_equal_the_unfused_chain(shape, scale, z_given):
    i = dt_chain_inputs(*shape, seed=sum(shape) + 1)
    yf, xs = combine_inputs(i, scale, seed=sum(shape))
    ref_codes, ref_yb = unfused_mixer_codes(i, True, yf, xs, z_given=z_given)
    args, kw = dt_args(i, True, True)
    args = list(args)
    args[16] = i["z"] if z_given else None
    # z read reversed: the same output as the scan on the flipped copy
    yb = SCAN_DT(*args, **kw, z_reverse=True)
    assert torch.equal(yb, ref_yb) and yb.stride() == ref_yb.stride()
    # and the codes
    codes = SCAN_DT(*args, **kw, z_reverse=True, combine=yf, code_scale=xs)
    assert codes.dtype == torch.int8 and codes.shape == (shape[0], shape[2], shape[1]) and codes.is_contiguous()
    assert torch.equal(codes.float(), ref_codes)
    assert (ref_codes == 127).any() or shape[2] * shape[1] < 100  # saturation exercised on the larger shapes
    # a time-contiguous forward output gives the same codes
    assert torch.equal(SCAN_DT(*args, **kw, z_reverse=True, combine=yf.contiguous(), code_scale=xs), codes)


def test_dt_scan_codes_narrower_range_time_contiguous_z_and_linear_after():
    from ouromamba_fx.ops.int8_linear import int8_linear_decomposed, int8_linear_decomposed_codes

    i = dt_chain_inputs(2, 40, 21, 16, 24, seed=7)
    i["z"] = i["z"].contiguous()  # time-contiguous z: read reversed through the in-register transposes
    yf, xs = combine_inputs(i, seed=7)
    ref_codes, yb = unfused_mixer_codes(i, True, yf, xs, qmax=31)
    args, kw = dt_args(i, True, True)
    codes = SCAN_DT(*args, **kw, z_reverse=True, combine=yf, code_scale=xs, code_qmin=-31, code_qmax=31)
    assert torch.equal(codes.float(), ref_codes) and codes.abs().max() == 31
    # out_proj on the codes: the numbers of int8_linear_decomposed on the float mixer output
    w = torch.randint(-127, 128, (24, 40), dtype=torch.int8)
    ws = torch.rand(24) * 0.01
    bias = torch.randn(24)
    x = ((yf + yb.flip(-1)) / 2).transpose(1, 2)
    assert torch.equal(int8_linear_decomposed_codes(codes, xs, 31, w, ws, bias),
                       int8_linear_decomposed(x, xs, -31, 31, w, ws, bias))


def test_dt_scan_codes_other_dtypes_fake_opcheck_and_without_kernels(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ouromamba_fx.ops.scan import combine_codes_ref

    i = dt_chain_inputs(2, 20, 7, 3, 4, seed=2)
    yf, xs = combine_inputs(i, seed=2)
    args, kw = dt_args(i, True, True)
    kw = dict(kw, z_reverse=True, combine=yf, code_scale=xs)
    codes = SCAN_DT(*args, **kw)
    torch.library.opcheck(SCAN_DT, args, kw)
    with FakeTensorMode() as mode:
        fake = SCAN_DT(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args),
                       **{k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    assert fake.shape == codes.shape and fake.dtype == torch.int8 and fake.stride() == codes.stride()
    # float64 scan (the ATen path after the scan): the graph's operations in float64, then float32
    a64 = list(args)
    for k in (0, 12, 13, 14, 15, 16, 17):
        a64[k] = a64[k].double()
    y64 = SCAN_DT(*a64, channels_last=True, z_reverse=True)
    c64 = SCAN_DT(*a64, **dict(kw, combine=yf.double()))
    assert torch.equal(c64, combine_codes_ref(y64, yf.double(), xs, -127, 127))
    with pytest.raises(RuntimeError, match="code_scale"):
        SCAN_DT(*args, **dict(kw, code_scale=torch.rand(1, 1, 7)))
    with pytest.raises(RuntimeError, match="combine"):
        SCAN_DT(*args, **dict(kw, combine=yf[:, :, :3]))
    # without the C++ kernel: plain torch (reference scan), the same codes up to the scan's rounding
    without_kernels(monkeypatch, SELECTIVE_SCAN)
    ref = SCAN_DT(*args, **kw)
    assert ref.dtype == torch.int8 and ref.shape == codes.shape
    assert (ref.int() - codes.int()).abs().max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 37, 13, 4), (1, 16, 1, 16), (2, 33, 40, 5)])
def test_scan_cl_reads_z_reversed(dtype, shape):
    """selective_scan_cl(z_reverse=True) is the scan on z.flip(-1), for time- and channel-contiguous z."""
    a = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    for z in (a["z"], a["z"].transpose(1, 2).contiguous().transpose(1, 2)):
        args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"])
        ref = SCAN_CL(*args, z.flip(-1), a["delta_bias"], True)
        out = SCAN_CL(*args, z, a["delta_bias"], True, z_reverse=True)
        assert torch.equal(out, ref) and out.stride() == ref.stride()
    torch.library.opcheck(SCAN_CL, args + (z, a["delta_bias"], True), {"z_reverse": True})


# ---------------------------------------------------------------------------------------------
# z as in_proj's raw accumulator: the scans apply its epilogue as they load z


def z_acc_inputs(batch, dim, L, scale="token", bias=True, layout="cl", seed=0):
    """in_proj's z half as the lowered graph hands it over: the columns dim..2 dim of a (batch, L,
    2 dim) accumulator (integer-valued float32), transposed to (batch, dim, L) (channel-contiguous,
    strided; ``layout="rows"``: a time-contiguous copy), the row scale per token (1, L, 1) or per
    tensor (1,), the z half's weight scales and bias."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-30000, 30001, (batch, L, 2 * dim), generator=g).float()
    z = acc[..., dim:].transpose(1, 2)
    if layout == "rows":
        z = z.contiguous()
    xs = torch.rand((1, L, 1) if scale == "token" else (1,), generator=g) * 0.01 + 0.001
    ws = torch.rand(dim, generator=g) * 0.02 + 0.001
    return z, xs, ws, (torch.randn(dim, generator=g) if bias else None)


def z_chain(z, xs, ws, bias):
    """The graph's z: in_proj's epilogue on the transposed accumulator half."""
    from ouromamba_fx.ops.int8_linear import int8_linear_epilogue_t

    return int8_linear_epilogue_t(z, xs, ws, bias)


@pytest.mark.parametrize("shape", [(2, 37, 13, 4), (1, 16, 1, 16), (2, 33, 40, 5), (3, 64, 17, 16)])
@pytest.mark.parametrize("scale", ["token", "tensor"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["cl", "rows"])
def test_scans_apply_the_z_epilogue_as_the_chain(shape, scale, bias, layout):
    """selective_scan_cl and selective_scan_dt on the raw accumulator with z_scale / z_wscale /
    z_bias equal, bit for bit, the separate epilogue followed by the scan, with and without
    z_reverse (the row scale follows z's own steps), for odd channel counts and L = 1."""
    b, d, L, N = shape
    a = make_inputs(b, d, L, N, dtype=torch.float32, seed=sum(shape))
    z, xs, ws, zb = z_acc_inputs(b, d, L, scale, bias, layout, seed=sum(shape) + 1)
    zf = z_chain(z, xs, ws, zb)
    assert not torch.equal(zf, z)
    head = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"])
    i = dt_chain_inputs(b, d, L, N, 5, seed=sum(shape) + 2)
    dargs, dkw = dt_args(i, True, True)
    for z_reverse in (False, True):
        epi = dict(z_reverse=z_reverse, z_scale=xs, z_wscale=ws, z_bias=zb)
        ref = SCAN_CL(*head, zf, a["delta_bias"], True, z_reverse=z_reverse)
        out = SCAN_CL(*head, z, a["delta_bias"], True, **epi)
        assert torch.equal(out, ref) and out.stride() == ref.stride()
        for combine in (None, (torch.randn(b, d, L) * 3, torch.rand(1, L, 1) * 0.02 + 0.01)):
            args = list(dargs)
            args[16] = zf
            kw = dict(dkw, z_reverse=z_reverse)
            if combine is not None:
                kw.update(combine=combine[0], code_scale=combine[1])
            ref = SCAN_DT(*args, **kw)
            args[16] = z
            out = SCAN_DT(*args, **dict(kw, z_scale=xs, z_wscale=ws, z_bias=zb))
            assert torch.equal(out, ref) and out.stride() == ref.stride()


def test_z_epilogue_float64_scans_opcheck_fake_and_without_kernels(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ouromamba_fx.ops.scan import z_epilogue_ref

    a = make_inputs(2, 21, 11, 4, dtype=torch.float32, seed=3)
    z, xs, ws, zb = z_acc_inputs(2, 21, 11, seed=3)
    zf = z_chain(z, xs, ws, zb)
    assert torch.equal(z_epilogue_ref(z, xs, ws, zb), zf)
    head = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"])
    epi = dict(z_reverse=True, z_scale=xs, z_wscale=ws, z_bias=zb)
    # float64 scans: the epilogue in float32 (the graph's), then the scan in float64
    h64 = tuple(t.double() for t in head)
    assert torch.equal(SCAN_CL(*h64, z, a["delta_bias"].double(), True, **epi),
                       SCAN_CL(*h64, zf, a["delta_bias"].double(), True, z_reverse=True))
    i = dt_chain_inputs(2, 21, 11, 4, 5, seed=4)
    dargs, dkw = dt_args(i, True, False)
    a64 = list(dargs)
    for k in (0, 12, 13, 14, 15, 17):
        a64[k] = a64[k].double()
    a64[16] = zf
    ref64 = SCAN_DT(*a64, **dkw, z_reverse=True)
    a64[16] = z
    assert ref64.dtype == torch.float64 and torch.equal(SCAN_DT(*a64, **dkw, **epi), ref64)
    # opcheck and fake tensors
    cl_args = head + (z, a["delta_bias"], True)
    torch.library.opcheck(SCAN_CL, cl_args, epi)
    dargs = list(dargs)
    dargs[16] = z
    torch.library.opcheck(SCAN_DT, tuple(dargs), dict(dkw, **epi))
    with FakeTensorMode() as mode:
        fk = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in epi.items()}
        fake = SCAN_CL(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in cl_args), **fk)
        fake_dt = SCAN_DT(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in dargs), **dkw, **fk)
    assert fake.shape == (2, 21, 11) and fake.stride() == (11 * 21, 1, 21)
    assert fake_dt.shape == (2, 21, 11) and fake_dt.stride() == (21 * 11, 11, 1)
    # the arguments are checked
    with pytest.raises(RuntimeError, match="z_scale and z_wscale go together"):
        SCAN_CL(*cl_args, z_scale=xs)
    with pytest.raises(RuntimeError, match="z_scale .* must have L"):
        SCAN_CL(*cl_args, z_scale=torch.rand(5), z_wscale=ws)
    with pytest.raises(RuntimeError, match="z_wscale must have d_inner"):
        SCAN_DT(*dargs, **dkw, z_scale=xs, z_wscale=ws[:3])
    with pytest.raises(RuntimeError, match="without z"):
        SCAN_CL(*head, None, a["delta_bias"], True, z_scale=xs, z_wscale=ws)
    # without the C++ kernels: the epilogue in plain torch, then the reference scan
    ref_cl = SCAN_CL(*head, zf, a["delta_bias"], True, z_reverse=True)
    dargs[16] = zf
    ref_dt = SCAN_DT(*dargs, **dkw, z_reverse=True)
    dargs[16] = z
    without_kernels(monkeypatch, SELECTIVE_SCAN)
    assert torch.equal(SCAN_CL(*head, z, a["delta_bias"], True, **epi),
                       SCAN_CL(*head, zf, a["delta_bias"], True, z_reverse=True))
    torch.testing.assert_close(SCAN_CL(*head, z, a["delta_bias"], True, **epi), ref_cl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(SCAN_DT(*dargs, **dkw, **epi), ref_dt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 6])
def test_scan_gives_the_same_bits_whichever_thread_runs_a_block(batch):
    # The forward's channel blocks and the backward's tasks go to threads as they come free
    # (om_parallel.h): 1, 2 and 3 threads, and 3 again, give identical outputs and gradients.
    # Small batches too: there the backward splits each batch element's blocks into runs with
    # partial dB / dC buffers, as many as the batch asks for whatever the thread count.
    a = make_inputs(batch, 70, 40, 16, dtype=torch.float32, form="var", requires_grad=True)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    dout = torch.randn(batch, 70, 40, generator=torch.Generator().manual_seed(3))

    def run():
        xs = [a[k].detach().clone().requires_grad_(True) for k in names]
        y = selective_scan(*xs, delta_softplus=True)
        y.backward(dout)
        return [y.detach(), SCAN_CL(*[t.detach() for t in xs], True)] + [t.grad for t in xs]

    assert_same_bits_at_thread_counts(run)
