"""Top-1 of VMamba, MambaVision and Mamba-stack CIFAR-10 checkpoints, float and quantized.

    python benchmarks/accuracy_families.py --ckpt vmamba_v2_cifar.pt              # all 5,000 val images
    python benchmarks/accuracy_families.py --ckpt mambavision_cifar.pt --limit-per-class 50

The checkpoints are what ``tools/train_cifar.py`` writes (``ouromamba_fx.models.families.load``
reads them). Rows: FP32; the two baselines of the Vim table (benchmarks/accuracy.md), here over
every linear and conv layer the families have (``ouromamba_fx.W8A8_RTN``: per-tensor min-max,
``ouromamba_fx.W8A8_PER_TOKEN``: PTQ4VM-style per-token min-max; scan and conv1d in float);
the presets W8A8, W4A8 (W4A8O16) and W4A4O8. Columns: calibration on real images
(``--calib-n`` of ``shared/data/cifar10/calib``) and data-free (OuroMamba-Gen, ``--gen-n`` images,
no real image seen). In brackets: top-1 agreement with FP32.

Writes one markdown section per checkpoint into ``accuracy_families.md`` beside this script after
every measured cell (a stopped run leaves the cells it finished, marked partial).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

import ouromamba_fx as of
from ouromamba_fx.gen import GenConfig
from ouromamba_fx.data import image_loader
from ouromamba_fx.models import families

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
ROWS = {"W8A8-RTN": of.W8A8_RTN, "W8A8-per-token": of.W8A8_PER_TOKEN, "W8A8": of.W8A8, "W4A8": of.W4A8,
        "W4A4O8": of.W4A4O8}


def write_section(path: Path, key: str, text: str) -> None:
    """Replace the section between ``<!-- key -->`` markers in ``path`` (or append it)."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    old = path.read_text() if path.exists() else "# Accuracy of the VMamba / MambaVision / Mamba-stack families\n\n"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old + ("\n" if not old.endswith("\n\n") else "") + block
    path.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint tools/train_cifar.py wrote")
    ap.add_argument("--val", default=str(SHARED / "data" / "cifar10" / "val"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "cifar10" / "calib"))
    ap.add_argument("--limit-per-class", type=int, default=None, help="val images per class (default: all)")
    ap.add_argument("--calib-n", type=int, default=256, help="real calibration images")
    ap.add_argument("--gen-n", type=int, default=GenConfig.n, help="OuroMamba-Gen images (data-free column; "
                    "default: the library's)")
    ap.add_argument("--gen-iters", type=int, default=GenConfig.iters)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--no-data-free", action="store_true", help="real calibration only")
    ap.add_argument("--out", default=str(HERE / "accuracy_families.md"))
    args = ap.parse_args()
    con = Console(stderr=True)
    model = families.load(args.ckpt).eval()
    name = Path(args.ckpt).stem
    out = Path(args.out)
    env = (f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), load average "
           f"at start {os.getloadavg()[0]:.1f}")
    cmd = (f"python benchmarks/accuracy_families.py --ckpt checkpoints/{Path(args.ckpt).name}"
           + (f" --limit-per-class {args.limit_per_class}" if args.limit_per_class else "")
           + (f" --calib-n {args.calib_n}" if args.calib_n != 256 else "")
           + ("" if args.no_data_free or (args.gen_n, args.gen_iters) == (GenConfig.n, GenConfig.iters)
              else f" --gen-n {args.gen_n} --gen-iters {args.gen_iters}")
           + (" --no-data-free" if args.no_data_free else "")
           + (f" --rows {args.rows}" if args.rows != ",".join(ROWS) else ""))
    real = []
    n = 0
    for b in image_loader(model, args.calib, batch_size=64, labels=False):
        real.append(b[: args.calib_n - n])
        n += len(real[-1])
        if n >= args.calib_n:
            break
    fp = of.evaluate(model, args.val, batch_size=250, limit_per_class=args.limit_per_class, description="FP32",
                     show_progress=False)
    con.print(f"{name}: FP32 top-1 {fp.top1:.2f} on {fp.total} images")
    cols = {"real": lambda: real}
    gen_note = ""
    if not args.no_data_free:
        synth_cache = {}

        def synthetic():
            if "s" not in synth_cache:
                t = time.time()
                synth_cache["s"] = of.gen(model, n=args.gen_n, iters=args.gen_iters, show_progress=False)
                synth_cache["t"] = time.time() - t
            return synth_cache["s"]
        cols["data-free (OuroMamba-Gen)"] = synthetic
    results: dict[str, dict[str, tuple[float, float]]] = {}
    rows = [r for r in args.rows.split(",") if r]
    start = time.time()
    total = len(rows) * len(cols)
    for row in rows:
        for col, data in cols.items():
            if col != "real" and row in ("W8A8-RTN", "W8A8-per-token"):
                continue  # the baselines: real calibration only, as in the Vim table
            t = time.time()
            q = of.convert(model, calib=data(), config=ROWS[row], show_progress=False)
            r = of.evaluate(q, args.val, batch_size=250, limit_per_class=args.limit_per_class, transform_model=model,
                            description=f"{row} {col}", show_progress=False)
            results.setdefault(row, {})[col] = (r.top1, r.agreement(fp))
            cov = q.coverage
            con.print(f"{row:<15} {col:<26} top-1 {r.top1:6.2f} (FP {fp.top1:.2f}, agreement {r.agreement(fp):.2f}%)"
                      f"  {sum(c.quantized for c in cov.values())}/{len(cov)} modules quantized, {time.time() - t:.0f} s")
            if "t" in locals().get("synth_cache", {}) and not gen_note:
                st = synth_cache["s"].settings
                gen_note = (f"Data-free: `ouromamba_fx.gen(model, n={args.gen_n}, iters={args.gen_iters})` "
                            f"(loss {st.get('loss')}), {synth_cache['t'] / 60:.1f} min on the machine as it was; the "
                            f"model classifies {100 * st.get('target_accuracy', float('nan')):.0f}% of them as their "
                            f"target class.")
            done = sum(len(v) for v in results.values()) == total - 2 * (len(cols) - 1)
            lines = [f"## {name}", "",
                     ("" if done else "**Partial: the run was stopped (or is still running) before every cell "
                      "was measured.**\n\n") + f"Command: `{cmd}`  ",
                     f"{env}; {time.time() - start:.0f} s for the quantized cells.", "",
                     f"Top-1 (%) on {fp.total} val images; FP32 **{fp.top1:.2f}**. Real calibration: {n} images of "
                     f"`shared/data/cifar10/calib`. In brackets: top-1 agreement with FP32.", "",
                     "| config | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            for rname in rows:
                if rname not in results:
                    continue
                cells = [f"{results[rname][c][0]:.2f} ({results[rname][c][1]:.1f})" if c in results[rname] else "-"
                         for c in cols]
                lines.append(f"| {rname} | " + " | ".join(cells) + " |")
            lines += ["", "W8A8-RTN / W8A8-per-token: the Vim table's two baselines over every linear and conv "
                      "layer (scan and conv1d in float); W8A8, W4A8 (outliers kept 16-bit), W4A4O8: the presets "
                      "(every mixer input incl. the scan's delta/B/C, MLP, attention qkv/proj, stem, downsampling "
                      "and conv-stage convs; head float; W4A4O8 keeps the stem, downsampling and conv-stage "
                      "inputs at 8 bits without outlier channels).", ""] + ([gen_note] if gen_note else [])
            write_section(out, name, "\n".join(lines))
    con.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
