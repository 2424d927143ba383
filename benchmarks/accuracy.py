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
  ours w/o X, ours + X   the preset with one technique (outliers, kscale, reparam) off or on
Writes the table as markdown beside this script (accuracy.md).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    switches = (("outliers", of.OutlierQuant(8 if a <= 4 else 16)), ("kscale", of.KScale()),
                ("reparam", of.Reparam(8)))
    for field, on in switches:
        if getattr(ours, field) is not None:
            cols[f"ours w/o {field}"] = ours.replace(name=f"{ours.name}-no-{field}", **{field: None})
        else:
            cols[f"ours + {field}"] = ours.replace(name=f"{ours.name}+{field}", **{field: on})
    cols["ours"] = ours
    return cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", default=str(SHARED / "data" / "cifar10" / "val"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "cifar10" / "calib"))
    ap.add_argument("--limit-per-class", type=int, default=None)
    ap.add_argument("--bits", default="8/8,6/6,4/8,4/4", help="comma-separated W/A pairs")
    ap.add_argument("--columns", default=None, help="comma-separated subset of the method columns")
    ap.add_argument("--out", default=str(HERE / "accuracy.md"))
    args = ap.parse_args()
    con = Console()
    torch.manual_seed(0)

    model = of.models.reference_model()
    calib = list(image_loader(model, args.calib, batch_size=100, labels=False))
    n_calib = sum(len(b) for b in calib)
    fp = of.evaluate(model, args.val, batch_size=250, limit_per_class=args.limit_per_class, description="FP32")
    con.print(fp.summary("FP32"))

    pairs = [tuple(int(v) for v in p.split("/")) for p in args.bits.split(",")]
    wanted = args.columns.split(",") if args.columns else None
    results: dict[tuple[int, int], dict[str, tuple[float, float]]] = {}
    start = time.time()
    for w, a in pairs:
        results[(w, a)] = {}
        for col, cfg in methods(w, a).items():
            if wanted and col not in wanted:
                continue
            q = of.convert(model, calib=calib, config=cfg, show_progress=False)
            r = of.evaluate(q, args.val, batch_size=250, limit_per_class=args.limit_per_class,
                            transform_model=model, description=f"W{w}A{a} {col}")
            results[(w, a)][col] = (r.top1, r.agreement(fp))
            con.print(f"W{w}A{a} {col:<18} top-1 {r.top1:6.2f}  (FP {fp.top1:.2f}, agreement {r.agreement(fp):.2f}%)")

    cols = [c for c in dict.fromkeys(c for row in results.values() for c in row)]
    table = Table(title=f"Top-1 (%) on {fp.total} val images; calibration: {n_calib} real images")
    table.add_column("bits")
    for c in cols:
        table.add_column(c, justify="right")
    table.add_row("FP32", *[f"{fp.top1:.2f}"] * len(cols))
    for (w, a), row in results.items():
        table.add_row(f"W{w}A{a}", *[f"{row[c][0]:.2f}" if c in row else "-" for c in cols])
    con.print(table)

    lines = [
        "# Accuracy: quantized reference Vim (CIFAR-10, d=128, depth 8)", "",
        f"Command: `python benchmarks/accuracy.py"
        + (f" --limit-per-class {args.limit_per_class}" if args.limit_per_class else "")
        + (f" --bits {args.bits}" if args.bits != "8/8,6/6,4/8,4/4" else "")
        + (f" --columns {args.columns}" if args.columns else "") + "`", "",
        f"Top-1 (%) on {fp.total} held-out val images (`shared/data/cifar10/val`); calibration on "
        f"{n_calib} real training images (`shared/data/cifar10/calib`). In brackets: top-1 agreement "
        f"with the FP32 model. torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads; {time.time() - start:.0f} s for the quantized rows.", "",
        "| bits | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols),
        f"| FP32 | " + " | ".join(f"{fp.top1:.2f}" for _ in cols) + " |",
    ]
    for (w, a), row in results.items():
        lines.append(f"| W{w}A{a}{'O8' if (w, a) == (4, 4) else ''} | " + " | ".join(
            f"{row[c][0]:.2f} ({row[c][1]:.1f})" if c in row else "-" for c in cols) + " |")
    lines += ["", "Methods:", "",
              "- RTN per-tensor: min-max per-channel weights; one min-max scale per activation tensor "
              "on the inputs of in_proj, x_proj, dt_proj, out_proj; conv1d and scan in float.",
              "- per-token static (PTQ4VM-style): Lp-clipped (p=2.4) per-channel weights; one static "
              "min-max scale per token position on the same linear inputs; conv1d and scan in float.",
              "- ours: the preset of that bit-width (`ouromamba_fx.PRESETS`): Lp-clipped weights of all "
              "linears and conv1d; every linear input, conv1d input and the scan's delta, B, C "
              "quantized; plus, where the preset has them, OuroMamba-Quant outlier channels (run-time, "
              "per time-step; 8-bit, or kept 16-bit for W4A8), k-scaled static scales (k=4) and the "
              "scan-state reparameterization with an 8-bit state folded into x_proj. W4A4 is W4A4O8.",
              "- ours w/o X: the same preset with technique X switched off.", ""]
    Path(args.out).write_text("\n".join(lines))
    con.print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
