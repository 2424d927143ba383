import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx.tags import tag
from ouromamba_fx.config import ActQuant, KScale, OutlierQuant, QuantConfig, Reparam, WeightQuant
from ouromamba_fx.kernels.scan_ref import selective_scan_ref
from ouromamba_fx.ops.scan_quant import SCAN_INT8_INPUTS_OP, SCAN_REPARAM_OP as SCAN_Q_OP
from ouromamba_fx.ops.scan_quant import scan_state_stats
from ouromamba_fx.ops.scan_quant import selective_scan_reparam_ref as selective_scan_q_ref
from ouromamba_fx.passes.reparam import rank1_factors
from ouromamba_fx.measure import sqnr
from ouromamba_fx.passes.qparams import kmeans_1d, kscale_scales
from ouromamba_fx.models import VisionMamba

from .conftest import tiny_config

# seeded on its own: module-level draws from the global generator depend on which test modules were
# imported before this one, and the state-scale comparisons below are margins on these images
X = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_kmeans_finds_planted_groups():
    v = torch.tensor([0.1, 0.12, 5.0, 5.1, 0.11, 9.9, 10.0, 2.0])
    labels = kmeans_1d(v, 4)
    assert labels.tolist() == [0, 0, 2, 2, 0, 3, 3, 1]  # ordered by centre
    assert kmeans_1d(torch.ones(5), 4).tolist() == [0] * 5  # fewer distinct values than k


def test_kscale_gives_k_scales_and_pow2_relation():
    torch.manual_seed(0)
    length, c = 20, 16
    gain = torch.tensor([1.0] * 5 + [4.0] * 5 + [16.0] * 5 + [64.0] * 5)
    rows = torch.randn(2000, c)
    tok = torch.randint(0, length, (2000,))
    rows = rows * gain[tok, None]
    absmean = torch.zeros(length).index_add_(0, tok, rows.abs().mean(1)) / torch.bincount(tok, minlength=length)
    absmax = torch.zeros(length).index_reduce_(0, tok, rows.abs().amax(1), "amax")
    s, labels = kscale_scales(rows, tok, absmean, absmax, 8, KScale(candidates=21))
    assert labels.unique().numel() == 4 and s.unique().numel() == 4
    assert (labels[:5] == 0).all() and (labels[15:] == 3).all()
    s2, _ = kscale_scales(rows, tok, absmean, absmax, 8, KScale(candidates=21, pow2=True))
    ratio = torch.log2(s2 / s2[0])
    assert torch.allclose(ratio, ratio.round())
    w = torch.randn(8, c)
    s3, _ = kscale_scales(rows, tok, absmean, absmax, 4, KScale(candidates=21), weight=w)
    assert s3.unique().numel() == 4


def test_rank1_factors_by_hand():
    h = torch.ones(4, 3, 2)
    h[:, :, 1] = 4.0  # only the state axis varies
    r_c, r_l, r_n = rank1_factors(h)
    torch.testing.assert_close(r_c, torch.ones(4))
    torch.testing.assert_close(r_l, torch.ones(3))
    torch.testing.assert_close(r_n, torch.tensor([1.0, 4.0]))  # p_N = 1: the full means


def test_scan_q_without_factors_or_quant_is_the_scan():
    b, d, length, n = 2, 6, 9, 4
    u, delta, z = torch.randn(b, d, length), torch.randn(b, d, length), torch.randn(b, d, length)
    A, B, C, D = -torch.rand(d, n), torch.randn(b, n, length), torch.randn(b, n, length), torch.randn(d)
    ref = selective_scan_ref(u, delta, A, B, C, D, z, None, True)
    ones = torch.ones
    out = selective_scan_q_ref(u, delta, A, B, C, D, z, None, True, ones(d), ones(length), ones(n), ones(length), 16)
    torch.testing.assert_close(out, ref)
    r_c, r_l, r_n = torch.rand(d) + 0.5, torch.rand(length) + 0.5, torch.rand(n) + 0.5
    out2 = selective_scan_q_ref(u, delta, A, B, C, D, z, None, True, r_c, r_l, r_n, ones(length), 16)
    torch.testing.assert_close(out2, ref, rtol=1e-5, atol=1e-5)  # exact reparameterization
    out8 = selective_scan_q_ref(u, delta, A, B, C, D, z, None, True, r_c, r_l, r_n, torch.full((length,), 0.05), 4)
    assert not torch.allclose(out8, ref, atol=1e-3)  # the quantized state changes the output
    s, m = scan_state_stats(u, delta, A, B, C, None, True)
    assert s.shape == m.shape == (d, length, n) and (m * b >= s - 1e-6).all()


