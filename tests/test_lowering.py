"""Lowering rules and the ``ouromamba`` torch.compile backend against the reference graph."""

import operator

import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx.lowering.lower import lower_graph, lowering_passes
from ouromamba_fx.lowering.patterns import LINEAR_TARGETS
from ouromamba_fx.ops.conv1d_silu import CONV1D_SILU_CODES_OP, CONV1D_SILU_OP
from ouromamba_fx.ops.int8_linear import (INT8_LINEAR_OP, W8A8_LINEAR_OP, int8_linear_codes, int8_linear_decomposed,
                                           int8_linear_decomposed_acc, int8_linear_decomposed_codes,
                                           int8_linear_epilogue_t)
from ouromamba_fx.ops.mixed import (MIXED_FAKE_QUANT_OP, OUTLIER_MASK_OP, QUANTIZE_MIXED_OP, as_rows,
                                    mixed_fake_quant_decomposed, outlier_mask, quantize_mixed_ref, site_outlier_mask)
from ouromamba_fx.ops.quant import DEQUANTIZE_OP, QUANTIZE_OP, fake_quantize
from ouromamba_fx.ops.scan import SCAN_CHANNELS_LAST_OP, SCAN_DT_OP, SCAN_OP
from ouromamba_fx.ops.scan_quant import SCAN_INT8_INPUTS_OP
from ouromamba_fx.ops.w4a4o8_linear import (W4A4O8_DETECT_OP, W4A4O8_DETECT_REQUANT_OP, W4A4O8_MASKED_OP,
                                            w4a4o8_linear_masked_decomposed)
from ouromamba_fx.models import VisionMamba
from ouromamba_fx.tags import SPEC, tag

from .conftest import tiny_config

CALIB = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
X = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
FUSED = (W8A8_LINEAR_OP, W4A4O8_MASKED_OP, SCAN_INT8_INPUTS_OP, int8_linear_codes, INT8_LINEAR_OP, int8_linear_decomposed,
         w4a4o8_linear_masked_decomposed)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    m = VisionMamba(tiny_config(depth=1)).eval()
    return {name: of.convert(m, calib=CALIB, config=getattr(of, name), show_progress=False)
            for name in ("W8A8", "W4A4O8", "W6A6")}


def calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def cl_scans(gm):
    """The scans writing channel-contiguous output (W8A8's compute their delta: selective_scan_dt)."""
    return calls(gm, SCAN_CHANNELS_LAST_OP) + [n for n in calls(gm, SCAN_DT_OP) if n.kwargs["channels_last"]]


def plain_scans(gm):
    return calls(gm, SCAN_OP) + [n for n in calls(gm, SCAN_DT_OP) if not n.kwargs["channels_last"]]


def n_linears(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS)


def n_int8(gm):
    """(decomposed int8 linears quantizing their input, with their epilogue or, like in_proj, with
    the consumers applying it (int8_linear_decomposed_acc); those on codes a fused producer wrote)."""
    return (len(calls(gm, int8_linear_decomposed)) + len(calls(gm, int8_linear_decomposed_acc)),
            len(calls(gm, int8_linear_decomposed_codes)))


