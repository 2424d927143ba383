"""Capture, quantization, lowering, saving and OuroMamba-Gen of VMamba (v0 / v2), MambaVision and
Mamba stacks, at small sizes; the upstream code (tests/upstream.py) converted with no user code
where it is installed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn

import ouromamba_fx as of
from ouromamba_fx.capture import capture, scan_nodes
from ouromamba_fx.config import WeightQuant
from ouromamba_fx.errors import OuroMambaError
from ouromamba_fx.gen import gen, record_scan
from ouromamba_fx.measure import sqnr
from ouromamba_fx.models import (MambaStack, MambaStackConfig, MambaVision, MambaVisionConfig, VMambaConfig,
                                 VSSM)
from ouromamba_fx.ops.int8_conv2d import int8_conv2d_decomposed
from ouromamba_fx.tags import SPEC, scan_site, tag
from tests import upstream

# A fast weight search: the tests check structure and end-to-end numbers, not the clipping search.
FAST = dict(weight=WeightQuant(8, candidates=4), calib_sample=256)
VM = {"v0": dict(depths=(1, 1), dims=16, ssm_d_state=4, forward_type="v0", mlp_ratio=0.0, norm_layer="ln",
                 downsample_version="v1", patchembed_version="v1"),
      "v2": dict(depths=(1, 1), dims=16, ssm_d_state=1, ssm_conv_bias=False, forward_type="v05_noz",
                 mlp_ratio=2.0, norm_layer="ln2d", downsample_version="v3", patchembed_version="v2")}
MV = dict(dim=16, in_dim=8, depths=(1, 1, 2, 1), window_size=(8, 8, 2, 1), num_heads=(1, 1, 2, 2),
          mlp_ratio=2.0)


def perturb(model: nn.Module, scale: float = 0.05) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family in VM:
        m = VSSM(VMambaConfig(**VM[family], num_classes=10, img_size=32, drop_path_rate=0.0))
    elif family == "mambavision":
        m = MambaVision(MambaVisionConfig(**MV, num_classes=10, img_size=32, drop_path_rate=0.0))
    else:
        m = MambaStack(MambaStackConfig(embed_dim=16, depth=2, d_state=4))
    m.pretrained_cfg = {"input_size": (3, 32, 32)}
    return perturb(m)


FAMILIES = ["v0", "v2", "mambavision", "stack"]
# scans per model, the roles capture must find
SCANS = {"v0": 8, "v2": 8, "mambavision": 2, "stack": 2}
ROLES = {"v0": {"stem", "in_proj", "conv2d", "x_proj", "dt_proj", "scan", "out_proj", "downsample", "head"},
         "v2": {"stem", "in_proj", "conv2d", "x_proj", "dt_proj", "scan", "out_proj", "downsample", "mlp", "head"},
         "mambavision": {"stem", "conv2d", "downsample", "in_proj", "conv1d", "x_proj", "dt_proj", "scan",
                         "out_proj", "mlp", "attn", "head"},
         "stack": {"in_proj", "conv1d", "x_proj", "dt_proj", "scan", "out_proj", "head"}}


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_roles_scans_and_same_outputs(family):
    m = build(family)
    gm = capture(m)
    roles = Counter(tag(n)["role"] for n in gm.graph.nodes if tag(n))
    assert set(roles) == ROLES[family]
    scans = scan_nodes(gm)
    assert len(scans) == SCANS[family] == roles["scan"]
    sites = [scan_site(tag(n)) for n in scans]
    assert len(set(sites)) == len(sites)  # one site (own per-step scales) per scan direction
    if family in VM:
        assert Counter(tag(n)["direction"] for n in scans) == {d: 2 for d in ("hw", "wh", "hw_rev", "wh_rev")}
        # every direction's delta comes from its own dt_proj
        assert all(tag(n)["layer"] in (0, 1) for n in scans)
    if family == "v2":  # Linear2d became permute -> nn.Linear -> permute
        lin = [n for n in gm.graph.nodes if n.op == "call_module" and tag(n) and tag(n)["role"] == "mlp"]
        assert lin and all(type(gm.get_submodule(n.target)) is nn.Linear for n in lin)
    if family == "mambavision":  # every BatchNorm after a conv folded into it
        bns = [k for k, v in m.named_modules() if isinstance(v, nn.BatchNorm2d)]
        assert sorted(gm.meta["folded_bn"]) == sorted(b for b in bns if b != "norm")
        assert m.patch_embed.conv_down[1].running_mean.abs().sum() > 0  # the model itself unchanged
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = m(x), gm(x)
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max() + 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_every_layer_lower_save_load(family, tmp_path):
    m = build(family)
    calib = torch.randn(4, 3, 32, 32)
    q = of.convert(m, calib, of.W8A8.replace(**FAST), show_progress=False)
    cov = q.coverage
    # the classifier (not in the default roles); the Mamba stack's timm PatchEmbed is a float leaf, as Vim's
    expected_float = {n for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d))
                      and n in ("head", "classifier.head", "patch_embed.proj")}
    for name, mod in m.named_modules():
        if not list(mod.parameters(recurse=False)):
            continue
        assert name in cov, name  # every parameter-bearing module is accounted for
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            assert cov[name].quantized == (name not in expected_float), (name, cov[name])
        if not cov[name].quantized:
            assert cov[name].why
    assert cov["classifier.head" if family in VM else "head"].why == "role head not in config.roles"
    report = str(q.report())
    assert "parameter-bearing modules:" in report
    if family == "mambavision":  # the attention matmuls' float choice and the folds are reported
        assert [k for k, v in q.float_reasons.items() if v.startswith("attention matmuls")] == \
            ["levels.2.blocks.1.mixer.matmuls"]
        assert cov["levels.0.blocks.0.norm1"].why == "BatchNorm folded into levels.0.blocks.0.conv1 (quantized)"
    x = calib[:2]
    with torch.no_grad():
        ref, out = m(x), q(x)
        assert sqnr(ref, out) > 20
        low = q.lower()
        assert sqnr(out, low(x)) > 30  # lowered and reference quantized graphs agree
        # every dense Conv2d as integer GEMMs (at these small widths only when asked): the same numbers
        dense = sum(1 for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups == 1
                    and cov[n].quantized)
        low0 = q.lower(conv2d_min_k=0)
        assert sum(1 for n in low0.graph_module.graph.nodes if n.target is int8_conv2d_decomposed) == dense
        torch.testing.assert_close(low0(x), low(x), rtol=1e-4, atol=1e-5 * out.abs().max().item())
    path = tmp_path / "q.pt"
    of.save(q, path)
    back = of.load(path)  # rebuilt from the file's config: no model passed
    with torch.no_grad():
        torch.testing.assert_close(back(x), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_w4a4o8_lowering_takes_every_quantized_linear(family):
    """Every quantized linear runs an integer op: W4A4O8 ones, VMamba v2's Linear2d on (B, H, W, C)
    pixels included (no recorded shapes: its input's axes come from the site spec), and the 8-bit
    integer linear for the conv roles the preset keeps at 8-bit activations (VMamba v0's
    patch-merging linear)."""
    m = build(family)
    calib = torch.randn(4, 3, 32, 32)
    q = of.convert(m, calib, of.W4A4O8.replace(weight=WeightQuant(4, candidates=4), calib_sample=256),
                   show_progress=False)
    low = q.lower()
    n_linear = sum(1 for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and q.coverage[n].quantized)
    a8 = sum(1 for n in q.graph_module.graph.nodes if n.target is torch.nn.functional.linear
             and tag(n)["role"] in ("stem", "downsample", "conv2d"))
    assert f"lower_w4a4o8_linear: {n_linear - a8} linear(s)" in low.log
    assert f"lower_w8a8_linear: {a8} linear(s)" in low.log
    assert not [n for n in low.graph_module.graph.nodes if n.target is torch.nn.functional.linear]
    with torch.no_grad():
        assert sqnr(q(calib), low(calib)) > 30


@torch.no_grad()
def test_compiled_mambavision_matches_the_reference_graph():
    """torch.compile(q, backend="ouromamba") on a graph whose first placeholders are module
    buffers (MambaVision's stem reads its scale before the input), integer convs included."""
    m = build("mambavision")
    calib = torch.randn(4, 3, 32, 32)
    q = of.convert(m, calib, of.W8A8.replace(**FAST), show_progress=False)
    torch._dynamo.reset()
    fast = torch.compile(q, backend="ouromamba", dynamic=False, options={"conv2d_min_k": 0})
    x = calib[:2]
    ref = q(x)
    torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_convert_w4a4o8_conv_and_mlp_sites():
    m = build("mambavision")
    calib = torch.randn(4, 3, 32, 32)
    q = of.convert(m, calib, of.W4A4O8.replace(weight=WeightQuant(4, candidates=4), calib_sample=256),
                   show_progress=False)
    kinds = Counter((tag(n).get("role"), tag(n).get("kind")) for n in q.graph_module.graph.nodes if tag(n))
    assert kinds["mlp", "quantize_mixed"] and kinds["attn", "quantize_mixed"] and kinds["scan", "quantize_mixed"]
    # the conv layers: 8-bit activations, no outlier channels (the preset's role_overrides)
    for role in ("conv2d", "stem", "downsample"):
        assert kinds[role, "quantize"] and not kinds[role, "quantize_mixed"], role
        spec = next(n.meta[SPEC] for n in q.graph_module.graph.nodes if n.meta.get(SPEC) and n.meta[SPEC].role == role)
        assert spec.inputs[0].quant.bits == 8 and spec.inputs[0].outliers is None and spec.weight.quant.bits == 4
    with torch.no_grad():
        assert sqnr(m(calib), q(calib)) > 5
        # their 8-bit codes run the integer conv (at these widths when asked), with the same numbers
        low = q.lower(conv2d_min_k=0)
        dense = sum(1 for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.groups == 1)
        assert f"lower_int8_conv2d: {dense} conv2d(s)" in low.log
        assert sqnr(q(calib), low(calib)) > 30


def test_convert_that_quantizes_nothing_is_an_error():
    m = build("v2")
    calib = torch.randn(2, 3, 32, 32)
    cfg = of.W8A8.replace(overrides={"*": {"skip": True}}, **FAST)
    with pytest.raises(OuroMambaError, match="allow_float=True"):
        of.convert(m, calib, cfg, show_progress=False)
    q = of.convert(m, calib, cfg, show_progress=False, allow_float=True)
    assert not any(c.quantized for c in q.coverage.values())


@pytest.mark.parametrize("family", ["v0", "v2", "mambavision"])
def test_gen_records_scans_on_their_grid(family):
    m = build(family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        with record_scan(m) as records:
            out = m(x)
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max() + 1e-6  # recording changes nothing
    for rec in records:
        h, w = rec["grid"]
        dirs = [k for k in rec if k != "grid"]
        assert dirs == (["hw", "wh", "hw_rev", "wh_rev"] if family in VM else ["fwd"])
        for yhat, delta in (rec[d] for d in dirs):
            assert yhat.shape[-1] == h * w and delta.shape == yhat.shape and (delta > 0).all()
    if family in VM:  # the four directions are back in row-major order: 'hw' and 'wh' line up
        y_hw, y_wh = records[0]["hw"][0], records[0]["wh"][0]
        assert y_hw.shape == y_wh.shape
    synth = gen(m, n=2, iters=1, batch_size=2, show_progress=False)
    assert synth.images.shape == (2, 3, 32, 32) and torch.isfinite(synth.images).all()


# ------------------------------------------------------------------------------------------------
# The upstream code, converted as it is

def _up_mambavision():
    mod = upstream.mambavision()
    torch.manual_seed(0)
    up = mod.MambaVision(**MV, num_classes=10, drop_path_rate=0.0)
    up.pretrained_cfg = {**(getattr(up, "pretrained_cfg", None) or {}), "input_size": (3, 32, 32)}  # calibrated at 32 px here
    return perturb(up)


def _up_vmamba(kind: str):
    vm = upstream.vmamba()
    torch.manual_seed(0)
    return perturb(vm.VSSM(**VM[kind], num_classes=10, drop_path_rate=0.0))


def _up_mamba_stack():
    ms = upstream.mamba_simple()

    class Stack(nn.Module):  # a user's model of mamba-ssm Mamba blocks (channels-last tokens)
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 4, 4)
            self.blocks = nn.ModuleList(ms.Mamba(16, d_state=4) for _ in range(2))
            self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(2))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            h = self.embed(x).flatten(2).transpose(1, 2)
            for norm, blk in zip(self.norms, self.blocks):
                h = h + blk(norm(h))
            return self.head(h.mean(1))

    torch.manual_seed(0)
    return perturb(Stack())


@pytest.mark.parametrize("which", ["mambavision", "v0", "v2", "mamba"])
def test_upstream_model_converts_with_no_user_code(which):
    up = {"mambavision": _up_mambavision, "mamba": _up_mamba_stack}.get(which, lambda: _up_vmamba(which))()
    before = {k: v.clone() for k, v in up.state_dict().items()}
    calib = torch.randn(4, 3, 32, 32)
    q = of.convert(up, calib, of.W8A8.replace(**FAST), show_progress=False)
    assert any("rebuilt as ouromamba_fx modules" in line for line in q.log)
    assert all(torch.equal(before[k], v) for k, v in up.state_dict().items())  # the user's model untouched
    n_lin = sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in up.modules())
    quantized = sum(c.quantized for c in q.coverage.values())
    assert quantized >= n_lin - 1  # all but the head (MambaVision: plus folded BatchNorms)
    with torch.no_grad():
        assert sqnr(up(calib), q(calib)) > 20
