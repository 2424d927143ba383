"""Each pass on its own: the graph before and after, lint, numerics."""

import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx.capture import capture
from ouromamba_fx.ops.quant import DEQUANTIZE_OP as DEQUANTIZE
from ouromamba_fx.ops.quant import QUANTIZE_OP as QUANTIZE
from ouromamba_fx.passes import (ActObserver, ActSpec, AnnotateSites, Calibrate, ChooseActScales, Context, InsertObservers,
                                 KeptFloat, Pass, PassError, PassManager, QuantizeActivations,
                                 QuantizeWeights, WeightSpec)
from ouromamba_fx.measure import sqnr
from ouromamba_fx.tags import SPEC, op_nodes, tag

X = torch.randn(8, 3, 16, 16)


def run(gm, ctx, *passes):
    for p in passes:
        p.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
    return gm


def kinds(gm):
    return [tag(n).get("kind") for n in gm.graph.nodes if tag(n)]


def test_insert_observers_is_identity_and_covers_every_site(tiny_vim):
    gm = capture(tiny_vim)
    ctx = Context(of.W8A8)
    run(gm, ctx, AnnotateSites(), InsertObservers())
    # per layer: in_proj, out_proj, 2 x (conv1d, x_proj, dt_proj, scan delta/B/C) = 14
    assert len(ctx.observers) == 14 * 2 == kinds(gm).count("observer")
    torch.testing.assert_close(gm(X), tiny_vim(X), rtol=0, atol=0)
    assert set(ctx.float_reasons) == {f"layers.{i}.mixer.{s}:{v}" for i in (0, 1)
                                      for s in ("scan", "scan_b") for v in ("u", "z")} | {"head"}
    assert ctx.float_reasons["head"] == "role head not in config.roles"


def test_roles_and_overrides_select_sites(tiny_vim):
    cfg = of.W8A8.replace(roles=("in_proj", "out_proj"), overrides={"layers.1.*": {"skip": True}})
    gm = capture(tiny_vim)
    ctx = Context(cfg)
    run(gm, ctx, AnnotateSites(), InsertObservers())
    assert sorted(o.site for o in ctx.observers.values()) == ["layers.0.mixer.in_proj", "layers.0.mixer.out_proj"]
    assert ctx.float_reasons["layers.1.mixer.in_proj"] == "skipped by config.overrides"
    assert ctx.float_reasons["layers.0.mixer.x_proj"] == "role x_proj not in config.roles"


def test_calibrate_records_per_token_statistics(tiny_vim):
    gm = capture(tiny_vim)
    ctx = Context(of.W8A8, calib=[X[:4], X[4:]], show_progress=False)
    run(gm, ctx, AnnotateSites(), InsertObservers(), Calibrate())
    obs = next(o for o in ctx.observers.values() if o.site == "layers.0.mixer.in_proj")
    assert obs.batches == 2 and obs.tok_absmax.shape == (17,)  # 16 patches + class token
    rows, tok = obs.sampled()
    assert rows.shape[1] == 32 and tok.max() < 17
    assert (rows.abs().amax(dim=1) <= obs.tok_absmax[tok] + 1e-6).all()
    scan_obs = next(o for o in ctx.observers.values() if o.site == "layers.0.mixer.scan:delta")
    assert scan_obs.tok_absmax.shape == (17,) and scan_obs.chan_absmax.shape == (64,)


def test_choose_act_scales_shapes(tiny_vim):
    gm = capture(tiny_vim)
    ctx = Context(of.W8A8, calib=[X], show_progress=False)
    run(gm, ctx, AnnotateSites(), InsertObservers(), Calibrate(), ChooseActScales())
    by_site = {o.site: o for o in ctx.observers.values()}
    assert by_site["layers.0.mixer.in_proj"].qparams[1].shape == (1, 17, 1)  # (B, L, C) input
    assert by_site["layers.0.mixer.scan:B"].qparams[1].shape == (1, 1, 17)  # (B, N, L) input
    per_tensor = Context(of.W8A8_RTN, calib=[X], show_progress=False)
    run(capture(tiny_vim), per_tensor, AnnotateSites(), InsertObservers(), Calibrate(), ChooseActScales())
    obs = next(iter(per_tensor.observers.values()))
    s = obs.qparams[1]
    assert s.numel() == 1 and torch.allclose(s.flatten(), obs.tok_absmax.max().reshape(1) / 127)


def test_quantize_weights_replaces_modules_with_int8_reference(tiny_vim):
    gm = capture(tiny_vim)
    ctx = Context(of.W4A8)
    run(gm, ctx, AnnotateSites(), QuantizeWeights())
    # every mixer module is gone; the head (not in the default roles) stays a float module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and tag(n)] == ["head"]
    with pytest.raises(AttributeError):  # the float module is gone
        gm.get_submodule("layers.0.mixer.in_proj")
    wq = gm.layers_0_mixer_in_proj_weight_q
    assert wq.dtype == torch.int8 and wq.abs().max() <= 7 and wq.shape == (128, 32)
    assert sum(n.target is DEQUANTIZE for n in gm.graph.nodes) == 2 * 8
    out = gm(X)
    assert 5 < sqnr(tiny_vim(X), out) < 60  # 4-bit weights: close, not equal
    w = tiny_vim.layers[0].mixer.in_proj.weight
    w_hat = wq.float() * gm.layers_0_mixer_in_proj_weight_scale
    assert sqnr(w, w_hat) > 12