def close(a, b):
    """Same numbers up to float summation order (integer codes equal, GEMM order differs)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize("inline", [True, False])
def test_w8a8_linears_become_int8_ops_and_match_reference(models, inline):
    q = models["W8A8"]
    ref_linears = n_linears(q.graph_module)
    # (dt_proj into the scan and x_proj on the conv's codes: tested below)
    low = q.lower(int8_inline=inline, dt_scan=False, conv_codes=False, inproj_epilogue=False)
    gm = low.graph_module
    fused = calls(gm, int8_linear_decomposed if inline else W8A8_LINEAR_OP)
    assert ref_linears == 6 and len(fused) == ref_linears
    assert n_linears(gm) == 0
    for n in fused:  # weights stay int8 buffers; the static per-token x scale is passed
        w, s = (n.args[4], n.args[1]) if inline else (n.args[1], n.args[4])
        assert getattr(gm, w.target).dtype == torch.int8 and getattr(gm, s.target).shape[-1] == 1
        if inline:
            assert n.args[2:4] == (-127, 127)
    assert close(low(X), q(X))
    assert torch.equal(low(X).argmax(-1), q(X).argmax(-1))
    # the reference model is untouched by lowering
    assert n_linears(q.graph_module) == ref_linears and not calls(q.graph_module, W8A8_LINEAR_OP)


@torch.no_grad()
def test_int8_linear_static_equals_the_int8_linear_op():
    x = torch.randn(2, 7, 33)
    s = torch.rand(7, 1) * 0.05 + 0.01
    wq = torch.randint(-127, 128, (19, 33), dtype=torch.int8)
    ws, b = torch.rand(19) * 0.01, torch.randn(19)
    assert torch.equal(int8_linear_decomposed(x, s, -127, 127, wq, ws, b),
                       torch.ops.ouromamba.w8a8_linear(x, wq, ws, b, s))


@torch.no_grad()
@pytest.mark.parametrize("k", [33, 200])  # below and above the prepacked GEMM's reduction threshold
def test_int8_linear_on_emitted_codes_equals_quantizing_inside(k):
    # a fused producer hands the linear its codes (int8 or float) instead of the float input
    x = torch.randn(2, 7, k) * 3
    s = torch.rand(7, 1) * 0.05 + 0.01
    wq = torch.randint(-127, 128, (19, k), dtype=torch.int8)
    ws, b = torch.rand(19) * 0.01, torch.randn(19)
    q = torch.round(x / s).clamp(-100, 90)
    want = int8_linear_decomposed(x, s, -100, 90, wq, ws, b)
    assert torch.equal(int8_linear_decomposed_codes(q.to(torch.int8), s, 100, wq, ws, b), want)
    assert torch.equal(int8_linear_decomposed_codes(q, s, 100, wq, ws, None),
                       int8_linear_decomposed(x, s, -100, 90, wq, ws, None))


@torch.no_grad()
def test_fewer_activation_bits_keep_their_integers_and_use_int8_linear(models):
    q = models["W6A6"]
    gm = q.lower().graph_module
    # (the two dt_proj compute inside their scans, on 6-bit codes too, the two x_proj read 6-bit
    # codes their convs write, the backward scan emits out_proj's 6-bit codes and the convs apply
    # in_proj's epilogue to its 6-bit products)
    assert not calls(gm, int8_linear_decomposed)
    assert [n.args[2:4] for n in calls(gm, int8_linear_decomposed_acc)] == [(-31, 31)]  # in_proj
    assert [n.args[9:11] for n in calls(gm, CONV1D_SILU_CODES_OP)] == [(-31, 31)] * 2
    assert [n.args[3:5] for n in calls(gm, SCAN_DT_OP)] == [(-31, 31)] * 2
    (codes,) = [n for n in calls(gm, SCAN_DT_OP) if "combine" in n.kwargs]
    assert (codes.kwargs["code_qmin"], codes.kwargs["code_qmax"]) == (-31, 31)
    assert [n.args[2] for n in calls(gm, int8_linear_decomposed_codes)] == [31] * 3
    assert torch.equal(q.lower()(X), q.lower(scan_combine=False)(X))
    gm = q.lower(int8_inline=False).graph_module
    nodes = calls(gm, int8_linear_codes)
    assert len(nodes) == 6 and not calls(gm, W8A8_LINEAR_OP)
    assert nodes[0].args[0].args[3:5] == (-31, 31)  # the 6-bit quantize feeds the int8 GEMM
    assert close(q.lower()(X), q(X)) and close(q.lower(int8_inline=False)(X), q(X))


@torch.no_grad()
@pytest.mark.parametrize("mode", ["fused", "inline", "op"])
def test_w4a4o8_linears_use_packed_int4_weights_and_the_outlier_rule(models, mode):
    q = models["W4A4O8"]
    low = q.lower(mixed_fused=mode == "fused", int4_inline=mode == "inline")
    gm = low.graph_module
    target = {"fused": W4A4O8_DETECT_OP, "inline": w4a4o8_linear_masked_decomposed, "op": W4A4O8_MASKED_OP}[mode]
    fused = calls(gm, target)
    if mode == "fused":  # the dt_projs, with the delta quantization they feed
        assert len(fused) == 4
        fused += calls(gm, W4A4O8_DETECT_REQUANT_OP)
    assert len(fused) == 6 and n_linears(gm) == 0 and not calls(gm, QUANTIZE_MIXED_OP)
    for n in fused:
        w_arg, k = (2, n.args[5]) if mode == "fused" else (3, n.args[6])
        wp = getattr(gm, n.args[w_arg].target)
        assert wp.dtype == torch.uint8 and wp.shape[1] == (k + 1) // 2
        if mode != "fused":
            assert n.args[1].args[0].target is OUTLIER_MASK_OP
    # the scan's delta/B/C: one C++ pass each when fused, the reference mask + plain torch when not
    assert bool(calls(gm, MIXED_FAKE_QUANT_OP)) == (mode == "fused")
    assert bool(calls(gm, OUTLIER_MASK_OP)) == (mode != "fused")
    assert close(low(X), q(X))
    assert torch.equal(low(X).argmax(-1), q(X).argmax(-1))


@torch.no_grad()
def test_w4a4o8_linear_static_equals_the_op():
    from ouromamba_fx.ops.int4 import pack_int4

    x = torch.randn(3, 9, 37)
    mask = torch.rand(3, 9, 37) < 0.05
    mask[0, 0] = False  # a row without outliers
    step = torch.rand(1, 9, 1) * 0.3 + 0.1
    wq = torch.randint(-7, 8, (21, 37), dtype=torch.int8)
    ws, b = torch.rand(21) * 0.01, torch.randn(21)
    args = (x, mask, step, pack_int4(wq), ws, b, 37)
    assert torch.equal(w4a4o8_linear_masked_decomposed(*args), torch.ops.ouromamba.w4a4o8_linear(*args))


def test_outlier_mask_op_is_the_reference_mask_and_passes_opcheck():
    x = torch.randn(3, 32, 11) * torch.linspace(0.1, 1, 32)[:, None]
    x[0, 2, 5] = 40.0
    s = torch.full((11,), 0.05)
    mask, step = site_outlier_mask(x, s, 2, 1, 4, 3.0, 4)
    rows = as_rows(x, 2, 1)
    assert torch.equal(mask.transpose(1, 2), outlier_mask(rows, s, 7, 3.0, 4))
    assert mask[0, 2, 5] and 0 < mask.sum() < mask.numel()
    assert step.shape == (1, 1, 11)
    # ...and mixed_fake_quant_decomposed with it reproduces quantize_mixed bit for bit (strided layout too)
    assert torch.equal(mixed_fake_quant_decomposed(x, mask, step, 1, 4, 8),
                       quantize_mixed_ref(x, s, 2, 1, 4, 8, 3.0, 4))
    torch.library.opcheck(torch.ops.ouromamba.outlier_mask.default, (x, s, 2, 1, 4, 3.0, 4))
    torch.library.opcheck(torch.ops.ouromamba.outlier_mask.default, (x[:1, :, :1], s, 2, 1, 4, 3.0, 10))


@torch.no_grad()
def test_scans_take_int8_codes(models):
    q = models["W8A8"]
    # default: the float scan on fake-quantized inputs (channel-contiguous output for out_proj)
    assert cl_scans(q.lower().graph_module) and calls(q.lower(dt_scan=False).graph_module, SCAN_CHANNELS_LAST_OP)
    low = q.lower(integer_scan=True)
    assert close(low(X), q(X))
    gm = low.graph_module
    scans = calls(gm, SCAN_INT8_INPUTS_OP)
    assert len(scans) == 2 and not calls(gm, SCAN_OP) and not cl_scans(gm)
    for n in scans:  # delta, B, C arrive as int8 codes of a quantize, with its scale and zero point
        for i in (1, 5, 8):
            assert n.args[i].target is not fake_quantize and n.args[i + 1] is not None
            assert "quantize" in getattr(n.args[i].target, "__name__", "")


@torch.no_grad()
@pytest.mark.parametrize("name", ["W8A8", "W4A4O8"])
def test_scans_feeding_out_proj_write_channel_contiguous_output(models, name):
    q = models[name]
    low = q.lower()
    gm = low.graph_module
    assert len(cl_scans(gm)) == 2 and not plain_scans(gm)
    assert any("channels_last_scan: 2 scan(s)" in line for line in low.log)
    off = q.lower(scan_cl=False)
    assert len(plain_scans(off.graph_module)) == 2 and not cl_scans(off.graph_module)
    assert torch.equal(low(X), off(X))


@torch.no_grad()
def test_fast_decay_option_marks_the_channel_contiguous_scans(models):
    q = models["W8A8"]
    low, fast = q.lower(), q.lower(fast_decay=True)
    scans = cl_scans(fast.graph_module)
    assert len(scans) == 2 and all(n.kwargs.get("fast_decay") is True for n in scans)
    assert not any("fast_decay" in n.kwargs for n in cl_scans(low.graph_module))
    assert fast.lower_options == {"fast_decay": True}
    # the decays differ by at most 2.9e-6 relative: the logits stay close, the predictions equal
    a, b = low(X), fast(X)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * a.abs().max().item())
    assert torch.equal(a.argmax(1), b.argmax(1))
    # without the channel-contiguous rewrite the option has nothing to mark
    assert torch.equal(q.lower(scan_cl=False, fast_decay=True)(X), q.lower(scan_cl=False)(X))


@torch.no_grad()
def test_dt_proj_and_the_delta_quantization_fuse(models):
    q = models["W4A4O8"]
    low = q.lower()
    gm = low.graph_module
    fused = calls(gm, W4A4O8_DETECT_REQUANT_OP)
    assert len(fused) == 2 and any("fuse_linear_mixed_fake_quant: 2 linear(s)" in line for line in low.log)
    for n in fused:  # the scan's delta, through the transpose back to (batch, d_inner, L)
        (user,) = n.users
        assert user.target == "transpose" and all(u.target is SCAN_CHANNELS_LAST_OP for u in user.users)
        assert n.args[5] < 32  # dt_rank input channels
    # the remaining mixed fake quantizations are the scans' B and C
    assert len(calls(gm, MIXED_FAKE_QUANT_OP)) == 4
    off = q.lower(mixed_fused=False)
    assert not calls(off.graph_module, W4A4O8_DETECT_REQUANT_OP)
    y, ref = low(X), q(X)
    assert torch.allclose(y, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@torch.no_grad()
def test_w8a8_dt_proj_and_delta_quantization_move_into_the_scan(models):
    q = models["W8A8"]
    low, off = q.lower(), q.lower(dt_scan=False)
    gm = low.graph_module
    fused = calls(gm, SCAN_DT_OP)
    assert len(fused) == 2 and not calls(gm, SCAN_CHANNELS_LAST_OP)
    assert any("fuse_dt_scan: 2 scan(s)" in line for line in low.log)
    assert low.lower_options == {} and q.lower(dt_scan=False).lower_options == {"dt_scan": False}
    # dt_proj is gone (in_proj, both x_proj, on their convs' codes, and out_proj, on the backward
    # scan's codes: scan_combine, tested below, are left), and with it delta's fake quantization
    assert n_int8(gm) == (1, 3) and len(calls(gm, fake_quantize)) == 4
    for n in fused:
        assert n.kwargs["channels_last"] is True and n.args[3:5] == (-127, 127) and n.args[-1] is True
        assert isinstance(n.args[1], torch.fx.Node) and n.args[1].target is operator.getitem  # x_proj's dt columns
    # the option off keeps the old graph: the linear, the transpose and the fake quantization
    ogm = off.graph_module
    assert not calls(ogm, SCAN_DT_OP) and len(calls(ogm, SCAN_CHANNELS_LAST_OP)) == 2
    assert n_int8(ogm) == (4, 2) and not any("fuse_dt_scan" in line for line in off.log)
    # the same numbers bit for bit, and the reference graph's up to float summation order
    y, r = low(X), q(X)
    assert torch.equal(y, off(X)) and close(y, r) and torch.equal(y.argmax(-1), r.argmax(-1))
    # W4A4O8's dt_proj is another op (w4a4o8_linear_mixed): nothing to fuse
    assert not calls(models["W4A4O8"].lower().graph_module, SCAN_DT_OP)


def compiled_both_ways(q, monkeypatch, option):
    """``torch.compile(q, backend="ouromamba")`` on X with the lowering option on and off: ({on: output},
    {on: the (graph, ..., log) tuples the backend's lower_graph returned for that compilation})."""
    import ouromamba_fx.lowering.backend as backend

    lowered = []
    real = backend.lower_graph

    def spy(gm, *args, **kw):
        out = real(gm, *args, **kw)
        lowered.append(out)
        return out

    monkeypatch.setattr(backend, "lower_graph", spy)
    ys, runs = {}, {}
    for on in (True, False):
        torch._dynamo.reset()
        lowered.clear()
        ys[on] = torch.compile(q, backend="ouromamba", dynamic=False, options={option: on})(X)
        runs[on] = list(lowered)
    return ys, runs


@torch.no_grad()
def test_dt_scan_fires_on_the_compiled_graph(models, monkeypatch):
    q = models["W8A8"]
    ys, runs = compiled_both_ways(q, monkeypatch, "dt_scan")
    for on, lowered in runs.items():
        n_fused = sum(len(calls(gm, SCAN_DT_OP)) for gm, _, _ in lowered)
        assert n_fused == (2 if on else 0)
        assert any("fuse_dt_scan: 2 scan(s)" in line for _, _, log in lowered for line in log) is on
    r = q(X)
    assert close(ys[True], r) and torch.equal(ys[True].argmax(-1), r.argmax(-1))
    assert close(ys[True], ys[False])


@torch.no_grad()
def test_bidirectional_mixer_flips_and_out_proj_quantization_move_into_the_backward_scan(models):
    q = models["W8A8"]
    low, off = q.lower(), q.lower(scan_combine=False)
    gm, ogm = low.graph_module, off.graph_module
    scans = calls(gm, SCAN_DT_OP)
    fwd, bwd = scans
    # the backward scan reads the forward's z reversed and emits out_proj's codes from the forward's output
    assert bwd.kwargs["z_reverse"] is True and bwd.args[16] is fwd.args[16] and bwd.kwargs["combine"] is fwd
    assert "z_reverse" not in fwd.kwargs and "combine" not in fwd.kwargs
    (lin,) = [n for n in calls(gm, int8_linear_decomposed_codes) if n.args[0] is bwd]  # (x_proj: conv_codes)
    assert lin.args[0] is bwd and lin.args[2] == 127 and bwd.kwargs["code_scale"] is lin.args[1]
    flips = lambda g: [n for n in g.graph.nodes if n.op == "call_method" and n.target == "flip"]  # noqa: E731
    assert not flips(gm) and len(flips(ogm)) == 2
    assert not any(n.target is operator.truediv for n in gm.graph.nodes)
    assert any("reverse_scan_gate: 1 scan(s)" in line for line in low.log)
    assert any("fuse_scan_combine: 1 mixer(s)" in line for line in low.log)
    assert not any("scan_combine" in line or "reverse_scan_gate" in line for line in off.log)
    assert off.lower_options == {"scan_combine": False}
    assert not [n for n in calls(ogm, int8_linear_decomposed_codes) if n.args[0].target is SCAN_DT_OP]
    # the report keeps out_proj's row and the dt_proj the scan absorbed
    assert lin.meta.get(SPEC) is not None
    # the same numbers bit for bit
    for x in (X, torch.randn(3, 3, 16, 16) * 4):
        assert torch.equal(low(x), off(x))
    # the lowered graph on the CPU only: for CUDA nothing is fused (and the log says why)
    cuda = q.lower(target="cuda")
    assert not calls(cuda.graph_module, int8_linear_decomposed_codes)
    assert any(line.startswith("fuse_scan_combine: kept for CUDA") for line in cuda.log)


@torch.no_grad()
def test_channel_contiguous_backward_scans_read_z_reversed(models):
    # W4A4O8 (and W8A8 with dt_scan off): selective_scan_cl takes z_reverse, nothing emits codes
    for q, kw in ((models["W4A4O8"], {}), (models["W8A8"], {"dt_scan": False})):
        low, off = q.lower(**kw), q.lower(scan_combine=False, **kw)
        fwd, bwd = cl_scans(low.graph_module)
        assert bwd.kwargs.get("z_reverse") is True and bwd.args[6] is fwd.args[6] and "z_reverse" not in fwd.kwargs
        assert any("reverse_scan_gate: 1 scan(s)" in line for line in low.log)
        assert any("fuse_scan_combine: 0 mixer(s)" in line for line in low.log)
        assert torch.equal(low(X), off(X))


@torch.no_grad()
def test_scan_combine_fires_on_the_compiled_graph(models, monkeypatch):
    q = models["W8A8"]
    ys, runs = compiled_both_ways(q, monkeypatch, "scan_combine")
    for on, lowered in runs.items():
        n_codes = sum(len([n for n in calls(gm, int8_linear_decomposed_codes) if n.args[0].target is SCAN_DT_OP])
                      for gm, _, _ in lowered)  # (the x_proj read their convs' codes either way)
        assert n_codes == (1 if on else 0)
        assert any("fuse_scan_combine: 1 mixer(s)" in line for _, _, log in lowered for line in log) is on
        assert any("reverse_scan_gate: 1 scan(s)" in line for _, _, log in lowered for line in log) is on
    assert torch.equal(ys[True], ys[False]) and torch.equal(ys[True], q.lower()(X))


def test_scan_combine_leaves_mixers_with_other_uses():
    """The rule needs the backward scan, its flip, the sum and the mean read by out_proj alone."""
    import torch.fx as fx

    from ouromamba_fx.lowering.rewrite import apply
    from ouromamba_fx.lowering.rules import lowering_rules

    rule = next(r for r in lowering_rules() if r.name == "fuse_scan_combine")

    def graph(extra_use):
        g = fx.Graph()
        u, wq, s = g.placeholder("u"), g.get_attr("wq"), g.get_attr("s")
        # (no shapes recorded: y_f must be a scan's output)
        yf = g.call_function(SCAN_CHANNELS_LAST_OP, (u,) + (None,) * 8)
        yb = g.call_function(SCAN_DT_OP, (u,) + (None,) * 18, {"channels_last": True})
        fl = g.call_method("flip", (yb, -1))
        add = g.call_function(operator.add, (yf, fl))
        div = g.call_function(operator.truediv, (add, 2))
        tr = g.call_method("transpose", (div, 1, 2))
        lin = g.call_function(int8_linear_decomposed, (tr, s, -127, 127, wq, s, None))
        out = [lin]
        if extra_use == "yf placeholder":  # an input of unknown shape in y_f's place
            add.replace_input_with(yf, u)
        elif extra_use is not None:
            out.append({"yb": yb, "flip": fl, "add": add, "div": div}[extra_use])
        g.output(tuple(out))
        root = torch.nn.Module()
        root.wq = torch.zeros(4, 4, dtype=torch.int8)
        root.s = torch.ones(1, 5, 1)
        return fx.GraphModule(root, g)

    assert apply(graph(None), rule.patterns[0]) == 1
    for use in ("yb", "flip", "add", "div", "yf placeholder"):
        assert apply(graph(use), rule.patterns[0]) == 0


def test_channels_last_scan_leaves_scans_with_other_uses():
    from ouromamba_fx.lowering.rewrite import RewritePass
    from ouromamba_fx.lowering.rules import lowering_rules
    from ouromamba_fx.passes.base import Context

    channels_last = RewritePass(next(r for r in lowering_rules() if r.name == "channels_last_scan"))

    w = torch.randn(4, 6)

    def through_linear(u, delta, A, B, C):
        y = SCAN_OP(u, delta, A, B, C, None, None, None, True)
        return torch.ops.ouromamba.w8a8_linear.default((y + y.flip(-1)).transpose(1, 2), u, w, u, None)

    def reshaped(u, delta, A, B, C):
        y = SCAN_OP(u, delta, A, B, C, None, None, None, True)
        return (y / 2).transpose(1, 2).reshape(-1, 6)

    def reduced_too(u, delta, A, B, C):
        y = SCAN_OP(u, delta, A, B, C, None, None, None, True)
        return torch.ops.ouromamba.w8a8_linear.default(y.transpose(1, 2), u, w, u, None), y.sum()

    def transposed_elsewhere(u, delta, A, B, C):
        y = SCAN_OP(u, delta, A, B, C, None, None, None, True)
        return torch.ops.ouromamba.w8a8_linear.default(y.transpose(0, 1), u, w, u, None)

    for fn, expected in ((through_linear, 1), (reshaped, 0), (reduced_too, 0), (transposed_elsewhere, 0)):
        gm = torch.fx.symbolic_trace(fn)
        channels_last.run(gm, Context(config=None, show_progress=False))
        assert (len(calls(gm, SCAN_CHANNELS_LAST_OP)), len(calls(gm, SCAN_OP))) == (expected, 1 - expected), fn.__name__


def test_no_quantize_dequantize_pairs_left_around_fused_ops(models):
    for name, opts in (("W8A8", {}), ("W8A8", {"integer_scan": True}), ("W4A4O8", {}), ("W6A6", {})):
        gm = models[name].lower(**opts).graph_module
        assert not calls(gm, QUANTIZE_OP) and not calls(gm, DEQUANTIZE_OP) and not calls(gm, QUANTIZE_MIXED_OP), name
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in FUSED:
                for a in n.all_input_nodes:
                    assert a.target not in (DEQUANTIZE_OP, fake_quantize, mixed_fake_quant_decomposed), (name, n.name, a.name)


@torch.no_grad()
def test_rules_leave_what_they_cannot_fuse_exactly(models):
    """A non-zero activation zero point is outside the symmetric int8 op: that linear stays float
    (fed by fake quantization) and the model still computes the reference's numbers."""
    q = models["W8A8"]
    gm = q.lower(dt_scan=False).graph_module  # sanity: all fused normally
    assert n_int8(gm) == (4, 2)
    import copy

    q2 = copy.deepcopy(q)
    zp = q2.graph_module.layers_0_mixer_in_proj_zp
    zp.fill_(1.0)
    low = q2.lower(dt_scan=False)
    assert n_int8(low.graph_module) == (3, 2) and n_linears(low.graph_module) == 1
    assert close(low(X), q2(X))


@torch.no_grad()
def test_conv1d_silu_rule_matches_reference(models):
    q = models["W8A8"]
    gm, _, log = lower_graph(__import__("copy").deepcopy(q.graph_module),
                             lowering_passes(conv_silu=True, conv_codes=False))  # (codes: tested below)
    convs = calls(gm, CONV1D_SILU_OP)
    assert len(convs) == 2 and not calls(gm, torch.conv1d)
    # the backward branch's flip is read backwards by the op, not materialised in front of it
    assert sorted(n.args[7] for n in convs) == [False, True]
    assert all(n.args[0].op != "call_method" or n.args[0].target != "flip" for n in convs)
    assert any("lower_conv1d_silu: 2" in line for line in log)
    assert close(gm(X), q(X))
    off, _, _ = lower_graph(__import__("copy").deepcopy(q.graph_module), lowering_passes(conv_silu=False))
    assert not calls(off, CONV1D_SILU_OP) and len(calls(off, torch.conv1d)) == 2


@torch.no_grad()
def test_x_proj_reads_the_codes_its_conv_writes(models):
    q = models["W8A8"]
    low, off = q.lower(), q.lower(conv_codes=False)
    gm, ogm = low.graph_module, off.graph_module
    fused = calls(gm, CONV1D_SILU_CODES_OP)
    assert len(fused) == 2 and not calls(gm, CONV1D_SILU_OP) and len(calls(ogm, CONV1D_SILU_OP)) == 2
    assert any("fuse_conv_codes: 2 conv(s)" in line for line in low.log)
    assert not any("fuse_conv_codes" in line for line in off.log)
    assert low.lower_options == {} and off.lower_options == {"conv_codes": False}
    assert sorted(n.args[7] for n in fused) == [False, True]  # both directions
    for n in fused:
        users = {u.args[1]: u for u in n.users}
        assert set(users) == {0, 1} and all(u.target is operator.getitem for u in users.values())
        # the floats go to the scan, the codes to x_proj (whose scale the op was given)
        assert [u.target for u in users[0].users] == [SCAN_DT_OP]
        (lin,) = users[1].users
        assert lin.target is int8_linear_decomposed_codes and lin.args[0] is users[1]
        assert n.args[8].target == lin.args[1].target and n.args[9:11] == (-127, 127) and lin.args[2] == 127
    assert n_int8(gm) == (1, 3) and n_int8(ogm) == (3, 1)  # (out_proj on the backward scan's codes)
    # the lowered model's numbers do not move, bit for bit
    y = low(X)
    assert torch.equal(y, off(X)) and close(y, q(X))
    # W4A4O8's x_proj quantizes its input with outlier channels: nothing to fuse
    assert not calls(models["W4A4O8"].lower().graph_module, CONV1D_SILU_CODES_OP)
    # for a GPU the conv stays as it is (no fused kernel there; the log line: below)
    assert not calls(q.lower(target="cuda").graph_module, CONV1D_SILU_CODES_OP)


def _in_proj_buffers(mod: torch.nn.Module, g: torch.Generator, c: int, d: int, bias: bool) -> None:
    """The buffers of a toy mixer's in_proj (int8 weight, its scales, an optional bias) and conv
    weight, for the epilogue rules' tests."""
    mod.register_buffer("w", torch.randn(d, 1, 4, generator=g))
    mod.register_buffer("wq", torch.randint(-127, 128, (2 * d, c), dtype=torch.int8, generator=g))
    mod.register_buffer("ws", torch.rand(2 * d, generator=g) * 0.01)
    mod.register_buffer("b", torch.randn(2 * d, generator=g) if bias else None)


def _trace_decomposed(mod: torch.nn.Module) -> torch.fx.GraphModule:
    """``mod`` traced with ``int8_linear_decomposed`` kept as one call (as the lowering sees it)."""
    return torch.fx.GraphModule(mod, torch.fx.Tracer(autowrap_functions=(int8_linear_decomposed,)).trace(mod))


def test_conv_codes_rule_takes_only_the_exact_pattern():
    from ouromamba_fx.lowering.rewrite import RewritePass
    from ouromamba_fx.lowering.rules import lowering_rules
    from ouromamba_fx.passes.base import Context

    rule = RewritePass(next(r for r in lowering_rules() if r.name == "fuse_conv_codes"))
    d, length, n = 6, 5, 3

    class M(torch.nn.Module):
        def __init__(self, scale, qmin=-127, qmax=127, dims=(1, 2)):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.register_buffer("w", torch.randn(d, 1, 4, generator=g))
            self.register_buffer("wq", torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=g))
            self.register_buffer("ws", torch.rand(n, generator=g) * 0.01)
            self.register_buffer("s", scale)
            self.qmin, self.qmax, self.dims = qmin, qmax, dims

        def forward(self, x):
            c = CONV1D_SILU_OP(x, self.w, None, None, None, -127, 127, False)
            y = int8_linear_decomposed(c.transpose(*self.dims), self.s, self.qmin, self.qmax, self.wq, self.ws, None)
            return y, c

    x = torch.randn(2, length, d).transpose(1, 2)
    per_step = torch.rand(1, length, 1) * 0.02 + 1e-3
    cases = [(M(per_step), 1), (M(per_step[0]), 1), (M(per_step.amax().reshape(1)), 1),
             (M(per_step, -63, 63), 1),
             (M(per_step.expand(2, length, 1).contiguous()), 0),  # per (batch, token): not a static step scale
             (M(per_step, -255, 255), 0),  # outside int8
             (M(per_step, dims=(0, 1)), 0)]  # another transpose
    for i, (mod, expected) in enumerate(cases):
        gm = _trace_decomposed(mod)
        want = gm(x) if expected else None
        rule.run(gm, Context(config=None, show_progress=False))
        assert len(calls(gm, CONV1D_SILU_CODES_OP)) == expected, i
        if expected:
            got = gm(x)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), i
            assert not calls(gm, CONV1D_SILU_OP) and len(calls(gm, int8_linear_decomposed_codes)) == 1
    # for a GPU target: kept, and the log says why
    from ouromamba_fx.lowering.rules import LoweringOptions

    cuda_rules = lowering_rules(LoweringOptions(target="cuda"))
    cuda_rule = RewritePass(next(r for r in cuda_rules if r.name == "fuse_conv_codes"))
    gm, ctx = _trace_decomposed(M(per_step)), Context(config=None, show_progress=False)
    cuda_rule.run(gm, ctx)
    assert not calls(gm, CONV1D_SILU_CODES_OP)
    assert any(line.startswith("fuse_conv_codes: kept for CUDA") for line in ctx.log)


