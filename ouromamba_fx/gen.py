"""OuroMamba-Gen: data-free synthetic calibration images for vision Mamba models.

``gen(model, n=128)`` starts ``n`` images from Gaussian noise (in the model's normalised input
space) and optimises the pixels so that

    L = L_O + lambda_c * L_C

is small, where

* ``L_O`` is the cross-entropy of the model's output toward each image's target class (targets
  spread evenly over the classes, in a seeded random order);
* ``L_C`` is a patch-level InfoNCE loss on patch features built from the selective scans.

The result is a :class:`SyntheticCalib`, an iterable of image batches that
:func:`ouromamba_fx.convert` takes as ``calib=``.

Patch features (what ``L_C`` sees) -- honestly stated
------------------------------------------------------
OuroMamba enriches the scan's hidden states ``h(tau)`` over a p x p neighbourhood of the patch
grid. Materialising ``h`` is ``(batch, d_inner, L, d_state)`` per scan, far too much memory for a
gradient loop, so this module uses only what one scan call produces:

1. the raw scan readout ``yhat_t = C_t . h_t`` per channel, ``(batch, d_inner, L)``: the scan
   run with ``D = None`` and ``z = None`` (the skip term ``D*u`` and the gate are applied
   afterwards, outside the scan, so the model's output is unchanged -- see the recording hook
   in :class:`ouromamba_fx.models.mixer.MambaMixer`);
2. the step size ``delta = softplus(dt_proj(...))`` the scan used, ``(batch, d_inner, L)``.

For each recorded mixer and each scan direction (the backward scan flipped back to token order),
the class token is removed (wherever it sits: ``model.cls_index``), the patch tokens are laid out
on the patch grid ``model.grid_size`` (any ``gh x gw``, row-major as the patch embedding
flattens them) and

    w(k)   = (dbar(k) - min dbar + eps) / (max dbar - min dbar + eps)     per image,
    o(tau) = sum_{k in N(tau)} w(k) * yhat(k)                              (p x p, zero padded)

with ``dbar`` the channel mean of ``delta`` over the image's patch tokens. ``eps`` keeps a batch
of one or a constant ``delta`` finite (then all weights are 1). Because ``C_t`` is applied per
token before the neighbourhood sum, ``o(tau)`` is ``sum_k w_k C_k . h(k)`` -- the "C_t . h_p"
style feature METHOD.md allows -- not ``C_tau . h_p(tau)`` and not the fused state ``h_p``
itself. Everything stays differentiable (gradients also flow through the weights).

The two directions are combined by averaging their cosine similarities: the similarity of two
patches is the mean over directions of the cosine of their per-direction features (the same as
the cosine of the concatenated, per-direction L2-normalised features), so both directions count
equally, whatever their scales.

Contrastive loss
----------------
For each recorded layer ``l``, image, and anchor patch ``i`` with feature ``o_i``: positives
``P_i`` are the ``top_k`` patches of the same image most cosine-similar to ``o_i`` (chosen on
detached similarities; ``top_k`` capped at ``num_patches - 2`` so at least one negative is left),
every other patch except ``i`` itself is a negative, and

    L_C(l, i) = - log( sum_{p in P_i} exp(cos(o_i, o_p) / T) / sum_{j != i} exp(cos(o_i, o_j) / T) ).

``L_C`` is the mean over images, anchors and layers (a mean, not METHOD.md's sum, so that
``lambda_c`` does not depend on the model's depth or resolution).

Optimisation (all settings are arguments of :func:`gen`)
---------------------------------------------------------
PSAQ-ViT's recipe: pixels from ``randn`` in normalised space; Adam with ``lr`` and
``betas = (0.5, 0.9)``; a linear warm-up over the first ``warmup`` fraction of the iterations,
then a cosine decay to 0; each step a random roll of up to ``jitter`` pixels in both axes and a
horizontal flip with probability 1/2 (one draw per batch); after each step the pixels are
clamped to the valid normalised range ``[(0 - mean)/std, (1 - mean)/std]`` per channel. The
``n`` images are optimised in independent batches of ``batch_size``. All randomness comes from
one ``torch.Generator`` seeded with ``seed``: the same seed gives the same images bit for bit on
CPU (same torch build and thread count). The global RNG is not touched.

The model is put in eval mode with ``requires_grad`` off for the run, and restored afterwards;
its parameters are never changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ouromamba_fx.checks import check_model
from ouromamba_fx.errors import DataError, OuroMambaError
from ouromamba_fx.models.families import canonical_copy
from ouromamba_fx.models.mambavision import MambaVisionMixer
from ouromamba_fx.models.mixer import MambaMixer
from ouromamba_fx.models.vmamba import SS2D
from ouromamba_fx.progress import console, progress_bar
from ouromamba_fx.version import QUANTIZED_META_KEY, SYNTHETIC_FORMAT

__all__ = ["gen", "GenConfig", "SyntheticCalib", "record_scan", "patch_features", "cosine_similarity_matrix",
           "info_nce", "contrastive_loss", "gen_losses"]

LOSSES = ("full", "output", "contrastive")
FORMAT = SYNTHETIC_FORMAT

@dataclass(frozen=True)
class GenConfig:
    """The settings of :func:`gen`, validated on construction (see the module docstring for what
    each does; ``benchmarks/gen_time.md`` for how the defaults were chosen on the reference model).

    n: number of images. iters: optimisation steps per batch. lr, betas: Adam's. warmup: fraction
    of ``iters`` of linear warm-up before the cosine decay. batch_size: images optimised together.
    neighbourhood: odd p of the p x p neighbourhood of the patch features. top_k: positives per
    anchor patch (capped at patches - 2). temperature: InfoNCE temperature T. lambda_c: weight of
    the contrastive loss in the ``"full"`` loss. loss: ``"full"`` (L_O + lambda_c L_C),
    ``"output"`` (L_O only) or ``"contrastive"`` (L_C only). layers: indices of the mixers whose
    features enter L_C (None: all). jitter: maximum random roll in pixels per step (None:
    ``min(H, W) // 8``, at least 1; 0: none). flip: random horizontal flips. input_size:
    ``(C, H, W)`` if the model has no ``pretrained_cfg["input_size"]``. num_classes: classes to
    spread the targets over (None: the model's). seed: everything random (initial pixels, targets,
    jitter, flips) derives from it.
    """

    # 64 images x 50 steps (100 steps at batch 32, an eighth of 128 x 200's): on the reference model
    # their W4A8 / W4A4O8 calibration is within 0.2 point of 128 x 200's and within 0.3 / 0.5 point
    # of real images on 5,000 val images (one seed; benchmarks/gen_time.md).
    n: int = 64
    iters: int = 50
    lr: float = 0.2
    betas: tuple[float, float] = (0.5, 0.9)
    warmup: float = 0.1
    batch_size: int = 32
    neighbourhood: int = 3
    top_k: int = 12
    temperature: float = 0.2
    lambda_c: float = 1.0
    loss: str = "full"
    layers: tuple[int, ...] | None = None
    jitter: int | None = None
    flip: bool = True
    input_size: tuple[int, int, int] | None = None
    num_classes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"gen: loss must be one of {LOSSES}, got {self.loss!r}")
        if self.n < 1 or self.iters < 0 or self.batch_size < 1:
            raise ValueError(f"gen: need n >= 1, iters >= 0, batch_size >= 1 (got {self.n}, {self.iters}, "
                             f"{self.batch_size})")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"gen: warmup is a fraction of iters in [0, 1), got {self.warmup}")
        if self.loss != "output" and (self.neighbourhood < 1 or self.neighbourhood % 2 == 0):
            raise ValueError(f"gen: neighbourhood must be an odd size >= 1, got {self.neighbourhood}")

    def replace(self, **changes) -> "GenConfig":
        return dataclasses.replace(self, **changes)


# -------------------------------------------------------------------------------------------------
# Recording the scan readout

_MIXERS = (MambaMixer, SS2D, MambaVisionMixer)

def mixers_of(model: nn.Module) -> list[nn.Module]:
    """The model's mixers in module order (layer 0 first): :class:`MambaMixer` (Vim, Mamba
    blocks), VMamba's ``SS2D`` and MambaVision's mixer (each has the ``_gen_record`` hook)."""
    return [m for m in model.modules() if isinstance(m, _MIXERS)]


@contextlib.contextmanager
def record_scan(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[list[dict]]:
    """Inside the block, the chosen mixers record ``(yhat, delta)`` per scan direction.

    Yields one dict per chosen mixer (in ``layers`` order; default: every mixer); after each
    forward pass it maps each scan direction (``"fwd"`` / ``"bwd"``; VMamba's ``"hw"``, ``"wh"``,
    ``"hw_rev"``, ``"wh_rev"``) to ``(yhat, delta)``, both ``(batch, d_inner, L)`` in token order
    (row-major on the grid), and for VMamba / MambaVision ``"grid"`` to the (H, W) the scan ran
    on, where ``yhat = C_t . h_t`` is the scan's raw readout and ``delta`` its
    (softplus-ed) step size. The model's outputs are the same as without recording. On exit the
    mixers are back to the normal code path.
    """
    mixers = mixers_of(model)
    if not mixers:
        raise OuroMambaError(f"record_scan: {type(model).__name__} has no mixer of ouromamba_fx.models "
                             "(MambaMixer, SS2D, MambaVisionMixer); OuroMamba-Gen's contrastive loss needs them")
    if layers is None:
        chosen = mixers
    else:
        bad = [i for i in layers if not -len(mixers) <= int(i) < len(mixers)]
        if bad:
            raise ValueError(f"record_scan: layers {bad} out of range (the model has {len(mixers)} mixers)")
        chosen = [mixers[int(i)] for i in layers]
    records: list[dict] = [{} for _ in chosen]
    try:
        for m, r in zip(chosen, records):
            m._gen_record = r
        yield records
    finally:
        for m in chosen:
            m.__dict__.pop("_gen_record", None)


# -------------------------------------------------------------------------------------------------
# Features and losses

def _patch_index(length: int, cls_index: int | None, device) -> torch.Tensor:
    """Indices of the patch tokens in a sequence of ``length`` tokens (class token left out)."""
    idx = torch.arange(length, device=device)
    return idx if cls_index is None else torch.cat((idx[:cls_index], idx[cls_index + 1:]))


def patch_features(yhat: torch.Tensor, delta: torch.Tensor, grid_size: tuple[int, int],
                   cls_index: int | None, neighbourhood: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Delta-weighted neighbourhood sums of the scan readout on the patch grid.

    Args:
        yhat, delta: ``(batch, d_inner, L)`` in token order (``L`` = patches + class token).
        grid_size: ``(gh, gw)`` patch grid, patches in row-major order.
        cls_index: position of the class token in the sequence, or None.
        neighbourhood: odd p, the p x p neighbourhood (1: no spatial enrichment).

    Returns:
        ``(batch, gh * gw, d_inner)``, contiguous: ``o(tau) = sum_{k in N(tau)} w_k yhat(k)`` with
        ``w`` the per-image min-max normalised channel mean of ``delta`` (module docstring).
    """
    p = int(neighbourhood)
    if p < 1 or p % 2 == 0:
        raise ValueError(f"patch_features: neighbourhood must be an odd size >= 1, got {neighbourhood}")
    gh, gw = (int(s) for s in grid_size)
    if yhat.shape != delta.shape or yhat.dim() != 3:
        raise ValueError(f"patch_features: yhat {tuple(yhat.shape)} and delta {tuple(delta.shape)} must "
                         "both be (batch, d_inner, L)")
    b, c, length = yhat.shape
    if length - (cls_index is not None) != gh * gw or (cls_index is not None and not 0 <= cls_index < length):
        raise ValueError(f"patch_features: {length} tokens with the class token at {cls_index} do not "
                         f"fill a {gh}x{gw} patch grid")
    idx = _patch_index(length, cls_index, yhat.device)
    m = delta.float().mean(dim=1).index_select(1, idx)  # (batch, P): channel mean of delta
    lo, hi = m.amin(dim=1, keepdim=True), m.amax(dim=1, keepdim=True)
    w = (m - lo + eps) / (hi - lo + eps)
    if p > 1:
        w = w * float(p * p)  # avg_pool2d below divides by p*p: this makes it a sum
    # Patch-major (batch, P, d_inner): the pooling below then runs on a channels-last grid, whose
    # kernel is vectorised over the channels rather than looping over (batch, d_inner) planes of a
    # few patches each; the same sums in the same order.
    fused = yhat.float().transpose(1, 2).index_select(1, idx) * w[:, :, None]
    if p == 1:
        return fused
    # sum over the p x p neighbourhood, zeros outside the grid
    grid = fused.view(b, gh, gw, c).permute(0, 3, 1, 2)  # (batch, d_inner, gh, gw), channels-last
    pooled = F.avg_pool2d(grid, p, stride=1, padding=p // 2, count_include_pad=True)
    return pooled.permute(0, 2, 3, 1).reshape(b, gh * gw, c)


def cosine_similarity_matrix(features: torch.Tensor | Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """Pairwise cosine similarities of the patches of each image, ``(batch, P, P)``.

    ``features``: ``(batch, P, d)``, or a sequence of those (one per scan direction): then the mean
    of the per-direction cosine similarities -- the same as the cosine of the concatenated,
    per-direction L2-normalised features, without building the concatenation.
    """
    feats = [features] if isinstance(features, torch.Tensor) else list(features)
    if not feats:
        raise ValueError("cosine_similarity_matrix: no features")
    total = None
    for f in feats:
        if f.dim() != 3:
            raise ValueError(f"cosine_similarity_matrix: features must be (batch, P, d), got {tuple(f.shape)}")
        f = f.float()
        gram = f @ f.transpose(1, 2)  # (batch, P, P); cheaper to normalise than (batch, P, d)
        inv = gram.diagonal(dim1=1, dim2=2).clamp_min(eps).rsqrt()
        cos = gram * inv[:, :, None] * inv[:, None, :]
        total = cos if total is None else total + cos
    return total / len(feats) if len(feats) > 1 else total


def info_nce(sim: torch.Tensor, top_k: int = 12, temperature: float = 0.2) -> torch.Tensor:
    """Patch-level InfoNCE from cosine similarities ``sim`` ``(batch, P, P)``, mean over images and
    anchors: positives are each anchor's ``top_k`` most similar other patches (capped at P - 2),
    negatives every other patch; ``-log(sum_pos exp(cos/T) / sum_{j != i} exp(cos/T))``."""
    if sim.dim() != 3 or sim.shape[1] != sim.shape[2]:
        raise ValueError(f"info_nce: sim must be (batch, P, P), got {tuple(sim.shape)}")
    num = sim.shape[1]
    if num < 3:
        raise ValueError(f"contrastive loss: needs at least 3 patches per image, got {num}")
    if temperature <= 0:
        raise ValueError(f"contrastive loss: temperature must be > 0, got {temperature}")
    k = max(1, min(int(top_k), num - 2))
    self_mask = torch.eye(num, dtype=torch.bool, device=sim.device)
    logits = (sim / temperature).masked_fill(self_mask, float("-inf"))
    pos = logits.detach().topk(k, dim=-1).indices
    per_anchor = torch.logsumexp(logits, dim=-1) - torch.logsumexp(logits.gather(-1, pos), dim=-1)
    return per_anchor.mean()


def contrastive_loss(features: torch.Tensor | Sequence[torch.Tensor], top_k: int = 12,
                     temperature: float = 0.2) -> torch.Tensor:
    """Patch-level InfoNCE of patch features ``(batch, P, d)`` (or one such tensor per scan
    direction, see :func:`cosine_similarity_matrix`); mean over images and anchors."""
    return info_nce(cosine_similarity_matrix(features), top_k, temperature)


def _grid_and_cls(model: nn.Module) -> tuple[tuple[int, int], int | None]:
    grid = getattr(model, "grid_size", None)
    if grid is None:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise OuroMambaError(f"gen: {type(model).__name__} has no grid_size (patch grid); the contrastive "
                             "loss needs it. Use loss='output' or a VisionMamba")
    return (int(grid[0]), int(grid[1])), getattr(model, "cls_index", None)


def gen_losses(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None, *, loss: str = "full",
               layers: Sequence[int] | None = None, neighbourhood: int = 3, top_k: int = 12,
               temperature: float = 0.2, lambda_c: float = 1.0) -> dict[str, torch.Tensor]:
    """One forward pass of ``model`` on ``x``; returns ``{"loss", "loss_o", "loss_c", "logits"}``.

    ``loss_o`` / ``loss_c`` are zero tensors when ``loss`` leaves them out; ``loss`` is
    ``loss_o + lambda_c * loss_c``. Differentiable with respect to ``x``.
    """
    if loss not in LOSSES:
        raise ValueError(f"gen: loss must be one of {LOSSES}, got {loss!r}")
    zero = x.new_zeros(())
    if loss == "output":
        logits = model(x)
        loss_c = zero
    else:
        with record_scan(model, layers) as records:
            logits = model(x)
        per_layer = []
        for rec in records:
            if not rec:
                raise OuroMambaError("gen: a recorded mixer did not run during the forward pass")
            # VMamba / MambaVision record the grid each scan ran on (stages differ); Vim and Mamba
            # stacks scan the model's one patch grid, with the class token where the model says.
            grid, cls_index = (rec["grid"], None) if "grid" in rec else _grid_and_cls(model)
            if "grid" in rec and grid[0] * grid[1] < 3:
                continue  # a 1x1 / 1x2 window or map has no patch to contrast with: left out
            feats = [patch_features(*v, grid, cls_index, neighbourhood) for d, v in rec.items() if d != "grid"]
            per_layer.append(contrastive_loss(feats, top_k, temperature))
        if not per_layer:
            raise OuroMambaError("gen: no recorded mixer scans a grid of 3 patches or more; the contrastive "
                                 "loss needs them (use loss='output', or record other layers)")
        loss_c = torch.stack(per_layer).mean()
    if loss == "contrastive":
        loss_o = zero
    else:
        if targets is None:
            raise ValueError("gen_losses: targets are needed for the output loss")
        loss_o = F.cross_entropy(logits.float(), targets)
    total = loss_o + lambda_c * loss_c if loss == "full" else (loss_o if loss == "output" else loss_c)
    return {"loss": total, "loss_o": loss_o, "loss_c": loss_c, "logits": logits}


# -------------------------------------------------------------------------------------------------
# The result

class SyntheticCalib:
    """Synthetic calibration images: iterate for batches (``calib=`` of :func:`ouromamba_fx.convert`).

    Attributes:
        images: ``(N, C, H, W)`` float32, normalised as the model expects.
        targets: ``(N,)`` int64 target class of each image.
        batch_size: batch size of iteration (default 32).
        settings: the generation settings and a summary of the run (saved with the images).
        classes: class names (may be empty), mean, std: the model's.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, settings: dict | None = None,
                 classes: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, batch_size: int = 32,
                 history: list[dict] | None = None) -> None:
        if images.dim() != 4:
            raise ValueError(f"SyntheticCalib: images must be (N, C, H, W), got {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"SyntheticCalib: {tuple(targets.shape)} targets for {images.shape[0]} images")
        if batch_size < 1:
            raise ValueError(f"SyntheticCalib: batch_size must be >= 1, got {batch_size}")
        channels = images.shape[1]
        self.images = images
        self.targets = targets.long()
        self.settings = dict(settings or {})
        self.classes = list(classes or [])
        self.mean = tuple(float(v) for v in (mean if mean is not None else (0.0,) * channels))
        self.std = tuple(float(v) for v in (std if std is not None else (1.0,) * channels))
        self.batch_size = int(batch_size)
        self.history = list(history or [])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.images.split(self.batch_size))

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        acc = self.settings.get("target_accuracy")
        extra = f", target accuracy {100 * acc:.1f}%" if acc is not None else ""
        return (f"SyntheticCalib({n} images {c}x{h}x{w}, loss={self.settings.get('loss', '?')}, "
                f"iters={self.settings.get('iters', '?')}, seed={self.settings.get('seed', '?')}{extra})")

    def class_name(self, target: int) -> str:
        return self.classes[target] if 0 <= target < len(self.classes) else str(target)

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write a .safetensors file: tensors ``images``, ``targets``; header metadata ``settings``,
        ``classes``, ``mean``, ``std`` (JSON strings)."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "settings": json.dumps(self.settings, default=str),
                "classes": json.dumps(self.classes), "mean": json.dumps(self.mean),
                "std": json.dumps(self.std)}
        save_file({"images": self.images.detach().cpu().contiguous(),
                   "targets": self.targets.detach().cpu().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 32) -> "SyntheticCalib":
        """Read a file written by :meth:`save`. Everything in it is checked before use (tensor
        names, dtypes and shapes before they are read; finite images; targets in range; the JSON
        metadata's types); any problem is a :class:`DataError` naming the file."""
        from safetensors import safe_open

        where = f"SyntheticCalib.load: {str(path)!r}"
        p = Path(path)
        if p.is_dir():
            raise DataError(f"{where} is a directory; expected a .safetensors file written by "
                            f"'ouromamba-fx gen' (SyntheticCalib.save)")
        if not p.is_file():
            raise DataError(f"{where} does not exist")
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    what = ("a quantized model saved by ouromamba-fx" if QUANTIZED_META_KEY in meta
                            else f"format {meta.get('format')!r}" if meta.get("format") else "no format tag")
                    raise DataError(f"{where} is not a file written by SyntheticCalib.save ({what}); "
                                    f"expected synthetic calibration images from 'ouromamba-fx gen'")
                keys = set(f.keys())
                if keys != {"images", "targets"}:
                    raise DataError(f"{where}: tensors {sorted(keys)[:6]}, expected exactly 'images' and 'targets'")
                shapes = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys}
                _check_synthetic_layout(where, shapes)
                images, targets = f.get_tensor("images"), f.get_tensor("targets")
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any read failure: say which file
            raise DataError(f"{where}: cannot read it as safetensors ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        settings = _json_field(where, meta, "settings", dict, {})
        classes = _json_field(where, meta, "classes", list, [])
        if not all(isinstance(c, str) for c in classes):
            raise DataError(f"{where}: classes must be a list of names")
        channels = images.shape[1]
        mean = _json_field(where, meta, "mean", list, None)
        std = _json_field(where, meta, "std", list, None)
        for key, v in (("mean", mean), ("std", std)):
            if v is not None and not (len(v) == channels and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                    and (key == "mean" or min(v) > 0)):
                raise DataError(f"{where}: {key} must be {channels} finite numbers"
                                f"{' > 0' if key == 'std' else ''}, got {str(v)[:60]}")
        if not bool(torch.isfinite(images).all()):
            raise DataError(f"{where}: the images hold NaN or infinite values")
        num_classes = settings.get("num_classes") or len(classes) or None
        if targets.numel() and (int(targets.min()) < 0 or (isinstance(num_classes, int) and
                                                           int(targets.max()) >= num_classes)):
            raise DataError(f"{where}: targets outside [0, {num_classes}) "
                            f"(found {int(targets.min())}..{int(targets.max())})")
        return cls(images.float(), targets.long(), settings=settings, classes=classes, mean=mean, std=std,
                   batch_size=batch_size)

    def to_pixels(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """De-normalised uint8 images ``(N, H, W, C)``."""
        x = self.images if images is None else images
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x.detach().float().cpu() * std + mean).clamp(0, 1)
        return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    def grid(self, path: str | Path | None = None, n: int = 32, cols: int = 8, scale: int | None = None,
             labels: bool = True, pad: int = 2, label_height: int = 12):
        """A PNG grid of the first ``n`` images (de-normalised), each captioned with its target
        class name. Tiles are upscaled by ``scale`` (default: to at least 64 px). Returns the
        ``PIL.Image``; writes it to ``path`` if given.

        Size: ``cols' * (W*scale + pad) + pad`` by ``rows * (H*scale + label_height + pad) + pad``
        with ``cols' = min(cols, n)``, ``rows = ceil(n / cols')`` (``label_height`` is 0 without labels).
        """
        from PIL import Image, ImageDraw, ImageFont

        n = max(1, min(int(n), self.images.shape[0]))
        cols = max(1, min(int(cols), n))
        rows = math.ceil(n / cols)
        h, w = self.images.shape[2:]
        scale = int(scale) if scale else max(1, math.ceil(64 / max(h, w)))
        lh = label_height if labels else 0
        th, tw = h * scale, w * scale
        pixels = self.to_pixels(self.images[:n]).numpy()
        channels = pixels.shape[-1]
        sheet = Image.new("RGB", (cols * (tw + pad) + pad, rows * (th + lh + pad) + pad), "white")
        draw = ImageDraw.Draw(sheet)
        font = ImageFont.load_default()
        for i in range(n):
            r, c = divmod(i, cols)
            x0, y0 = pad + c * (tw + pad), pad + r * (th + lh + pad)
            arr = pixels[i]
            tile = Image.fromarray(arr[..., 0] if channels == 1 else arr[..., :3])
            sheet.paste(tile.convert("RGB").resize((tw, th), Image.NEAREST), (x0, y0))
            if labels:
                text = self.class_name(int(self.targets[i]))
                while len(text) > 1 and draw.textlength(text, font=font) > tw:
                    text = text[:-1]
                draw.text((x0, y0 + th), text, fill="black", font=font)
        if path is not None:
            sheet.save(str(path), format="PNG")
        return sheet


def _check_synthetic_layout(where: str, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """``images`` float (N, C, H, W) with N, C, H, W >= 1; ``targets`` integer (N,)."""
    (idt, ishape), (tdt, tshape) = shapes["images"], shapes["targets"]
    if idt not in ("F16", "BF16", "F32", "F64") or len(ishape) != 4 or 0 in ishape:
        raise DataError(f"{where}: images are {idt} {ishape}; expected float (N, C, H, W), none of them 0")
    if tdt not in ("I8", "U8", "I16", "I32", "I64") or tshape != ishape[:1]:
        raise DataError(f"{where}: targets are {tdt} {tshape}; expected integers ({ishape[0]},), one per image")


def _json_field(where: str, meta: dict, key: str, kind: type, default):
    """A JSON value of the file's metadata, of type ``kind`` (or null/absent: ``default``)."""
    text = meta.get(key)
    if text is None:
        return default
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{where}: metadata {key!r} is not valid JSON ({e})") from None
    if value is None:
        return default
    if not isinstance(value, kind):
        raise DataError(f"{where}: metadata {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


# -------------------------------------------------------------------------------------------------
# Generation

@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the block; both restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _input_spec(model: nn.Module, input_size) -> tuple[tuple[int, int, int], tuple, tuple]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(input_size or cfg.get("input_size") or ())
    if len(size) != 3:
        raise OuroMambaError(f"gen: cannot tell the input size of {type(model).__name__}: give "
                             "input_size=(C, H, W) (or set model.pretrained_cfg['input_size'])")
    channels = size[0]
    mean = tuple(cfg.get("mean") or (0.0,) * channels)
    std = tuple(cfg.get("std") or (1.0,) * channels)
    if len(mean) != channels or len(std) != channels:
        raise OuroMambaError(f"gen: mean/std of length {len(mean)}/{len(std)} for {channels} channels")
    return size, mean, std


def _num_classes(model: nn.Module, num_classes: int | None, probe: torch.Tensor) -> int:
    if num_classes:
        return int(num_classes)
    for source in (getattr(getattr(model, "cfg", None), "num_classes", None),
                   (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")):
        if source:
            return int(source)
    with torch.no_grad():
        return int(model(probe).shape[-1])


def _targets(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """Targets spread evenly: every class ``n // C`` or ``n // C + 1`` times, in random order."""
    order = torch.randperm(num_classes, generator=g)
    t = order[torch.arange(n) % num_classes]
    return t[torch.randperm(n, generator=g)]


def _lr_at(step: int, iters: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` steps, then cosine decay to 0 (step counts from 0)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, iters - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


@dataclass(frozen=True)
class _Setup:
    """What generation derives from the model and the config before it starts."""

    size: tuple[int, int, int]  # (C, H, W)
    mean: tuple
    std: tuple
    device: torch.device
    dtype: torch.dtype
    lo: torch.Tensor  # the valid normalised range per channel, (1, C, 1, 1)
    hi: torch.Tensor
    jitter: int
    warmup_steps: int


def _setup(model: nn.Module, cfg: GenConfig) -> _Setup:
    size, mean, std = _input_spec(model, cfg.input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    jit = max(1, min(size[1], size[2]) // 8) if cfg.jitter is None else int(cfg.jitter)
    warmup_steps = max(1, round(cfg.warmup * cfg.iters)) if cfg.warmup > 0 else 0
    return _Setup(size, mean, std, device, dtype, (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t, jit, warmup_steps)


def _settings(model: nn.Module, cfg: GenConfig, setup: _Setup) -> dict:
    """The settings a :class:`SyntheticCalib` records (plain JSON values; jitter resolved)."""
    return dict(n=cfg.n, iters=cfg.iters, lr=cfg.lr, betas=list(cfg.betas), warmup=cfg.warmup,
                batch_size=cfg.batch_size, neighbourhood=cfg.neighbourhood, top_k=cfg.top_k,
                temperature=cfg.temperature, lambda_c=cfg.lambda_c, loss=cfg.loss,
                layers=None if cfg.layers is None else [int(i) for i in cfg.layers], jitter=setup.jitter,
                flip=cfg.flip, seed=cfg.seed, input_size=list(setup.size), model=type(model).__name__,
                torch=torch.__version__)


def _optimise_batch(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, cfg: GenConfig, setup: _Setup,
                    g: torch.Generator, step_done: Callable[[int, dict], None]) -> torch.Tensor:
    """Optimise one batch of images ``x0`` toward targets ``t`` for ``cfg.iters`` steps."""
    x = x0.clone().clamp_(setup.lo, setup.hi).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=tuple(cfg.betas))
    jit = setup.jitter
    for step in range(cfg.iters):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.iters, cfg.lr, setup.warmup_steps)
        # one draw per step and batch, always in the same order (determinism)
        dy, dx = (torch.randint(-jit, jit + 1, (2,), generator=g).tolist() if jit > 0 else (0, 0))
        do_flip = cfg.flip and bool(torch.rand((), generator=g) < 0.5)
        xa = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x
        if do_flip:
            xa = xa.flip(3)
        res = gen_losses(model, xa.to(setup.dtype), t, loss=cfg.loss, layers=cfg.layers,
                         neighbourhood=cfg.neighbourhood, top_k=cfg.top_k, temperature=cfg.temperature,
                         lambda_c=cfg.lambda_c)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        opt.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, setup.hi), setup.lo))
        step_done(step, {"loss_o": res["loss_o"].item(), "loss_c": res["loss_c"].item()})
    return x.detach()


def _outcome(history: list[dict], seconds: float, iters: int, batches: int, accuracy: float) -> dict:
    """Timing and the final losses (mean over batches of the last step's), for the settings."""
    last = {k: sum(h[k] for h in history if h["iter"] == iters - 1) / max(1, batches)
            for k in ("loss_o", "loss_c")} if history else {}
    return dict(seconds=round(seconds, 2), seconds_per_iter=round(seconds / max(1, iters * batches), 4),
                target_accuracy=accuracy, final_loss_o=last.get("loss_o"), final_loss_c=last.get("loss_c"))


def gen(model: nn.Module, config: GenConfig | None = None, *, show_progress: bool = True,
        **settings) -> SyntheticCalib:
    """Generate synthetic calibration images for ``model`` (OuroMamba-Gen, data-free).

    Args:
        model: a vision Mamba built from :mod:`ouromamba_fx.models` (the contrastive loss needs
            its ``MambaMixer`` layers, ``grid_size`` and ``cls_index``); left unchanged.
        config: a :class:`GenConfig` (default: ``GenConfig()``).
        show_progress: rich progress bar with the losses (quiet when stderr is not a terminal).
        settings: :class:`GenConfig` fields to change (``gen(model, n=64, seed=1)``).

    Returns:
        A :class:`SyntheticCalib`.

    Example:
        >>> synth = gen(model, n=128)                                      # doctest: +SKIP
        >>> q = ouromamba_fx.convert(model, calib=synth, config=ouromamba_fx.W4A8)  # doctest: +SKIP
    """
    check_model(model, "gen")
    model = canonical_copy(model)  # upstream VMamba / MambaVision / Mamba: the package's modules
    cfg = (config or GenConfig()).replace(**settings)
    if cfg.loss != "output" and not any(isinstance(m, _MIXERS[1:]) for m in model.modules()):
        _grid_and_cls(model)  # fail early with a clear message
    setup = _setup(model, cfg)
    g = torch.Generator().manual_seed(int(cfg.seed))
    images = torch.randn(cfg.n, *setup.size, generator=g).to(setup.device)
    classes = list(getattr(getattr(model, "cfg", None), "classes", None) or [])
    record = _settings(model, cfg, setup)
    history: list[dict] = []
    start = time.perf_counter()
    with _frozen(model), torch.enable_grad():
        ncls = _num_classes(model, cfg.num_classes, images[:1].to(setup.dtype))
        targets = _targets(cfg.n, ncls, g).to(setup.device)
        record["num_classes"] = ncls
        chunks = list(zip(images.split(cfg.batch_size), targets.split(cfg.batch_size)))
        out = []
        with progress_bar(f"OuroMamba-Gen ({cfg.loss})", total=cfg.iters * len(chunks),
                          enabled=show_progress) as advance:
            for bi, (x0, t) in enumerate(chunks):
                def step_done(step: int, info: dict, bi: int = bi) -> None:
                    history.append({"batch": bi, "iter": step, **info})
                    advance(1, batch=f"{bi + 1}/{len(chunks)}", **info)

                out.append(_optimise_batch(model, x0, t, cfg, setup, g, step_done))
        final = torch.cat(out) if out else images[:0]
        with torch.no_grad():
            pred = torch.cat([model(xb.to(setup.dtype)).argmax(-1) for xb in final.split(cfg.batch_size)])
    record.update(_outcome(history, time.perf_counter() - start, cfg.iters, len(chunks),
                           float((pred == targets).float().mean())))
    synth = SyntheticCalib(final.cpu(), targets.cpu(), settings=record, classes=classes, mean=setup.mean,
                           std=setup.std, history=history)
    if show_progress:
        console.print(f"[green]generated[/] {synth}")
    return synth
