"""Time the Triton integer kernels against torch's float linear on a CUDA GPU.

    python benchmarks/gpu.py [--out gpu.md]

Without a CUDA GPU it prints "no CUDA GPU here: nothing measured" and exits 0.

For each shape (the same as ``benchmarks/ops_cpu.py``) it first checks the CUDA ops against the
plain-torch references (integers must match exactly, floats closely), then times with
``triton.testing.do_bench`` (median): fp16 / bf16 / fp32 ``F.linear``, ``torch._int_mm`` (cuBLAS
int8, where its shape rules allow), the Triton int8 GEMM with fused epilogue
(``ouromamba::int8_linear``), W8A8 with quantization (``ouromamba::w8a8_linear``) and W4A4 + 8-bit
outliers on packed int4 weights (``ouromamba::w4a4o8_linear``, ~2 % outlier channels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [  # (label, M, K, N)
    ("Vim-S in_proj", 16 * 197, 384, 1536),
    ("Vim-S out_proj", 16 * 197, 768, 384),
    ("Vim-S x_proj", 16 * 197, 768, 56),
    ("ref in_proj", 64 * 65, 128, 512),
    ("ref out_proj", 64 * 65, 256, 128),
    ("ref x_proj", 64 * 65, 256, 40),
]


def check(c: dict) -> None:
    """CUDA ops vs the CPU references: exact integer products, float outputs to 1e-5 relative."""
    from ouromamba_fx.ops import gemm, int8_linear, quant, w4a4o8_linear

    ops = torch.ops.ouromamba
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    q, s = ops.quantize_per_token(c["x"], 8)
    q_ref, s_ref = quant.quantize_per_token_ref(cpu["x"], 8)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref), "quantize_per_token"
    y = ops.int8_linear(q, s, c["w8"], torch.ones_like(c["w8_scale"]), None)
    assert torch.equal(y.cpu(), gemm.int_matmul_ref(q_ref, cpu["w8"]).float() * s_ref), "int8_linear"
    for name, got, want in [
        ("w8a8_linear", ops.w8a8_linear(c["x"], c["w8"], c["w8_scale"], c["bias"], None),
         int8_linear.w8a8_linear_ref(cpu["x"], cpu["w8"], cpu["w8_scale"], cpu["bias"], None)),
        ("w4a4o8_linear", ops.w4a4o8_linear(c["x"], c["mask"], None, c["w4_packed"], c["w4_scale"], c["bias"], c["k"]),
         w4a4o8_linear.w4a4o8_linear_masked_ref(cpu["x"], cpu["mask"], None, cpu["w4_packed"], cpu["w4_scale"],
                                                 cpu["bias"], cpu["k"])),
    ]:
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def make_case(m: int, k: int, n: int, device: str) -> dict:
    from ouromamba_fx.ops import int4

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    mask = torch.zeros(m, k, dtype=torch.bool)
    mask[:, torch.randperm(k, generator=g)[: max(1, round(0.02 * k))]] = True
    x = torch.where(mask, x * 20, x)
    w8_scale = w.abs().amax(dim=1) / 127
    w4_scale = w.abs().amax(dim=1) / 7
    c = dict(x=x, w=w, bias=torch.randn(n, generator=g), mask=mask, w8_scale=w8_scale, w4_scale=w4_scale,
             w8=torch.round(w / w8_scale[:, None]).to(torch.int8),
             w4_packed=int4.pack_int4(torch.round(w / w4_scale[:, None]).clamp(-7, 7).to(torch.int8)))
    c = {key: v.to(device) for key, v in c.items()}
    c["k"] = k
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write a markdown table here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured")
        return 0
    import triton.testing

    import ouromamba_fx.ops  # noqa: F401  (registers the ops)
    ops = torch.ops.ouromamba
    gpu = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {gpu}")
    cols = ["fp16", "bf16", "fp32", "_int_mm", "int8 GEMM", "w8a8", "w4a4o8"]
    lines = [f"# Triton integer kernels on {gpu}", "",
             "Produced by `python benchmarks/gpu.py`; median milliseconds per call (triton.testing.do_bench).", "",
             "| shape | M | K | N | " + " | ".join(cols) + " | w8a8 vs fp16 | w4a4o8 vs fp16 |",
             "|---|---:|---:|---:|" + "---:|" * (len(cols) + 2)]
    for label, m, k, n in SHAPES:
        c = make_case(m, k, n, "cuda")
        check(c)
        x, w, b = c["x"], c["w"], c["bias"]
        xh, wh, bh = x.half(), w.half(), b.half()
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        q, s = ops.quantize_per_token(x, 8)
        fns = {
            "fp16": lambda: F.linear(xh, wh, bh),
            "bf16": lambda: F.linear(xb, wb, bb),
            "fp32": lambda: F.linear(x, w, b),
            "_int_mm": lambda: torch._int_mm(q, c["w8"].t()),
            "int8 GEMM": lambda: ops.int8_linear(q, s, c["w8"], c["w8_scale"], b),
            "w8a8": lambda: ops.w8a8_linear(x, c["w8"], c["w8_scale"], b, None),
            "w4a4o8": lambda: ops.w4a4o8_linear(x, c["mask"], None, c["w4_packed"], c["w4_scale"], b, k),
        }
        t = {}
        for name, f in fns.items():
            try:
                t[name] = triton.testing.do_bench(f, return_mode="median")
            except RuntimeError as e:  # cuBLAS _int_mm shape rules (M > 16, K and N multiples of 8)
                print(f"  {label} {name}: not run ({str(e).splitlines()[0][:100]})")
                t[name] = float("nan")
        print(f"{label:15s} M={m} K={k} N={n}: " + ", ".join(f"{name} {t[name]:.3f}" for name in cols) + " ms")
        lines.append(f"| {label} | {m} | {k} | {n} | " + " | ".join(f"{t[c_]:.3f}" for c_ in cols)
                     + f" | {t['fp16'] / t['w8a8']:.2f} | {t['fp16'] / t['w4a4o8']:.2f} |")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