@torch.no_grad()
def test_conv_codes_fire_on_the_compiled_graph(models, monkeypatch):
    q = models["W8A8"]
    ys, runs = compiled_both_ways(q, monkeypatch, "conv_codes")
    for on, lowered in runs.items():
        assert sum(len(calls(gm, CONV1D_SILU_CODES_OP)) for gm, _, _ in lowered) == (2 if on else 0)
        assert any("fuse_conv_codes: 2 conv(s)" in line for _, _, log in lowered for line in log) is on
    # Inductor's quantization of the conv's output (option off) and the op's codes: the same bits
    assert torch.equal(ys[True], ys[False])
    r = q(X)
    assert close(ys[True], r) and torch.equal(ys[True].argmax(-1), r.argmax(-1))


@torch.no_grad()
def test_convs_apply_in_proj_epilogue(models):
    q = models["W8A8"]
    low, off = q.lower(), q.lower(inproj_epilogue=False)
    gm, ogm = low.graph_module, off.graph_module
    (acc,) = calls(gm, int8_linear_decomposed_acc)
    assert not calls(ogm, int8_linear_decomposed_acc) and len(calls(ogm, CONV1D_SILU_CODES_OP)) == 2
    assert any("fuse_in_proj_epilogue: 1 linear(s)" in line for line in low.log)
    assert not any("fuse_in_proj_epilogue" in line for line in off.log)
    assert low.lower_options == {} and off.lower_options == {"inproj_epilogue": False}
    # in_proj's weight scales, as the linear had them (option off)
    (in_proj,) = [n for n in calls(ogm, int8_linear_decomposed) if n.args[4].target == acc.args[4].target]
    ws = getattr(ogm, in_proj.args[5].target)
    d = ws.numel() // 2
    (tr,) = acc.users
    (chunk,) = tr.users
    halves = {u.args[1]: u for u in chunk.users}
    convs = calls(gm, CONV1D_SILU_CODES_OP)
    assert len(convs) == 2 and sorted(n.args[7] for n in convs) == [False, True]
    for n in convs:  # the x half, raw, with the row scale and the x half's weight scales
        assert n.args[0] is halves[0] and n.args[11].target == acc.args[1].target and n.args[13] is None
        assert torch.equal(getattr(gm, n.args[12].target), ws[:d])
    # the z half: raw into both scans as their gate (the backward one reversed), which apply the
    # epilogue with the row scale and the z half's weight scales
    assert not calls(gm, int8_linear_epilogue_t)
    scans = calls(gm, SCAN_DT_OP)
    assert set(halves[1].users) == set(scans) and len(scans) == 2
    assert sorted(bool(n.kwargs.get("z_reverse")) for n in scans) == [False, True]
    for n in scans:
        assert n.args[16] is halves[1] and n.kwargs["z_scale"].target == acc.args[1].target
        assert torch.equal(getattr(gm, n.kwargs["z_wscale"].target), ws[d:]) and "z_bias" not in n.kwargs
    assert any("fuse_z_epilogue: 1 z half(s)" in line for line in low.log)
    y = low(X)
    assert torch.equal(y, off(X)) and close(y, q(X))
    # on the plain convs too (conv_codes off), and with dt_proj left out of the scan (selective_scan_cl)
    low2 = q.lower(conv_codes=False, dt_scan=False)
    gm2 = low2.graph_module
    assert len(calls(gm2, CONV1D_SILU_OP)) == 2 and calls(gm2, int8_linear_decomposed_acc)
    assert not calls(gm2, int8_linear_epilogue_t) and [n.kwargs.get("z_scale") is not None for n in cl_scans(gm2)] == \
        [True, True]
    assert torch.equal(low2(X), q.lower(conv_codes=False, dt_scan=False, inproj_epilogue=False)(X))
    # the backward scan reading a flip of the z half (scan_combine off): the epilogue stays, logged
    low3 = q.lower(scan_combine=False)
    (z,) = calls(low3.graph_module, int8_linear_epilogue_t)
    assert torch.equal(getattr(low3.graph_module, z.args[2].target), ws[d:])
    assert any(line.startswith("fuse_z_epilogue: kept the z half's epilogue: read by flip") for line in low3.log)
    assert torch.equal(low3(X), q.lower(scan_combine=False, inproj_epilogue=False)(X))
    # W4A4O8's in_proj is another op: nothing to fuse; for a GPU the linear keeps its epilogue
    assert not calls(models["W4A4O8"].lower().graph_module, int8_linear_decomposed_acc)
    cuda = q.lower(target="cuda")
    assert not calls(cuda.graph_module, int8_linear_decomposed_acc)
    assert any(line.startswith("fuse_in_proj_epilogue: kept for CUDA") for line in cuda.log)


