"""Run calibration data through the observed graph."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx

from ouromamba_fx.errors import DataError
from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.progress import progress_bar


def iter_batches(calib, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Image batches from ``calib``: a tensor (split into batches), or any iterable of tensors or of
    ``(images, labels, ...)`` tuples (a DataLoader)."""
    if isinstance(calib, torch.Tensor):
        yield from calib.split(batch_size) if calib.ndim == 4 else (calib,)
        return
    if not isinstance(calib, Iterable):
        raise DataError(f"calib must be a tensor or an iterable of batches, got {type(calib).__name__}")
    for item in calib:
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        elif isinstance(item, dict):
            item = item.get("pixel_values", item.get("image"))
        yield item


def check_batch(x, i: int, expect: tuple[int, ...] | None) -> torch.Tensor:
    """Validate calibration batch ``i``; ``expect`` is the (C, H, W) the model takes."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"calib batch {i}: expected a tensor of images, got {type(x).__name__}")
    if x.is_meta:
        raise DataError(f"calib batch {i} is on the meta device (a shape without data); calibration needs "
                        f"real images")
    if not x.is_floating_point():
        raise DataError(f"calib batch {i}: dtype {x.dtype}; expected normalised float images "
                        f"(use ouromamba_fx.data.image_loader or the model's transform)")
    if x.ndim != 4 or (expect is not None and tuple(x.shape[1:]) != tuple(expect)):
        want = f"(batch, {', '.join(map(str, expect))})" if expect else "(batch, C, H, W)"
        raise DataError(f"calib batch {i}: shape {tuple(x.shape)}, expected {want}")
    if x.shape[0] == 0:
        raise DataError(f"calib batch {i} is empty")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"calib batch {i}: {bad} NaN or Inf values; calibration needs finite images")
    return x.float()


class Calibrate(Pass):
    """Feed every calibration batch through the graph so the observers see it."""

    name = "calibrate"
    requires = ("observers",)
    provides = ("calibrated",)

    def __init__(self, input_shape: tuple[int, ...] | None = None, name: str = "calibrate",
                 requires: tuple[str, ...] = ("observers",), provides: tuple[str, ...] = ("calibrated",)) -> None:
        self.input_shape = input_shape
        self.name, self.requires, self.provides = name, requires, provides

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        if ctx.calib is None:
            raise DataError("no calibration data (calib is None)")
        batches = ctx.calib if isinstance(ctx.calib, list) else list(iter_batches(ctx.calib))
        if not batches:
            raise DataError("calib is empty: it yielded no batches")
        total = sum(len(b) for b in batches if isinstance(b, torch.Tensor))
        gm.eval()
        with torch.no_grad(), progress_bar(self.name.replace("_", " "), total, ctx.show_progress) as advance:
            for i, x in enumerate(batches):
                x = check_batch(x, i, self.input_shape)
                gm(x)
                advance(len(x))
        ctx.log.append(f"{self.name}: {total} images in {len(batches)} batches")
        return False
