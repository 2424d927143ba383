import math

import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx.errors import DataError, OuroMambaError
from ouromamba_fx.measure import sqnr

X = torch.randn(16, 3, 16, 16)


def test_convert_leaves_the_user_model_alone(tiny_vim):
    before = {k: v.clone() for k, v in tiny_vim.state_dict().items()}
    tiny_vim.train()
    q = of.convert(tiny_vim, calib=X, show_progress=False)
    assert tiny_vim.training  # mode untouched too
    for k, v in tiny_vim.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(q, of.QuantizedModel)
    assert q.passes == ["capture", "annotate", "insert_observers", "quantize_weights", "calibrate",
                        "choose_act_scales", "quantize_activations"]


def test_same_model_calib_and_seed_give_bit_identical_models(tiny_vim):
    a = of.convert(tiny_vim, calib=X, show_progress=False)
    b = of.convert(tiny_vim, calib=X, show_progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    y = torch.randn(4, 3, 16, 16)
    assert torch.equal(a(y), b(y))


def test_calib_forms_accepted(tiny_vim):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, torch.zeros(16)), batch_size=8)
    a = of.convert(tiny_vim, calib=loader, show_progress=False)
    b = of.convert(tiny_vim, calib=[X[:8], X[8:]], show_progress=False)
    y = torch.randn(2, 3, 16, 16)
    assert torch.equal(a(y), b(y))


@pytest.mark.parametrize("calib,msg", [
    ([], "calib is empty"),
    ([torch.full((2, 3, 16, 16), float("nan"))], "calib batch 0: 1536 NaN or Inf"),
    ([X[:2], torch.randn(2, 3, 32, 32)], r"calib batch 1: shape \(2, 3, 32, 32\), expected \(batch, 3, 16, 16\)"),
    ([torch.zeros(2, 3, 16, 16, dtype=torch.uint8)], "dtype torch.uint8"),
    ([["not", "a", "tensor"]], "expected a tensor of images, got str"),
])
def test_bad_calibration_data_is_named(tiny_vim, calib, msg):
    before = {k: v.clone() for k, v in tiny_vim.state_dict().items()}
    with pytest.raises(DataError, match=msg):
        of.convert(tiny_vim, calib=calib, show_progress=False)
    assert all(torch.equal(v, before[k]) for k, v in tiny_vim.state_dict().items())


def test_no_calib_means_data_free_and_the_report_says_so(tiny_vim):
    before = {k: v.clone() for k, v in tiny_vim.state_dict().items()}
    opts = {"n": 4, "iters": 2, "batch_size": 4, "seed": 3}
    q = of.convert(tiny_vim, show_progress=False, gen_options=opts)
    assert all(torch.equal(v, before[k]) for k, v in tiny_vim.state_dict().items())
    assert q.log[0].startswith("calibration: data-free, 4 OuroMamba-Gen images (loss=full, 2 iterations, seed 3)")
    assert "data-free" in str(q.report())
    # the same as generating explicitly and passing the images
    synth = of.gen(tiny_vim, show_progress=False, **opts)
    p = of.convert(tiny_vim, calib=synth, show_progress=False)
    y = torch.randn(2, 3, 16, 16)
    assert torch.equal(q(y), p(y))
    r = of.convert(tiny_vim, calib=X, show_progress=False)
    assert r.log[0] == "calibration: 16 user-supplied images"
    with pytest.raises(ValueError, match="gen_options only apply when calib is None"):
        of.convert(tiny_vim, calib=X, gen_options=opts, show_progress=False)


def test_convert_twice_is_an_error(tiny_vim):
    q = of.convert(tiny_vim, calib=X, show_progress=False)
    with pytest.raises(OuroMambaError, match="already quantized"):
        of.convert(q, calib=X)


def test_other_resolution_at_inference_is_a_clear_error(tiny_vim):
    q = of.convert(tiny_vim, calib=X, show_progress=False)
    with pytest.raises(ValueError, match=r"quantized for inputs \(batch, 3, 16, 16\).*per-token"):
        q(torch.randn(1, 3, 32, 32))


def test_report_lists_quantized_ops_and_what_stayed_float(tiny_vim):
    q = of.convert(tiny_vim, calib=X, config=of.W8A8, show_progress=False)
    rep = q.report()
    assert len(rep.rows) == 2 * 10  # per layer: in/out_proj + 2 x (conv1d, x_proj, dt_proj, scan)
    assert all(math.isfinite(r.sqnr) and r.sqnr > 15 for r in rep.rows)
    text = str(rep)
    assert "layers.1.mixer.scan_b" in text and "delta,B,C: A8 per_token" in text
    assert "W8 per_channel" in text
    assert "layers.*.mixer.scan:u (2 layers)" in text and "not in config.scan_inputs" in text
    # every parameter-bearing module outside the quantized ones, with its reason
    assert "parameter-bearing modules: 16 of" in text  # per layer: in/out_proj, 2 x (conv1d, x_proj, dt_proj)
    assert q.coverage["head"].why == "role head not in config.roles"
    assert q.coverage["norm_f"].why.startswith("normalisation layer")
    assert q.coverage["patch_embed.proj"].why.startswith("inside patch_embed (PatchEmbed)")


def test_reference_model_w8a8_tracks_float(reference):
    from ouromamba_fx.data import bundled_samples, image_loader

    calib = image_loader(reference, bundled_samples(), batch_size=100, limit_per_class=20, labels=False)
    q = of.convert(reference, calib=calib, config=of.W8A8, show_progress=False)
    x = next(iter(calib))[:32]
    with torch.no_grad():
        assert sqnr(reference(x), q(x)) > 20  # logits
    assert min(q.sqnr_db.values()) > 12