def test_in_proj_epilogue_rule_takes_only_the_exact_pattern():
    from ouromamba_fx.lowering.rewrite import RewritePass
    from ouromamba_fx.lowering.rules import lowering_rules
    from ouromamba_fx.passes.base import Context

    rule = RewritePass(next(r for r in lowering_rules() if r.name == "fuse_in_proj_epilogue"))
    c, d, length = 8, 6, 5

    class M(torch.nn.Module):
        def __init__(self, scale, bias=False, chunk_dim=1, x_also=False, codes=False):
            super().__init__()
            _in_proj_buffers(self, torch.Generator().manual_seed(4), c, d, bias)
            self.register_buffer("s", scale)
            self.register_buffer("cs", torch.full((1,), 0.01))
            self.chunk_dim, self.x_also, self.codes = chunk_dim, x_also, codes

        def forward(self, u):
            xz = int8_linear_decomposed(u, self.s, -127, 127, self.wq, self.ws, self.b).transpose(1, 2)
            x, z = xz.chunk(2, dim=self.chunk_dim)
            if self.codes:
                y, q = CONV1D_SILU_CODES_OP(x, self.w, None, None, None, -127, 127, True, self.cs, -127, 127)
                y = y + q.float().transpose(1, 2)
            else:
                y = CONV1D_SILU_OP(x, self.w, None, None, None, -127, 127, False)
            return (y * z + x) if self.x_also else y * z

    u = torch.randn(2, length, c) * 3
    per_step = torch.rand(1, length, 1) * 0.05 + 1e-2
    cases = [(M(per_step), 1), (M(per_step, bias=True), 1), (M(per_step.amax().reshape(1)), 1),
             (M(per_step, codes=True, bias=True), 1),
             (M(per_step, chunk_dim=-2), 1),
             (M(per_step, x_also=True), 0),  # the x half read by another op than the convs
             (M(per_step.expand(2, length, 1).contiguous()), 0)]  # per (batch, token)
    for i, (mod, expected) in enumerate(cases):
        gm = _trace_decomposed(mod)
        want = gm(u)
        rule.run(gm, Context(config=None, show_progress=False))
        gm.recompile()  # (the pass manager does this after each pass)
        assert len(calls(gm, int8_linear_decomposed_acc)) == expected, i
        assert len(calls(gm, int8_linear_decomposed)) == 1 - expected, i
        assert len(calls(gm, int8_linear_epilogue_t)) == expected, i
        assert torch.equal(gm(u), want), i


