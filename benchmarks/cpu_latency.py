"""End-to-end CPU latency: float vs quantized-and-lowered vision Mambas (writes cpu_latency.md).

    python benchmarks/cpu_latency.py                          # everything (tens of minutes)
    python benchmarks/cpu_latency.py --quick                  # reference model, batch 16, few rounds
    python benchmarks/cpu_latency.py --models ref,vim_tiny --batches 1,16 --rounds 5
    python benchmarks/cpu_latency.py --models vmamba_t,mambavision_t --batches 16 --rounds 5
    python benchmarks/cpu_latency.py --models vim_small --batches 16 --malloc tuned   # of.tune_malloc() first

Variants, each timed as the median of ``--rounds`` calls after two warm-up calls (compilation),
called in turn round by round (a shared machine's drift then slows all of them alike):

* ``fp32 eager``      the float model as written (its scan is the fused C++ op);
* ``fp32 compiled``   ``torch.compile(model)`` (Inductor, defaults);
* ``bf16 compiled``   the same under ``torch.autocast("cpu", torch.bfloat16)`` (AMX bf16 GEMMs where
  the CPU has them; without native bf16 it is several times slower than fp32);
* ``W8A8``, ``W4A4O8``  ``torch.compile(q, backend="ouromamba")``: the reference quantized graph
  lowered to fused ops (int8 GEMMs; for W4A4O8 one op per linear that finds the outlier
  channels, quantizes, runs the int4-weight inlier GEMM and adds the sparse 8-bit outlier term;
  the C++ conv1d+SiLU; the float scan on fake-quantized inputs), the rest compiled by Inductor.

All compiled variants use ``dynamic=False`` (one graph per batch size). Models: the bundled
reference model (CIFAR-10, 32 px, d=128, depth 8) calibrated on its bundled sample images, and
Vim-tiny / Vim-small-sized models, and the other families at their published tiny sizes
(``vmamba_t`` = VMamba-T v2 ``vmamba_v2_tiny_s2l5``, ``vmamba_v0_t`` = the vanilla VMamba-T,
``mambavision_t`` = MambaVision-T), at 224 px with random weights calibrated on random images
(speed does not depend on the weights' values, except through how many outlier channels W4A4O8
finds: real models may find more or fewer). A profile of one call per variant (torch.profiler)
splits the time into GEMMs, scan, quantization ops, float convolutions (conv1d, conv2d; the
integer conv2d's GEMMs count as GEMM), attention (its matmuls: scaled_dot_product_attention),
normalisation layers and the rest
(Inductor's fused kernels: residuals, gating, transposes, in-graph quantization, and the norms
Inductor compiles itself, which then no longer appear as ops).
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

import ouromamba_fx as of
from ouromamba_fx.ops import gemm as cpu_gemm

HERE = Path(__file__).resolve().parent
MODELS = {"ref": "vim_cifar_d128_l8", "vim_tiny": "vim_tiny_patch16_224", "vim_small": "vim_small_patch16_224",
          "vmamba_t": "vmamba_v2_tiny_s2l5", "vmamba_v0_t": "vmamba_v0_tiny", "mambavision_t": "mambavision_tiny"}
# built by ouromamba_fx.models.families (the others are Vim models of ouromamba_fx.models.registry)
FAMILY_MODELS = ("vmamba_t", "vmamba_v0_t", "mambavision_t")
VARIANTS = ("fp32 eager", "fp32 compiled", "bf16 compiled", "W8A8", "W4A4O8")
# Extra variants (``--extra``): the lowering options, to see what each rule buys.
EXTRA = {"W8A8 integer scan": ("W8A8", {"integer_scan": True}),
         "W8A8 op": ("W8A8", {"int8_inline": False}),
         "W8A8 mkldnn conv": ("W8A8", {"conv_silu": False}),
         "W8A8 float conv2d": ("W8A8", {"int8_conv2d": False}),
         "W8A8 int8 conv2d all": ("W8A8", {"conv2d_min_k": 0}),
         "W4A4O8 mask+dense": ("W4A4O8", {"mixed_fused": False}),
         "W4A4O8 mask+op": ("W4A4O8", {"mixed_fused": False, "int4_inline": False}),
         "W4A4O8 time-contiguous scan": ("W4A4O8", {"scan_cl": False}),
         "W8A8 fast decay": ("W8A8", {"fast_decay": True}),
         "W4A4O8 fast decay": ("W4A4O8", {"fast_decay": True})}
# Checked in this order (a conv may run as an mkldnn op, so "conv" comes before "mkldnn"; the
# attention's matmuls before the GEMMs, as its math path runs aten::bmm / matmul inside it).
CATEGORIES = {
    "conv": ("conv",),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention"),
    "norm": ("layer_norm", "batch_norm", "group_norm", "rms_norm"),
    "scan": ("selective_scan",),
    "GEMM": ("w8a8_linear", "int8_linear", "w4a4o8_linear", "s8_mm", "s16_mm", "aten::mm", "aten::addmm",
             "aten::linear",
             "aten::_int_mm", "aten::bmm", "aten::matmul", "mkldnn", "_linear_pointwise", "mkl_linear",
             "qlinear_pointwise"),
    "quant": ("quantize", "outlier_mask", "outlier_split", "fake_quant"),
    # (conv: ouromamba::causal_conv1d_silu matches "conv"; the lowering's integer conv2d is plain
    # torch, so its integer products (torch._int_mm, ouromamba::s8_mm / s16_mm) count as GEMM and
    # its im2col / epilogue, compiled by Inductor, as rest; the decomposed linears' epilogues are
    # Inductor's too, so rest; W4A4O8's w4a4o8_linear_rt is a GEMM op that also runs its activations'
    # outlier detection and quantization)
}


def load_avg() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(limit: float, max_wait: float) -> float:
    start = time.time()
    while load_avg() >= limit and time.time() - start < max_wait:
        print(f"load {load_avg():.2f} >= {limit}: waiting", flush=True)
        time.sleep(30)
    return load_avg()


def build(key: str, calib_n: int, seed: int = 0):
    """(float model, calibration batch, input sampler)."""
    torch.manual_seed(seed)
    name = MODELS[key]
    if key == "ref":
        model = of.models.reference_model().eval()
        from ouromamba_fx.data import bundled_samples, image_loader

        imgs = torch.cat([x for x in image_loader(model, bundled_samples(), batch_size=64, labels=False)])
        calib = imgs[:calib_n]

        def sample(b):
            idx = torch.arange(b) % len(imgs)
            return imgs[idx].contiguous()
    else:
        create = of.models.families.create if key in FAMILY_MODELS else of.models.registry.create
        model = create(name).eval()
        shape = (3, model.cfg.img_size, model.cfg.img_size)
        calib = torch.randn(calib_n, *shape)

        def sample(b):
            return torch.randn(b, *shape, generator=torch.Generator().manual_seed(b))
    return model, calib, sample


def time_round_robin(fns: dict, x, rounds: int) -> dict:
    """{name: (wall seconds, process CPU seconds) per call} for ``fns`` = {name: (fn, autocast)}:
    two warm-up calls each, then ``rounds`` rounds that call every variant once in turn, so that
    a machine whose speed drifts over minutes (a shared one) slows all variants alike. On a
    shared machine the CPU time is the steadier measure of the work a call does (wall time
    includes waiting for a core)."""
    out = {name: ([], []) for name in fns}
    with torch.inference_mode():
        for fn, autocast in fns.values():
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                for _ in range(2):
                    fn(x)
        for _ in range(rounds):
            for name, (fn, autocast) in fns.items():
                with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                    t, c = time.perf_counter(), time.process_time()
                    fn(x)
                    out[name][0].append(time.perf_counter() - t)
                    out[name][1].append(time.process_time() - c)
    return out


def categorize(name: str) -> str | None:
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return None


def profile_call(fn, x, autocast: bool = False) -> dict[str, float]:
    """Milliseconds per category for one call (outermost categorized ops only, no double count)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            fn(x)
            wall = time.perf_counter() - t
    out = {c: 0.0 for c in CATEGORIES}
    for ev in prof.events():
        cat = categorize(ev.name)
        if cat is None:
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            if categorize(parent.name) is not None:
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            out[cat] += ev.cpu_time_total / 1e3
    out["total"] = wall * 1e3
    out["rest"] = max(out["total"] - sum(out[c] for c in CATEGORIES), 0.0)
    return out


