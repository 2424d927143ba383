"""tools/train_cifar.py end to end on a few batches: it trains, measures top-1 on a val folder and
writes a checkpoint in the family's upstream layout that the package and the upstream code load."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ouromamba_fx.models import families
from tests import upstream
from tests.conftest import shared_path
from tests.test_families import UpstreamStack, assert_same_outputs

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_cifar.py"
CLASSES = ("cat", "ship")


def train_cifar():
    spec = importlib.util.spec_from_file_location("train_cifar", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jpeg(rng: np.random.Generator, tint: int) -> bytes:
    img = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8)
    img[..., tint] += 120  # the classes differ in colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> Path:
    """``train.tar.gz`` (train/<class>/*.jpg, 6 per class) and ``val/<class>/*.jpg`` (3 per class)."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    with tarfile.open(root / "train.tar.gz", "w:gz") as tar:
        for tint, cls in enumerate(CLASSES):
            for i in range(6):
                data = _jpeg(rng, tint)
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for tint, cls in enumerate(CLASSES):
        (root / "val" / cls).mkdir(parents=True)
        for i in range(3):
            (root / "val" / cls / f"{i:04d}.jpg").write_bytes(_jpeg(rng, tint))
    return root


def _upstream_model(family: str, cfg):
    """The family's upstream implementation built with ``cfg`` (skips when it is not available)."""
    if family == "mambavision":
        return upstream.mambavision().MambaVision(
            dim=cfg.dim, in_dim=cfg.in_dim, depths=list(cfg.depths), window_size=list(cfg.window_size),
            mlp_ratio=cfg.mlp_ratio, num_heads=list(cfg.num_heads), num_classes=cfg.num_classes)
    if family == "vmamba":
        return upstream.vmamba().VSSM(
            depths=list(cfg.depths), dims=list(cfg.dims), patch_size=cfg.patch_size, num_classes=cfg.num_classes,
            ssm_d_state=cfg.ssm_d_state, ssm_ratio=cfg.ssm_ratio, ssm_conv_bias=cfg.ssm_conv_bias,
            forward_type=cfg.forward_type, mlp_ratio=cfg.mlp_ratio, norm_layer=cfg.norm_layer,
            downsample_version=cfg.downsample_version, patchembed_version=cfg.patchembed_version)
    ms = upstream.mamba_simple()
    return UpstreamStack(upstream.mamba_block(), ms.Mamba, cfg)


@pytest.mark.parametrize("name", ["mambavision_cifar", "vmamba_v0_cifar", "vmamba_v2_cifar", "mamba_stack_cifar"])
def test_train_a_few_batches_and_save_upstream_layout(name, cifar_like, tmp_path):
    out = tmp_path / f"{name}.pt"
    tool = train_cifar()
    result = tool.main(["--model", name, "--data", str(cifar_like), "--out", str(out), "--max-steps", "2",
                        "--batch-size", "4", "--log-every", "1"])
    assert result["steps"] == 2 and 0.0 <= result["val_acc"] <= 1.0
    ckpt = torch.load(out, weights_only=True)  # plain data only
    family = families.config_for(name)[0]
    key = "state_dict" if family == "mambavision" else "model"
    assert ckpt["family"] == family and ckpt["classes"] == list(CLASSES) and ckpt["val_images"] == 6
    assert out.stat().st_size < 10e6
    model = families.load(out)
    assert model.cfg.num_classes == 2 and model.cfg.classes == list(CLASSES)
    sd = ckpt[key]
    assert list(model.state_dict()) == list(sd)
    # The upstream code loads the file as it is and computes the same function.
    ref = _upstream_model(family, model.cfg)
    ref.load_state_dict(sd, strict=True)
    ref.eval()
    x = torch.randn(3, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():
        assert_same_outputs(ref(x), model(x))


def test_benchmark_mode_reports_throughput(cifar_like):
    result = train_cifar().main(["--model", "mamba_stack_cifar", "--data", str(cifar_like), "--batch-size", "2",
                                 "--benchmark-steps", "1", "--log-every", "0"])
    assert result["steps"] == 1 and result["images_per_second"] > 0


def test_augment_keeps_content():
    tool = train_cifar()
    x = torch.rand(5, 3, 32, 32)
    y = tool.augment(x)
    assert y.shape == x.shape
    # Each output is a shifted (and possibly flipped) window of the reflect-padded input: its
    # centre 24x24 pixels appear somewhere in the original or in its mirror image.
    for a, b in zip(x, y):
        centre = b[:, 4:28, 4:28]
        found = any(torch.equal(centre, src[:, i:i + 24, j:j + 24])
                    for src in (a, a.flip(-1)) for i in range(9) for j in range(9))
        assert found


def test_real_data_few_batches(tmp_path):
    data = shared_path("data", "cifar10")
    shared_path("data", "cifar10", "train.tar.gz")
    out = tmp_path / "m.pt"
    result = train_cifar().main(["--model", "mamba_stack_cifar", "--data", str(data), "--out", str(out),
                                 "--train-limit", "4", "--val-limit", "2", "--max-steps", "2",
                                 "--batch-size", "8", "--log-every", "0"])
    assert result["steps"] == 2
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["train_images"] == 40 and ckpt["val_images"] == 20 and len(ckpt["classes"]) == 10


def test_time_budget_ends_the_schedule(cifar_like, tmp_path):
    out = tmp_path / "b.pt"
    result = train_cifar().main(["--model", "mamba_stack_cifar", "--data", str(cifar_like), "--out", str(out),
                                 "--budget-min", "0.002", "--epochs", "1000", "--batch-size", "4",
                                 "--log-every", "0"])
    ckpt = torch.load(out, weights_only=True)
    assert 1 <= result["steps"] < 1000 * 3 and ckpt["recipe"]["budget_min"] == 0.002


def test_learning_rate_schedule():
    lr_at = train_cifar().lr_at
    assert lr_at(0.0, 1e-3, 0.1, 1e-5) == pytest.approx(1e-6)  # warm-up starts near zero
    assert lr_at(0.1, 1e-3, 0.1, 1e-5) == pytest.approx(1e-3)  # peak after warm-up
    assert lr_at(0.55, 1e-3, 0.1, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine midpoint
    assert lr_at(1.0, 1e-3, 0.1, 1e-5) == pytest.approx(1e-5)  # ends at the floor


def test_config_overrides_and_native_size(cifar_like, tmp_path):
    out = tmp_path / "mv32.pt"
    train_cifar().main(["--model", "mambavision_cifar", "--data", str(cifar_like), "--out", str(out),
                        "--max-steps", "1", "--batch-size", "4", "--log-every", "0",
                        "--set", "img_size=32", "--set", "window_size=[8, 8, 2, 1]"])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["img_size"] == 32 and tuple(ckpt["config"]["window_size"]) == (8, 8, 2, 1)
    assert ckpt["recipe"]["crop_padding"] == 4
    assert families.load(out).pretrained_cfg["input_size"] == (3, 32, 32)


def test_upsampled_training_images_match_the_eval_transform(cifar_like):
    from ouromamba_fx.data import model_transform
    tool = train_cifar()
    x, _, _ = tool.read_train_tar(cifar_like / "train.tar.gz", limit_per_class=1, size=64)
    model = families.create("mambavision_cifar")
    with tarfile.open(cifar_like / "train.tar.gz") as tar:
        member = next(m for m in tar if m.isfile())
        img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    expected = model_transform(model)(img)  # normalised (3, 64, 64)
    mean = torch.tensor(model.cfg.mean).view(3, 1, 1)
    std = torch.tensor(model.cfg.std).view(3, 1, 1)
    got = (x[0].float() / 255.0 - mean) / std
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
