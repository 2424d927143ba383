import pytest
import torch

from ouromamba_fx import capture, evaluate
from ouromamba_fx.cli import main
from ouromamba_fx.data import ImageFolder, bundled_samples, image_loader
from ouromamba_fx.errors import DataError
from tests.conftest import shared_path

CARD_TOP1 = 73.94  # the reference model card's top-1 on shared/data/cifar10/val


def test_bundled_sample_eval_eager_and_traced_agree(reference):
    # the whole bundle is 1,000 images (100 per class); 20 per class keep the test fast
    assert len(ImageFolder(bundled_samples(), class_names=reference.cfg.classes)) == 1000
    eager = evaluate(reference, bundled_samples(), limit_per_class=20, show_progress=False)
    traced = evaluate(capture(reference), bundled_samples(), limit_per_class=20, transform_model=reference,
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
    # the traced graph on a fifth of them (100 per class), prediction for prediction; the bundled
    # sample test checks the same on other images, so the whole set is not read twice
    part = evaluate(reference, val, batch_size=250, limit_per_class=100, show_progress=False)
    traced = evaluate(capture(reference), val, batch_size=250, limit_per_class=100, transform_model=reference,
                      show_progress=False)
    assert traced.total == part.total == 1000 and traced.agreement(part) == 100.0


def _result(pred, labels):
    from ouromamba_fx.evaluate import EvalResult

    pred, labels = torch.tensor(pred), torch.tensor(labels)
    return EvalResult(int((pred == labels).sum()), len(labels), 1.0, pred, labels)


def test_paired_difference_and_its_interval():
    labels = [0, 1, 2, 3] * 50  # 200 images
    fp = _result(labels, labels)  # all right
    assert fp.paired_difference(fp) == (0.0, 0.0)  # same predictions: no uncertainty at all
    # 3 images wrong out of 200: -1.5 points; d has three -1 and 197 zeros
    wrong = list(labels)
    for i in (0, 5, 9):
        wrong[i] = (wrong[i] + 1) % 4
    q = _result(wrong, labels)
    diff, half = q.paired_difference(fp)
    d = torch.tensor([-1.0] * 3 + [0.0] * 197, dtype=torch.float64)
    assert diff == pytest.approx(-1.5)
    assert half == pytest.approx(100 * 1.96 * (d.var() / 200).sqrt().item())
    assert 1.5 < half < 2.0  # 3 disagreements in 200 images: the drop is not resolved
    # errors on both sides partly cancel in the mean but widen the interval
    both = list(wrong)
    both[1] = (both[1] + 1) % 4
    other = _result(both, labels)
    assert other.paired_difference(q)[1] > 0
    with pytest.raises(ValueError, match="same images"):
        q.paired_difference(_result(labels, [x ^ 1 for x in labels]))
