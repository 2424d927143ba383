"""Top-1 of the quantized reference Vim by bit-width and method, on real images.

    python benchmarks/accuracy.py                      # full val set (5,000 images), 1,000 calib images
    python benchmarks/accuracy.py --limit-per-class 50 # quicker look

Rows are bit-widths; columns are methods:
  RTN per-tensor   min-max weights and per-tensor min-max activations on the linear inputs,
                   scan in float (the naive baseline of the model card)
  per-token static PTQ4VM-style: Lp-clipped per-channel weights, one static min-max scale per
                   token position on the linear inputs, scan in float
  ours             the preset of that bit-width (ouromamba_fx.PRESETS): every mixer input
                   quantized (linears, conv1d, scan delta/B/C), per-token static scales with an
                   MSE clipping search, OuroMamba outlier channels at W4A8 (16-bit) and W4A4O8
  ours w/o X, ours + X   the preset with one technique (outliers, kscale, reparam, refine) off or on

Calibration sources (``--sources``, issue: data-free calibration): rows W8A8, W4A8, W4A4O8 with
the preset of that bit-width; columns real images, OuroMamba-Gen (full loss, output loss only,
contrastive loss only) and plain Gaussian noise, 128 images each except "real (all)".

    python benchmarks/accuracy.py --sources --gen-cache <dir>   # synthetic sets are cached there

Writes its tables as markdown beside this script (accuracy.md), one section per mode, after every
measured cell (a stopped run leaves the cells it finished, marked as partial).
"""

from __future__ import annotations

import argparse
import json
import hashlib
import re
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import ouromamba_fx as of
from ouromamba_fx.data import image_loader

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
LINEAR_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj")


def methods(w: int, a: int) -> dict[str, of.QuantConfig]:
    """Columns for one bit-width row. "ours" is the preset of that bit-width; the ablations drop
    one technique from it."""
    ours = of.PRESETS.get(f"W{w}A{a}") or of.PRESETS.get(f"W{w}A{a}O8") or \
        of.QuantConfig(f"W{w}A{a}", of.WeightQuant(w), of.ActQuant(a))
    cols = {
        "RTN per-tensor": of.QuantConfig(f"W{w}A{a}-RTN", of.WeightQuant(w, method="minmax"),
                                         of.ActQuant(a, "per_tensor", method="minmax"), roles=LINEAR_ROLES),
        "per-token static": of.QuantConfig(f"W{w}A{a}-per-token", of.WeightQuant(w),
                                           of.ActQuant(a, "per_token", method="minmax"), roles=LINEAR_ROLES),
    }
    # Ablations: each technique off if the preset has it, on if it does not.
    switches = (("outliers", of.OutlierQuant(16 if (w, a) == (4, 8) else 8)), ("kscale", of.KScale()),
                ("reparam", of.Reparam(8, granularity="step")), ("refine", of.Refine()))
    for field, on in switches:
        if getattr(ours, field) is not None:
            cols[f"ours w/o {field}"] = ours.replace(name=f"{ours.name}-no-{field}", **{field: None})
        else:
            cols[f"ours + {field}"] = ours.replace(name=f"{ours.name}+{field}", **{field: on})
    cols["ours"] = ours
    return cols


def state_methods() -> dict[str, of.QuantConfig]:
    """Columns of the hidden-state ablation (``--state``): the W8A8 preset with its scan state kept
    in float, then quantized at 8 bits with and without the reparameterization, with one scale per
    time-step or finer scales (per time-step and d_inner channel, per time-step and d_state index)."""
    base = of.PRESETS["W8A8"]
    cols = {"float state": base}
    for gran, gname in (("step", "per step"), ("step_channel", "per step x channel"),
                        ("step_state", "per step x state")):
        for factors, fname in ((True, "reparam"), (False, "no reparam")):
            cols[f"S8 {fname} {gname}"] = base.replace(
                name=f"W8A8-S8-{gran}{'' if factors else '-noreparam'}",
                reparam=of.Reparam(8, factors=factors, granularity=gran))
    return cols