def tensor_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def linear_weight_bytes(lowered) -> tuple[int, int]:
    """(bytes of the fused linears' weights + weight scales, bytes of the same weights in fp32); W8A8
    dt_projs computed inside the scan (``ouromamba::selective_scan_dt``) count as linears, and so do
    linears on codes a producer wrote (``int8_linear_decomposed_codes``) and in_proj stopped at its
    integer products (``int8_linear_decomposed_acc``: its per-channel float32 weight scales went to
    the consumers that apply its epilogue, counted here as N float32 values)."""
    from ouromamba_fx.lowering.patterns import const
    from ouromamba_fx.ops.int8_linear import (W8A8_LINEAR_OP, int8_linear_codes, int8_linear_decomposed,
                                              int8_linear_decomposed_acc, int8_linear_decomposed_codes)
    from ouromamba_fx.ops.scan import SCAN_DT_OP
    from ouromamba_fx.ops.w4a4o8_linear import (W4A4O8_DETECT_OP, W4A4O8_DETECT_REQUANT_OP, W4A4O8_MASKED_OP,
                                                w4a4o8_linear_masked_decomposed)

    gm = lowered.graph_module
    q_bytes = f_bytes = 0
    where = {W8A8_LINEAR_OP: (1, 2), int8_linear_codes: (2, 3), int8_linear_decomposed: (4, 5),
             W4A4O8_MASKED_OP: (3, 4), w4a4o8_linear_masked_decomposed: (3, 4), W4A4O8_DETECT_OP: (2, 3),
             W4A4O8_DETECT_REQUANT_OP: (2, 3), SCAN_DT_OP: (5, 6), int8_linear_decomposed_codes: (3, 4)}
    k_arg = {W4A4O8_MASKED_OP: 6, w4a4o8_linear_masked_decomposed: 6, W4A4O8_DETECT_OP: 5, W4A4O8_DETECT_REQUANT_OP: 5}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is int8_linear_decomposed_acc:
            w = const(gm, n.args[4])
            q_bytes += w.numel() * w.element_size() + w.shape[0] * 4
            f_bytes += w.numel() * 4
            continue
        if n.op != "call_function" or n.target not in where:
            continue
        w, s = (const(gm, n.args[i]) for i in where[n.target])
        numel = w.shape[0] * n.args[k_arg[n.target]] if n.target in k_arg else w.numel()
        q_bytes += w.numel() * w.element_size() + s.numel() * s.element_size()
        f_bytes += numel * 4
    return q_bytes, f_bytes


