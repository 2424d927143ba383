"""OuroMamba-Gen cost and quality on CPU.

Timing (default): seconds per optimisation step (forward + backward of the generation loss, the
Adam step excluded) for the reference model at batch 32 and 128, and how it grows with depth and
token count (random-weight VisionMamba, d_model 128, patch 4, batch 32).

Quality (``--quality``): synthetic sets (128 images per loss by default, or one row per
``--variant`` of GenConfig settings), then ``convert`` with each preset of ``--configs`` and top-1
on the CIFAR-10 val folder (``--limit`` per class, 0: all 5,000), against the same conversions
calibrated on real images and on Gaussian noise. Needs the shared data folder (``--data``, default
``../shared/data/cifar10`` from the repository root).

Convert time (``--convert``): wall and CPU time of the whole data-free convert of the bundled model
(generation + calibration + passes) for each ``--variant``, one after the other in one process --
the before/after of a change to the GenConfig defaults on one machine.

Each mode writes its section of ``benchmarks/gen_time.md`` (the other sections are kept).

    python benchmarks/gen_time.py                      # timing
    python benchmarks/gen_time.py --quality            # accuracy table (long: minutes per gen run)
    python benchmarks/gen_time.py --quality --limit 0 --variant "cheap:n=64,iters=50" --variant "iters=200"
    python benchmarks/gen_time.py --convert --variant "before:n=128,iters=200" --variant "after:"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import ouromamba_fx as of
from ouromamba_fx.gen import GenConfig, SyntheticCalib, gen, gen_losses
from ouromamba_fx.ops.scan import scan_backend
from ouromamba_fx.models import VimConfig, VisionMamba

from cpu_latency import cpu_name  # noqa: E402 (this folder is on sys.path when a script here runs)

HERE = Path(__file__).resolve().parent
# The settings the cache keys of synthetic sets are made of (those gen() had when the caches were
# made), so that cached files stay valid.
GEN_KEY_FIELDS = ("n", "iters", "lr", "betas", "warmup", "batch_size", "neighbourhood", "top_k", "temperature",
                  "lambda_c", "loss", "jitter", "flip")


def load_avg() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def step_seconds(model, batch: int, loss: str, reps: int, seed: int = 0) -> tuple[float, float]:
    """(min, median) seconds of one forward + backward of the generation loss over ``reps`` steps
    after one warm-up step. On a shared machine the minimum is the better estimate of the cost."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w, generator=g).requires_grad_(True)
    t = torch.arange(batch) % model.cfg.num_classes
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    times = []
    try:
        for i in range(reps + 1):
            start = time.perf_counter()
            res = gen_losses(model.eval(), x, t, loss=loss)
            res["loss"].backward()
            x.grad = None
            if i:
                times.append(time.perf_counter() - start)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return min(times), statistics.median(times)


def random_vim(depth: int, patches: int) -> VisionMamba:
    side = int(round(patches ** 0.5)) * 4
    cfg = VimConfig(img_size=side, patch_size=4, embed_dim=128, depth=depth, d_state=16, num_classes=10,
                    mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)
    torch.manual_seed(0)
    return VisionMamba(cfg).eval()


