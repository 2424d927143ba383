"""The integer Conv2d of the lowering (ouromamba_fx.ops.int8_conv2d, rule lower_int8_conv2d)
against the reference graph's float conv of fake-quantized inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ouromamba_fx as of
from ouromamba_fx.config import WeightQuant
from ouromamba_fx.ops import gemm
from ouromamba_fx.ops.int8_conv2d import conv_weight_rows, int8_conv2d_decomposed, int8_conv2d_ref

# (B, C, H, W, N, kernel, stride, padding, dilation): odd sizes, both strides, patchify (kernel =
# stride: im2col is a reshape), a patchify whose width the stride does not divide, rectangular
# kernels, dilation, 1x1
CASES = [(2, 5, 9, 11, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
         (2, 5, 9, 11, 7, (3, 3), (2, 2), (1, 1), (1, 1)),
         (1, 3, 8, 8, 6, (4, 4), (4, 4), (0, 0), (1, 1)),
         (2, 4, 10, 7, 3, (2, 2), (2, 2), (0, 0), (1, 1)),
         (1, 6, 7, 9, 5, (3, 2), (2, 1), (0, 1), (1, 1)),
         (1, 6, 11, 9, 5, (3, 3), (1, 1), (2, 2), (2, 2)),
         (1, 6, 7, 9, 5, (1, 1), (1, 1), (0, 0), (1, 1))]


def close(a, b):
    """Same numbers up to float summation order (integer codes equal, GEMM order differs)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def make(case, per_row: bool, bias: bool, qmax: int = 127, seed: int = 0):
    b, c, h, w, n, k, s, p, d = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g) * 3
    xs = (torch.rand(1, 1, h, 1, generator=g) if per_row else torch.rand(1, generator=g)) * 0.03 + 0.01
    wq = torch.randint(-127, 128, (n, c, *k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01
    bs = torch.randn(n, generator=g) if bias else None
    return x, xs, -qmax, qmax, wq, ws, bs, k, s, p, d


@torch.no_grad()
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("per_row,bias", [(True, True), (True, False), (False, True)])
def test_op_equals_the_reference_conv(case, per_row, bias):
    x, xs, qmin, qmax, wq, ws, bs, k, s, p, d = make(case, per_row, bias)
    y = int8_conv2d_decomposed(x, xs, qmin, qmax, conv_weight_rows(wq), ws, bs, k, s, p, d)
    ref = int8_conv2d_ref(x, xs, qmin, qmax, wq, ws, bs, s, p, d)
    assert close(y, ref)
    # int8_conv2d_ref is the reference graph's arithmetic: fake quantization, then a float conv
    codes = torch.round(x / xs.reshape(1, 1, -1, 1) if per_row else x / xs).clamp(qmin, qmax)
    direct = F.conv2d(codes * (xs.reshape(1, 1, -1, 1) if per_row else xs), wq.float() * ws.reshape(-1, 1, 1, 1),
                      bs, s, p, d)
    assert close(ref, direct)


@torch.no_grad()
@pytest.mark.parametrize("case", CASES[:3])
def test_fewer_activation_bits(case):
    x, xs, qmin, qmax, wq, ws, bs, k, s, p, d = make(case, True, True, qmax=31)
    y = int8_conv2d_decomposed(x, xs, qmin, qmax, conv_weight_rows(wq), ws, bs, k, s, p, d)
    assert close(y, int8_conv2d_ref(x, xs, qmin, qmax, wq, ws, bs, s, p, d))


@torch.no_grad()
@pytest.mark.parametrize("case", CASES[:2])
def test_emulated_gemm_path_gives_the_same_numbers(case):
    """CPUs without VNNI / AMX multiply the codes as exact fp32 GEMMs: the same integers, so the
    same output bit for bit."""
    x, xs, qmin, qmax, wq, ws, bs, k, s, p, d = make(case, True, True)
    args = (x, xs, qmin, qmax, conv_weight_rows(wq), ws, bs, k, s, p, d)
    with gemm.use("int_mm"):
        a = int8_conv2d_decomposed(*args)
    with gemm.use("emulated"):
        e = int8_conv2d_decomposed(*args)
    assert torch.equal(a, e)


class ConvNet(nn.Module):
    """Dense convs of the shapes the families have (stem, stride-2 downsampling, a stride-1 stage
    conv with and without bias), a depthwise conv, then a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.down = nn.Conv2d(8, 16, 2, 2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + F.gelu(self.conv(x))
        x = self.dw(x)
        x = self.down(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def convnet_q():
    torch.manual_seed(0)
    from ouromamba_fx.tags import Role

    m = ConvNet().eval()
    calib = torch.randn(8, 3, 15, 13)
    cfg = of.W8A8.replace(weight=WeightQuant(8, candidates=4), calib_sample=256,
                          roles=(Role.CONV2D, Role.STEM, Role.DOWNSAMPLE))
    return of.convert(m, calib, cfg, show_progress=False, allow_float=True), calib


def n_int_convs(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is int8_conv2d_decomposed)


@torch.no_grad()
def test_lowered_convs_match_the_reference_graph_and_the_log_says_what_stayed_float(convnet_q):
    q, calib = convnet_q
    x = calib[:3]
    low = q.lower(conv2d_min_k=0)
    assert n_int_convs(low.graph_module) == 3  # stem, conv, down; the depthwise conv stays float
    assert close(low(x), q(x))
    assert any("lower_int8_conv2d: kept float: grouped / depthwise" in line and line.endswith("(1)")
               for line in low.log)
    # the default threshold keeps these narrow convs float, each counted with its reason
    default = q.lower()
    assert n_int_convs(default.graph_module) == 0
    assert any("KW * C = 9 < conv2d_min_k" in line for line in default.log)
    assert n_int_convs(q.lower(int8_conv2d=False, conv2d_min_k=0).graph_module) == 0
    # a GPU target keeps every conv2d float, visibly
    cuda = q.lower(target="cuda", conv2d_min_k=0)
    assert n_int_convs(cuda.graph_module) == 0
    assert any("kept float for CUDA" in line and line.endswith("(3)") for line in cuda.log)


@torch.no_grad()
def test_lowered_convs_under_the_backend(convnet_q):
    q, calib = convnet_q
    x = calib[:3]
    torch._dynamo.reset()
    fast = torch.compile(q, backend="ouromamba", dynamic=False, options={"conv2d_min_k": 0})
    assert close(fast(x), q(x))


def test_bad_threshold_is_refused(convnet_q):
    q, _ = convnet_q
    with pytest.raises(ValueError, match="conv2d_min_k"):
        q.lower(conv2d_min_k=-1)