def test_folded_float_graph_equals_unfolded(tiny_vim):
    cfg = QuantConfig("fold-only", WeightQuant(16), ActQuant(16), reparam=Reparam(state_bits=16))
    q = of.convert(tiny_vim, calib=X, config=cfg, show_progress=False, allow_float=True)  # nothing quantized
    scans = [n for n in q.graph_module.graph.nodes if n.target is SCAN_Q_OP]
    assert len(scans) == 4 and all(tag(n)["folded_r_n"] for n in scans)
    x_proj = q.graph_module.get_submodule("layers.0.mixer.x_proj").weight
    assert not torch.allclose(x_proj, tiny_vim.layers[0].mixer.x_proj.weight)  # really folded...
    assert torch.equal(x_proj[:2], tiny_vim.layers[0].mixer.x_proj.weight[:2])  # ...dt rows untouched
    y = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(y), tiny_vim(y), rtol=1e-5, atol=1e-5)


def test_state_quantization_changes_output(tiny_vim):
    cfgs = [QuantConfig("s", WeightQuant(16), ActQuant(16), reparam=Reparam(state_bits=b)) for b in (16, 4)]
    y = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        a, b = (of.convert(tiny_vim, calib=X, config=c, show_progress=False, allow_float=c.reparam.state_bits >= 16)(y)
                for c in cfgs)
    # The 4-bit state moves this small model's logits by about 1e-4 (of ~0.1): measurably, not
    # by float noise (16-bit states run the same op without the rounding, so equal inputs give
    # equal bits), and far from destroying them.
    diff = (a - b).abs().max().item()
    assert diff > 1e-5
    assert sqnr(a, b) > 5


def test_full_ouromamba_config_runs_and_reports(tiny_vim):
    cfg = QuantConfig("all", WeightQuant(4), ActQuant(4), outliers=OutlierQuant(8),
                      kscale=KScale(candidates=11), reparam=Reparam(8))
    q = of.convert(tiny_vim, calib=X, config=cfg, show_progress=False)
    text = str(q.report())
    assert "A4O8 k4-scaled+outliers" in text and "state S8 per_step_channel, r_N folded" in text
    assert all(v > 5 for k, v in q.sqnr_db.items())  # folded x_proj compared with the folded float model
    assert "outlier channels" in text and "layers.1.mixer.out_proj" in q.outlier_fraction
    assert all(f.shape == (17,) and (f <= 1).all() for f in q.outlier_fraction.values())


def test_scan_q_finer_state_scales_match_per_step_and_resample():
    b, d, length, n = 2, 6, 9, 4
    g = torch.Generator().manual_seed(1)
    u, delta, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    A, D = -torch.rand(d, n, generator=g), torch.randn(d, generator=g)
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    r_c, r_l, r_n = torch.rand(d) + 0.5, torch.rand(length) + 0.5, torch.rand(n) + 0.5
    step = torch.rand(length) * 0.05 + 0.01
    args = (u, delta, A, B, C, D, z, None, True, r_c, r_l, r_n)
    per_step = SCAN_Q_OP(*args, step, 8)  # the C++ kernel
    # the same scales given per (channel, step) and per (step, state): the same numbers
    for fine in (step[None, :, None].expand(d, length, 1), step[None, :, None].expand(1, length, n)):
        torch.testing.assert_close(SCAN_Q_OP(*args, fine.contiguous(), 8), per_step, rtol=1e-5, atol=1e-6)
    # a finer scale really is per channel: halving one channel's scales changes only that channel
    fine = step[None, :, None].repeat(d, 1, 1)
    fine[2] /= 2
    out = SCAN_Q_OP(*args, fine, 8)
    changed = (out - per_step).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False, False, True, False, False, False]
    # random finer scales: the C++ kernel equals the reference
    for fine in (torch.rand(d, length, 1, generator=g) * 0.05 + 0.005, torch.rand(1, length, n, generator=g) * 0.05 + 0.005):
        torch.testing.assert_close(SCAN_Q_OP(*args, fine, 8), selective_scan_q_ref(*args, fine, 8), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="state_scale must be"):
        SCAN_Q_OP(*args, torch.ones(d, length, n), 8)
    # calibrated for another length: resampled along the step axis like per-step scales
    short = SCAN_Q_OP(u[..., :5], delta[..., :5], A, B[..., :5], C[..., :5], D, z[..., :5], None, True, r_c, r_l,
                      r_n, torch.full((d, length, 1), 0.02), 8)
    ref = SCAN_Q_OP(u[..., :5], delta[..., :5], A, B[..., :5], C[..., :5], D, z[..., :5], None, True, r_c, r_l,
                    r_n, torch.full((length,), 0.02), 8)
    torch.testing.assert_close(short, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity,shape", [("step", (17,)), ("step_channel", (64, 17, 1)),
                                               ("step_state", (1, 17, 4))])
