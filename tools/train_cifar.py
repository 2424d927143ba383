"""Train a small model of one vision-Mamba family on CIFAR-10, on the CPU.

    python tools/train_cifar.py --model vmamba_v2_cifar --data ../shared/data/cifar10 \\
        --budget-min 120 --out vmamba_v2_cifar.pt

``--model`` is one of the registered CIFAR configs (``mambavision_cifar``, ``vmamba_v0_cifar``,
``vmamba_v2_cifar``, ``mamba_stack_cifar``). Training data: ``<data>/train.tar.gz`` (JPEGs under
``train/<class>/``), decoded once into memory; top-1 is measured at the end on ``<data>/val``
(``<class>/*.jpg``) with the model's own evaluation transform.

Recipe (the one the reference Vim checkpoint was trained with): random crop with 4-pixel reflect
padding, horizontal flip, AdamW (no weight decay on norms, biases and the scans' A/D), linear
warm-up then a cosine schedule, label smoothing 0.1. Models whose input size is larger than the
32-px images (``img_size`` in the config) get the images resized once with PIL's bicubic filter,
as their evaluation transform does, and the crop padding scaled with them (8 px at 64 px). The
scans run through the package's differentiable fused op. ``--set field=value`` changes a field of
the registered config (``value`` as JSON, e.g. ``--set img_size=32 --set "window_size=[8,8,2,1]"``).

``--budget-min`` fits the cosine schedule to wall-clock time: the learning rate follows the larger
of the step fraction (``--epochs``) and the elapsed-time fraction, and training stops when either
reaches 1, so a budget-cut run still ends at the bottom of the schedule.

The output file is ``torch.save`` of plain data, readable with ``torch.load(weights_only=True)``:
the state dict in the family's upstream layout under its upstream key (``state_dict`` for
MambaVision, ``model`` otherwise), plus ``family``, ``arch``, ``config``, ``classes``, ``mean``,
``std``, ``val_acc`` (fraction), ``epoch``, ``steps`` and timing. ``--benchmark-steps N`` only
times N training steps (after 2 warm-up steps) and prints images per second.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import ouromamba_fx  # noqa: F401  (registers the models)
from ouromamba_fx.evaluate import evaluate
from ouromamba_fx.models import families

# Parameter names (last component) never decayed, besides every 1-D tensor: the scans' A and D.
NO_DECAY = {"A_log", "A_b_log", "A_logs", "D", "D_b", "Ds", "pos_embed"}
STATE_KEY = {"mambavision": "state_dict"}  # others: "model"


def read_train_tar(path: Path, limit_per_class: int | None = None,
                   size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of ``train/<class>/*`` in the tar: uint8 ``(N, 3, H, W)``, labels, classes.

    ``size``: resize each image to ``size`` x ``size`` with PIL's bicubic filter, as the models'
    evaluation transform (timm's ``Resize``) does."""
    items: dict[str, list[bytes]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            cls = parts[-2]
            if limit_per_class is not None and len(items.get(cls, ())) >= limit_per_class:
                continue
            items.setdefault(cls, []).append(tar.extractfile(member).read())
    if not items:
        raise SystemExit(f"{path}: no images under train/<class>/")
    classes = sorted(items)
    images, labels = [], []
    for label, cls in enumerate(classes):
        for data in items[cls]:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels), classes


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-pixel reflect padding and horizontal flip, per image (float input)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,))
    dx = torch.randint(0, 2 * pad + 1, (n,))
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 3, h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 3, h, w)
    x = x.gather(3, cols)
    flip = torch.rand(n) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def prepare(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, pad: int) -> torch.Tensor:
    """A training batch: augmented (crop with ``pad``-pixel reflect padding, flip), normalised."""
    x = augment(x_uint8.float().div_(255.0), pad)
    return (x - mean) / std


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(progress: float, base: float, warmup: float, floor: float) -> float:
    if progress < warmup:
        return base * max(progress / warmup, 1e-3)
    t = min((progress - warmup) / max(1.0 - warmup, 1e-9), 1.0)
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * t))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=[n for n in families.CONFIGS if n.endswith("_cifar")])
    ap.add_argument("--data", default="../shared/data/cifar10", help="folder with train.tar.gz and val/")
    ap.add_argument("--out", help="checkpoint file to write (required unless --benchmark-steps)")
    ap.add_argument("--epochs", type=float, default=30.0)
    ap.add_argument("--budget-min", type=float, default=None, help="wall-clock budget in minutes")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the schedule")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="train through torch.compile (Inductor)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None, help="images per class (tests)")
    ap.add_argument("--val-limit", type=int, default=None, help="val images per class (tests)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    ap.add_argument("--benchmark-steps", type=int, default=None, help="only time this many steps")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a field of the model's config")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.out is None and args.benchmark_steps is None:
        raise SystemExit("--out is required (or --benchmark-steps)")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    family, base_cfg = families.config_for(args.model)
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    size = int(overrides.get("img_size", base_cfg.img_size))
    data = Path(args.data)
    t0 = time.perf_counter()
    x_all, y_all, classes = read_train_tar(data / "train.tar.gz", args.train_limit, size)
    print(f"read {len(y_all)} training images ({len(classes)} classes) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    model = families.create(args.model, **{**overrides, "classes": classes, "num_classes": len(classes)})
    cfg = model.cfg
    pad = round(4 * size / 32)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params:,} parameters, input {size} px", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    forward = torch.compile(model) if args.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    n = len(y_all)
    steps_per_epoch = max(n // args.batch_size, 1)
    total_steps = max(int(args.epochs * steps_per_epoch), 1)
    budget = args.budget_min * 60.0 if args.budget_min else None

    model.train()
    step, seen, start = 0, 0, time.perf_counter()
    bench_start, bench_cpu = None, 0.0
    progress = 0.0
    while progress < 1.0:
        perm = torch.randperm(n)
        for i in range(steps_per_epoch):
            elapsed = time.perf_counter() - start
            progress = max(step / total_steps, elapsed / budget if budget else 0.0)
            if progress >= 1.0 or (args.max_steps is not None and step >= args.max_steps):
                progress = 1.0
                break
            if args.benchmark_steps is not None and step == 2:
                bench_start, bench_cpu = time.perf_counter(), time.process_time()
            if args.benchmark_steps is not None and step >= args.benchmark_steps + 2:
                progress = 1.0
                break
            lr = lr_at(progress, args.lr, args.warmup, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = prepare(x_all[idx], mean, std, pad)
            loss = criterion(forward(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            step += 1
            seen += len(idx)
            if not math.isfinite(loss.item()):
                raise SystemExit(f"step {step}: loss is {loss.item()}; lower --lr")
            if args.log_every and step % args.log_every == 0:
                el = time.perf_counter() - start
                print(f"step {step} epoch {seen / n:.2f} lr {lr:.2e} loss {loss.item():.3f} "
                      f"{seen / el:.0f} img/s", flush=True)
    train_seconds = time.perf_counter() - start
    if args.benchmark_steps is not None:
        timed = (time.perf_counter() - bench_start) if bench_start else float("nan")
        cpu = (time.process_time() - bench_cpu) if bench_start else float("nan")
        images = (step - 2) * args.batch_size
        # Wall-clock rate, and images per CPU-second of this process (less sensitive to other
        # processes sharing the cores).
        result = {"model": args.model, "params": n_params, "batch_size": args.batch_size,
                  "steps": step - 2, "seconds": timed, "images_per_second": images / timed,
                  "cpu_seconds": cpu, "images_per_cpu_second": images / cpu,
                  "threads": torch.get_num_threads()}
        print(json.dumps(result), flush=True)
        return result

    model.eval()
    val = evaluate(model, data / "val", batch_size=256, limit_per_class=args.val_limit,
                   show_progress=False)
    print(val.summary(args.model, str(data / "val")), flush=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    ckpt = {STATE_KEY.get(family, "model"): sd, "family": family, "arch": args.model,
            "config": cfg.to_dict(), "classes": list(classes), "mean": list(cfg.mean),
            "std": list(cfg.std), "val_acc": val.top1 / 100.0, "val_images": val.total,
            "epoch": int(seen // n), "epochs": seen / n, "steps": step,
            "train_seconds": train_seconds, "train_images": n,
            "recipe": {**{k: getattr(args, k) for k in ("batch_size", "lr", "min_lr", "weight_decay",
                                                        "warmup", "label_smoothing", "grad_clip", "seed",
                                                        "epochs", "budget_min")},
                       "config_overrides": overrides, "crop_padding": pad}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), val top-1 {val.top1:.2f}%", flush=True)
    return {"val_acc": val.top1 / 100.0, "steps": step, "out": str(out)}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