def test_z_epilogue_rule_takes_only_scan_gates():
    """fuse_z_epilogue moves the z half's epilogue into the scans only where every reader of it is a
    selective_scan_cl / _dt gate (with in_proj's bias too); else the epilogue stays and is logged."""
    from ouromamba_fx.lowering.rewrite import RewritePass
    from ouromamba_fx.lowering.rules import lowering_rules
    from ouromamba_fx.passes.base import Context

    rules = [RewritePass(r) for r in lowering_rules() if r.name in ("fuse_in_proj_epilogue", "fuse_z_epilogue")]
    c, d, n_state, length = 8, 6, 3, 5

    class M(torch.nn.Module):
        def __init__(self, bias, other=None):
            super().__init__()
            g = torch.Generator().manual_seed(5)
            _in_proj_buffers(self, g, c, d, bias)
            self.register_buffer("s", torch.rand(1, length, 1, generator=g) * 0.05 + 1e-2)
            self.register_buffer("A", -torch.rand(d, n_state, generator=g) - 0.5)
            self.register_buffer("D", torch.randn(d, generator=g))
            self.other = other

        def forward(self, u, delta, B, C):
            xz = int8_linear_decomposed(u, self.s, -127, 127, self.wq, self.ws, self.b).transpose(1, 2)
            x, z = xz.chunk(2, dim=1)
            y = CONV1D_SILU_OP(x, self.w, None, None, None, -127, 127, False)
            yf = SCAN_CHANNELS_LAST_OP(y, delta, self.A, B, C, self.D, z, None, True)
            yb = SCAN_CHANNELS_LAST_OP(y, delta, self.A, B, C, self.D, z, None, True, z_reverse=True)
            if self.other == "plain_scan":
                yb = SCAN_OP(y, delta, self.A, B, C, self.D, z, None, True)
            elif self.other == "add":
                yb = yb + z
            return yf + yb

    g = torch.Generator().manual_seed(6)
    inputs = (torch.randn(2, length, c, generator=g) * 3, torch.randn(2, d, length, generator=g) * 0.5 - 1,
              torch.randn(2, n_state, length, generator=g), torch.randn(2, n_state, length, generator=g))
    for bias, other, fused in ((True, None, 1), (False, None, 1), (True, "plain_scan", 0), (False, "add", 0)):
        mod = M(bias, other)
        gm = _trace_decomposed(mod)
        want = gm(*inputs)
        ctx = Context(config=None, show_progress=False)
        for r in rules:
            r.run(gm, ctx)
            gm.recompile()
        case = (bias, other)
        assert calls(gm, int8_linear_decomposed_acc) and len(calls(gm, int8_linear_epilogue_t)) == 1 - fused, case
        gates = [n for n in calls(gm, SCAN_CHANNELS_LAST_OP) if n.kwargs.get("z_scale") is not None]
        assert len(gates) == 2 * fused, case
        assert all(("z_bias" in n.kwargs) is bias for n in gates), case
        assert (f"fuse_z_epilogue: {fused} z half(s)" in ctx.log) and \
            any("kept the z half's epilogue" in line for line in ctx.log) is (not fused), case
        assert torch.equal(gm(*inputs), want), case


