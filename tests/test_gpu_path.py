"""The GPU path end to end without a GPU: small Vims lowered for CUDA and run through every op's CUDA
implementation on CPU tensors, the Triton kernels interpreted
(:func:`ouromamba_fx.ops.dispatch.cuda_kernels_on_cpu`), against the reference graph on the CPU.

For each lowered graph: every ``ouromamba::`` op node is called once per forward and every call
launched a Triton kernel (counted by the kernels' launch helper), the logits are within 1e-5
(relative to their largest magnitude) of the reference graph's, and the top-1 classes agree on a
fixed batch. cuBLAS's ``torch._int_mm`` shape rules are enforced on the CPU inside the run (the
real ``_int_mm`` raises for them on a GPU), so a lowering that left a refused shape to cuBLAS
fails here too. The float model's forward and backward (the selective scan's Triton kernels, as
OuroMamba-Gen uses them) are compared with the CPU.

As in the other Triton test files, the interpreted tests run in a child pytest process started
with ``TRITON_INTERPRET=1``; the parent also checks what needs no interpreter (the lowering's
routing of the shapes cuBLAS refuses, the switch's error without the interpreter). Shapes are
tiny: the interpreter runs each kernel program in Python (its generic associative scan element
by element).
"""

from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("triton")

import ouromamba_fx as of  # noqa: E402
from ouromamba_fx.models import VisionMamba  # noqa: E402
from ouromamba_fx.ops import dispatch, gemm  # noqa: E402
from ouromamba_fx.ops.int8_linear import W8A8_LINEAR_OP, int8_linear_decomposed  # noqa: E402
from ouromamba_fx.ops.scan import SCAN_DT_OP  # noqa: E402
from ouromamba_fx.ops.w4a4o8_linear import W4A4O8_MASKED_OP, w4a4o8_linear_masked_decomposed  # noqa: E402
from tests.triton_child import INTERPRET, assert_passes_in_interpreter  # noqa: E402

from .conftest import tiny_config  # noqa: E402

# embed 16 -> d_inner 32; dt_rank 2 (dt_proj K = 2), x_proj N = 2 + 2 * 4 = 10: shapes cuBLAS refuses.
# 3 x 3 patches + a class token: L = 10, one scan chunk under the interpreter.
CONFIG = dict(depth=1, embed_dim=16, dt_rank=2, img_size=12)
CALIB = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))


def _model() -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(tiny_config(**CONFIG)).eval()


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_gpu_path_in_interpreter():
    assert_passes_in_interpreter(__file__)


test_gpu_path_in_interpreter.__test__ = not INTERPRET


@torch.no_grad()
def test_lowering_for_cuda_routes_the_shapes_cublas_refuses():
    """For a GPU, in_proj (K 16, N 64) and out_proj (K 32, N 16) stay decomposed around
    torch._int_mm, x_proj (K 32, N 10) becomes the op (Triton int8 GEMM) and dt_proj (K 2, N 32)
    stays decomposed for its exact float product; on the CPU all four are decomposed."""
    for k, n, ok in ((16, 64, True), (32, 10, False), (12, 384, False), (384, 44, False), (0, 8, False)):
        assert gemm.cublas_weight_ok(k, n) == ok
    assert not gemm.cublas_int_mm_ok(16, 16, 64) and gemm.cublas_int_mm_ok(17, 16, 64)
    m = _model()
    q = of.convert(m, calib=CALIB, config=of.W8A8, show_progress=False)
    counts = {t: {} for t in ("cpu", "cuda")}
    for target in counts:
        # (on a CPU target dt_proj is computed inside the scan, x_proj reads its conv's codes and the
        # convs apply in_proj's epilogue by default: the linears' routing is what is checked here)
        gm = q.lower(target=target, dt_scan=False, conv_codes=False, inproj_epilogue=False).graph_module
        for node in _calls(gm, int8_linear_decomposed) + _calls(gm, W8A8_LINEAR_OP):
            w = getattr(gm, (node.args[4] if node.target is int8_linear_decomposed else node.args[1]).target)
            counts[target][tuple(w.shape)] = node.target
    assert counts["cpu"] == {(64, 16): int8_linear_decomposed, (10, 32): int8_linear_decomposed,
                             (32, 2): int8_linear_decomposed, (16, 32): int8_linear_decomposed}
    assert counts["cuda"] == {**counts["cpu"], (10, 32): W8A8_LINEAR_OP}
    assert q.lower().lower_options == {} and q.lower(target="cuda").lower_options == {"target": "cuda"}
    # the scan computes dt_proj itself for the CPU only (the Triton scan reads delta)
    cuda = q.lower(target="cuda")
    assert not _calls(cuda.graph_module, SCAN_DT_OP) and len(_calls(q.lower(target="cpu").graph_module, SCAN_DT_OP)) == 2
    assert any(line.startswith("fuse_dt_scan: kept for CUDA") for line in cuda.log)
    with pytest.raises(ValueError, match="target"):
        q.lower(target="gpu")
    # the non-fused W4A4O8 linears: the same routing
    q4 = of.convert(m, calib=CALIB, config=of.W4A4O8, show_progress=False)
    for target, masked in (("cpu", 0), ("cuda", 2)):  # the two x_proj for a GPU
        gm = q4.lower(target=target, mixed_fused=False).graph_module
        assert len(_calls(gm, W4A4O8_MASKED_OP)) == masked
        assert len(_calls(gm, w4a4o8_linear_masked_decomposed)) == 6 - masked


