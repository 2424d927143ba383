"""OuroMamba-Gen: recording hook, patch features, contrastive loss, generation loop, SyntheticCalib."""

import math

import pytest
import torch
import torch.nn.functional as F

from ouromamba_fx.capture import capture
from ouromamba_fx.gen import (SyntheticCalib, contrastive_loss, cosine_similarity_matrix, gen, gen_losses,
                              info_nce, patch_features, record_scan)
from ouromamba_fx.models import MambaMixer, VisionMamba

from tests.conftest import tiny_config


def _tiny(**kw) -> VisionMamba:
    return VisionMamba(tiny_config(**kw)).eval()


# -- recording hook -------------------------------------------------------------------------------

def test_recording_leaves_outputs_and_graph_unchanged(tiny_vim):
    x = torch.randn(3, 3, 16, 16)
    graph_before = [(n.op, str(n.target)) for n in capture(tiny_vim).graph.nodes]
    with torch.no_grad():
        ref = tiny_vim(x)
        with record_scan(tiny_vim) as records:
            rec = tiny_vim(x)
    torch.testing.assert_close(rec, ref, rtol=0, atol=1e-5)
    assert len(records) == 2
    for r in records:
        assert set(r) == {"fwd", "bwd"}
        for yhat, delta in r.values():
            assert yhat.shape == delta.shape == (3, 64, tiny_vim.num_tokens)
            assert (delta > 0).all()  # softplus-ed step sizes
    assert all("_gen_record" not in m.__dict__ for m in tiny_vim.modules())
    assert [(n.op, str(n.target)) for n in capture(tiny_vim).graph.nodes] == graph_before


def test_recorded_directions_are_in_token_order():
    mixer = MambaMixer(16, d_state=4).eval()
    x = torch.randn(1, 9, 16)
    x2 = x.clone()
    x2[:, 0] += 1.0  # change the first token only
    with torch.no_grad(), record_scan(mixer) as (r,):
        mixer(x)
        a = {k: v[0].clone() for k, v in r.items()}
        mixer(x2)
        b = {k: v[0].clone() for k, v in r.items()}
    changed = {k: (a[k] - b[k]).abs().amax(dim=1)[0] > 1e-7 for k in a}  # per token
    assert changed["fwd"].all()  # the forward scan carries token 0 to every later token
    assert changed["bwd"][0] and not changed["bwd"][1:].any()  # the backward one only to itself


def test_record_scan_chooses_layers(tiny_vim):
    with torch.no_grad(), record_scan(tiny_vim, layers=[1]) as records:
        tiny_vim(torch.randn(1, 3, 16, 16))
    assert len(records) == 1 and set(records[0]) == {"fwd", "bwd"}
    with pytest.raises(ValueError, match="out of range"):
        with record_scan(tiny_vim, layers=[5]):
            pass


# -- features ---------------------------------------------------------------------------------------