@torch.no_grad()
def test_in_proj_epilogue_fires_on_the_compiled_graph(models, monkeypatch):
    q = models["W8A8"]
    ys, runs = compiled_both_ways(q, monkeypatch, "inproj_epilogue")
    for on, lowered in runs.items():
        gms = [gm for gm, _, _ in lowered]
        assert sum(len(calls(gm, int8_linear_decomposed_acc)) for gm in gms) == (1 if on else 0)
        assert sum(len(calls(gm, int8_linear_epilogue_t)) for gm in gms) == 0  # (on: the scans apply it)
        assert sum(1 for gm in gms for n in calls(gm, CONV1D_SILU_CODES_OP) if len(n.args) == 14) == (2 if on else 0)
        assert sum(1 for gm in gms for n in calls(gm, SCAN_DT_OP) if n.kwargs.get("z_scale") is not None) == \
            (2 if on else 0)
        assert any("fuse_z_epilogue: 1 z half(s)" in line for _, _, log in lowered for line in log) is on
    # the convs' and the scans' epilogue and Inductor's: the same bits
    assert torch.equal(ys[True], ys[False])
    assert torch.equal(ys[True], q.lower()(X))


def test_lowering_is_recorded_as_passes_with_diffs(models):
    q = models["W8A8"]
    low = q.lower()
    assert low.passes[:len(q.passes)] == q.passes
    assert {"lower_w8a8_linear", "inline_fake_quant", "fold_weight_dequant"} <= set(low.passes)
    assert low.lower() is low
    assert "int8_linear_decomposed" in str(low.diff("quantize_activations", "lower_w8a8_linear", verbose=True))


