import pytest
import torch

from ouromamba_fx import capture, evaluate
from ouromamba_fx.cli import main
from ouromamba_fx.data import ImageFolder, bundled_samples, image_loader
from ouromamba_fx.errors import DataError
from tests.conftest import shared_path

CARD_TOP1 = 73.94  # the reference model card's top-1 on shared/data/cifar10/val


def test_bundled_sample_eval_eager_and_traced_agree(reference):
    eager = evaluate(reference, bundled_samples(), show_progress=False)
    traced = evaluate(capture(reference), bundled_samples(), transform_model=reference,
                      show_progress=False)
    assert eager.total == 200
    assert 55 < eager.top1 < 95  # a trained model, not chance (10%)
    assert traced.agreement(eager) == 100.0 and traced.correct == eager.correct


def test_folder_labels_follow_model_classes(tmp_path, reference):
    ds = ImageFolder(bundled_samples(), class_names=reference.cfg.classes, limit_per_class=1)
    assert [label for _, label in ds.samples] == list(range(10))
    calib = image_loader(reference, bundled_samples(), batch_size=4, limit_per_class=1, labels=False)
    batch = next(iter(calib))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32


def test_folder_errors(tmp_path, reference):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolder(tmp_path)
    (tmp_path / "unicorn").mkdir()
    with pytest.raises(DataError, match=r"folders \['unicorn'\] are not classes of the model"):
        ImageFolder(tmp_path, class_names=reference.cfg.classes)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path)


def test_cli_eval(capsys):
    assert main(["eval", "--limit-per-class", "3", "--traced"]) == 0
    text = capsys.readouterr().out
    assert "vim_cifar_d128_l8 (eager): top-1" in text and "(30 images" not in text
    assert "16 scan nodes" in text and "agreement 100.00%" in text


def test_cli_error_is_reported_not_raised(capsys):
    assert main(["eval", "--checkpoint", "no-such-file.pth"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_reference_top1_matches_card_eager_and_traced(reference):
    val = shared_path("data", "cifar10", "val")
    eager = evaluate(reference, val, batch_size=250, show_progress=False)
    assert eager.total == 5000
    assert abs(eager.top1 - CARD_TOP1) <= 0.1, eager.summary()
    traced = evaluate(capture(reference), val, batch_size=250, transform_model=reference,
                      show_progress=False)
    assert abs(traced.top1 - CARD_TOP1) <= 0.1 and traced.agreement(eager) == 100.0
