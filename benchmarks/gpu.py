"""Whole-model GPU latency: Vim-T/S/B in float (fp16, bf16) against W8A8 and W4A4O8 (writes gpu.md).

    python benchmarks/gpu.py                      # on a CUDA GPU (an H100: tens of minutes)
    python benchmarks/gpu.py --models vim_tiny --batches 1,16 --rounds 20
    python benchmarks/gpu.py --dry-run            # anywhere: the plan, and a tiny Vim through every
                                                  # variant's code path on the CPU (nothing timed)

Variants, for each model and batch size:

* ``fp16``, ``bf16``  ``torch.compile(model.to(dtype))`` (Inductor, defaults); the selective scan
  is the Triton kernel of ``ouromamba_fx.kernels.triton.scan``;
* ``W8A8``, ``W4A4O8``  ``torch.compile(q, backend="ouromamba")`` of the model converted with that
  preset: the reference quantized graph lowered for CUDA (Triton int8 GEMMs or ``torch._int_mm``,
  the W4A4O8 linear with the run-time outlier rule and each token's gathered outlier product,
  conv1d + SiLU, the mixed quantization of the scan's inputs, the Triton scan) and Inductor
  around it. Inputs are float32 (the quantized model's contract).

Each is timed as the median of ``--rounds`` calls (``triton.testing.do_bench``-style: CUDA events,
after warm-up calls that compile and autotune). Agreement: on a fixed batch of ``--agree`` images,
the top-1 agreement and the largest logit difference (relative to the largest logit) of each
compiled quantized model with its reference graph (``q`` itself, eager), and of the compiled
float models with the float32 model.

Models have random weights (seeded) and are calibrated on random images, as in
``cpu_latency.py``: speed does not depend on the weights' values, except through how many outlier
channels W4A4O8 finds at run time (real models may find more or fewer). The markdown goes beside
this script (``gpu.md``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ouromamba_fx as of  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = {"vim_tiny": "vim_tiny_patch16_224", "vim_small": "vim_small_patch16_224", "vim_base": "vim_base_patch16_224"}
BATCHES = (1, 16, 64)
FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUANT = ("W8A8", "W4A4O8")
VARIANTS = tuple(FLOAT) + QUANT
# The dry run's model: the test suite's tiny Vim, with dims cuBLAS's int8 GEMM refuses (x_proj N = 10).
DRY_CONFIG = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, d_state=4, dt_rank=2, num_classes=5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=50, help="timed calls per variant and batch (median)")
    p.add_argument("--calib", type=int, default=32, help="calibration images")
    p.add_argument("--agree", type=int, default=64, help="images of the agreement batch")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: gpu.md beside this script; "
                                                           "the dry run writes none unless given)")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: print the plan and run a tiny Vim "
                                                          "through every variant on the CPU, untimed")
    args = p.parse_args(argv)
    args.models = _names(args.models, MODELS, "--models", p)
    args.variants = _names(args.variants, VARIANTS, "--variants", p)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if min(args.batches) < 1 or args.rounds < 1 or args.calib < 1 or args.agree < 1:
        p.error("--batches, --rounds, --calib and --agree must be >= 1")
    return args


def _names(text: str, known, flag: str, p) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        p.error(f"{flag}: unknown {bad or text!r}; known: {', '.join(known)}")
    return names


# ---------------------------------------------------------------------------------------------
# Models and variants

def float_model(key: str | None, seed: int = 0) -> torch.nn.Module:
    """A Vim with random weights: ``key`` from :data:`MODELS`, or None for the dry run's tiny one."""
    torch.manual_seed(seed)
    if key is None:
        from ouromamba_fx.models import VimConfig, VisionMamba

        return VisionMamba(VimConfig(**DRY_CONFIG)).eval()
    return of.models.registry.create(MODELS[key]).eval()


def images(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    size = model.cfg.img_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def variants(model: torch.nn.Module, names: list[str], calib: torch.Tensor, device: str, compile: bool) -> dict:
    """{name: (callable, input dtype, reference callable, what the reference is)}. ``compile``:
    torch.compile (Inductor, the ``ouromamba`` backend); otherwise eager (the dry run: the float
    models as they are, the quantized ones lowered for CUDA)."""
    out = {}
    base = model.to(device)
    for name in names:
        if name in FLOAT:
            m = float_model_copy(base, FLOAT[name])
            fn = torch.compile(m, dynamic=False) if compile else m
            out[name] = (fn, FLOAT[name], base, "float32 model")
        else:
            q = of.convert(base, calib=calib.to(device), config=name, show_progress=False)
            if compile:
                fn = torch.compile(q, backend="ouromamba", dynamic=False, options={"target": "cuda"})
            else:
                fn = q.lower(target="cuda")
            out[name] = (fn, torch.float32, q, "reference graph")
    return out


def float_model_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype).eval()