@torch.no_grad()
@pytest.mark.parametrize("name", ["W8A8", "W4A4O8"])
def test_backend_end_to_end(models, name):
    from torch._dynamo.backends.registry import list_backends

    assert "ouromamba" in list_backends()
    q = models[name]
    torch._dynamo.reset()
    fast = torch.compile(q, backend="ouromamba", dynamic=False)
    y, r = fast(X), q(X)
    assert close(y, r) and torch.equal(y.argmax(-1), r.argmax(-1))


def test_entry_point_is_declared():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '[project.entry-points.torch_dynamo_backends]' in text
    assert 'ouromamba = "ouromamba_fx.lowering.backend:ouromamba_backend"' in text
    from ouromamba_fx.lowering.backend import ouromamba_backend  # the declared target exists

    assert callable(ouromamba_backend)


def test_getitem_free_graph_has_no_dangling_masks(models):
    """Every outlier_mask result is consumed (mask and step scale), none left dead."""
    gm = models["W4A4O8"].lower().graph_module
    for n in calls(gm, OUTLIER_MASK_OP):
        assert {u.args[1] for u in n.users if u.target is operator.getitem} == {0, 1}


@torch.no_grad()
def test_convert_can_return_the_lowered_model(models):
    torch.manual_seed(0)
    m = VisionMamba(tiny_config(depth=1)).eval()
    low = of.convert(m, calib=CALIB, config=of.W8A8, show_progress=False, lower=True)
    assert getattr(low, "lowered", False) and n_int8(low.graph_module) == (1, 3)
    assert len(calls(low.graph_module, SCAN_DT_OP)) == 2  # (the dt_proj)
    assert torch.equal(low(X), models["W8A8"].lower()(X))  # same model, same seed: same numbers


@pytest.mark.parametrize("name", ["W8A8", "W4A4O8"])
def test_lowered_report_keeps_a_row_per_quantized_site(models, name):
    q = models[name]
    low = q.lower()
    fused = [n for n in low.graph_module.graph.nodes if (tag(n) or {}).get("kind") == "fused"]
    assert fused and all(SPEC in n.meta for n in fused)  # the rules carried the decisions along
    ref_rows = {r.name: r for r in q.report().rows}
    low_rows = {r.name: r for r in low.report().rows}
    assert ref_rows and low_rows.keys() == ref_rows.keys()
    for site, r in ref_rows.items():
        lr = low_rows[site]
        assert (lr.role, lr.layer, lr.direction, lr.weight, lr.inputs) == (r.role, r.layer, r.direction, r.weight, r.inputs)
        assert lr.sqnr == r.sqnr  # measured on the reference graph, found through the fused node
