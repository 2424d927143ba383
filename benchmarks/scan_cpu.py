"""Time the fused CPU selective scan against the plain-torch reference, and write ``scan_cpu.md``.

    python benchmarks/scan_cpu.py [--rounds 15] [--ref-rounds 5] [--wait-load 1.5] [--out benchmarks/scan_cpu.md]

Compares ``ouromamba::selective_scan`` (the fused C++ kernel, :func:`selective_scan`) with
:func:`selective_scan_ref` (a loop over time on whole ``(batch, d_inner, d_state)`` tensors, with
the per-step decays and inputs built up front), in float32, for

* forward: inference, under ``torch.no_grad()``;
* forward + backward: the scan and ``out.backward(dout)`` w.r.t. every input.

The arguments are those of a Vim mixer: ``z``, ``D``, ``delta_bias`` given and
``delta_softplus=True``; A = -[1 .. d_state] per channel (Mamba's initialisation), delta_bias the
inverse softplus of a step log-uniform in [1e-3, 0.1].

The machine may be shared: both implementations are timed round-robin (one call of each per round,
after a warm-up) so bursts of load hit both alike; the table gives the median over rounds of the
wall-clock time and of the process CPU time (all threads; less sensitive to other jobs taking the
cores, though it counts OpenMP threads spinning at barriers too), and the load average is recorded (``--wait-load X`` first waits, up to ``--wait-max`` seconds, for the
1-minute load average to drop below X). ``torch.get_num_threads()`` is left at its default.

A second table repeats the comparison on one thread (``torch.set_num_threads(1)``) and gives the
minimum CPU time of the calling thread per call: not what a user sees, but nearly immune to other
jobs on a shared machine, so it shows the kernels' own cost. It adds the fused forward's state
updates per second (batch * d_inner * L * d_state per call) beside an FMA-peak estimate of the CPU
(2 FMA ports x vector lanes x the clock in /proc/cpuinfo, which is the nominal clock, not the turbo
one), and the forward of ``ouromamba::selective_scan_cl`` with ``fast_decay=True`` (the lowering
option for quantized models).

A third part times the quantized scans (forward only, ``torch.no_grad()``), on the same inputs:
the float scan (C++), ``ouromamba::selective_scan_q`` (C++; reparameterization factors and 8-bit
state scales calibrated on the inputs themselves with ``scan_state_stats`` and the reparam pass's
``rank1_factors``), ``ouromamba::selective_scan_qi`` (C++; the same, fed int8 delta / B / C codes
with per-time-step scales from ``ouromamba::quantize``) and ``selective_scan_q_ref`` (the Python
loop over time-steps), round-robin with medians as above and again on one thread
(``--q-ref-rounds`` calls of the reference, 0 skips this part).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ouromamba_fx.kernels.cpu.build import SELECTIVE_SCAN_Q  # noqa: E402
from ouromamba_fx.kernels.scan_ref import selective_scan_ref  # noqa: E402
from ouromamba_fx.ops.scan import SCAN_CHANNELS_LAST_OP, scan_backend, selective_scan  # noqa: E402
from ouromamba_fx.ops.scan_quant import scan_state_stats  # noqa: E402
from ouromamba_fx.ops.scan_quant import selective_scan_reparam_ref as selective_scan_q_ref  # noqa: E402
from ouromamba_fx.passes.reparam import rank1_factors  # noqa: E402

SHAPES = [  # (label, batch, d_inner, L, d_state)
    ("reference model (CIFAR, 8x8 patches + cls)", 64, 256, 65, 16),
    ("Vim-S-like (224px, 16x16 patches + cls)", 8, 768, 197, 16),
]


def make_inputs(batch: int, dim: int, L: int, N: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(batch, dim, L, generator=g),
        "delta": torch.randn(batch, dim, L, generator=g) * 0.5,
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, N, L, generator=g),
        "C": torch.randn(batch, N, L, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, L, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    }


def call(fn, a: dict) -> torch.Tensor:
    return fn(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], delta_softplus=True)


def forward_fn(fn, a):
    def run():
        with torch.no_grad():
            call(fn, a)
    return run


def fast_decay_fn(a):
    """The channel-contiguous forward with the lowering's fast decays (no grad)."""
    def run():
        with torch.no_grad():
            SCAN_CHANNELS_LAST_OP(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True,
                                  fast_decay=True)
    return run


def fma_peak() -> tuple[float, str]:
    """(fp32 lane-FMAs per second, how it was estimated): 2 FMA ports x lanes x nominal clock."""
    mhz, flags = 0.0, ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("cpu MHz") and not mhz:
                    mhz = float(line.split(":", 1)[1])
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    return 2 * lanes * mhz * 1e6, f"2 FMA ports x {lanes} fp32 lanes x {mhz / 1e3:.2f} GHz (/proc/cpuinfo)"