def test_the_switch_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with dispatch.cuda_kernels_on_cpu():
            pass


test_lowering_for_cuda_routes_the_shapes_cublas_refuses.__test__ = not INTERPRET
test_the_switch_needs_the_interpreter.__test__ = not INTERPRET


# --------------------------------------------------------------------------------------------------
# The interpreted tests (child process).

@contextmanager
def _cublas_shape_rules():
    """``torch._int_mm`` raising as cuBLAS does for the shapes it refuses (CPU oneDNN takes them)."""
    real = torch._int_mm

    def strict(a, b):
        if not gemm.cublas_int_mm_ok(a.shape[0], a.shape[1], b.shape[1]):
            raise RuntimeError(f"cuBLAS _int_mm refuses {tuple(a.shape)} x {tuple(b.shape)}")
        return real(a, b)

    torch._int_mm = strict
    try:
        yield
    finally:
        torch._int_mm = real


def _graph_ops(gm) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
                n.target.namespace == "ouromamba":
            out[n.target._schema.name] = out.get(n.target._schema.name, 0) + 1
    return out


@pytest.fixture(scope="module")
def models():
    m = _model()
    return {name: of.convert(m, calib=CALIB, config=cfg, show_progress=False)
            for name, cfg in (("W8A8", of.W8A8), ("W4A4O8", of.W4A4O8),
                              ("W8A8-reparam", of.W8A8.replace(reparam=of.Reparam(8))))}


class TestInInterpreter:
    __test__ = INTERPRET

    @torch.no_grad()
    @pytest.mark.parametrize("name,options,ops", [
        # every linear on the Triton int8 GEMM
        ("W8A8", dict(int8_inline=False), {"w8a8_linear": 6, "causal_conv1d_silu": 2, "selective_scan_cl": 2}),
        # the default W4A4O8 lowering: outlier rule, split and gathered outlier product in one op
        ("W4A4O8", {}, {"w4a4o8_linear_rt": 4, "w4a4o8_linear_mixed": 2, "mixed_fake_quant": 4,
                        "causal_conv1d_silu": 2, "selective_scan_cl": 2}),
        # its non-fused form: the rule's mask, then the masked linear
        ("W4A4O8", dict(mixed_fused=False, int4_inline=False),
         {"outlier_mask": 12, "w4a4o8_linear": 6, "causal_conv1d_silu": 2, "selective_scan": 2}),
        # the reparameterized scan on int8 codes; linears decomposed where cuBLAS takes them
        ("W8A8-reparam", dict(integer_scan=True),
         {"w8a8_linear": 2, "causal_conv1d_silu": 2, "selective_scan_qi": 2}),
    ])
    def test_lowered_model_through_the_cuda_kernels(self, models, name, options, ops):
        q = models[name]
        low = q.lower(target="cuda", **options)
        want = {f"ouromamba::{k}": v for k, v in ops.items()}
        assert _graph_ops(low.graph_module) == want
        ref = q(X)
        with _cublas_shape_rules(), dispatch.cuda_kernels_on_cpu() as calls:
            y = low(X)
        assert calls.summary() == {op: (n, n) for op, n in want.items()}  # each call launched Triton
        rel = ((y - ref).abs().max() / ref.abs().max()).item()
        print(f"{name} {options}: max |y - ref| / max |ref| = {rel:.2e}; calls {calls.summary()}; "
              f"launches {calls.kernels()}")
        assert rel <= 1e-5
        assert torch.equal(y.argmax(-1), ref.argmax(-1))

    def test_float_model_forward_and_backward(self):
        """The float scan's Triton forward and backward under autograd (what OuroMamba-Gen runs on a
        GPU), against the CPU kernels: logits and the input's gradient."""
        m = _model()
        x = X[:2].clone().requires_grad_(True)
        ref = m(x)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        with dispatch.cuda_kernels_on_cpu() as calls:
            y = m(x)
            (g,) = torch.autograd.grad(y.square().sum(), x)
        assert calls.summary() == {"ouromamba::selective_scan": (2, 2), "ouromamba::selective_scan_bwd": (2, 2)}
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max().item())
