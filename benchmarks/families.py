"""The upstream code of each family, converted with no user code (random weights, 224 px).

    OUROMAMBA_VMAMBA_SRC=<VMamba checkout> python benchmarks/families.py            # all four
    python benchmarks/families.py --models mambavision_t,mamba_stack --calib 4

For each model: ``convert(upstream_model, calib, W8A8)`` as a user would call it (the upstream
object is passed as it is); the count of quantized / total parameter-bearing modules and the
reasons for the float ones (``q.coverage``); the W8A8 output SQNR against the float upstream model
on held-out inputs; and the lowered model (``q.lower()``) and, with ``--compile``, the compiled
lowered model (``torch.compile(..., backend="ouromamba")``) against the reference quantized graph.

Upstream code (never copied into this repository): mamba-ssm and mambavision installed as
DEVELOPERS.md says (a forward-only stand-in for mamba-ssm's CUDA scan extension computes with its
own ``selective_scan_ref``, see tests/upstream.py), VMamba from a checkout named by
``OUROMAMBA_VMAMBA_SRC``. Inputs are N(0, 1) images in the models' normalised input space, so the
SQNR numbers describe the quantization of random-weight models, not accuracy.

Writes ``families.md`` beside this script.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import ouromamba_fx as of  # noqa: E402
from ouromamba_fx.measure import sqnr  # noqa: E402
from tests import upstream  # noqa: E402  (the upstream import helpers the tests use)

VMAMBA_T = {  # the published configs (VMamba's vanilla_vmamba_tiny and vmamba_tiny_s2l5)
    "vmamba_t_v0": dict(depths=[2, 2, 9, 2], dims=96, ssm_d_state=16, ssm_ratio=2.0, ssm_conv_bias=True,
                        forward_type="v0", mlp_ratio=0.0, norm_layer="ln", downsample_version="v1",
                        patchembed_version="v1"),
    "vmamba_t_v2": dict(depths=[2, 2, 5, 2], dims=96, ssm_d_state=1, ssm_ratio=2.0, ssm_conv_bias=False,
                        forward_type="v05_noz", mlp_ratio=4.0, norm_layer="ln2d", downsample_version="v3",
                        patchembed_version="v2"),
}


class MambaStack224(nn.Module):
    """A user's model of mamba-ssm ``Mamba`` blocks: 16x16 patches of a 224-px image, 12
    pre-norm residual blocks of width 192, mean-pooled head (upstream objects, unmodified)."""

    def __init__(self, mamba_cls, dim: int = 192, depth: int = 12) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 16, 16)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.blocks = nn.ModuleList(mamba_cls(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1000)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)
        for norm, blk in zip(self.norms, self.blocks):
            h = h + blk(norm(h))
        return self.head(self.norm(h).mean(1))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mambavision_t":
        return upstream.mambavision().mamba_vision_T().eval()
    if name in VMAMBA_T:
        return upstream.vmamba().VSSM(**VMAMBA_T[name]).eval()
    if name == "mamba_stack":
        return MambaStack224(upstream.mamba_simple().Mamba).eval()
    raise SystemExit(f"unknown model {name!r}")


def measure(name: str, n_calib: int, n_test: int, compile_: bool) -> dict:
    model = build(name)
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(n_calib, 3, 224, 224, generator=g)
    test = torch.randn(n_test, 3, 224, 224, generator=g)
    t = time.time()
    q = of.convert(model, calib, of.W8A8, show_progress=False)
    seconds = time.time() - t
    cov = q.coverage
    reasons = Counter(c.why if not c.why.startswith("inside ") else c.why for c in cov.values() if not c.quantized)
    kinds = Counter(type(model.get_submodule(n)).__name__ for n, c in cov.items() if c.quantized
                    if _has(model, n))
    with torch.no_grad():
        ref = model(test)
        out = q(test)
        low = q.lower()
        out_low = low(test)
        row = {"name": name, "class": f"{type(model).__module__}.{type(model).__name__}",
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "quantized": sum(c.quantized for c in cov.values()), "total": len(cov), "reasons": reasons,
               "kinds": kinds, "sqnr": sqnr(ref, out), "lowered_sqnr": sqnr(out, out_low),
               "lowered_max_diff": (out - out_low).abs().max().item(), "top1_agree": 100.0 * float(
                   (out.argmax(-1) == out_low.argmax(-1)).float().mean()), "convert_s": seconds,
               "log": [line for line in q.log if line.startswith("rebuilt")]}
        if compile_:
            comp = torch.compile(q, backend="ouromamba")
            out_c = comp(test)
            row["compiled_sqnr"] = sqnr(out, out_c)
    return row


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mambavision_t,vmamba_t_v0,vmamba_t_v2,mamba_stack")
    ap.add_argument("--calib", type=int, default=8, help="calibration images (N(0,1), 224 px)")
    ap.add_argument("--test", type=int, default=4, help="held-out images for the SQNR")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the quantized model")
    ap.add_argument("--out", default=str(HERE / "families.md"))
    args = ap.parse_args()
    env = (f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), load average "
           f"at start {os.getloadavg()[0]:.1f}")
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(measure(name, args.calib, args.test, args.compile))
        except BaseException as e:  # noqa: BLE001 - a skipped upstream (pytest.skip) or a failure, reported
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"})
        print(rows[-1], flush=True)
        write(Path(args.out), rows, args, env)
    return 0


def write(path: Path, rows: list[dict], args, env: str) -> None:
    lines = ["# The upstream families converted with no user code (random weights, 224 px)", "",
             f"Command: `python benchmarks/families.py --models {args.models} --calib {args.calib} --test "
             f"{args.test}{' --compile' if args.compile else ''}`  ", env + ".", "",
             "Each model is the unmodified upstream object (see the script's docstring); `convert(model, calib, "
             "W8A8)` with N(0, 1) calibration images. SQNR: output logits of the quantized model against the "
             "float upstream model on held-out N(0, 1) images. Lowered: `q.lower()` against the reference "
             "quantized graph (SQNR, max |diff| of logits, top-1 agreement).", "",
             "| model | params (M) | quantized / parameter-bearing modules | W8A8 output SQNR (dB) | lowered vs "
             "reference: SQNR dB / max diff / top-1 agree | convert (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | - | not run: {r['error'][:160]} | | | |")
            continue
        comp = f"; compiled {r['compiled_sqnr']:.1f} dB" if "compiled_sqnr" in r else ""
        lines.append(f"| {r['name']} | {r['params_m']:.2f} | {r['quantized']} / {r['total']} | {r['sqnr']:.1f} | "
                     f"{r['lowered_sqnr']:.1f} / {r['lowered_max_diff']:.2g} / {r['top1_agree']:.0f} %{comp} | "
                     f"{r['convert_s']:.0f} |")
    lines += ["", "Modules kept in float, by reason (count):", ""]
    for r in rows:
        if "error" in r:
            continue
        lines.append(f"- **{r['name']}** ({r['class']}; {'; '.join(r['log'])}): quantized "
                     + ", ".join(f"{v} {k}" for k, v in sorted(r["kinds"].items())) + ". Float: "
                     + "; ".join(f"{v} x {k}" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1])))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