def write_section(path: Path, key: str, text: str) -> None:
    """Replace the ``<!-- key -->`` section of the markdown file (other sections are kept)."""
    old = path.read_text() if path.is_file() else "# Accuracy: quantized reference Vim (CIFAR-10, d=128, depth 8)\n"
    block = f"<!-- {key} -->\n{text.rstrip()}\n<!-- /{key} -->"
    pat = re.compile(rf"<!-- {key} -->.*?<!-- /{key} -->", re.S)
    new = pat.sub(lambda _: block, old) if pat.search(old) else old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def table_md(title_lines: list[str], rows: dict[str, dict[str, tuple[float, float]]], cols: list[str],
             fp: float, notes: list[str]) -> str:
    lines = list(title_lines)
    lines += ["| bits | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols),
              "| FP32 | " + " | ".join(f"{fp:.2f}" for _ in cols) + " |"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[c][0]:.2f} ({row[c][1]:.1f})" if c in row else "-" for c in cols) + " |")
    return "\n".join(lines + [""] + notes)


GEN_KEY_FIELDS = ("n", "iters", "lr", "betas", "warmup", "batch_size", "neighbourhood", "top_k", "temperature",
                  "lambda_c", "loss", "jitter", "flip")


def synthetic(model, loss: str, n: int, seed: int, cache: Path | None, quiet: bool):
    from ouromamba_fx.gen import GenConfig

    # the cache key of the settings gen() used when the cache was made (files stay valid)
    defaults = {k: getattr(GenConfig(), k) for k in GEN_KEY_FIELDS}
    settings = {**defaults, "n": n, "loss": loss, "seed": seed}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = cache / f"synth_{loss}_seed{seed}_{key}.safetensors" if cache else None
    if path is not None and path.is_file():
        return of.SyntheticCalib.load(path)
    synth = of.gen(model, n=n, loss=loss, seed=seed, show_progress=not quiet)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        synth.save(path)
    return synth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", default=str(SHARED / "data" / "cifar10" / "val"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "cifar10" / "calib"))
    ap.add_argument("--limit-per-class", type=int, default=None)
    ap.add_argument("--bits", default=None, help="comma-separated W/A pairs (default 8/8,6/6,4/8,4/4; "
                    "with --sources 8/8,4/8,4/4)")
    ap.add_argument("--columns", default=None, help="comma-separated subset of the columns")
    ap.add_argument("--sources", action="store_true", help="calibration sources as columns")
    ap.add_argument("--state", action="store_true", help="the hidden-state quantization ablation at W8A8 "
                    "(real calibration; columns: float state, 8-bit state with/without reparameterization "
                    "and by scale granularity)")
    ap.add_argument("--gen-cache", default=None, help="folder to keep/reuse synthetic sets (--sources)")
    ap.add_argument("--gen-file", action="append", default=[], metavar="LOSS=PATH",
                    help="use a saved synthetic set (SyntheticCalib.save) for that loss instead of generating; "
                         "the table notes the settings stored in the file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic and noise sets")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--section", default=None, help="markdown section to (re)write (default: methods or "
                    "sources; accuracy.md's full-split W8A8 table is section methods_full)")
    ap.add_argument("--out", default=str(HERE / "accuracy.md"))
    args = ap.parse_args()
    con = Console()
    torch.manual_seed(0)
    out = Path(args.out)
    bits = args.bits or ("8/8,4/8,4/4" if args.sources else "8/8,6/6,4/8,4/4")

    model = of.models.reference_model()
    calib = list(image_loader(model, args.calib, batch_size=100, labels=False))
    n_calib = sum(len(b) for b in calib)
    fp = of.evaluate(model, args.val, batch_size=250, limit_per_class=args.limit_per_class, description="FP32")
    con.print(fp.summary("FP32"))
    pairs = [tuple(int(v) for v in p.split("/")) for p in bits.split(",")]
    wanted = args.columns.split(",") if args.columns else None
    cmd = "python benchmarks/accuracy.py" + (" --sources" if args.sources else "") + (" --state" if args.state else "") + \
        (f" --limit-per-class {args.limit_per_class}" if args.limit_per_class else "") + \
        (f" --bits {args.bits}" if args.bits else "") + (f" --columns {args.columns}" if args.columns else "") + \
        "".join(f" --gen-file {g.split('=', 1)[0]}=<dir>/{Path(g.split('=', 1)[1]).name}" for g in args.gen_file)
    env = (f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), load "
           f"average at start {os.getloadavg()[0]:.1f}")

    def measure(results: dict, row: str, col: str, cfg: of.QuantConfig, calib_data) -> None:
        """Convert with ``cfg`` on ``calib_data``, evaluate, print and store (top-1, agreement)."""
        q = of.convert(model, calib=calib_data, config=cfg, show_progress=False)
        r = of.evaluate(q, args.val, batch_size=250, limit_per_class=args.limit_per_class,
                        transform_model=model, description=f"{row} {col}")
        results.setdefault(row, {})[col] = (r.top1, r.agreement(fp))
        con.print(f"{row} {col:<24} top-1 {r.top1:6.2f}  (FP {fp.top1:.2f}, agreement {r.agreement(fp):.2f}%)")

    def header(title: str, done: bool, start: float) -> list[str]:
        return [title, "", ("" if done else "**Partial: the run was stopped before every cell was measured.**\n\n") +
                f"Command: `{cmd}`  ", env + f"; {time.time() - start:.0f} s for the quantized cells.", ""]

    if args.sources:
        real = torch.cat(calib)
        pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))[:128]
        c, h, w = model.pretrained_cfg["input_size"]
        sources = {"real (all)": lambda: calib, "real (128)": lambda: real[pick]}
        gen_notes = {}
        files = dict(g.split("=", 1) for g in args.gen_file)
        for loss, col in (("full", "gen (full)"), ("output", "gen (output only)"),
                          ("contrastive", "gen (contrastive only)")):
            def make(loss=loss, col=col):
                synth = of.SyntheticCalib.load(files[loss]) if loss in files else synthetic(model, loss, 128, args.seed, Path(args.gen_cache) if args.gen_cache else None,
                                  args.quiet)
                st = synth.settings
                gen_notes[col] = (f"{col}: loss={st['loss']}, {st['iters']} iterations, lr {st['lr']}, "
                                  f"T {st['temperature']}, top-K {st['top_k']}, {st['neighbourhood']}x"
                                  f"{st['neighbourhood']} neighbourhood, lambda_c {st['lambda_c']}, batch "
                                  f"{st['batch_size']}, seed {st['seed']}; {st['seconds'] / 60:.1f} min wall time "
                                  f"to generate on the machine as it was then (quiet-machine cost: "
                                  f"benchmarks/gen_time.md); the model classifies {100 * st['target_accuracy']:.0f}% of "
                                  f"them as their target class")
                return synth
            sources[col] = make
        sources["Gaussian noise (128)"] = lambda: torch.randn(128, c, h, w, generator=torch.Generator().manual_seed(args.seed))
        cols = [k for k in sources if not wanted or k in wanted]
        data = {k: sources[k]() for k in cols}
        results: dict[str, dict] = {}
        start = time.time()
        for w, a in pairs:
            cfg = of.PRESETS.get(f"W{w}A{a}") or of.PRESETS[f"W{w}A{a}O8"]
            for col in cols:
                measure(results, cfg.name, col, cfg, data[col])
                done = sum(len(v) for v in results.values()) == len(pairs) * len(cols)
                write_section(out, args.section or "sources", table_md(
                    header("## Calibration source: real images vs data-free", done, start) + [
                     f"Top-1 (%) on {fp.total} val images, each row the preset of that bit-width "
                     f"(`ouromamba_fx.PRESETS`); columns: where the calibration images came from. In "
                     f"brackets: top-1 agreement with FP32.", ""],
                    results, cols, fp.top1,
                    ["Sources: real (all) = the 1,000 calibration images; real (128) = 128 of them at random; "
                     "gen = `ouromamba_fx.gen(model, n=128, loss=...)` (OuroMamba-Gen from Gaussian noise, "
                     "no real image seen); Gaussian noise = 128 N(0, 1) images in the model's normalised "
                     "input space.", ""] + [f"- {v}" for v in gen_notes.values()]))
        con.print(f"wrote {out}")
        return

    if args.state:
        cols = {k: v for k, v in state_methods().items() if not wanted or k in wanted}
        results: dict[str, dict] = {}
        start = time.time()
        for col, cfg in cols.items():
            measure(results, "W8A8", col, cfg, calib)
            write_section(out, args.section or "state", table_md(
                header("## Scan hidden-state quantization at W8A8 (real calibration)", len(results["W8A8"]) == len(cols),
                       start) + [
                 f"Top-1 (%) on {fp.total} held-out val images; calibration on {n_calib} real training images. "
                 "In brackets: top-1 agreement with the FP32 model.", ""],
                results, list(cols), fp.top1, STATE_NOTES))
        con.print(f"wrote {out}")
        return

    results = {}
    start = time.time()
    plan = {f"W{w}A{a}{'O8' if (w, a) == (4, 4) else ''}":
            {k: v for k, v in methods(w, a).items() if not wanted or k in wanted} for w, a in pairs}
    all_cols = list(dict.fromkeys(c for cols in plan.values() for c in cols))
    total = sum(len(cols) for cols in plan.values())
    for row, cols in plan.items():
        for col, cfg in cols.items():
            measure(results, row, col, cfg, calib)
            done = sum(len(v) for v in results.values()) == total
            write_section(out, args.section or "methods", table_md(
                header("## Methods by bit-width (real calibration)", done, start) + [
                 f"Top-1 (%) on {fp.total} held-out val images (`shared/data/cifar10/val`); calibration on "
                 f"{n_calib} real training images (`shared/data/cifar10/calib`). In brackets: top-1 "
                 f"agreement with the FP32 model.", ""],
                results, all_cols, fp.top1, METHOD_NOTES))
    con.print(f"wrote {out}")


