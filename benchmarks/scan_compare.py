"""Time the fused CPU float scan of two revisions of this repository in one run.

    python benchmarks/scan_compare.py BEFORE [AFTER] [--rounds 5] [--calls 10] [--out FILE]

``BEFORE`` and ``AFTER`` are git revisions (``AFTER`` defaults to the working tree). Each revision's
``ouromamba_fx`` package is exported (``git archive``) to a temporary directory, and a child Python
process per revision imports that copy (its C++ kernels build on first use, before timing) and times
``ouromamba_fx.ops.scan.selective_scan`` on the shapes of ``scan_cpu.py``: the forward under
``torch.no_grad()`` and forward + backward, on one thread (``torch.set_num_threads(1)``), the
minimum CPU time of the calling thread over ``--calls`` calls. The children of the two revisions
alternate for ``--rounds`` rounds and each cell keeps its minimum over the rounds, so a burst of
load on a shared machine hits both alike and the two columns are comparable: same CPU, same run.

The table is printed and, with ``--out``, appended to that markdown file as a new section naming
the CPU, the revisions and the command (earlier sections stay).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def child(tree: str, calls: int) -> None:
    """Time one revision's scan (runs in a child process; prints one JSON object)."""
    sys.path.insert(0, tree)
    import torch

    import ouromamba_fx
    if not Path(ouromamba_fx.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"scan_compare: imported ouromamba_fx from {ouromamba_fx.__file__}, not from the exported tree")
    from ouromamba_fx.ops.scan import scan_backend, selective_scan

    # The input makers and timers of scan_cpu.py, with the package above already imported: its
    # own ``sys.path`` insertion does not replace the module loaded from the exported tree.
    sys.path.insert(1, str(HERE))
    import scan_cpu

    if scan_backend() != "cpp":
        raise SystemExit(f"scan_compare: the fused C++ scan is not in use in {tree} (scan_backend() = {scan_backend()!r})")
    out = {}
    for label, batch, dim, L, N in scan_cpu.SHAPES:
        a = scan_cpu.make_inputs(batch, dim, L, N)
        dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(1))
        fns = {"forward": scan_cpu.forward_fn(selective_scan, a),
               "forward + backward": scan_cpu.forward_backward_fn(selective_scan, a, dout)}
        t = scan_cpu.time_single_thread(fns, {k: calls for k in fns})
        for pass_name, sec in t.items():
            out[f"{label}|{(batch, dim, L, N)}|{pass_name}"] = sec
    print(json.dumps(out))


def export_tree(rev: str | None, dest: Path) -> str:
    """The ``ouromamba_fx`` package of ``rev`` (None: the working tree) under ``dest``; returns
    the directory to put on ``sys.path``."""
    if rev is None:
        return str(ROOT)
    dest.mkdir(parents=True)
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev, "ouromamba_fx"],
                   check=True)
    with tarfile.open(archive) as tf:
        tf.extractall(dest, filter="data")
    archive.unlink()
    return str(dest)


def run_child(tree: str, calls: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    res = subprocess.run([sys.executable, __file__, "--child", tree, "--calls", str(calls)],
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"scan_compare: the child for {tree} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def describe(rev: str | None) -> str:
    if rev is None:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "ouromamba_fx"],
                               capture_output=True, text=True).stdout.strip()
        return f"working tree ({head}{', modified' if dirty else ''})"
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True,
                          text=True, check=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", nargs="?", help="git revision timed as 'before'")
    ap.add_argument("after", nargs="?", default=None, help="git revision timed as 'after' (default: working tree)")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two revisions")
    ap.add_argument("--calls", type=int, default=10, help="timed calls per pass in each child")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to append the table to")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.calls)
        return
    if not args.before:
        ap.error("give the 'before' revision")

    sys.path.insert(0, str(HERE))
    from scan_cpu import cpu_name, fma_peak  # noqa: E402  (reads /proc/cpuinfo only)

    with tempfile.TemporaryDirectory(prefix="scan_compare_") as tmp:
        trees = {"before": export_tree(args.before, Path(tmp) / "before"),
                 "after": export_tree(args.after, Path(tmp) / "after")}
        for name, tree in trees.items():  # builds the kernels (not timed)
            print(f"warm-up / build: {name}", flush=True)
            run_child(tree, 1)
        load_start = os.getloadavg()[0]
        best = {"before": {}, "after": {}}
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                for key, sec in run_child(trees[name], args.calls).items():
                    best[name][key] = min(sec, best[name].get(key, math.inf))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        load_end = os.getloadavg()[0]

    peak, peak_how = fma_peak()
    cmd = "python benchmarks/scan_compare.py " + " ".join(
        [args.before] + ([args.after] if args.after else [])
        + [f"--rounds {args.rounds}", f"--calls {args.calls}"] + ([f"--out {args.out}"] if args.out else []))
    lines = [
        f"## {describe(args.before)} -> {describe(args.after)}, {datetime.date.today().isoformat()}",
        "",
        f"`{cmd}`. CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); torch run on one thread; "
        f"minimum CPU time of the calling thread over {args.calls} calls x {args.rounds} alternating rounds "
        f"per cell; 1-minute load average {load_start:.2f} at the start, {load_end:.2f} at the end. "
        f"State updates/s (batch * d_inner * L * d_state per forward) against an FMA peak of "
        f"{peak / 1e9:.1f} G fp32 lane-FMAs/s ({peak_how}).",
        "",
        "| shape | (batch, d_inner, L, d_state) | pass | before (ms) | after (ms) | after vs before "
        "| state updates/s before | after |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, b in best["before"].items():
        label, shape, pass_name = key.split("|")
        a = best["after"][key]
        n = math.prod(int(s) for s in shape.strip("()").split(","))
        ups = (f"{n / b / 1e9:.2f} G | {n / a / 1e9:.2f} G" if pass_name == "forward" else " | ")
        lines.append(f"| {label} | {shape} | {pass_name} | {b * 1e3:.2f} | {a * 1e3:.2f} | {b / a:.2f}x | {ups} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        prev = args.out.read_text() if args.out.exists() else (
            "# Fused CPU float scan: two revisions timed in one run\n\n"
            "Written by `benchmarks/scan_compare.py` (its docstring says how it times). Newest section last;\n"
            "each names its CPU.\n\n")
        args.out.write_text(prev.rstrip("\n") + "\n\n" + text)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
