"""Deployed quantized models: agreement, latency and file sizes (writes export_latency.md).

    python benchmarks/export_latency.py                                 # reference model and Vim-small
    python benchmarks/export_latency.py --models ref --rounds 3         # quick

For each model and preset (W8A8, W4A4O8) the model is quantized, lowered and deployed three ways,
all from one ``q.lower().export(x)`` program with a dynamic batch:

* ``exported program``   saved as ``.pt2`` (``ouromamba_fx.export.save``), read back through the
  checked loader (``ouromamba_fx.export.load``) and run with ``ep.module()``;
* ``AOTI from Python``   the AOTInductor package (``export.compile_aoti``) run by
  ``torch._inductor.aoti_load_package``;
* ``AOTI from C++``      the same package run by ``examples/cpp`` ``classify`` (no Python in the
  process; built with ``examples/cpp/build.py``);
* ``lowered model, eager`` ``q.lower()`` called in Python, the graph the program is a trace of;

and compared with ``torch.compile(q, backend="ouromamba")`` (``dynamic=False``), the way the
package runs a quantized model in Python:

(a) agreement on the first ``--images`` bundled images (20 per class): same top-1 as the
    compiled model (count), and the largest logit difference relative to the largest logit of the
    compiled model and of the eager lowered model (max |a - b| / max |b| over the whole batch of
    logits);
(b) latency of one call at batch 1 and 16 (AOTI from Python, from C++, torch.compile): median of
    ``--rounds`` calls after warm-up; the Python variants are called in turn round by round, the
    C++ program times its own calls (``classify --repeat``) between the Python rounds;
(c) file sizes: the ``.pt2``, the AOTI package and the package's own ``.safetensors`` vs the fp32
    model's ``state_dict`` written by ``torch.save``.

Models: the bundled reference model (CIFAR-10, 32 px) with its trained weights, and Vim-small
(``vim_small_patch16_224``) with random weights (no trained checkpoint is used: agreement is
between deployment paths, which does not need a trained model; its images are the bundled ones
resized to 224 px by its transform). Calibration: 4 bundled images per class not among the
evaluated ones. All runs use ``--threads`` intra-op threads (default 1: on a shared machine a
multi-threaded OpenMP barrier waits for busy cores).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ouromamba_fx as of
from ouromamba_fx import export as ex
from ouromamba_fx.data import ImageFolder, bundled_samples, model_transform

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = {"ref": ("reference model (vim_cifar_d128_l8, trained, bundled)", "vim_cifar_d128_l8"),
          "vim_small": ("Vim-small (vim_small_patch16_224, random weights)", "vim_small_patch16_224")}
CHUNK = 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def load_images(model, per_class: int, skip: int = 0) -> torch.Tensor:
    ds = ImageFolder(bundled_samples(), model_transform(model), getattr(getattr(model, "cfg", None), "classes", None),
                     per_class + skip)
    by_class: dict[int, list] = {}
    for path, label in ds.samples:
        by_class.setdefault(label, []).append(path)
    keep = {p for paths in by_class.values() for p in paths[skip:skip + per_class]}
    ds.samples = [(p, c) for p, c in ds.samples if p in keep]
    return torch.stack([ds[i][0] for i in range(len(ds))])


def build_model(key: str):
    torch.manual_seed(0)
    if key == "ref":
        return of.models.reference_model().eval()
    return of.models.registry.create(MODELS[key][1]).eval()


def padded(x: torch.Tensor) -> torch.Tensor:
    """x with its first images appended up to a multiple of CHUNK: every variant then runs the
    same batches of CHUNK (a GEMM's blocking, so its float sums, may depend on the batch)."""
    pad = (-x.shape[0]) % CHUNK
    return torch.cat([x, x[:pad]]) if pad else x


def chunked(fn, x: torch.Tensor) -> torch.Tensor:
    """fn over x in chunks of CHUNK (:func:`padded`; the padding's outputs dropped)."""
    xp = padded(x)
    outs = [fn(xp[i:i + CHUNK].contiguous()) for i in range(0, xp.shape[0], CHUNK)]
    return torch.cat(outs)[:x.shape[0]]


def stats_bytes(path: Path) -> int:
    """Bytes of the ``__stats__/`` tensors (outlier fractions and maps, for the report and
    ``inspect``) in a file written by ``QuantizedModel.save``."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.startswith("__stats__/"))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run_cpp(classify: Path, pkg: Path, x: torch.Tensor, tmp: Path, threads: int, chunk: int | None = None,
            repeat: int = 0) -> tuple[torch.Tensor, dict]:
    raw = tmp / "in.f32"
    x.contiguous().numpy().astype(np.float32).tofile(raw)
    logits = tmp / "out.f32"
    cmd = [str(classify), str(pkg), "--raw", str(raw), "--batch", str(x.shape[0]), "--threads", str(threads),
           "--logits", str(logits)]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    if repeat:
        cmd += ["--repeat", str(repeat)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TMPDIR": str(tmp)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"classify failed: {proc.stderr[-3000:]}")
    out = torch.from_numpy(np.fromfile(logits, dtype=np.float32)).reshape(x.shape[0], -1)
    timing = {}
    for line in proc.stdout.splitlines():
        if line.startswith("latency_ms"):
            timing = dict(kv.split("=") for kv in line.split()[1:])
    return out, timing


def time_python(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    out = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(2):
                fn(x)
        for _ in range(rounds):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                out[k].append(time.perf_counter() - t)
    return out


def run(key: str, presets: list[str], args, classify: Path, work: Path) -> dict:
    model = build_model(key)
    label = MODELS[key][0]
    calib = load_images(model, args.calib_per_class, skip=args.images // 10)
    images = load_images(model, args.images // 10)
    log(f"{key}: {len(images)} images {tuple(images.shape[1:])}, calibration {len(calib)}")
    res = {"label": label, "rows": {}, "lat": {}, "size": {}}
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    res["size"]["fp32 state_dict"] = len(buf.getvalue())
    for name in presets:
        cfg = getattr(of, name)
        t0 = time.perf_counter()
        q = of.convert(model, calib=calib, config=cfg, show_progress=False)
        low = q.lower()
        log(f"{key} {name}: converted and lowered in {time.perf_counter() - t0:.1f} s")
        st = work / f"{key}_{name}.safetensors"
        q.save(st)
        t0 = time.perf_counter()
        ep = low.export(images[:2])
        missing = ex.cpp_missing_ops(ep)
        pt2 = ex.save(ep, work / f"{key}_{name}.pt2", ex.metadata_of(low))
        log(f"{key} {name}: exported in {time.perf_counter() - t0:.1f} s; ops without C++ kernel: {missing or 'none'}")
        t0 = time.perf_counter()
        pkg = ex.compile_aoti(ep, work / f"{key}_{name}_aoti.pt2", ex.metadata_of(low))
        aoti_s = time.perf_counter() - t0
        log(f"{key} {name}: AOTI package in {aoti_s:.1f} s")
        res["size"][f"{name} .safetensors (of.save; {stats_bytes(st):,} bytes of it outlier statistics)"] = \
            st.stat().st_size
        res["size"][f"{name} .pt2 (exported program)"] = pt2.stat().st_size
        res["size"][f"{name} AOTI package"] = pkg.stat().st_size

        loaded = ex.load(pt2).module()
        runner = ex.load_aoti(pkg)
        torch._dynamo.reset()
        compiled = torch.compile(q, backend="ouromamba", dynamic=False)
        with torch.inference_mode():
            t0 = time.perf_counter()
            ref = chunked(compiled, images)
            log(f"{key} {name}: torch.compile on {len(images)} images in {time.perf_counter() - t0:.1f} s "
                f"(with compilation)")
            eager = chunked(low, images)
            outs = {"lowered model, eager": eager, "exported program": chunked(loaded, images),
                    "AOTI from Python": chunked(runner, images)}
        log(f"{key} {name}: lowered model, exported program and AOTI from Python done")
        cpp_out, _ = run_cpp(classify, pkg, padded(images), work, args.threads, chunk=CHUNK)
        outs["AOTI from C++"] = cpp_out[:len(images)]
        log(f"{key} {name}: AOTI from C++ done")
        top_ref = ref.argmax(1)
        for v, o in outs.items():
            res["rows"][(name, v)] = (int((o.argmax(1) == top_ref).sum()), len(images), rel_diff(o, ref),
                                      rel_diff(o, eager))
        res["rows"][(name, "classes predicted")] = len(set(top_ref.tolist()))
        res["rows"][(name, "aoti_s")] = aoti_s

        for b in args.batches:
            x = images[:b].contiguous() if b <= len(images) else images[torch.arange(b) % len(images)]
            fns = {"AOTI from Python": runner, "torch.compile": compiled}
            times = {k: [] for k in fns}
            cpp = []
            blocks = 2
            per = max(1, args.rounds // blocks)
            for _ in range(blocks):  # Python rounds, then a C++ block, twice: both see the same drift
                for k, ts in time_python(fns, x, per).items():
                    times[k] += ts
                _, timing = run_cpp(classify, pkg, x, work, args.threads, repeat=per)
                cpp.append(float(timing["median"]) / 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            med["AOTI from C++"] = statistics.median(cpp)
            res["lat"][(name, b)] = med
            log(f"{key} {name} batch {b}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items()))
        del loaded, runner, compiled
    return res


def cpu_line() -> str:
    name = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        name = platform.processor() or name
    want = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"]
    have = [f for f in want if f in flags]
    return f"{name}; flags: {' '.join(have) or 'none of ' + ', '.join(want)}; {os.cpu_count()} logical CPUs"


def write_md(path: Path, results: dict, args, load0, load1, started: str, cmd: str) -> None:
    L = ["# Deployed quantized models: agreement, latency, file sizes", "",
         f"Written by `{cmd}` ({started} UTC). CPU: {cpu_line()}. torch {torch.__version__}, "
         f"{args.threads} intra-op thread(s) in every variant. Load average (1 min) {load0:.2f} at the start, "
         f"{load1:.2f} at the end: the machine's 2 cores were shared with other jobs, so latencies are wall "
         f"times under that load.", "",
         "Variants: `exported program` = the `.pt2` read back by `ouromamba_fx.export.load`, run by "
         "`ep.module()`; `AOTI from Python` = `torch._inductor.aoti_load_package`; `AOTI from C++` = "
         "`examples/cpp` `classify` (no Python in the process); reference = `torch.compile(q, "
         "backend=\"ouromamba\")`. Script docstring: how each number is measured.", ""]
    L += ["## (a) Agreement with torch.compile(q, backend=\"ouromamba\")", "",
          "| model | preset | variant | same top-1 | max rel diff vs torch.compile | max rel diff vs lowered eager |",
          "|---|---|---|---|---|---|"]
    for key, r in results.items():
        for (name, v), val in r["rows"].items():
            if isinstance(val, tuple):
                same, n, rel, rel_eager = val
                L.append(f"| {r['label']} | {name} | {v} | {same}/{n} | {rel:.2e} | {rel_eager:.2e} |")
    L += ["", "`AOTI from Python`, `AOTI from C++` and `torch.compile` run code that Inductor generated "
          "from the lowered graph; `lowered model, eager` and `exported program` run that graph op by op "
          "without Inductor. Where Inductor's fused float code rounds differently in the last bits, a "
          "quantizer after it can pick another integer code, which then shows in the logits by far more "
          "than float rounding (the second column shows which side of that line each variant is on). "
          "Every variant runs the images in batches of 16 (the last one padded).", ""]
    for key, r in results.items():
        for (name, v), val in r["rows"].items():
            if v == "classes predicted":
                L.append(f"- {r['label']}, {name}: the compiled model predicts {val} distinct classes on these images; "
                         f"AOTInductor compile {r['rows'][(name, 'aoti_s')]:.0f} s.")
    L += ["", "## (b) Latency of one call (ms, median)", "",
          "| model | preset | batch | AOTI from Python | AOTI from C++ | torch.compile |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        for (name, b), med in r["lat"].items():
            L.append(f"| {r['label']} | {name} | {b} | {1e3 * med['AOTI from Python']:.2f} | "
                     f"{1e3 * med['AOTI from C++']:.2f} | {1e3 * med['torch.compile']:.2f} |")
    L += ["", "## (c) File sizes", "", "| model | file | bytes | vs fp32 |", "|---|---|---|---|"]
    for key, r in results.items():
        fp32 = r["size"]["fp32 state_dict"]
        for k, v in r["size"].items():
            L.append(f"| {r['label']} | {k} | {v:,} | {v / fp32:.2f}x |")
    L.append("")
    path.write_text("\n".join(L))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="ref,vim_small")
    ap.add_argument("--presets", default="W8A8,W4A4O8")
    ap.add_argument("--images", type=int, default=200, help="evaluated bundled images (a multiple of 10)")
    ap.add_argument("--calib-per-class", type=int, default=4)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=10, help="timed calls per variant and batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "export_latency.md"))
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("cpp_example_build", ROOT / "examples" / "cpp" / "build.py")
    cpp_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpp_build)

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    classify = cpp_build.build() / "classify"
    log(f"examples/cpp ready in {time.perf_counter() - t0:.1f} s")
    cmd = " ".join(["python benchmarks/export_latency.py", *(argv if argv is not None else sys.argv[1:])])
    results = {}
    with tempfile.TemporaryDirectory(prefix="export_latency_") as tmp:
        for key in args.models.split(","):
            results[key] = run(key, args.presets.split(","), args, classify, Path(tmp))
            write_md(Path(args.out), results, args, load0, os.getloadavg()[0], started, cmd)  # after each model
            log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