def runtime_linear_bytes(lowered) -> int:
    """Bytes of the fused linears' weights as the CPU kernels of this CPU hold them while the model
    runs: the graph's weights and scales plus the layouts the kernels build on the first call and
    keep beside each weight (``ouromamba_fx.ops.gemm.cached``), by their shapes. W4A4O8 linears with
    K >= SMALL_K: the int4 codes unpacked to int8 for the inlier GEMM (oneDNN's prepacked weight, or
    the (K, N) int8 copy / the AVX2 kernel's panels: N * K bytes either way) and the outlier
    epilogue's rows (K x N rounded up to 64, one byte each; an upper bound on CPUs with AMX, where a
    linear builds them only once a call's outliers take the epilogue's tiles rather than the dense
    outlier GEMM, ``w4a4o8_linear.DENSE_OUTLIER_RATIO``); K < SMALL_K: the dequantized float32
    weight. W8A8's int8 linears with K >= ``gemm.PREPACK_MIN_K`` on x86 CPUs with VNNI/AMX: oneDNN's
    prepacked copy beside the graph's weight (N * K bytes); on x86 CPUs without them whose kernels
    have AVX2, the int16 panels of ``ouromamba::s16_mm`` (N rounded up to 16 x K rounded up to 2,
    two bytes each); elsewhere the weights as they are."""
    from ouromamba_fx.lowering.patterns import const
    from ouromamba_fx.ops import gemm
    from ouromamba_fx.ops.int8_linear import (int8_linear_decomposed, int8_linear_decomposed_acc,
                                              int8_linear_decomposed_codes)
    from ouromamba_fx.ops.w4a4o8_linear import SMALL_K, W4A4O8_DETECT_OP, W4A4O8_DETECT_REQUANT_OP

    # the int8 weight's argument of each decomposed W8A8 linear (prepacked by oneDNN beside it)
    weight_arg = {int8_linear_decomposed: 4, int8_linear_decomposed_acc: 4, int8_linear_decomposed_codes: 3}

    q_bytes, _ = linear_weight_bytes(lowered)
    gm = lowered.graph_module
    extra = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (W4A4O8_DETECT_OP, W4A4O8_DETECT_REQUANT_OP):
            n_out, k = const(gm, n.args[2]).shape[0], n.args[5]
            extra += n_out * k * 4 if k < SMALL_K else n_out * k + k * ((n_out + 63) // 64 * 64)
        elif n.op == "call_function" and n.target in weight_arg:
            n_out, k = const(gm, n.args[weight_arg[n.target]]).shape
            if gemm.mode() == "emulated" and gemm.s16():
                extra += 2 * ((n_out + 15) // 16 * 16) * ((k + 1) // 2 * 2)
            elif gemm.mode() == "int_mm" and gemm.onednn_s8() and gemm.int8_dot():
                extra += n_out * k if k >= gemm.PREPACK_MIN_K else 0
    return q_bytes + extra


def run_model(key: str, batches: list[int], rounds: int, calib_n: int, do_profile: bool, log,
              extra: list[str] = (), extra_batches: tuple[int, ...] = (16,)) -> dict:
    model, calib, sample = build(key, calib_n)
    res = {"times": {}, "cpu": {}, "profile": {}, "size": {}, "convert_s": {}}
    variants = {"fp32 eager": (model, False)}
    torch._dynamo.reset()
    variants["fp32 compiled"] = (torch.compile(model, dynamic=False), False)
    variants["bf16 compiled"] = (torch.compile(model, dynamic=False), True)
    res["size"]["fp32"] = tensor_bytes(model)
    qs = {}
    for cname, cfg in (("W8A8", of.W8A8), ("W4A4O8", of.W4A4O8)):
        t = time.perf_counter()
        q = of.convert(model, calib=calib, config=cfg, show_progress=False)
        res["convert_s"][cname] = time.perf_counter() - t
        lowered = q.lower()
        res["size"][cname] = tensor_bytes(lowered.graph_module)
        res["size"][cname + " linears"] = linear_weight_bytes(lowered)
        res["size"][cname + " linears at run time"] = runtime_linear_bytes(lowered)
        variants[cname] = (torch.compile(q, backend="ouromamba", dynamic=False), False)
        qs[cname] = q
    for e in extra:
        base, opts = EXTRA[e]
        variants[e] = (torch.compile(qs[base], backend="ouromamba", dynamic=False, options=dict(opts)), False)
    res["variants"] = list(variants)
    for b in batches:
        x = sample(b)
        fns = {v: fc for v, fc in variants.items() if v in VARIANTS or b in extra_batches}
        for v, (ts, cs) in time_round_robin(fns, x, rounds).items():
            res["times"][(b, v)], res["cpu"][(b, v)] = ts, cs
            log(f"{key} batch {b} {v}: median {1e3 * statistics.median(ts):.1f} ms wall, "
                f"{1e3 * statistics.median(cs):.1f} ms CPU (load {load_avg():.2f})")
        if do_profile:
            for v, (fn, ac) in variants.items():
                if v != "fp32 eager" and (v in VARIANTS or b in extra_batches):
                    res["profile"][(b, v)] = profile_call(fn, x, ac)
    return res


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def cpu_features() -> str:
    probes = {"AVX-512": "_is_avx512_supported", "AVX-512 VNNI": "_is_vnni_supported",
              "AVX-512 BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    have = [name for name, p in probes.items() if getattr(torch.cpu, p, lambda: False)()]
    cap = torch.backends.cpu.get_cpu_capability()
    return f"capability {cap}" + (f", {', '.join(have)}" if have else ", no AVX-512 / VNNI / AMX")


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def malloc_note(mode: str) -> str:
    """How this run's allocator was set (``--malloc``, and glibc's environment variables)."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") and k.endswith("_")]
    how = ("`of.tune_malloc()` (glibc keeps freed chunks up to 32 MB in the heap and does not trim it)"
           if mode == "tuned" else "the C library's defaults (glibc: freed large chunks go back to the kernel)")
    return how + (f"; environment: {', '.join(env)}" if env else "")


def write_md(path: Path, args, results: dict, load_start: float, load_end: float, cmd: str) -> None:
    lines = [
        "# End-to-end CPU latency: float vs quantized and lowered",
        "",
        f"Produced by `{cmd}` (from the repository root) on {datetime.date.today().isoformat()}.",
        "",
        f"- torch {torch.__version__}, {platform.machine()} CPU ({cpu_name()}), {os.cpu_count()} logical CPUs, "
        f"`torch.get_num_threads()` = {torch.get_num_threads()}",
        f"- CPU features as torch sees them: {cpu_features()}; {cpu_gemm.describe()}",
        f"- load average (1 min) at start / end: {load_start:.2f} / {load_end:.2f} (the machine is shared; "
        "the benchmark itself keeps about 2 cores busy)",
        f"- median of {args.rounds} calls after 2 warm-up calls, the variants called in turn round by round; milliseconds per batch; `torch.inference_mode()`; "
        "profiles are wall time of one call",
        "- W8A8 / W4A4O8 = `torch.compile(of.convert(model, calib, preset), backend=\"ouromamba\")`;"
        " fp32/bf16 compiled = `torch.compile(model)` (Inductor defaults, bf16 under `torch.autocast`)",
        "- ratios: speed-up = time of the baseline / time of the variant (> 1: the variant is faster)",
        f"- malloc: {malloc_note(args.malloc)}",
        "",
    ]
    for key, res in results.items():
        lines += [f"## {key} ({MODELS[key]})", ""]
        extras = [v for v in res["variants"] if v not in VARIANTS]
        batches = sorted({b for b, _ in res["times"]})
        for measure, title in (("times", "Median wall time per batch (ms)"),
                               ("cpu", "Median process CPU time per batch (ms; all threads, the steadier "
                                       "measure on a shared machine)")):
            lines += [f"{title}:", "",
                      "| batch | " + " | ".join(VARIANTS) + " | W8A8 vs fp32c | W8A8 vs bf16c | W4A4O8 vs fp32c | W4A4O8 vs bf16c |",
                      "|---:|" + "---:|" * (len(VARIANTS) + 4)]
            for b in batches:
                med = {v: 1e3 * statistics.median(res[measure][(b, v)]) for v in VARIANTS}
                row = [f"{med[v]:.1f}" for v in VARIANTS]
                row += [fmt_ratio(med["fp32 compiled"], med["W8A8"]), fmt_ratio(med["bf16 compiled"], med["W8A8"]),
                        fmt_ratio(med["fp32 compiled"], med["W4A4O8"]), fmt_ratio(med["bf16 compiled"], med["W4A4O8"])]
                lines.append(f"| {b} | " + " | ".join(row) + " |")
            lines.append("")
        if extras:
            lines += ["Lowering options (`options=` of `torch.compile(q, backend=\"ouromamba\", ...)`): median "
                      "wall / CPU ms, and CPU-time speed-up vs fp32 compiled:", "",
                      "| batch | " + " | ".join(extras) + " |", "|---:|" + "---:|" * len(extras)]
            for b in [b for b in batches if (b, extras[0]) in res["times"]]:
                fc = statistics.median(res["cpu"][(b, "fp32 compiled")])
                cell = lambda v: (f"{1e3 * statistics.median(res['times'][(b, v)]):.1f} / "  # noqa: E731
                                  f"{1e3 * statistics.median(res['cpu'][(b, v)]):.1f} "
                                  f"({fc / statistics.median(res['cpu'][(b, v)]):.2f}x)")
                lines.append(f"| {b} | " + " | ".join(cell(v) for v in extras) + " |")
            lines.append("")
        s = res["size"]
        w8, w8f = s["W8A8 linears"]
        w4, w4f = s["W4A4O8 linears"]
        lines += ["Model size (bytes of all parameters and buffers; the lowered graphs keep patch embedding, "
                  "norms, head, A, D, conv1d and per-token activation scales in fp32):", "",
                  "| | fp32 | W8A8 lowered | W4A4O8 lowered |", "|---|---:|---:|---:|",
                  f"| whole model | {s['fp32']:,} | {s['W8A8']:,} ({s['fp32'] / s['W8A8']:.2f}x smaller) | "
                  f"{s['W4A4O8']:,} ({s['fp32'] / s['W4A4O8']:.2f}x smaller) |",
                  f"| quantized linear weights (+ their scales) | {w8f:,} | {w8:,} ({w8f / w8:.2f}x smaller) | "
                  f"{w4:,} ({w4f / w4:.2f}x smaller) |",
                  f"| the same as the CPU kernels hold them at run time (+ the layouts built once per weight) | "
                  f"{w8f:,} | {s['W8A8 linears at run time']:,} ({w8f / s['W8A8 linears at run time']:.2f}x smaller) | "
                  f"{s['W4A4O8 linears at run time']:,} ({w4f / s['W4A4O8 linears at run time']:.2f}x smaller) |", "",
                  "At run time the W4A4O8 linears keep, beside their packed int4 weights, the weights unpacked to "
                  "int8 for the inlier GEMM (there is no int4 GEMM on the CPU) and the outlier epilogue's rows, "
                  "and the dequantized float32 weights of the short-reduction linears (dt_proj); the files and the "
                  "lowered graph hold the packed form (`runtime_linear_bytes` in this script says how it is "
                  "counted).", "",
                  f"Conversion time (calibration on {args.calib} images): "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in res["convert_s"].items()), ""]
        if res["profile"]:
            # a column per category this model spends time in (Vim has no attention nor norms as ops)
            cols = [c for c in ("GEMM", "scan", "quant", "conv", "attention", "norm")
                    if c in ("GEMM", "scan", "quant", "conv") or any(p[c] > 0 for p in res["profile"].values())]
            lines += ["Where the time goes (one profiled call, ms; GEMM = float or integer linear ops incl. "
                      "their quantize/epilogue, scan = selective scan op, quant = quantize/outlier-mask ops "
                      "outside GEMMs, conv = float conv1d / conv2d ops (the integer conv2d's GEMMs are under "
                      "GEMM), attention "
                      "= scaled_dot_product_attention (its float matmuls and softmax), norm = normalisation "
                      "ops Inductor left as ops, rest = everything else: Inductor's fused kernels and "
                      "overhead; the profiler adds some time to each op):", "",
                      "| batch | variant | total | " + " | ".join(cols) + " | rest |",
                      "|---:|---|---:|" + "---:|" * (len(cols) + 1)]
            for (b, v), p in sorted(res["profile"].items()):
                pct = lambda c: f"{p[c]:.1f} ({100 * p[c] / p['total']:.0f}%)"  # noqa: E731
                lines.append(f"| {b} | {v} | {p['total']:.1f} | " + " | ".join(
                    pct(c) for c in cols + ["rest"]) + " |")
            lines.append("")
    if args.notes and Path(args.notes).is_file():
        lines += [Path(args.notes).read_text().rstrip(), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="ref,vim_tiny,vim_small")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calib", type=int, default=32, help="calibration images per model")
    ap.add_argument("--quick", action="store_true", help="reference model, batch 16, 3 rounds")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--extra", default="", help=f"extra variants, comma-separated: {', '.join(EXTRA)}")
    ap.add_argument("--extra-batches", default="16", help="batch sizes at which the extra variants run")
    ap.add_argument("--wait-load", type=float, default=0.0, help="wait (up to 30 min) for a 1-min load below this")
    ap.add_argument("--notes", default="", help="a markdown file appended to the report (the reading of the numbers)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--malloc", choices=("default", "tuned"), default="default",
                    help="tuned: of.tune_malloc() first (freed memory kept in the process; glibc only)")
    ap.add_argument("--out", default=str(HERE / "cpu_latency.md"))
    args = ap.parse_args(argv)
    if args.malloc == "tuned" and not of.tune_malloc():
        ap.error("--malloc tuned: this C library is not glibc")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.batches, args.rounds = "ref", "16", 3
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    batches = [int(b) for b in args.batches.split(",")]
    load_start = wait_for_quiet(args.wait_load, 1800) if args.wait_load else load_avg()
    results = {}
    for m in models:
        extra = [e.strip() for e in args.extra.split(",") if e.strip()]
        for e in extra:
            if e not in EXTRA:
                ap.error(f"unknown extra variant {e!r}; known: {', '.join(EXTRA)}")
        results[m] = run_model(m, batches, args.rounds, args.calib, not args.no_profile,
                               lambda s: print(s, flush=True), extra,
                               tuple(int(b) for b in args.extra_batches.split(",")))
    cmd = "python benchmarks/cpu_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_md(Path(args.out), args, results, load_start, load_avg(), cmd.strip())
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