def _naive_features(yhat, delta, grid, cls_index, p, eps=1e-6):
    gh, gw = grid
    keep = [i for i in range(yhat.shape[-1]) if i != cls_index]
    y, d = yhat[..., keep], delta[..., keep]
    out = torch.zeros(y.shape[0], gh * gw, y.shape[1], dtype=torch.float64)
    for b in range(y.shape[0]):
        m = d[b].mean(0)
        w = (m - m.min() + eps) / (m.max() - m.min() + eps)
        for tau in range(gh * gw):
            r, c = divmod(tau, gw)
            for k in range(gh * gw):
                rk, ck = divmod(k, gw)
                if abs(rk - r) <= p // 2 and abs(ck - c) <= p // 2:
                    out[b, tau] += w[k] * y[b, :, k]
    return out


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (4, 4)])
@pytest.mark.parametrize("cls", ["head", "middle", "tail", None])
@pytest.mark.parametrize("p", [1, 3])
def test_patch_features_match_definition_on_any_grid(grid, cls, p):
    num = grid[0] * grid[1]
    cls_index = {"head": 0, "middle": num // 2, "tail": num, None: None}[cls]
    length = num + (cls_index is not None)
    yhat = torch.randn(2, 5, length, dtype=torch.float64)
    delta = torch.rand(2, 5, length, dtype=torch.float64)
    got = patch_features(yhat, delta, grid, cls_index, p)
    assert got.shape == (2, num, 5)
    torch.testing.assert_close(got.double(), _naive_features(yhat, delta, grid, cls_index, p),
                               rtol=1e-5, atol=1e-5)


def test_patch_features_batch_of_one_and_constant_delta_are_finite():
    yhat = torch.randn(1, 4, 17)
    feats = patch_features(yhat, torch.full((1, 4, 17), 0.3), (4, 4), 8, 3)
    assert torch.isfinite(feats).all()
    # constant delta: every weight is 1, so the feature is the plain 3x3 neighbourhood sum
    plain = F.avg_pool2d(torch.cat((yhat[..., :8], yhat[..., 9:]), -1).view(1, 4, 4, 4), 3, 1, 1) * 9
    torch.testing.assert_close(feats, plain.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_patch_features_reject_bad_shapes():
    with pytest.raises(ValueError, match="odd"):
        patch_features(torch.randn(1, 4, 16), torch.rand(1, 4, 16), (4, 4), None, 2)
    with pytest.raises(ValueError, match="grid"):
        patch_features(torch.randn(1, 4, 17), torch.rand(1, 4, 17), (4, 4), None, 3)


# -- contrastive loss -------------------------------------------------------------------------------

def test_info_nce_matches_the_formula():
    torch.manual_seed(1)
    f = torch.randn(2, 7, 5, dtype=torch.float64)
    k, t = 3, 0.3
    got = contrastive_loss(f, top_k=k, temperature=t)
    total = 0.0
    for b in range(2):
        cos = F.cosine_similarity(f[b][:, None], f[b][None], dim=-1)
        for i in range(7):
            others = [j for j in range(7) if j != i]
            pos = sorted(others, key=lambda j: -cos[i, j].item())[:k]
            num = sum(math.exp(cos[i, j].item() / t) for j in pos)
            den = sum(math.exp(cos[i, j].item() / t) for j in others)
            total += -math.log(num / den)
    assert got.item() == pytest.approx(total / 14, rel=1e-6)


def test_contrastive_loss_prefers_planted_positives():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g)
    # 16 patches in 4 groups of 4 near-identical features: each patch's 3 most similar are planted
    planted = centres.repeat_interleave(4, 0)[None] + 0.05 * torch.randn(1, 16, 32, generator=g)
    shuffled = torch.stack([row[torch.randperm(32, generator=g)] for row in planted[0]])[None]
    lp, ls = contrastive_loss(planted, top_k=3), contrastive_loss(shuffled, top_k=3)
    assert lp < 0.25 * ls
    # spatial neighbourhood enrichment makes grid neighbours similar: lower loss than without it
    yhat, delta = torch.randn(2, 32, 36, generator=g), torch.rand(2, 32, 36, generator=g)
    with_nb = contrastive_loss(patch_features(yhat, delta, (6, 6), None, 3), top_k=8)
    without = contrastive_loss(patch_features(yhat, delta, (6, 6), None, 1), top_k=8)
    assert with_nb < without


def test_directions_average_cosines_and_top_k_is_capped():
    a, b = torch.randn(1, 5, 4), torch.randn(1, 5, 6)
    expect = (F.cosine_similarity(a[0][:, None], a[0][None], -1)
              + F.cosine_similarity(b[0][:, None], b[0][None], -1)) / 2
    torch.testing.assert_close(cosine_similarity_matrix([a, b])[0], expect, rtol=1e-5, atol=1e-5)
    # top_k larger than the patches: capped at P - 2 (one negative left), still finite and > 0
    loss = info_nce(cosine_similarity_matrix(a), top_k=100)
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("loss", ["output", "contrastive"])
def test_gradients_reach_the_pixels_from_each_term_alone(tiny_vim, loss):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = gen_losses(tiny_vim, x, torch.tensor([0, 3]), loss=loss, top_k=4)
    other = "loss_c" if loss == "output" else "loss_o"
    assert out[other].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("cls_position", ["head", "middle", "tail", "none"])
def test_class_token_anywhere(cls_position):
    model = _tiny(cls_position=cls_position)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = gen_losses(model, x, torch.tensor([1, 2]), loss="full", top_k=4)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and x.grad.abs().sum() > 0


# -- generation -------------------------------------------------------------------------------------

GEN = dict(n=6, iters=3, batch_size=4, top_k=4, show_progress=False)


def test_gen_is_deterministic_and_leaves_the_model_unchanged():
    model = _tiny().train()
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    a = gen(model, seed=3, **GEN)
    b = gen(model, seed=3, **GEN)
    c = gen(model, seed=4, **GEN)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("_gen_record" not in m.__dict__ for m in model.modules())
    # images in the valid normalised range, targets spread evenly over the 5 classes
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert a.images.shape == (6, 3, 16, 16) and a.images.min() >= lo and a.images.max() <= hi
    counts = torch.bincount(a.targets, minlength=5)
    assert counts.max() - counts.min() <= 1
    assert len(a.history) == 2 * 3 and a.settings["iters"] == 3


def test_gen_rejects_bad_settings(tiny_vim):
    with pytest.raises(ValueError, match="loss"):
        gen(tiny_vim, loss="bogus", **{k: v for k, v in GEN.items()})
    with pytest.raises(ValueError, match="neighbourhood"):
        gen(tiny_vim, neighbourhood=4, **GEN)


def test_save_load_round_trip_and_grid(tmp_path):
    model = _tiny(classes=["cat", "dog", "owl", "emu", "yak"])
    synth = gen(model, loss="output", **GEN)
    path = tmp_path / "synth.safetensors"
    synth.save(path)
    back = SyntheticCalib.load(path)
    assert torch.equal(back.images, synth.images) and torch.equal(back.targets, synth.targets)
    assert back.settings == synth.settings and back.classes == synth.classes
    assert back.mean == synth.mean and back.std == synth.std
    assert [t.shape[0] for t in SyntheticCalib.load(path, batch_size=4)] == [4, 2]

    from PIL import Image

    png = tmp_path / "grid.png"
    synth.grid(png, n=5, cols=3)  # 16 px images, upscaled x4 to 64 px tiles, 12 px labels, 2 px pads
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (3 * (64 + 2) + 2, 2 * (64 + 12 + 2) + 2)
    assert synth.grid(None, n=2, cols=2, scale=1, labels=False).size == (2 * 18 + 2, 18 + 2)


def test_gen_output_calibrates_convert():
    from ouromamba_fx import W8A8_RTN, convert

    model = _tiny()
    synth = gen(model, **GEN)
    assert len(list(synth)) == 1  # 6 images in one batch of 32
    q = convert(model, calib=synth, config=W8A8_RTN, show_progress=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(q(x)).all() and q(x).shape == model(x).shape
