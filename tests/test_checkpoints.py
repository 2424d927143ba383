"""The trained family checkpoints under checkpoints/ load through the package and classify as their
card says (a broken layout, transform or loader shows up as chance-level accuracy)."""

from pathlib import Path

import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx.data import bundled_samples
from ouromamba_fx.models import families

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
# val top-1 of the card (checkpoints/README.md), measured on all 5,000 val images
CARD = {"vmamba_v2_cifar": 70.32, "mambavision_cifar": 76.28, "mamba_stack_cifar": 53.22}


@pytest.mark.parametrize("name", sorted(CARD))
def test_checkpoint_loads_and_classifies_as_its_card_says(name):
    torch.manual_seed(0)
    model = families.load(ROOT / f"{name}.pt")
    assert not model.training
    # 200 of the bundled val images (20 per class): a binomial standard error of about 3.3
    # points, so 12 points is a wide margin for a correct model and far from chance (10 %)
    res = of.evaluate(model, bundled_samples(), limit_per_class=20, show_progress=False)
    assert res.total == 200
    assert abs(res.top1 - CARD[name]) < 12, (name, res.top1)