def timing(args) -> str:
    ref = of.models.reference_model()
    iters = GenConfig().iters
    lines = ["Seconds per step: min / median over the timed steps.", "",
             f"| model | batch | loss | s / step | ms / step / image (min) | 128 images x {iters} steps (min) |",
             "|---|---:|---|---:|---:|---:|"]
    for batch in (32, 128):
        for loss in ("full", "output"):
            lo, med = step_seconds(ref, batch, loss, args.reps)
            total = lo * (128 / batch) * iters
            lines.append(f"| reference (d128, depth 8, 64 patches) | {batch} | {loss} | {lo:.2f} / {med:.2f} | "
                         f"{1000 * lo / batch:.1f} | {total / 60:.1f} min |")
            print(lines[-1], flush=True)
    lines += ["", "Growth (random weights, d_model 128, batch 32, full loss):", "",
              "| depth | patches | tokens | s / step | ms / step / image (min) |", "|---:|---:|---:|---:|---:|"]
    for depth, patches in ((4, 64), (8, 64), (16, 64), (8, 16), (8, 256)):
        m = random_vim(depth, patches)
        lo, med = step_seconds(m, 32, "full", args.reps)
        lines.append(f"| {depth} | {patches} | {m.num_tokens} | {lo:.2f} / {med:.2f} | {1000 * lo / 32:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def evaluate_q(model, calib, config, data: Path, limit: int | None) -> float:
    q = of.convert(model, calib=calib, config=config, show_progress=False)
    return of.evaluate(q, str(data / "val"), transform_model=model, limit_per_class=limit,
                       show_progress=False).top1


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` (or just ``"key=value,..."``) -> (name, GenConfig overrides).
    Values are ints, floats, ``none``, or ``a/b/c`` for a tuple of ints (``layers=7`` or ``layers=3/7``)."""
    name, _, spec = text.rpartition(":")
    changes: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(GenConfig)}:
            raise SystemExit(f"gen_time.py: --variant {text!r}: {key!r} is not a GenConfig field")
        if key == "layers":
            changes[key] = None if value == "none" else tuple(int(v) for v in value.split("/"))
        elif value == "none":
            changes[key] = None
        elif key == "loss":
            changes[key] = value
        else:
            changes[key] = float(value) if any(c in value for c in ".e") else int(value)
    GenConfig().replace(**changes)  # validate now, not after an hour of other rows
    return name or ",".join(f"{k}={v}" for k, v in changes.items()) or "defaults", changes


def quality(args, write) -> str:
    import hashlib
    import json

    from ouromamba_fx.data import image_loader

    data = Path(args.data)
    limit = args.limit or None
    model = of.models.reference_model()
    fp_res = of.evaluate(model, str(data / "val"), limit_per_class=limit, show_progress=False)
    fp, total = fp_res.top1, fp_res.total
    cache = Path(args.cache) if args.cache else None
    overrides = {k: getattr(args, k) for k in ("iters", "lr", "lambda_c", "temperature", "top_k",
                                                "neighbourhood", "batch_size") if getattr(args, k) is not None}
    variants = ([parse_variant(v) for v in args.variant] if args.variant else
                [(f"loss={loss}", {"loss": loss}) for loss in args.losses])
    configs = [of.config.preset(c) for c in args.configs]
    lines = [f"FP32 top-1: {fp:.2f}% (CIFAR-10 val, {total} images; one image = {100 / total:.2f} points)", "",
             "| calibration | seed | " + " | ".join(c.name for c in configs) + " | generation |",
             "|---|---:|" + "---:|" * len(configs) + "---|"]

    def row(name: str, seed, calib, note: str = "") -> None:
        accs = [evaluate_q(model, calib, cfg, data, limit) for cfg in configs]
        lines.append(f"| {name} | {seed} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {note} |")
        print(lines[-1], flush=True)
        write("\n".join(lines))

    def synthetic(changes: dict, seed: int) -> SyntheticCalib:
        cfg = GenConfig().replace(**{"n": 128, **overrides, **changes, "seed": seed})
        key = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:10]
        path = cache / f"synth_{cfg.loss}_seed{seed}_{key}.safetensors" if cache else None
        if path is not None and path.is_file():
            return SyntheticCalib.load(path)
        synth = gen(model, cfg, show_progress=not args.quiet)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            synth.save(path)
        return synth

    baselines = [] if args.no_baselines else args.baselines.split(",")
    real = None
    if {"real", "real128"} & set(baselines):
        real = torch.cat(list(image_loader(model, data / "calib", batch_size=100, labels=False)))
    if "real" in baselines:
        row("real (1000 calib images)", "-", real.split(100))
    for seed in args.seeds:
        if "real128" in baselines:
            pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:128]
            row("real (128 random calib images)", seed, real[pick])
        if "noise" in baselines:
            c, h, w = model.pretrained_cfg["input_size"]
            row("Gaussian noise (randn, 128)", seed,
                torch.randn(128, c, h, w, generator=torch.Generator().manual_seed(seed)))
        for name, changes in variants:
            synth = synthetic(changes, seed)
            st = synth.settings
            layers = "all" if st.get("layers") is None else "/".join(str(i) for i in st["layers"])
            note = (f"loss {st['loss']}, {st['n']} images x {st['iters']} it, batch {st['batch_size']}, layers "
                    f"{layers}, lr {st['lr']}; {st['seconds']:.0f} s ({st['seconds_per_iter']:.2f} s/step, load "
                    f"{load_avg()}); target acc {100 * st['target_accuracy']:.0f}%")
            row(f"OuroMamba-Gen {name}", seed, synth, note)
    return "\n".join(lines)


def convert_time(args, write) -> str:
    """Wall and CPU time of the data-free convert of the bundled model (OuroMamba-Gen with the
    variant's settings, then calibration and the passes), each variant in turn in this process."""
    model = of.models.reference_model()
    variants = [parse_variant(v) for v in args.variant] or [("defaults", {})]
    cfg = of.config.preset(args.configs[0])
    lines = [f"Data-free `ouromamba_fx.convert(model, config={cfg.name}, gen_options=...)` of the bundled "
             "reference model (no calib: OuroMamba-Gen, then calibration on its images), one after the "
             "other in one process; CPU time = user + system of the process (both threads).", "",
             "| gen settings | images x iters | loss | layers | wall (s) | CPU (s) | load average before |",
             "|---|---|---|---|---:|---:|---|"]
    for name, changes in variants:
        g = GenConfig().replace(**changes)
        before = load_avg()
        t0, c0 = time.perf_counter(), time.process_time()
        of.convert(model, config=cfg, gen_options=changes, show_progress=not args.quiet)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        layers = "all" if g.layers is None else "/".join(str(i) for i in g.layers)
        lines.append(f"| {name} | {g.n} x {g.iters} | {g.loss} | {layers} | {wall:.0f} | {cpu:.0f} | {before} |")
        print(lines[-1], flush=True)
        write("\n".join(lines))
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> None:
    text = path.read_text() if path.is_file() else "# OuroMamba-Gen: cost and quality\n"
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true", help="accuracy table instead of timing")
    ap.add_argument("--convert", action="store_true", help="wall time of the data-free convert of the bundled "
                    "model per --variant (before/after in one run)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per setting")
    ap.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data" / "cifar10"))
    ap.add_argument("--limit", type=int, default=100, help="val images per class (0: all)")
    ap.add_argument("--losses", nargs="*", default=["full", "output", "contrastive"])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="a generated row with these GenConfig changes (n=64,iters=50,layers=7,loss=output); "
                         "repeatable; replaces --losses")
    ap.add_argument("--configs", nargs="+", default=["W8A8", "W4A8", "W6A6", "W4A4O8"],
                    help="presets to convert with (quality mode)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="seeds of the generated sets, the real subsets and the noise")
    ap.add_argument("--cache", default=None, help="folder to keep generated sets in (reused if present)")
    for k in ("iters", "batch_size", "top_k", "neighbourhood"):
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=None)
    for k in ("lr", "lambda_c", "temperature"):
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=float, default=None)
    ap.add_argument("--no-baselines", action="store_true", help="skip the real-image and noise rows")
    ap.add_argument("--baselines", default="real,real128,noise",
                    help="comma-separated baseline rows: real (all calib images), real128, noise")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=str(HERE / "gen_time.md"))
    args = ap.parse_args(argv)

    shown = ["<path>" if a.startswith("/") else shlex.quote(a) for a in (argv or sys.argv[1:])]
    cmd = "python benchmarks/gen_time.py " + " ".join(shown)
    header = (f"Command: `{cmd.strip()}`  \ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs ({cpu_name()}), scan backend {scan_backend()}, "
              f"load average at start {load_avg()}")
    start = time.perf_counter()
    section = "quality" if args.quality else "convert" if args.convert else "timing"
    title = {"quality": "## Quality: calibration source vs top-1", "timing": "## Time per generation step",
             "convert": "## Data-free convert of the bundled model: wall time"}[section]

    def write(body: str, footer: str = "\n\n**Partial: the run is still going or was stopped.**") -> None:
        write_section(Path(args.out), section, f"{title}\n\n{header}\n\n{body}{footer}")

    body = quality(args, write) if args.quality else convert_time(args, write) if args.convert else timing(args)
    write(body, f"\n\nload average at end {load_avg()}; {time.perf_counter() - start:.0f} s in all. "
                f"Defaults: {GenConfig()}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