STATE_NOTES = [
    "Columns: the W8A8 preset (8-bit per-channel weights, 8-bit static per-step activations with the "
    "clipping search, conv1d and scan inputs quantized) with the scan's hidden state in float, then "
    "quantized to 8 bits (`QuantConfig.reparam = Reparam(8, factors=..., granularity=...)`): 'reparam' = "
    "k-scaled PTQ's rank-1 reparameterization h' = h / (r_C r_L r_N) with r_N folded into x_proj; "
    "'no reparam' = the state quantized as it is; scales are the calibrated max of |h'| / 127, one per "
    "time-step, per time-step and d_inner channel, or per time-step and d_state index.", ""]


METHOD_NOTES = [
    "Methods:", "",
    "- RTN per-tensor: min-max per-channel weights; one min-max scale per activation tensor on the "
    "inputs of in_proj, x_proj, dt_proj, out_proj; conv1d and scan in float.",
    "- per-token static (PTQ4VM-style): Lp-clipped (p=2.4) per-channel weights; one static min-max "
    "scale per token position on the same linear inputs; conv1d and scan in float.",
    "- ours: the preset of that bit-width (`ouromamba_fx.PRESETS`): Lp-clipped weights of all linears "
    "and conv1d; every linear input, conv1d input and the scan's delta, B, C quantized with static "
    "per-step scales from an MSE clipping search; plus, where the preset has them, OuroMamba-Quant "
    "outlier channels (run-time, per time-step; 8-bit, or kept 16-bit for W4A8). W4A4 is W4A4O8.",
    "- ours w/o X / ours + X: the same preset with technique X switched off / on: outliers "
    "(OuroMamba-Quant, 8-bit outliers at A4 and A8, 16-bit at W4A8), kscale (k-scaled PTQ: k=4 "
    "grouped static scales per tensor, cosine search), reparam (scan hidden state reparameterized, "
    "r_N folded into x_proj, state quantized to 8 bits per time-step), refine (block-wise "
    "refinement of the weight scales after the clipping search, `QuantConfig.refine = Refine()`: "
    f"Adam on 1 - cos of each mixer's output, straight-through rounding; `{of.Refine()!r}`). At W8A8, 'ours + outliers' is the `W8A8O8` preset.", ""]


if __name__ == "__main__":
    sys.exit(main())
