"""Time the lowering's integer Conv2d against the float conv it replaces, on this CPU.

    python benchmarks/conv2d_cpu.py [--batch 16] [--rounds 9] [--threads 2] [--out FILE.md]

Shapes: the dense 3x3 convs of MambaVision-T and VMamba-T (224 px): stems, conv stages and
downsamplings. Variants, each from the same float input (B, C, H, W) with a static symmetric int8
scale per image row (what the reference graph's ``per_token`` conv inputs get) to the float output:

* ``float``: ``F.conv2d(fake_quantize(x), w_dequantized)`` -- what the lowering keeps for a conv
  it does not take (oneDNN fp32 conv);
* ``int8``: :func:`ouromamba_fx.ops.int8_conv2d.int8_conv2d_decomposed` (im2col of the int8 codes,
  ``torch._int_mm``, per-row epilogue);

each eager and compiled (the function traced by ``make_fx`` and compiled by Inductor, as the
``ouromamba`` backend compiles the lowered graph). Round-robin timing: one call of each variant
per round after two warm-up calls; medians of wall time and of process CPU time (the steadier
measure on a shared machine). The last column, compiled float / compiled int8 CPU time, is what
``conv2d_min_k`` (the lowering's threshold on one kernel row's reduction ``KW * C``) is set from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_latency import cpu_features, cpu_name  # noqa: E402 (this folder is on sys.path when a script here runs)
from ouromamba_fx.ops import gemm  # noqa: E402
from ouromamba_fx.ops.int8_conv2d import conv_weight_rows, int8_conv2d_decomposed  # noqa: E402
from ouromamba_fx.ops.quant import fake_quantize  # noqa: E402

SHAPES = [  # (label, C, H (= W), N, stride)
    ("MambaVision-T stem 1", 3, 224, 32, 2),
    ("MambaVision-T stem 2", 32, 112, 80, 2),
    ("MambaVision-T stage 0 conv", 80, 56, 80, 1),
    ("MambaVision-T downsample 0", 80, 56, 160, 2),
    ("MambaVision-T stage 1 conv", 160, 28, 160, 1),
    ("MambaVision-T downsample 1", 160, 28, 320, 2),
    ("MambaVision-T downsample 2", 320, 14, 640, 2),
    ("VMamba-T stem 2", 48, 112, 96, 2),
    ("VMamba-T downsample 0", 96, 56, 192, 2),
    ("VMamba-T downsample 1", 192, 28, 384, 2),
    ("VMamba-T downsample 2", 384, 14, 768, 2),
]


def variants(b: int, c: int, h: int, n: int, s: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, h, generator=g)
    xs = torch.rand(1, 1, h, 1, generator=g) * 0.03 + 0.01
    wq = torch.randint(-127, 128, (n, c, 3, 3), dtype=torch.int8, generator=g)
    ws, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    wf, wr = wq.float() * ws.reshape(-1, 1, 1, 1), conv_weight_rows(wq)

    def flt(x, xs, wf, bias):
        return F.conv2d(fake_quantize(x, xs, torch.zeros_like(xs), -127, 127), wf, bias, s, 1)

    def i8(x, xs, wr, ws, bias):
        return int8_conv2d_decomposed(x, xs, -127, 127, wr, ws, bias, (3, 3), (s, s), (1, 1), (1, 1))

    fa, ia = (x, xs, wf, bias), (x, xs, wr, ws, bias)
    fc = torch.compile(make_fx(flt)(*fa), dynamic=False)
    ic = torch.compile(make_fx(i8)(*ia), dynamic=False)
    ref = flt(*fa)
    for f, a in ((i8, ia), (fc, fa), (ic, ia)):
        y = f(*a)
        if not torch.allclose(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item()):
            raise AssertionError("the variants disagree")
    return {"float": (flt, fa), "int8": (i8, ia), "float compiled": (fc, fa), "int8 compiled": (ic, ia)}


def time_round_robin(fns: dict, rounds: int) -> dict:
    out = {k: ([], []) for k in fns}
    for f, a in fns.values():
        for _ in range(2):
            f(*a)
    for _ in range(rounds):
        for k, (f, a) in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f(*a)
            out[k][0].append(time.perf_counter() - t)
            out[k][1].append(time.process_time() - c)
    return {k: (1e3 * statistics.median(w), 1e3 * statistics.median(c)) for k, (w, c) in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", default="", help="comma-separated substrings of the shape labels to run")
    ap.add_argument("--out", default="", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
    shapes = [sh for sh in SHAPES if not keys or any(k in sh[0] for k in keys)]
    load0 = os.getloadavg()[0]
    lines = ["# Integer Conv2d vs float conv on CPU", "",
             f"CPU: {cpu_name()} ({os.cpu_count()} CPUs; {cpu_features()}), torch {torch.__version__}. "
             f"Command: `python benchmarks/conv2d_cpu.py --batch {args.batch} --rounds {args.rounds}"
             f"{f' --threads {args.threads}' if args.threads else ''}`", "",
             f"batch {args.batch}, {torch.get_num_threads()} thread(s), {gemm.describe()}, load average at start "
             f"{load0:.2f}; median wall / CPU ms per call over {args.rounds} rounds", "",
             "| conv | KW*C | float | int8 | float compiled | int8 compiled | compiled float / int8 (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for label, c, h, n, s in shapes:
            r = time_round_robin(variants(args.batch, c, h, n, s), args.rounds)
            cell = lambda k: f"{r[k][0]:.1f} / {r[k][1]:.1f}"  # noqa: E731
            row = (f"| {label} ({c}->{n}, {h}x{h}, stride {s}) | {3 * c} | {cell('float')} | {cell('int8')} | "
                   f"{cell('float compiled')} | {cell('int8 compiled')} | "
                   f"{r['float compiled'][1] / r['int8 compiled'][1]:.2f}x |")
            lines.append(row)
            print(row, flush=True)
    lines.append(f"\nload average at end {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
