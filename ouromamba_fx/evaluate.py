"""Top-1 accuracy of a model on an image folder."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ouromamba_fx.data import image_loader
from ouromamba_fx.progress import progress_bar


@dataclass
class EvalResult:
    correct: int
    total: int
    seconds: float
    predictions: torch.Tensor  # (total,) predicted class per image, in folder order
    labels: torch.Tensor

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * self.correct / max(self.total, 1)

    def agreement(self, other: "EvalResult") -> float:
        """Percentage of images on which two models predict the same class."""
        if other.total != self.total:
            raise ValueError(f"agreement: {self.total} vs {other.total} images")
        return 100.0 * (self.predictions == other.predictions).float().mean().item()

    def paired_difference(self, other: "EvalResult") -> tuple[float, float]:
        """Top-1 of ``self`` minus top-1 of ``other`` on the same images, in points, and the
        half-width of its 95 % interval (normal approximation, 1.96 standard errors).

        The two models saw the same images, so the error is that of the mean of the per-image
        differences ``d_i = correct_self_i - correct_other_i`` (each -1, 0 or 1): only images on
        which exactly one model is right add to it. That is much tighter than two independent
        binomial errors when the models mostly agree, and it is 0 when they agree everywhere.
        """
        if other.total != self.total:
            raise ValueError(f"paired_difference: {self.total} vs {other.total} images")
        if not torch.equal(self.labels, other.labels):
            raise ValueError("paired_difference: the two results are not on the same images (labels differ)")
        n = self.total
        if n == 0:
            return 0.0, 0.0
        d = (self.predictions == self.labels).double() - (other.predictions == other.labels).double()
        mean = d.mean().item()
        var = d.var(unbiased=True).item() if n > 1 else 0.0
        return 100.0 * mean, 100.0 * 1.96 * math.sqrt(var / n)

    def summary(self, name: str = "model", data: str = "") -> str:
        where = f" on {data}" if data else ""
        return (f"{name}: top-1 {self.top1:.2f}% ({self.correct}/{self.total}){where} "
                f"in {self.seconds:.1f} s ({self.total / max(self.seconds, 1e-9):.0f} img/s)")


@torch.no_grad()
def evaluate(model: torch.nn.Module, root: str | Path, batch_size: int = 128,
             limit_per_class: int | None = None, transform_model: torch.nn.Module | None = None,
             description: str = "eval", show_progress: bool = True) -> EvalResult:
    """Top-1 of ``model`` on ``root/<class>/*.jpg`` with the model's own normalisation.

    Args:
        model: any classifier; a traced or quantized GraphModule works too.
        transform_model: where to read preprocessing and class names from, if ``model`` has
            none itself (e.g. a GraphModule traced from a Vim).

    Example:
        >>> r = evaluate(ouromamba_fx.models.reference_model(), ouromamba_fx.data.bundled_samples())  # doctest: +SKIP
        >>> print(r.summary())                                                                        # doctest: +SKIP
    """
    loader = image_loader(transform_model or model, root, batch_size, limit_per_class)
    was_training = model.training
    model.eval()
    preds, labels = [], []
    start = time.perf_counter()
    try:
        with progress_bar(description, total=len(loader.dataset), enabled=show_progress) as advance:
            for x, y in loader:
                preds.append(model(x).argmax(dim=-1))
                labels.append(y)
                advance(len(y))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    p, t = torch.cat(preds), torch.cat(labels)
    return EvalResult(int((p == t).sum()), len(t), seconds, p, t)
