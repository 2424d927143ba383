"""Block-wise weight-scale refinement (``QuantConfig.refine``, ouromamba_fx.passes.refine)."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import ouromamba_fx as of
from ouromamba_fx.models import VisionMamba
from ouromamba_fx.tags import Role, tag

from .conftest import tiny_config

CALIB = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
X = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
REFINE = of.Refine(iters=30, batch=8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VisionMamba(tiny_config()).eval()


@pytest.fixture(scope="module")
def converted(model):
    out = {}
    for cfg in (of.W4A8, of.W4A4O8):
        out[cfg.name] = (of.convert(model, calib=CALIB, config=cfg, show_progress=False),
                         of.convert(model, calib=CALIB, config=cfg.replace(refine=REFINE), show_progress=False))
    return out


def refine_line(q) -> str:
    return next(line for line in q.log if line.startswith("refine weights:"))


@torch.no_grad()
def mixer_losses(model, q, x) -> list[float]:
    """Per mixer, mean over images and tokens of 1 - cos (over channels) between the float
    model's mixer output and the quantized graph's (its out_proj output), each model run end to
    end on ``x``: measured independently of the refinement pass's own bookkeeping."""
    ref = []
    hooks = [layer.mixer.register_forward_hook(lambda m, i, o: ref.append(o)) for layer in model.layers]
    model(x)
    for h in hooks:
        h.remove()
    got = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            t = tag(n) or {}
            if t.get("role") == Role.OUT_PROJ and not t.get("kind"):
                got[t["layer"]] = out
            return out

    Record(q.graph_module).run(x)
    assert len(got) == len(ref) == len(model.layers)
    return [float((1 - F.cosine_similarity(got[i], ref[i], dim=-1)).mean())
            for i in range(len(ref))]


def test_config_round_trip_and_validation():
    cfg = of.W4A4O8.replace(refine=of.Refine(iters=7, lr=2e-3, batch=4, samples=64, budget=12.5))
    d = cfg.to_dict()
    assert d["refine"] == {"iters": 7, "lr": 2e-3, "batch": 4, "samples": 64, "budget": 12.5}
    assert of.QuantConfig.from_dict(d) == cfg
    assert of.QuantConfig.from_dict(of.W4A8.to_dict()).refine is None
    for bad, msg in [(dict(iters=0), "iters"), (dict(batch=0), "batch"), (dict(lr=0.0), "lr"),
                     (dict(lr=float("nan")), "lr"), (dict(budget=-1.0), "budget")]:
        with pytest.raises(ValueError, match=msg):
            of.Refine(**bad)
    with pytest.raises(ValueError, match="refine and reparam"):
        of.W8A8.replace(refine=of.Refine(), reparam=of.Reparam())
    with pytest.raises(ValueError, match="refine"):
        of.QuantConfig.from_dict({**of.W4A8.to_dict(), "refine": {"iters": "ten"}})


def test_off_runs_no_refinement_pass_and_budget_zero_changes_nothing(model, converted):
    off, _ = converted["W4A8"]
    assert "refine_weights" not in off.passes
    assert not any(line.startswith("refine weights") for line in off.log)
    zero = of.convert(model, calib=CALIB, config=of.W4A8.replace(refine=of.Refine(budget=0.0)), show_progress=False)
    assert "refine_weights" in zero.passes
    line = refine_line(zero)
    assert "0 of 2 mixers refined" in line and "time budget 0 s reached" in line
    assert line in " ".join(str(zero.report()).split())  # the report shows it (rich wraps long lines)
    with torch.no_grad():
        assert torch.equal(zero(X), off(X))
    for name, buf in off.graph_module.named_buffers():
        assert torch.equal(buf, zero.graph_module.get_buffer(name)), name


@pytest.mark.parametrize("name", ["W4A8", "W4A4O8"])
def test_refinement_lowers_the_mixer_output_loss_on_calibration_data(model, converted, name):
    off, on = converted[name]
    line = refine_line(on)
    assert "2 of 2 mixers refined" in line
    before, after = mixer_losses(model, off, CALIB), mixer_losses(model, on, CALIB)
    assert sum(after) < sum(before)
    # only weight scales changed: the integer weights were re-rounded with them, nothing else moved
    changed = {n for n, b in off.graph_module.named_buffers() if not torch.equal(b, on.graph_module.get_buffer(n))}
    assert changed and all(n.endswith(("_weight_scale", "_weight_q")) for n in changed)
    assert any(n.endswith("_weight_scale") for n in changed)


@pytest.mark.parametrize("name", ["W4A8", "W4A4O8"])
def test_lowered_model_uses_the_refined_scales(converted, name):
    off, on = converted[name]
    with torch.no_grad():
        ref, low = on(X), on.lower()(X)
        assert torch.allclose(low, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        assert not torch.allclose(low, off.lower()(X), rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_refined_model_saves_and_loads_bit_exact(model, converted, tmp_path):
    _, on = converted["W4A8"]
    on.save(tmp_path / "q.safetensors")
    back = of.load(tmp_path / "q.safetensors", model=model)
    assert back.config.refine == REFINE
    with torch.no_grad():
        assert torch.equal(back(X), on(X))


@pytest.mark.parametrize("family", ["vmamba_v2", "mambavision"])
def test_other_families_refine_their_mixers_and_lower_the_same(family):
    from ouromamba_fx.models import MambaVision, MambaVisionConfig, VMambaConfig, VSSM

    from .test_families_quant import MV, VM, perturb

    torch.manual_seed(0)
    m = VSSM(VMambaConfig(**VM["v2"], num_classes=10, img_size=32, drop_path_rate=0.0)) if family == "vmamba_v2" \
        else MambaVision(MambaVisionConfig(**MV, num_classes=10, img_size=32, drop_path_rate=0.0))
    m = perturb(m.eval())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    q = of.convert(m, x, of.W4A8.replace(refine=of.Refine(iters=3, batch=4)), show_progress=False)
    assert "2 of 2 mixers refined" in refine_line(q)
    with torch.no_grad():
        ref = q(x)
        assert torch.allclose(q.lower()(x), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
