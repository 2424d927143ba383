"""Latency of a float model and its quantized version on this machine (``ouromamba-fx bench``).

    >>> res = bench_latency(model, q, batch_size=32)   # doctest: +SKIP
    >>> rich.print(res.table("vim W8A8"))              # doctest: +SKIP

The quantized model called directly runs the *reference* graph (explicit quantize / dequantize
around float ops): it checks numbers, it is not meant to be fast. The fast path is
``torch.compile(q, backend="ouromamba")`` (fused integer kernels), timed with ``compiled=True``.
The kernel-level tables are in ``benchmarks/*.md``. (Named ``latency`` rather than ``bench``: the
repository's ``benchmarks/`` holds the measurements, this module the CLI's timer.)
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from rich.table import Table

BACKEND = "ouromamba"


@dataclass
class BenchResult:
    batch_size: int
    threads: int
    ms: dict[str, float]  # name -> median milliseconds per batch
    notes: list[str] = field(default_factory=list)

    def table(self, title: str = "") -> Table:
        t = Table(title=f"{title} latency, batch {self.batch_size}, {self.threads} threads "
                        f"({os.cpu_count()} CPUs)", title_justify="left", header_style="bold")
        for col in ("model", "ms / batch", "images / s", "time vs float"):
            t.add_column(col, justify="left" if col == "model" else "right")
        base = self.ms.get("float eager")
        for name, ms in self.ms.items():
            ratio = f"{ms / base:.2f}x" if base else ""
            t.add_row(name, f"{ms:.1f}", f"{1000 * self.batch_size / ms:.0f}", ratio)
        return t


@torch.no_grad()
def _time(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(2):  # warm-up: allocations, lazy initialisation, compiled code's first calls
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_latency(model: torch.nn.Module, q, batch_size: int = 32, repeats: int = 5,
                  threads: int | None = None, compiled: bool = False) -> BenchResult:
    """Median milliseconds per batch of ``model`` (eager) and ``q`` (reference graph, eager), and of
    ``torch.compile(q, backend="ouromamba")`` when ``compiled``."""
    shape = q.input_shape or model.pretrained_cfg["input_size"]
    x = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    notes = []
    try:
        model.eval()
        ms = {"float eager": _time(model, x, repeats),
              f"{q.config.name} reference graph (eager)": _time(q, x, repeats)}
        notes.append("The reference graph runs float ops on dequantized integers: it checks the "
                     "numbers, it is not the fast path.")
        if compiled:
            start = time.perf_counter()
            fast = torch.compile(q, backend=BACKEND)
            fast(x)
            notes.append(f"torch.compile(backend='{BACKEND}'): first call (compilation) "
                         f"{time.perf_counter() - start:.1f} s")
            ms[f"{q.config.name} compiled (backend='{BACKEND}')"] = _time(fast, x, repeats)
        else:
            notes.append("Add --compiled to also time torch.compile(q, backend='ouromamba') (fused "
                         "integer kernels).")
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes.append(f"median of {repeats} runs after two warm-up calls; load average at the end {load:.1f} "
                 f"(other processes on the machine slow every row alike)")
    return BenchResult(batch_size, used, ms, notes)
