"""Time the integer linear ops on this CPU against float ``F.linear``, and write ``ops_cpu.md``.

    python benchmarks/ops_cpu.py [--rounds 25] [--threads 2,1] [--out benchmarks/ops_cpu.md] [--wait-load L]

Shapes: Vim-small-like linears (M = 16 images x 197 tokens) and the reference model's
(M = 64 x 65). Variants, all producing float32 (M, N) from the same inputs:

* ``fp32``: ``F.linear`` on float32 x, W, bias.
* ``bf16``: ``F.linear`` on bfloat16 x, W, bias (inputs already bf16; the casts are not timed).
* ``w8a8``: ``ouromamba::w8a8_linear`` on float32 x (per-token quantization included).
* ``int8 GEMM``: ``ouromamba::int8_linear`` on pre-quantized x (GEMM + dequant epilogue).
* ``_int_mm``: the bare ``torch._int_mm`` (int32 out), to show what the epilogue costs.
* ``prepacked``: the same product on oneDNN's matmul with the weight prepacked once, float32 out
  (:func:`ouromamba_fx.ops.gemm.s8_mm`; x86 only, elsewhere the column times an empty call; exact
  for 8-bit codes only on CPUs with VNNI / AMX).
* ``fp32 of codes``: the same product as an exact fp32 GEMM of the codes (:func:`ouromamba_fx.ops.gemm.float_mm`,
  the emulated mode's product before ``s16``).
* ``s16``: the same product on this package's AVX2 int16 kernel with the weight packed once, float32
  out (``ouromamba::s16_mm``, the lowered W8A8 graph's product on CPUs without VNNI / AMX; an empty
  call where the kernels have no AVX2).
* ``u4``: W4A4O8's inlier product alone on this package's AVX2 kernel: 4-bit codes (stored + 8)
  times the int4 weight laid out once, int32 out (``u4_mm``, what the lowered W4A4O8 linears run on
  CPUs without VNNI / AMX; an empty call where the kernels have no AVX2).
* ``w4a4o8``: ``ouromamba::w4a4o8_linear`` on float32 x with ~2 % outlier channels (the same
  channels in every row, as outlier channels are), packed int4 weight unpacked per call.
* ``w4a4o8 scattered``: the same op with ~2 % outliers scattered at random per row (their union
  covers most columns, so the outlier GEMM runs over all of K): the worst case.
* ``w4a4o8_rt``: ``ouromamba::w4a4o8_linear_rt``, the op the lowering emits: the outlier rule, the
  split and the quantization in one pass, the inlier GEMM on the int4 weights unpacked and laid out
  once (on x86 CPUs with VNNI/AMX oneDNN's matmul on the prepacked weight), each token's outliers
  added in the epilogue. x as (images, tokens, K), step scales from the inliers' range.

The machine may be shared: variants are timed round-robin (one call of each per round, after a
warm-up), so a burst of load hits all of them alike; the tables give the median over rounds, and
the load average is recorded. A second table compares the ways of running the W4A4O8 integer
products (two GEMMs, one GEMM over the concatenated 2M rows, or the outlier GEMM over the outlier
columns only), which is how the op's CPU path was chosen.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ouromamba_fx.ops import gemm  # noqa: E402
from ouromamba_fx.ops.int4 import pack_int4, unpack_int4  # noqa: E402

OPS = torch.ops.ouromamba
SHAPES = [  # (label, M, K, N)
    ("Vim-S in_proj", 16 * 197, 384, 1536),
    ("Vim-S out_proj", 16 * 197, 768, 384),
    ("Vim-S x_proj", 16 * 197, 768, 56),
    ("ref in_proj", 64 * 65, 128, 512),
    ("ref out_proj", 64 * 65, 256, 128),
    ("ref x_proj", 64 * 65, 256, 40),
]
OUTLIER_FRACTION = 0.02
TOKENS = {"Vim-S": 197, "ref": 65}  # time steps per image, by the shape label's first word


def time_round_robin(fns: dict, rounds: int, warmup: int = 3) -> dict:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}, {
        name: min(ts) * 1e3 for name, ts in times.items()}


def make_case(m: int, k: int, n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = torch.randn(n, generator=g)
    n_out = max(1, round(OUTLIER_FRACTION * k))
    channels = torch.randperm(k, generator=g)[:n_out]
    mask_ch = torch.zeros(m, k, dtype=torch.bool)
    mask_ch[:, channels] = True
    mask_sc = torch.rand(m, k, generator=g) < OUTLIER_FRACTION
    x = torch.where(mask_ch, x * 20, x)
    w8_scale = w.abs().amax(dim=1) / 127
    w8 = torch.round(w / w8_scale[:, None]).to(torch.int8)
    w4_scale = w.abs().amax(dim=1) / 7
    w4 = torch.round(w / w4_scale[:, None]).clamp(-7, 7).to(torch.int8)
    return dict(x=x, w=w, bias=bias, mask_ch=mask_ch, mask_sc=mask_sc, w8=w8, w8_scale=w8_scale,
                w4=w4, w4_packed=pack_int4(w4), w4_scale=w4_scale)


def u4_product(x_q, w4):
    """A call of the AVX2 int4 kernel on 4-bit codes of x (x_q clamped to [-7, 7], stored + 8) and
    the weight laid out once; an empty call where the kernels have no AVX2 (``u4_mm`` needs the
    same build as ``s16_mm``: :func:`ouromamba_fx.ops.gemm.s16`)."""
    from ouromamba_fx.kernels.cpu.build import MIXER_OPS

    if not gemm.s16():
        return lambda: None
    ext = MIXER_OPS.get()
    panels, colsum = ext.u4_pack(w4)
    a = (x_q.clamp(-7, 7) + 8).to(torch.uint8)
    return lambda: ext.u4_mm(a, panels, colsum)


def bench_ops(c: dict, rounds: int, steps: int) -> dict:
    x, w, bias = c["x"], c["w"], c["bias"]
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    x_q, x_s = OPS.quantize_per_token(x, 8)
    k = x.shape[1]
    x3 = x.view(-1, steps, k)
    # static step scales: half the inliers' largest magnitude per step, over 7 levels
    s_steps = (x3.masked_fill(c["mask_ch"].view(x3.shape), 0).abs().amax(-1).mean(0) / 14).contiguous()
    fns = {
        "fp32": lambda: F.linear(x, w, bias),
        "bf16": lambda: F.linear(xb, wb, bb),
        "w8a8": lambda: OPS.w8a8_linear(x, c["w8"], c["w8_scale"], bias, None),
        "int8 GEMM": lambda: OPS.int8_linear(x_q, x_s, c["w8"], c["w8_scale"], bias),
        "_int_mm": lambda: torch._int_mm(x_q, c["w8"].t()),
        # the same product on oneDNN's matmul with the weight prepacked once (float32 out), x86 only
        "prepacked": (lambda: gemm.s8_mm(x_q, lambda: c["w8"], c["w8"])) if gemm.onednn_s8() else (lambda: None),
        # the exact products of the emulated mode (CPUs without VNNI / AMX): an fp32 GEMM of the
        # codes, and this package's AVX2 int16 kernel on the weight packed once (float32 out)
        "fp32 of codes": lambda: gemm.float_mm(x_q, c["w8"], 127, 127),
        "s16": (lambda: gemm.S16_MM_OP(x_q, c["w8"], 0, 0)) if gemm.s16() else (lambda: None),
        "u4": u4_product(x_q, c["w4"]),
        "w4a4o8": lambda: OPS.w4a4o8_linear(x, c["mask_ch"], None, c["w4_packed"], c["w4_scale"], bias, k),
        "w4a4o8 scattered": lambda: OPS.w4a4o8_linear(x, c["mask_sc"], None, c["w4_packed"], c["w4_scale"],
                                                      bias, k),
        "w4a4o8_rt": lambda: OPS.w4a4o8_linear_rt(x3, s_steps, c["w4_packed"], c["w4_scale"], bias, k, 3.0, 4),
    }
    return time_round_robin(fns, rounds)


def bench_w4_strategies(c: dict, rounds: int) -> dict:
    """Integer products only (quantized operands ready): the candidates for the W4A4O8 CPU path.

    Every candidate is timed up to float accumulators, as the epilogue needs them: an int8 GEMM
    pays an int32 -> float pass that the fp32 GEMM (exact for these small integers) does not.
    """
    x, mask, k = c["x"], c["mask_ch"], c["x"].shape[1]
    q_in, _, q_out, _ = OPS.outlier_split(x, mask, None, 4)
    w4 = c["w4"]
    cols = mask.view(torch.uint8).amax(dim=0).nonzero().flatten()
    q_out_cols = q_out[:, cols].contiguous()
    key = torch.zeros(1)  # the cache key of the prepacked weight
    fns = {
        "unpack int4": lambda: unpack_int4(c["w4_packed"], k),
        "inlier GEMM": lambda: torch._int_mm(q_in, w4.t()).float(),
        "two GEMMs": lambda: (torch._int_mm(q_in, w4.t()).float(), torch._int_mm(q_out, w4.t()).float()),
        "one GEMM on [q_in; q_out]": lambda: torch._int_mm(torch.cat([q_in, q_out]), w4.t()).float(),
        "inlier GEMM + gathered outlier GEMM": lambda: (torch._int_mm(q_in, w4.t()).float(),
                                                        torch._int_mm(q_out_cols, w4[:, cols].t()).float()),
        "inlier GEMM + gathered outlier fp32 GEMM": lambda: (torch._int_mm(q_in, w4.t()).float(),
                                                             q_out_cols.float() @ w4[:, cols].float().t()),
    }
    if gemm.onednn_s8():  # x86: oneDNN's matmul on the weight prepacked once (AMX where the CPU has it)
        fns["inlier GEMM, oneDNN prepacked"] = lambda: gemm.s8_mm(q_in, lambda: w4, key)
    return time_round_robin(fns, rounds)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def section(threads: int, rounds: int) -> tuple[list[str], str]:
    """Time every shape with ``threads`` torch threads; return markdown lines and a one-line summary."""
    torch.set_num_threads(threads)
    print(f"torch.get_num_threads() = {torch.get_num_threads()}")
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    op_cols = ["fp32", "bf16", "w8a8", "int8 GEMM", "_int_mm", "prepacked", "fp32 of codes", "s16", "u4",
               "w4a4o8", "w4a4o8 scattered", "w4a4o8_rt"]
    rows, strat_rows = [], []
    for label, m, k, n in SHAPES:
        c = make_case(m, k, n)
        t, t_min = bench_ops(c, rounds, TOKENS[label.split()[0]])
        s, _ = bench_w4_strategies(c, rounds)
        rows.append((label, m, k, n, t, t_min))
        strat_rows.append((label, int(c["mask_ch"][0].sum()), k, s))
        print(f"  {label:15s} M={m} K={k} N={n}: " + ", ".join(f"{name} {t[name]:.2f}" for name in op_cols) + " ms")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    lines = [
        f"## `torch.get_num_threads()` = {torch.get_num_threads()}",
        "",
        f"Load average (1 min) at start / end of this section: {load0:.2f} / {load1:.2f}.",
        "",
        "### Time per call (ms): median / best of the rounds",
        "",
        "| shape | M | K | N | " + " | ".join(op_cols) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(op_cols),
    ]
    for label, m, k, n, t, t_min in rows:
        lines.append(f"| {label} | {m} | {k} | {n} | "
                     + " | ".join(f"{t[c]:.2f} / {t_min[c]:.2f}" for c in op_cols) + " |")
    ratio_cols = ["w8a8", "int8 GEMM", "s16", "u4", "w4a4o8", "w4a4o8 scattered", "w4a4o8_rt"]
    lines += [
        "",
        "### Speed-up (median time of the float linear / median time of the op; > 1 is faster)",
        "",
        "| shape | " + " | ".join(f"{c} vs fp32 | {c} vs bf16" for c in ratio_cols) + " |",
        "|---|" + "---:|" * (2 * len(ratio_cols)),
    ]
    empty = {"s16": not gemm.s16(), "u4": not gemm.s16()}  # columns that time an empty call here
    for label, m, k, n, t, _ in rows:
        cells = []
        for c in ratio_cols:
            cells += ["n/a", "n/a"] if empty.get(c) else [f"{t['fp32'] / t[c]:.2f}", f"{t['bf16'] / t[c]:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    strat_cols = list(strat_rows[0][3])
    lines += [
        "",
        "### W4A4O8 integer products: candidate CPU paths (median ms, quantized operands given, float accumulators out)",
        "",
        "| shape | outlier channels | " + " | ".join(strat_cols) + " |",
        "|---|---:|" + "---:|" * len(strat_cols),
    ]
    for label, n_out, k, s in strat_rows:
        lines.append(f"| {label} | {n_out} of {k} | " + " | ".join(f"{s[c]:.2f}" for c in strat_cols) + " |")
    lines += ["", "### Reading", ""]
    for (label, m, k, n, t, _), (*_, s) in zip(rows, strat_rows):
        cands = {c: s[c] for c in strat_cols if c not in ("unpack int4", "inlier GEMM", "inlier GEMM, oneDNN prepacked")}
        best = min(cands, key=cands.get)
        # (where _int_mm is torch's reference loop, the op does not run it: no epilogue share to read)
        epi = ("n/a (torch._int_mm is a reference loop here)" if gemm.emulated(torch.device("cpu")) else
               f"{100 * (t['int8 GEMM'] - t['_int_mm']) / t['int8 GEMM']:.0f} % of the int8 GEMM op")
        lines.append(
            f"- {label}: dequant epilogue = {epi}; "
            f"quantization = {100 * (t['w8a8'] - t['int8 GEMM']) / t['w8a8']:.0f} % of w8a8; "
            f"int4 unpack = {100 * s['unpack int4'] / t['w4a4o8']:.0f} % of w4a4o8; fastest W4A4O8 product: {best}.")
    return lines, f"threads={threads}, load {load0:.2f}->{load1:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=25, help="timed rounds per shape (median reported)")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts, one section each (default: torch's default)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ops_cpu.md")
    p.add_argument("--wait-load", type=float, default=None, metavar="L",
                   help="on a shared machine: first wait (up to 30 min) until the 1-min load average is below L")
    args = p.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    if args.wait_load is not None and hasattr(os, "getloadavg"):
        deadline = time.time() + 1800
        while os.getloadavg()[0] >= args.wait_load and time.time() < deadline:
            time.sleep(10)
    print(f"torch {torch.__version__}, {cpu_name()}, default torch.get_num_threads() = {torch.get_num_threads()}")

    cmd = "python benchmarks/ops_cpu.py" + (f" --rounds {args.rounds}" if args.rounds != 25 else "") + (
        f" --threads {args.threads}" if args.threads else "") + (
        f" --wait-load {args.wait_load:g}" if args.wait_load is not None else "")
    lines = [
        "# Integer linear ops on CPU",
        "",
        f"Produced by `{cmd}` (from the repository root) on {datetime.date.today().isoformat()}.",
        "",
        f"- torch {torch.__version__}, CPU: {cpu_name()} ({os.cpu_count()} logical CPUs)",
        f"- median of {args.rounds} round-robin rounds per shape, milliseconds per call, float32 output",
        f"- outliers: {OUTLIER_FRACTION:.0%} of the K channels (at least one); `w4a4o8` = the same channels "
        "in every row, `w4a4o8 scattered` = random per row",
        "- the CPU path of `w4a4o8_linear` (see `ouromamba_fx/ops/w4a4o8_linear.py`) runs the inlier GEMM over "
        "all K and the outlier GEMM over the gathered outlier columns when they are at most half of K "
        "(as an fp32 GEMM, exact for these integers; otherwise over all K, i.e. two int8 GEMMs); the int4 weight is "
        "unpacked on every call",
        "",
    ]
    for threads in thread_counts:
        sec, summary = section(threads, args.rounds)
        lines += sec + [""]
        print(summary)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