def agreement(fn, dtype, ref, x: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement in %, max |logits - reference| / max |reference|) on ``x``."""
    with torch.inference_mode():
        y = fn(x.to(dtype)).float()
        r = ref(x).float()
    top1 = (y.argmax(-1) == r.argmax(-1)).float().mean().item() * 100
    return top1, ((y - r).abs().max() / r.abs().max()).item()


def time_ms(fn, x: torch.Tensor, rounds: int) -> float:
    """Median milliseconds per call on the GPU (CUDA events), after warm-up calls."""
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Runs

def plan(args) -> list[str]:
    lines = [f"models: {', '.join(f'{k} ({MODELS[k]})' for k in args.models)}",
             f"batches: {', '.join(map(str, args.batches))}; variants: {', '.join(args.variants)}",
             f"{args.rounds} timed calls each (median); calibration {args.calib} images; agreement on "
             f"{args.agree} images"]
    return lines


def run_gpu(args) -> list[str]:
    import triton

    gpu = torch.cuda.get_device_name()
    head = [f"# Whole-model latency on {gpu}", "",
            f"Produced by `python benchmarks/gpu.py` on {datetime.date.today().isoformat()}: "
            f"torch {torch.__version__}, "
            f"triton {triton.__version__}, {platform.python_implementation()} {platform.python_version()}. "
            "Median milliseconds per forward (CUDA events); speed-up against fp16. Random weights, "
            "calibration on random images (see the script's docstring).", ""]
    timing = ["| model | batch | " + " | ".join(args.variants) + " | " +
              " | ".join(f"{v} vs fp16" for v in args.variants if v != "fp16") + " |",
              "|---|---:|" + "---:|" * (2 * len(args.variants) - 1)]
    agree = ["| model | variant | compared with | top-1 agreement | max logit difference / max logit |",
             "|---|---|---|---:|---:|"]
    for key in args.models:
        model = float_model(key)
        calib = images(model, args.calib, 1)
        torch._dynamo.reset()
        fns = variants(model, args.variants, calib, "cuda", compile=True)
        x_agree = images(model, args.agree, 2).cuda()
        for name, (fn, dtype, ref, what) in fns.items():
            top1, rel = agreement(fn, dtype, ref, x_agree)
            agree.append(f"| {key} | {name} | {what} | {top1:.2f} % | {rel:.2e} |")
            print(f"{key} {name}: top-1 agreement {top1:.2f} % with the {what}, max rel. logit diff {rel:.2e}",
                  flush=True)
        for b in args.batches:
            x = images(model, b, 3).cuda()
            t = {name: time_ms(fn, x.to(dt), args.rounds) for name, (fn, dt, _, _) in fns.items()}
            print(f"{key} batch {b}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in t.items()), flush=True)
            ratios = [f"{t['fp16'] / t[v]:.2f}x" if "fp16" in t else "-" for v in args.variants if v != "fp16"]
            timing.append(f"| {key} | {b} | " + " | ".join(f"{t[v]:.3f}" for v in args.variants) + " | "
                          + " | ".join(ratios) + " |")
        del fns
        torch.cuda.empty_cache()
    return head + ["## Latency (ms)", ""] + timing + ["", "## Agreement", ""] + agree


def run_dry(args) -> list[str]:
    """Every variant's code path on a tiny Vim on the CPU (eager, the quantized models lowered for
    CUDA; with TRITON_INTERPRET=1 in the environment their ops run their CUDA implementations,
    the Triton kernels interpreted). Nothing is timed."""
    import contextlib
    import os

    from ouromamba_fx.ops.dispatch import cuda_kernels_on_cpu

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    model = float_model(None)
    calib, x = images(model, 8, 1), images(model, 4, 2)
    lines = ["# Dry run of benchmarks/gpu.py (CPU, nothing timed)", "",
             f"A tiny Vim ({DRY_CONFIG}) through each variant's code path, eager; the quantized models lowered "
             f"for CUDA{', their ops on their CUDA implementations (Triton interpreted)' if interpret else ''}.", "",
             "| variant | compared with | top-1 agreement | max logit difference / max logit |", "|---|---|---:|---:|"]
    for name, (fn, dtype, ref, what) in variants(model, args.variants, calib, "cpu", compile=False).items():
        ctx = cuda_kernels_on_cpu() if interpret and name in QUANT else contextlib.nullcontext()
        with ctx:
            top1, rel = agreement(fn, dtype, ref, x)
        lines.append(f"| {name} | {what} | {top1:.2f} % | {rel:.2e} |")
        print(f"dry run {name}: top-1 agreement {top1:.2f} % with the {what}, max rel. logit diff {rel:.2e}",
              flush=True)
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    for line in plan(args):
        print(line)
    if args.dry_run:
        lines = run_dry(args)
        out = args.out
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: nothing measured (--dry-run checks the code paths on the CPU)")
            return 0
        lines = run_gpu(args)
        out = args.out or HERE / "gpu.md"
    if out is not None:
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