def forward_backward_fn(fn, a, dout):
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}

    def run():
        for v in leaves.values():
            v.grad = None
        call(fn, leaves).backward(dout)
    return run


STATE_BITS = 8


def make_q_inputs(a: dict, state_bits: int = STATE_BITS) -> dict:
    """Reparameterization factors, state scales and int8 delta / B / C codes calibrated on ``a``
    itself (the way the reparam and qdq passes calibrate, on one batch)."""
    h_sum, h_max = scan_state_stats(a["u"], a["delta"], a["A"], a["B"], a["C"], a["delta_bias"], True)
    r_c, r_l, r_n = rank1_factors(h_sum / a["u"].shape[0])
    scaled = h_max / (r_c[:, None, None] * r_l[None, :, None] * r_n[None, None, :])
    state_scale = (scaled.amax(dim=(0, 2)) / (2 ** (state_bits - 1) - 1)).clamp_min(1e-8)
    codes = {}
    for k in ("delta", "B", "C"):
        scale = (a[k].abs().amax(dim=(0, 1)) / 127).clamp_min(1e-8).reshape(1, -1)  # per time-step
        zp = torch.zeros_like(scale)
        codes[k] = (torch.ops.ouromamba.quantize(a[k], scale, zp, -128, 127), scale, zp)
    return {"r_c": r_c, "r_l": r_l, "r_n": r_n, "state_scale": state_scale, "codes": codes}


def q_fns(a: dict, q: dict) -> dict:
    """The float scan and the quantized scans on one input set, as no-grad callables."""
    extra = (q["r_c"], q["r_l"], q["r_n"], q["state_scale"], STATE_BITS)
    base = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
    (dq, ds, dz), (bq, bs, bz), (cq, cs, cz) = (q["codes"][k] for k in ("delta", "B", "C"))
    qi = (a["u"], dq, ds, dz, a["A"], bq, bs, bz, cq, cs, cz, a["D"], a["z"], a["delta_bias"], True)
    ops = torch.ops.ouromamba

    def nograd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    return {
        "float scan": nograd(lambda: call(selective_scan, a)),
        "selective_scan_q": nograd(lambda: ops.selective_scan_q(*base, *extra)),
        "selective_scan_qi": nograd(lambda: ops.selective_scan_qi(*qi, *extra)),
        "selective_scan_q_ref": nograd(lambda: selective_scan_q_ref(*base, *extra)),
    }