def test_state_without_reparameterization_and_finer_scales(granularity, shape):
    # a model of its own seed: the state-scale comparisons at the end are margins on its numbers
    # (the shared fixture's weights depend on which tests drew from the global generator first)
    torch.manual_seed(0)
    tiny_vim = VisionMamba(tiny_config()).eval()
    y = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = tiny_vim(y)
    # without the factors and with a float state the scan is the float scan
    plain = QuantConfig("s", WeightQuant(16), ActQuant(16), reparam=Reparam(state_bits=16, factors=False,
                                                                            granularity=granularity))
    q = of.convert(tiny_vim, calib=X, config=plain, show_progress=False, allow_float=True)
    scans = [n for n in q.graph_module.graph.nodes if n.target is SCAN_Q_OP]
    assert scans and not any(tag(n)["folded_r_n"] for n in scans)
    torch.testing.assert_close(q.graph_module.get_submodule("layers.0.mixer.x_proj").weight,
                               tiny_vim.layers[0].mixer.x_proj.weight)  # nothing folded
    for name, buf in q.graph_module.named_buffers():
        if name.endswith(("_r_c", "_r_l", "_r_n")):
            assert torch.equal(buf, torch.ones_like(buf)), name
        if name.endswith("_state_scale"):
            assert tuple(buf.shape) == shape, name
    with torch.no_grad():
        torch.testing.assert_close(q(y), ref, rtol=1e-5, atol=1e-5)
    assert "not reparameterized" in str(q.report())
    # 4-bit states: quantized for real, and the finer scales are really used (per channel: closer to
    # float here; per state index: different, not necessarily closer -- rounding errors of a state
    # feed the next step, so a finer grid is not monotonically better)
    sq = {}
    for gran in ("step", granularity):
        cfg = QuantConfig("s", WeightQuant(16), ActQuant(16), reparam=Reparam(state_bits=4, factors=False,
                                                                              granularity=gran))
        with torch.no_grad():
            sq[gran] = sqnr(of.convert(tiny_vim, calib=X, config=cfg, show_progress=False)(X), tiny_vim(X))
    assert 5 < sq["step"] < 200
    if granularity == "step_channel":
        assert sq[granularity] > sq["step"] + 1
    elif granularity == "step_state":
        assert abs(sq[granularity] - sq["step"]) > 0.1


def test_reparam_config_checks_granularity():
    with pytest.raises(ValueError, match="granularity"):
        Reparam(granularity="per_token")
    cfg = QuantConfig("s", reparam=Reparam(8, factors=False, granularity="step_channel"))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_lowered_model_keeps_finer_state_scales(tiny_vim):
    # the lowered graph (selective_scan_q, or selective_scan_qi when it takes int8 scan inputs) keeps
    # the (d_inner, L, 1) state scales and computes the same
    cfg = QuantConfig("s", WeightQuant(8), ActQuant(8), reparam=Reparam(8, granularity="step_channel"))
    q = of.convert(tiny_vim, calib=X, config=cfg, show_progress=False)
    y = torch.randn(4, 3, 16, 16)
    low = q.lower()
    assert any(n.target in (SCAN_Q_OP, SCAN_INT8_INPUTS_OP) for n in low.graph_module.graph.nodes)
    assert any(name.endswith("state_scale") and buf.shape == (64, 17, 1) for name, buf in low.graph_module.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(low(y), q(y), rtol=1e-4, atol=1e-4)
