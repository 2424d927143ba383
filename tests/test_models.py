import argparse
import re

import pytest
import timm
import torch

from ouromamba_fx.errors import CheckpointError
from ouromamba_fx.models import (VisionMamba, bundled_checkpoint, config_from_checkpoint, load,
                                 read_checkpoint)
from tests.conftest import shared_path, tiny_config

# hustvl/Vim's bimamba-v2 state-dict layout (METHOD.md).
MIXER_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
              "dt_proj.bias", "A_log", "D", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight",
              "dt_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b", "out_proj.weight"}
TOP_KEYS = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
            "norm_f.weight", "head.weight", "head.bias"}


def expected_keys(depth: int) -> set[str]:
    keys = set(TOP_KEYS)
    for i in range(depth):
        keys |= {f"layers.{i}.mixer.{k}" for k in MIXER_KEYS} | {f"layers.{i}.norm.weight"}
    return keys


def test_state_dict_layout_is_hustvl(tiny_vim):
    assert set(tiny_vim.state_dict()) == expected_keys(2)


def test_timm_registry_variants():
    sizes = {}
    for name, dim in [("vim_tiny_patch16_224", 192), ("vim_small_patch16_224", 384)]:
        m = timm.create_model(name)
        assert isinstance(m, VisionMamba) and m.cfg.embed_dim == dim and len(m.layers) == 24
        assert m.num_tokens == 197 and m.cls_index == 98  # middle class token at 224 px
        sizes[name] = sum(p.numel() for p in m.parameters())
    # hustvl reports Vim-Ti at 7M and Vim-S at 26M parameters.
    assert 6.5e6 < sizes["vim_tiny_patch16_224"] < 7.5e6
    assert 25e6 < sizes["vim_small_patch16_224"] < 27e6


def test_forward_shapes_and_cls_positions():
    x = torch.randn(2, 3, 16, 16)
    for pos, idx in [("middle", 8), ("head", 0), ("tail", 16), ("none", None)]:
        m = VisionMamba(tiny_config(cls_position=pos)).eval()
        assert m.cls_index == idx
        assert m(x).shape == (2, 5)


def test_hustvl_checkpoint_with_namespace_loads(tmp_path, tiny_vim):
    path = tmp_path / "vim_hustvl.pth"
    args = argparse.Namespace(model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_"
                                    "with_midclstok_div2", input_size=16, lr=5e-4)
    torch.save({"model": tiny_vim.state_dict(), "args": args, "epoch": 3}, path)
    with pytest.raises(Exception):  # what plain weights_only loading does with such a file
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    assert ckpt.meta["args"]["lr"] == 5e-4
    cfg = config_from_checkpoint(ckpt)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.d_state) == (16, 4, 32, 2, 4)
    assert cfg.cls_position == "middle" and cfg.bimamba
    model = load(path, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), tiny_vim(x), rtol=0, atol=0)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_arbitrary_object_is_refused(tmp_path, tiny_vim):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_vim.state_dict(), "extra": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_checkpoint(path)


@pytest.mark.parametrize("change,expect", [
    (lambda sd: sd.pop("layers.1.mixer.x_proj_b.weight"), r"missing keys \(1\): layers\.1\.mixer\.x_proj_b\.weight"),
    (lambda sd: sd.__setitem__("layers.0.mixer.rope.freqs", torch.zeros(3)), r"unexpected keys \(1\): layers\.0\.mixer\.rope\.freqs"),
    (lambda sd: sd.__setitem__("head.bias", torch.zeros(7)), r"head\.bias: checkpoint \(7,\) vs model \(5,\)"),
])
def test_strict_loading_names_the_keys(tmp_path, tiny_vim, change, expect):
    sd = dict(tiny_vim.state_dict())
    change(sd)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=expect):
        load(path, num_classes=5)


def test_name_mismatch_is_an_error(tmp_path, tiny_vim):
    path = tmp_path / "t.pth"
    torch.save(tiny_vim.state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a vim_tiny_patch16_224: img_size"):
        load(path, name="vim_tiny_patch16_224")


def test_pretrained_without_file_says_what_to_do():
    with pytest.raises(RuntimeError, match="checkpoint=<file>"):
        timm.create_model("vim_small_patch16_224", pretrained=True)


def test_bundled_reference_loads_strictly(reference):
    assert reference.cfg.classes[0] == "airplane" and reference.cfg.crop_pct == 1.0
    assert sum(p.numel() for p in reference.parameters()) == 1_094_410  # the model card's count
    assert reference.num_tokens == 65 and reference.cls_index == 32
    via_timm = timm.create_model("vim_cifar_d128_l8", pretrained=True)
    for (k, a), (_, b) in zip(reference.state_dict().items(), via_timm.state_dict().items()):
        assert torch.equal(a, b), k


def test_shared_reference_checkpoint_matches_bundled_copy():
    path = shared_path("models", "vim_cifar_d128_l8.pt")
    model = load(path, name="vim_cifar_d128_l8")
    bundled = read_checkpoint(bundled_checkpoint())
    assert set(model.state_dict()) == set(bundled.state_dict)
    for k, v in model.state_dict().items():
        assert torch.equal(v, bundled.state_dict[k]), k
    assert model.cfg.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert all(re.match(r"(layers\.\d+\.|patch_embed|cls_token|pos_embed|norm_f|head)", k)
               for k in model.state_dict())


@pytest.mark.parametrize("name", ["vim_cifar_d128_l8", "vmamba_v2_cifar"])
def test_timm_hub_options_dropped_when_unset_refused_when_set(name):
    assert isinstance(timm.create_model(name, cache_dir=None), torch.nn.Module)
    with pytest.raises(TypeError, match=f"{name}: timm option cache_dir='hub' is not supported"):
        timm.create_model(name, cache_dir="hub")