def test_reference_graph_has_qdq_pairs_and_tracks_float(tiny_vim):
    gm = capture(tiny_vim)
    ctx = Context(of.W8A8, calib=[X], show_progress=False)
    run(gm, ctx, AnnotateSites(), InsertObservers(), QuantizeWeights(), Calibrate(), ChooseActScales(), QuantizeActivations())
    assert "observer" not in kinds(gm)
    qs = [n for n in gm.graph.nodes if n.target is QUANTIZE]
    assert len(qs) == 28 and all(len(n.users) == 1 and next(iter(n.users)).target is DEQUANTIZE for n in qs)
    assert not any(isinstance(m, ActObserver) for m in gm.modules())
    assert sqnr(tiny_vim(X), gm(X)) > 25


class Boom(Pass):
    name = "boom"
    requires = ("observers",)

    def run(self, gm, ctx):
        raise RuntimeError("kaboom")


def test_manager_names_the_failing_pass_and_those_before(tiny_vim):
    pm = PassManager([AnnotateSites(), InsertObservers(), Boom()])
    with pytest.raises(PassError, match=r"pass 'boom' failed after \[capture, annotate, insert_observers\]: RuntimeError: kaboom"):
        pm.run(capture(tiny_vim), Context(of.W8A8))


def test_manager_orders_by_requirements_and_snapshots(tiny_vim):
    passes = [QuantizeActivations(), ChooseActScales(), Calibrate(), InsertObservers(), AnnotateSites()]
    order = [p.name for p in PassManager.order(passes)]
    assert order == ["annotate", "insert_observers", "calibrate", "choose_act_scales", "quantize_activations"]
    with pytest.raises(PassError, match="requires 'calibrated', which no pass provides"):
        PassManager.order([ChooseActScales()])
    pm = PassManager(passes)
    pm.run(capture(tiny_vim), Context(of.W8A8, calib=[X], show_progress=False))
    assert [s.pass_name for s in pm.snapshots] == ["capture"] + order
    assert [s.changed for s in pm.snapshots[1:]] == [False, True, False, False, True]


def test_quantize_ops_pass_opcheck_on_transposed_inputs():
    # the real ops return what their fake implementations promise (contiguous), also for the
    # transposed activations the reference graph quantizes (conv1d and scan inputs)
    x = torch.randn(2, 5, 7).transpose(1, 2)
    s, z = torch.rand(1, 1, 5) + 0.1, torch.zeros(1, 1, 5)
    torch.library.opcheck(QUANTIZE, (x, s, z, -127, 127))
    q = QUANTIZE(x, s, z, -127, 127)
    assert q.is_contiguous()
    torch.library.opcheck(DEQUANTIZE, (q.transpose(1, 2), s.transpose(1, 2), z.transpose(1, 2)))


def test_annotate_decides_every_site_once_and_passes_only_read(tiny_vim):
    cfg = of.W4A4O8.replace(overrides={"layers.1.mixer.out_proj": {"weight_bits": 16}})
    gm = capture(tiny_vim)
    ctx = Context(cfg)
    assert AnnotateSites().run(gm, ctx) is False  # meta only: the graph is unchanged
    specs = {n.target if n.op == "call_module" else n.name: n.meta[SPEC] for n in op_nodes(gm)}
    assert all(isinstance(s.weight, WeightSpec) for k, s in specs.items() if "in_proj" in str(k))
    out1 = specs["layers.1.mixer.out_proj"]
    assert isinstance(out1.weight, KeptFloat) and out1.weight.text == "weight bits 16 (float) by config"
    assert ctx.float_reasons["layers.1.mixer.out_proj"] == "weight bits 16 (float) by config"
    acts = [a for s in specs.values() for a in s.inputs if isinstance(a, ActSpec)]
    assert [a.seed for a in acts] == [cfg.seed + i for i in range(len(acts))]  # graph order
    delta = next(a for a in acts if a.input == "delta")
    assert delta.outliers.k == cfg.outliers.k_delta and delta.search == "mixed"
    assert delta.granularity_text() == "per_token+outliers" and delta.bits_text() == "4O8"
    # a pass that needs the decisions refuses a graph nobody annotated
    with pytest.raises(PassError, match="run AnnotateSites"):
        InsertObservers().run(capture(tiny_vim), Context(cfg))
    with pytest.raises(PassError, match="requires 'annotated'"):
        PassManager.order([InsertObservers()])