def time_round_robin(fns: dict, rounds: dict, warmup: int = 2) -> dict:
    """{name: (median wall seconds, median process CPU seconds)} per call; fns[name] runs in every
    round up to rounds[name]."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for r in range(max(rounds.values())):
        for name, f in fns.items():
            if r < rounds[name]:
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def time_single_thread(fns: dict, rounds: dict) -> dict:
    """{name: minimum CPU seconds of this thread per call}, on one torch thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for name, f in fns.items():
            f()
            ts = []
            for _ in range(rounds[name]):
                c0 = time.thread_time()
                f()
                ts.append(time.thread_time() - c0)
            best[name] = min(ts)
        return best
    finally:
        torch.set_num_threads(saved)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed calls of the fused op per pass")
    ap.add_argument("--ref-rounds", type=int, default=5, help="timed calls of the reference per pass")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "scan_cpu.md")
    ap.add_argument("--single-rounds", type=int, default=5,
                    help="calls of each implementation in the one-thread table (0: skip it)")
    ap.add_argument("--wait-load", type=float, default=None,
                    help="wait until the 1-minute load average is below this before timing")
    ap.add_argument("--wait-max", type=float, default=1800.0, help="give up waiting after this many seconds")
    ap.add_argument("--q-ref-rounds", type=int, default=3,
                    help="timed calls of the quantized-scan reference loop (0: skip the quantized scans)")
    args = ap.parse_args()

    backend = scan_backend()  # builds the C++ kernel if needed (not timed)
    if backend != "cpp":
        print(f"warning: the fused kernel is not in use (scan_backend() = {backend!r})", file=sys.stderr)

    if args.wait_load is not None and hasattr(os, "getloadavg"):
        t0 = time.monotonic()
        while os.getloadavg()[0] >= args.wait_load and time.monotonic() - t0 < args.wait_max:
            time.sleep(10)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows, single = [], []
    for label, batch, dim, L, N in SHAPES:
        a = make_inputs(batch, dim, L, N)
        # Same numbers from both (sanity check, not timed).
        with torch.no_grad():
            err = (call(selective_scan, a) - call(selective_scan_ref, a)).abs().max().item()
        dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(1))
        for pass_name, make in (("forward", lambda fn: forward_fn(fn, a)),
                                ("forward + backward", lambda fn: forward_backward_fn(fn, a, dout))):
            t = time_round_robin({"fused": make(selective_scan), "reference": make(selective_scan_ref)},
                                 {"fused": args.rounds, "reference": args.ref_rounds})
            rows.append((label, (batch, dim, L, N), pass_name, t["fused"], t["reference"], err))
            (fw, fc), (rw, rc) = t["fused"], t["reference"]
            print(f"{label[:30]:30s} {str((batch, dim, L, N)):18s} {pass_name:19s} wall: fused {fw * 1e3:8.2f} ms,"
                  f" reference {rw * 1e3:8.1f} ms, x{rw / fw:6.1f} | CPU time: fused {fc * 1e3:8.2f} ms,"
                  f" reference {rc * 1e3:8.1f} ms, x{rc / fc:6.1f}", flush=True)
            if args.single_rounds > 0:
                fns1 = {"fused": make(selective_scan), "reference": make(selective_scan_ref)}
                rounds1 = {"fused": 2 * args.single_rounds, "reference": args.single_rounds}
                if pass_name == "forward":
                    fns1["fast"], rounds1["fast"] = fast_decay_fn(a), 2 * args.single_rounds
                t1 = time_single_thread(fns1, rounds1)
                single.append((label, (batch, dim, L, N), pass_name, t1["fused"], t1["reference"], t1.get("fast")))
                print(f"{'':30s} {'':18s} {'':19s} 1 thread (min thread CPU time): fused {t1['fused'] * 1e3:8.2f} ms,"
                      + (f" {batch * dim * L * N / t1['fused'] / 1e9:.2f} G state updates/s,"
                         f" fast_decay {t1['fast'] * 1e3:8.2f} ms," if "fast" in t1 else "")
                      + f" reference {t1['reference'] * 1e3:8.1f} ms, x{t1['reference'] / t1['fused']:6.1f}", flush=True)

    qrows, qsingle = [], []
    if args.q_ref_rounds > 0:
        if SELECTIVE_SCAN_Q.backend() != "cpp":
            print(f"warning: the quantized-scan C++ kernel is not in use ({SELECTIVE_SCAN_Q.reason})", file=sys.stderr)
        for label, batch, dim, L, N in SHAPES:
            a = make_inputs(batch, dim, L, N)
            fns = q_fns(a, make_q_inputs(a))
            out_q, out_ref = fns["selective_scan_q"](), fns["selective_scan_q_ref"]()
            err = (out_q - out_ref).abs().max().item()
            flips = (~torch.isclose(out_q, out_ref, rtol=1e-4, atol=1e-4)).float().mean().item()
            rounds = {k: (args.q_ref_rounds if k.endswith("_ref") else args.rounds) for k in fns}
            t = time_round_robin(fns, rounds)
            qrows.append((label, (batch, dim, L, N), t, err, flips))
            print(f"{label[:30]:30s} {str((batch, dim, L, N)):18s} quantized, wall: "
                  + ", ".join(f"{k} {w * 1e3:.2f} ms" for k, (w, _) in t.items()), flush=True)
            if args.single_rounds > 0:
                t1 = time_single_thread(fns, {k: (max(1, args.single_rounds // 2) if k.endswith("_ref")
                                                  else 2 * args.single_rounds) for k in fns})
                qsingle.append((label, (batch, dim, L, N), t1))
                print(f"{'':30s} {'':18s} 1 thread: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t1.items()),
                      flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cmd = "python benchmarks/scan_cpu.py" + "".join(
        f" {flag} {val}" for flag, val, default in (("--rounds", args.rounds, 15), ("--ref-rounds", args.ref_rounds, 5),
                                                    ("--single-rounds", args.single_rounds, 5),
                                                    ("--q-ref-rounds", args.q_ref_rounds, 3),
                                                    ("--wait-load", args.wait_load, None))
        if val != default)
    lines = [
        "# Selective scan on CPU: fused op vs plain-torch reference",
        "",
        f"Produced by `{cmd}` on {datetime.date.today().isoformat()}.",
        "",
        f"* torch {torch.__version__}, {torch.get_num_threads()} threads (`torch.get_num_threads()`, default), "
        f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs)",
        f"* scan backend: `{backend}`; float32; `z`, `D`, `delta_bias` given, `delta_softplus=True` (as in Vim)",
        f"* median of {args.rounds} (fused) / {args.ref_rounds} (reference) calls after 2 warm-up calls, timed "
        "round-robin" + (f"; 1-minute load average {load_start[0]:.2f} at the start, {load[0]:.2f} at the end "
                         "(the machine is shared; other jobs were running)" if load else ""),
        "* forward is run under `torch.no_grad()`; forward + backward is `out.backward(dout)` w.r.t. all eight "
        "tensor inputs",
        "",
        "| shape | (batch, d_inner, L, d_state) | pass | fused (ms) | reference (ms) | speed-up "
        "| fused CPU time (ms) | reference CPU time (ms) | CPU-time ratio | max abs diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, shape, pass_name, (fw, fc), (rw, rc), err in rows:
        lines.append(f"| {label} | {shape} | {pass_name} | {fw * 1e3:.2f} | {rw * 1e3:.1f} | {rw / fw:.1f}x "
                     f"| {fc * 1e3:.2f} | {rc * 1e3:.1f} | {rc / fc:.1f}x | {err:.1e} |")
    lines += [
        "",
        "The reference materialises `(batch, d_inner, L, d_state)` decay and input tensors and loops over",
        "time in Python; the fused kernel never builds them (16 channels per AVX-512 vector, sequential",
        "over time, states recomputed in the backward). \"max abs diff\" is between the two forward outputs.",
        "Times are medians per call: wall clock, then process CPU time (all threads).",
        "",
    ]
    if single:
        peak, peak_how = fma_peak()
        lines += [
            f"One thread (`torch.set_num_threads(1)`), minimum CPU time of the calling thread over "
            f"{2 * args.single_rounds} (fused) / {args.single_rounds} (reference) calls: the kernels' own cost, "
            "nearly independent of other jobs on the machine. \"state updates/s\": batch * d_inner * L * d_state "
            f"per fused forward call, against an FMA peak of {peak / 1e9:.1f} G fp32 lane-FMAs/s ({peak_how}); "
            "\"fast_decay\": `ouromamba::selective_scan_cl` with `fast_decay=True`.",
            "",
            "| shape | (batch, d_inner, L, d_state) | pass | fused (ms) | state updates/s | fast_decay (ms) "
            "| reference (ms) | speed-up |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for label, shape, pass_name, tf, tr, tfast in single:
            ups = f"{math.prod(shape) / tf / 1e9:.2f} G" if pass_name == "forward" else ""
            fast = f"{tfast * 1e3:.2f}" if tfast is not None else ""
            lines.append(f"| {label} | {shape} | {pass_name} | {tf * 1e3:.2f} | {ups} | {fast} | {tr * 1e3:.1f} "
                         f"| {tr / tf:.1f}x |")
        lines.append("")
    if qrows:
        lines += [
            f"## Quantized scans (forward, `torch.no_grad()`, {STATE_BITS}-bit state)",
            "",
            "`selective_scan_q`: reparameterized scan with state quantization (factors and per-step state scales "
            "calibrated on the inputs); `selective_scan_qi`: the same on int8 delta / B / C codes with per-step "
            "scales (dequantized inside the kernel); `selective_scan_q_ref`: the Python loop over time-steps "
            f"(median of {args.q_ref_rounds} calls; {args.rounds} for the others). \"ref speed-up\" is "
            "reference / `selective_scan_q`. \"max abs diff\" and \"mismatch\" (share of outputs not within "
            "1e-4) compare `selective_scan_q` with the reference: a state code can flip at a near-tie made by "
            "float rounding, and the flip carries on through the decay.",
            "",
            "| shape | (batch, d_inner, L, d_state) | float scan (ms) | selective_scan_q (ms) "
            "| selective_scan_qi (ms) | selective_scan_q_ref (ms) | ref speed-up | max abs diff | mismatch |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, shape, t, err, flips in qrows:
            w = {k: v[0] * 1e3 for k, v in t.items()}
            lines.append(f"| {label} | {shape} | {w['float scan']:.2f} | {w['selective_scan_q']:.2f} "
                         f"| {w['selective_scan_qi']:.2f} | {w['selective_scan_q_ref']:.1f} "
                         f"| {w['selective_scan_q_ref'] / w['selective_scan_q']:.1f}x | {err:.1e} | {flips:.2%} |")
        lines.append("")
        if qsingle:
            lines += [
                "One thread, minimum CPU time of the calling thread per call:",
                "",
                "| shape | (batch, d_inner, L, d_state) | float scan (ms) | selective_scan_q (ms) "
                "| selective_scan_qi (ms) | selective_scan_q_ref (ms) | ref speed-up |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for label, shape, t1 in qsingle:
                v = {k: x * 1e3 for k, x in t1.items()}
                lines.append(f"| {label} | {shape} | {v['float scan']:.2f} | {v['selective_scan_q']:.2f} "
                             f"| {v['selective_scan_qi']:.2f} | {v['selective_scan_q_ref']:.1f} "
                             f"| {v['selective_scan_q_ref'] / v['selective_scan_q']:.1f}x |")
            lines.append("")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out.name}")


if __name__ == "__main__":
    main()
