"""Unusual and bad inputs: empty batches, non-finite images, other dtypes, gradients, the meta
device, 0-dim tensors in models, files that are not what they should be, and the CLI's answers
to user errors."""

from __future__ import annotations

import re

import pytest
import torch
from torch.library import opcheck

from ouromamba_fx.ops.int4 import pack_int4

OPS = torch.ops.ouromamba


# --- every custom op takes a batch of 0 rows ------------------------------------------------------

def _empty_batch_cases():
    """(name, op, args) with the batch axis of every activation of size 0 (weights, scales and
    other per-model tensors as in use)."""
    g = torch.Generator().manual_seed(0)
    b, length, c, n = 0, 9, 40, 6
    x = torch.randn(b, length, c, generator=g)
    s_in = torch.rand(length, generator=g) + 0.1
    wq = torch.randint(-8, 8, (n, c), dtype=torch.int8, generator=g)
    w4, w4s = pack_int4(wq), torch.rand(n, generator=g) * 0.01 + 1e-3
    w8, w8s, bias = wq * 9, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    small = torch.randn(b, length, 8, generator=g)  # K < SMALL_K: the float-GEMM CPU path
    w4_small = pack_int4(torch.randint(-8, 8, (n, 8), dtype=torch.int8, generator=g))
    rows = torch.randn(0, c, generator=g)
    mask = torch.zeros(0, c, dtype=torch.bool)
    # scan: u, delta (batch, d, L), A (d, N), B/C (batch, N, L)
    d, ns = 12, 4
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    A = -(torch.rand(d, ns, generator=g) + 0.1)
    B, C = torch.randn(b, ns, length, generator=g), torch.randn(b, ns, length, generator=g)
    D, z, dbias = torch.randn(d, generator=g), torch.randn(b, d, length, generator=g), torch.randn(d, generator=g)
    scan = (u, delta, A, B, C, D, z, dbias, True)
    r_c, r_l, r_n = torch.rand(d) + 0.5, torch.rand(length) + 0.5, torch.rand(ns) + 0.5
    state_scale = torch.rand(length) * 0.05 + 0.02
    dq, bq, cq = (torch.randint(-127, 128, t.shape, dtype=torch.int8, generator=g) for t in (delta, B, C))
    step = lambda: (torch.rand(1, 1, length, generator=g) * 0.05 + 0.01, torch.zeros(1, 1, length))  # noqa: E731
    conv_x = torch.randn(b, length, 2 * d, generator=g)[..., :d].transpose(1, 2)
    conv_w = torch.randn(d, 1, 4, generator=g) * 0.4
    return [
        ("quantize", OPS.quantize.default, (x, torch.rand(length, 1) + 0.1, torch.zeros(length, 1), -7, 7)),
        ("dequantize", OPS.dequantize.default,
         (torch.zeros(b, length, c, dtype=torch.int8), torch.rand(length, 1) + 0.1, torch.zeros(length, 1))),
        ("quantize_mixed", OPS.quantize_mixed.default, (x, s_in, 1, 2, 4, 8, 3.0, 4)),
        ("quantize_mixed (B, C, L)", OPS.quantize_mixed.default,
         (x.transpose(1, 2).contiguous(), s_in, 2, 1, 4, 16, 3.0, 10)),
        ("outlier_mask", OPS.outlier_mask.default, (x, s_in, 1, 2, 4, 3.0, 4)),
        ("mixed_fake_quant", OPS.mixed_fake_quant.default, (x, s_in, 1, 2, 4, 8, 3.0, 4)),
        ("mixed_fake_quant (B, C, L)", OPS.mixed_fake_quant.default,
         (x.transpose(1, 2).contiguous(), s_in, 2, 1, 4, 8, 3.0, 10)),
        ("w4a4o8_linear_rt", OPS.w4a4o8_linear_rt.default, (x, s_in, w4, w4s, bias, c, 3.0, 4)),
        ("w4a4o8_linear_rt small K", OPS.w4a4o8_linear_rt.default, (small, s_in, w4_small, w4s, None, 8, 3.0, 4)),
        ("w4a4o8_linear_mixed", OPS.w4a4o8_linear_mixed.default,
         (small, s_in, w4_small, w4s, bias, 8, 3.0, 4, torch.rand(length) + 0.1, 1, 2, 4, 4.0, 10)),
        ("w4a4o8_linear_mixed long K", OPS.w4a4o8_linear_mixed.default,
         (x, s_in, w4, w4s, bias, c, 3.0, 4, torch.rand(length) + 0.1, 1, 2, 4, 4.0, 10)),
        ("quantize_per_token", OPS.quantize_per_token.default, (x, 8)),
        ("outlier_split", OPS.outlier_split.default, (rows, mask, None, 4)),
        ("outlier_split static", OPS.outlier_split.default, (rows, mask, torch.rand(0, 1) + 0.1, 4)),
        ("int8_linear", OPS.int8_linear.default,
         (torch.zeros(0, c, dtype=torch.int8), torch.rand(0, 1), w8, w8s, bias)),
        ("w8a8_linear", OPS.w8a8_linear.default, (x, w8, w8s, bias, None)),
        ("w8a8_linear static", OPS.w8a8_linear.default, (x, w8, w8s, None, torch.tensor([0.02]))),
        ("w4a4o8_linear", OPS.w4a4o8_linear.default,
         (x, torch.zeros(x.shape, dtype=torch.bool), s_in.reshape(1, length, 1), w4, w4s, bias, c)),
        ("causal_conv1d_silu", OPS.causal_conv1d_silu.default, (conv_x, conv_w, D, *step(), -127, 127, True)),
        ("causal_conv1d_silu float", OPS.causal_conv1d_silu.default,
         (conv_x.contiguous(), conv_w, None, None, None, -127, 127, False)),
        ("selective_scan", OPS.selective_scan.default, scan),
        ("selective_scan_cl", OPS.selective_scan_cl.default, scan),
        ("selective_scan_q", OPS.selective_scan_q.default, (*scan, r_c, r_l, r_n, state_scale, 8)),
        ("selective_scan_qi", OPS.selective_scan_qi.default,
         (u, dq, *step(), A, bq, *step(), cq, *step(), D, z, dbias, True, r_c, r_l, r_n, state_scale, 8)),
    ]


@pytest.mark.parametrize("case", _empty_batch_cases(), ids=lambda c: c[0])
def test_every_op_takes_an_empty_batch(case):
    _, op, args = case
    with torch.no_grad():
        out = op(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert outs[0].shape[0] == 0  # (outlier_mask's second output is the per-step scale)
    opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# --- inputs of a quantized model --------------------------------------------------------------------

import ouromamba_fx as of  # noqa: E402
from ouromamba_fx.config import PRESETS  # noqa: E402
from ouromamba_fx.errors import DataError, InferenceOnlyError, InputError, OuroMambaError  # noqa: E402
from ouromamba_fx.models import VisionMamba  # noqa: E402

from tests.conftest import tiny_config  # noqa: E402

CALIB = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _tiny() -> VisionMamba:
    torch.manual_seed(0)
    return VisionMamba(tiny_config()).eval()


@pytest.fixture(scope="module")
def tiny_models():
    """preset name -> (float model, reference quantized model, lowered model), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            m = _tiny()
            q = of.convert(m, calib=CALIB, config=PRESETS[name], show_progress=False)
            cache[name] = (m, q, q.lower())
        return cache[name]

    return get


def _poisoned(x):
    """``x`` with a NaN in sample 1 and an infinity in sample 3 (0 and 2 clean)."""
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    bad[3, 2, 0, 5] = -float("inf")
    return bad


@pytest.mark.parametrize("name", list(PRESETS))
def test_non_finite_samples_give_nan_logits_and_leave_the_others_alone(tiny_models, name):
    m, q, low = tiny_models(name)
    bad = _poisoned(X)
    with torch.no_grad():
        # the float model: NaN for exactly the poisoned samples
        fy = m(bad)
        assert torch.isnan(fy).all(1).tolist() == [False, True, False, True]
        for mod in (q, low):
            clean, y = mod(X), mod(bad)
            assert torch.isnan(y).all(1).tolist() == [False, True, False, True]
            assert torch.isfinite(y[[0, 2]]).all()
            assert torch.equal(y[[0, 2]], clean[[0, 2]])  # bit for bit


@pytest.mark.parametrize("name", list(PRESETS))
def test_an_empty_batch_gives_an_empty_result(tiny_models, name):
    _, q, low = tiny_models(name)
    with torch.no_grad():
        for mod in (q, low):
            y = mod(X[:0])
            assert y.shape == (0, 5) and y.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_cast_to_float32(tiny_models, dtype):
    _, q, low = tiny_models("W4A4O8")
    xd = X.to(dtype)
    with torch.no_grad():
        for mod in (q, low):
            y = mod(xd)
            assert y.dtype == torch.float32
            assert torch.equal(y, mod(xd.float()))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_integer_images_are_refused_with_a_hint_to_normalise(tiny_models, dtype):
    _, q, low = tiny_models("W8A8")
    for mod in (q, low):
        with pytest.raises(InputError, match=rf"dtype {dtype}.*normalised float images.*model_transform"):
            mod(torch.zeros(2, 3, 16, 16, dtype=dtype))
    with pytest.raises(InputError, match="expected a tensor of images, got ndarray"):
        q(X.numpy())


def test_gradients_are_refused_not_silently_zero(tiny_models):
    _, q, low = tiny_models("W8A8")
    for mod in (q, low):
        assert not any(p.requires_grad for p in mod.parameters())
        with pytest.raises(InferenceOnlyError, match="inference only.*torch.no_grad"):
            mod(X.clone().requires_grad_(True))
        # grad mode on with an input that needs none: fine, and nothing to differentiate
        y = mod(X)
        assert not y.requires_grad
        with torch.no_grad():  # under no_grad a requires_grad input is just read
            assert torch.equal(mod(X.clone().requires_grad_(True)), y)
    # a parameter switched back on is refused too (its gradient would be through rounding)
    _, q6, _ = tiny_models("W6A6")
    p = next(q6.parameters())
    p.requires_grad_(True)
    try:
        with pytest.raises(InferenceOnlyError):
            q6(X)
    finally:
        p.requires_grad_(False)
    assert issubclass(InferenceOnlyError, OuroMambaError)


def test_the_original_model_keeps_its_requires_grad(tiny_models):
    m, _, _ = tiny_models("W8A8")
    assert all(p.requires_grad for p in m.parameters())


def test_meta_inputs_and_models_are_named():
    m = _tiny()
    q = of.convert(m, calib=CALIB, show_progress=False)
    with pytest.raises(InputError, match="the input is on the meta device"):
        q(X.to("meta"))
    with pytest.raises(InputError, match="the quantized model is on the meta device"):
        q.to("meta")(X)
    with torch.device("meta"):
        meta_model = VisionMamba(tiny_config()).eval()
    with pytest.raises(InputError, match=r"convert: VisionMamba is on the meta device \('\w+' holds a shape"):
        of.convert(meta_model, calib=CALIB, show_progress=False)
    with pytest.raises(InputError, match="gen: VisionMamba is on the meta device"):
        of.gen(meta_model, n=2, iters=1, show_progress=False)
    with pytest.raises(DataError, match="calib batch 0 is on the meta device"):
        of.convert(m, calib=CALIB.to("meta"), show_progress=False)
    with pytest.raises(InputError, match="expected a torch.nn.Module, got str"):
        of.convert("model.pt", calib=CALIB, show_progress=False)


def test_compiled_model_nan_empty_batch_dtypes_and_gradients(tiny_models):
    _, q, _ = tiny_models("W4A4O8")
    torch._dynamo.reset()
    fast = torch.compile(q, backend="ouromamba")
    clean, y = fast(X), fast(_poisoned(X))
    assert torch.isnan(y).all(1).tolist() == [False, True, False, True]
    assert torch.equal(y[[0, 2]], clean[[0, 2]])
    torch.testing.assert_close(clean, q.lower()(X), rtol=1e-5, atol=1e-5)
    assert fast(X[:0]).shape == (0, 5)
    assert fast(X.half()).dtype == torch.float32
    with pytest.raises(InferenceOnlyError):
        fast(X.clone().requires_grad_(True))
    with pytest.raises(InputError, match="dtype torch.uint8"):
        fast(X.to(torch.uint8))


# --- models with 0-dim tensors ------------------------------------------------------------------------

class _BatchNormVim(VisionMamba):
    """A Vim with a BatchNorm1d (0-dim ``num_batches_tracked``) before the head, a 0-dim parameter
    and a 0-dim buffer: every one outside the mixers."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.bn = torch.nn.BatchNorm1d(cfg.embed_dim)
        self.gain = torch.nn.Parameter(torch.tensor(0.9))
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, x):
        return self.head(self.bn(self.forward_features(x)) * self.gain) / self.temperature


@pytest.mark.parametrize("name", ["W8A8", "W4A4O8"])
def test_a_model_with_zero_dim_parameters_and_buffers_converts_lowers_and_saves(name, tmp_path):
    torch.manual_seed(0)
    m = _BatchNormVim(tiny_config()).eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    assert m.bn.num_batches_tracked.dim() == 0
    q = of.convert(m, calib=CALIB, config=PRESETS[name], show_progress=False)
    assert q.model_identity is not None
    assert "out_proj" in str(q.report())
    assert q.diff() is not None
    with torch.no_grad():
        fy, y = m(X), q(X)
        assert (fy.argmax(1) == y.argmax(1)).float().mean() >= 0.5
        # the lowering keeps the BatchNorm's running statistics (it used to drop every buffer no
        # get_attr read, including those of modules the graph calls)
        low = q.lower()
        torch.testing.assert_close(low(X), y, rtol=1e-4, atol=1e-4)
        assert torch.equal(low.graph_module.get_submodule("bn").running_mean, m.bn.running_mean)
    path = tmp_path / "bn.safetensors"
    try:
        q.save(path)
    except OuroMambaError as e:  # the file format's business; convert itself got to its end
        pytest.skip(f"save: {e}")
    q2 = of.load(path, model=m)
    with torch.no_grad():
        assert torch.equal(q2(X), y)


# --- files that are not checkpoints -------------------------------------------------------------------

import argparse  # noqa: E402
import os  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

from ouromamba_fx.errors import CheckpointError  # noqa: E402
from ouromamba_fx.models import load as load_checkpoint  # noqa: E402


class _Marker:
    """Unpickling this would create a marker file (it must never happen)."""

    path = ""

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _bad_checkpoints(d):
    """name -> (path, pattern the CheckpointError message must match)."""
    m = _tiny()
    sd = m.state_dict()
    good_pt, good_st = d / "good.pt", d / "good.safetensors"
    torch.save(sd, good_pt)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(good_st))
    raw_pt, raw_st = good_pt.read_bytes(), good_st.read_bytes()
    cases = {}

    def put(name, data, pattern):
        p = d / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
        cases[name] = (p, pattern)

    def pt(name, obj, pattern, **kw):
        torch.save(obj, d / name, **kw)
        cases[name] = (d / name, pattern)

    def changed(**kv):
        out = dict(sd)
        for k, v in kv.items():
            k = k.replace("__", ".")
            if v is None:
                out.pop(k)
            else:
                out[k] = v
        return out

    put("text.pt", "hello, this is not a checkpoint\n", "not a checkpoint .*starts with b'hello")
    put("text.safetensors", "hello, this is not a checkpoint\n", "not a safetensors file")
    put("empty.pt", b"", "the file is empty; expected a Vision Mamba checkpoint")
    put("empty.safetensors", b"", "the file is empty")
    put("truncated.pt", raw_pt[: len(raw_pt) // 2], "damaged or truncated zip")
    put("truncated.safetensors", raw_st[: len(raw_st) // 2], "not a readable safetensors file")
    put("header.safetensors", (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 10,
        "not a readable safetensors file")
    put("huge_header.safetensors", (2 ** 62).to_bytes(8, "little") + b"{}", "declare a 4611686018427387904-byte header")
    (d / "folder.pt").mkdir()
    cases["folder.pt"] = (d / "folder.pt", "is a directory; expected a Vision Mamba checkpoint")
    cases["missing.pt"] = (d / "missing.pt", "does not exist")
    _Marker.path = str(d / "MARKER")
    pt("code.pt", {"model": sd, "hook": _Marker()}, "refusing to unpickle it.*could run arbitrary code")
    pt("legacy.pt", sd, "legacy \\(pre-zip\\) torch pickle", _use_new_zipfile_serialization=False)
    pt("list.pt", [1, 2, 3], "expected a dict .*found list")
    pt("strings.pt", {"a": "b"}, "entries are not tensors \\('a'\\)")
    pt("shape.pt", changed(head__weight=torch.zeros(7, 31)), r"head.weight has shape \(7, 31\), expected \(classes, 32\)")
    pt("keys.pt", changed(norm_f__weight=None, extra__w=torch.zeros(3)),
       r"does not match VisionMamba:\s+missing keys \(1\): norm_f.weight\s+unexpected keys \(1\): extra.w")
    pt("not_vim.pt", changed(layers__0__mixer__A_log=None), "not a Vision Mamba state dict \\(no 'layers.0.mixer.A_log'\\)")
    pt("int.pt", changed(head__weight=torch.zeros(5, 32, dtype=torch.int64)), "not dense floating point.*head.weight")
    pt("nan.pt", changed(head__weight=torch.full((5, 32), float("nan"))), "NaN or infinite values \\(head.weight\\)")
    pt("proj2d.pt", changed(patch_embed__proj__weight=torch.zeros(32, 48)), "patch_embed.proj.weight has shape \\(32, 48\\)")
    pt("deep.pt", changed(**{"layers__100000__norm__weight": torch.zeros(32)}), r"layers \[2, 3, 4.*are missing")
    pt("huge_img.pt", {"model": sd, "args": argparse.Namespace(img_size=60000)},
       "the file says img_size 60000, but pos_embed holds a 4x4 patch grid")
    pt("img_range.pt", {"model": sd, "args": argparse.Namespace(img_size=10 ** 9)}, "img_size=1000000000 is out of range")
    pt("stride.pt", {"model": sd, "args": argparse.Namespace(stride="abc")}, "stride must be an integer, got 'abc'")
    pt("config.pt", {"model": sd, "config": [1, 2]}, "'config' must be a mapping")
    pt("mean.pt", {"model": sd, "mean": "red"}, "mean must be 3 finite numbers")
    pt("std.pt", {"model": sd, "std": [0.2, 0.0, 0.2]}, "std must be 3 finite numbers > 0")
    pt("classes.pt", {"model": sd, "classes": ["a", "b"]}, "2 class names for a head of 5 classes")
    for name, text, pattern in [("side_broken", "{not json", "not valid JSON"),
                                ("side_list", '["a"]', "expected a JSON object")]:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / f"{name}.safetensors"))
        (d / f"{name}.json").write_text(text)
        cases[f"{name}.safetensors"] = (d / f"{name}.safetensors", pattern)
    q = of.convert(m, calib=CALIB, show_progress=False)
    try:
        q.save(d / "quantized.safetensors")
        cases["quantized.safetensors"] = (d / "quantized.safetensors",
                                          "a quantized model saved by ouromamba-fx.*ouromamba_fx.load")
    except OuroMambaError:
        pass
    from ouromamba_fx.gen import SyntheticCalib

    SyntheticCalib(torch.randn(2, 3, 16, 16), torch.tensor([0, 1])).save(d / "synth.safetensors")
    cases["synth.safetensors"] = (d / "synth.safetensors", "synthetic calibration images.*--calib")
    return cases


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    return _bad_checkpoints(tmp_path_factory.mktemp("ckpt"))


BAD_CHECKPOINT_NAMES = [
    "text.pt", "text.safetensors", "empty.pt", "empty.safetensors", "truncated.pt", "truncated.safetensors",
    "header.safetensors", "huge_header.safetensors", "folder.pt", "missing.pt", "code.pt", "legacy.pt",
    "list.pt", "strings.pt", "shape.pt", "keys.pt", "not_vim.pt", "int.pt", "nan.pt", "proj2d.pt", "deep.pt",
    "huge_img.pt", "img_range.pt", "stride.pt", "config.pt", "mean.pt", "std.pt", "classes.pt",
    "side_broken.safetensors", "side_list.safetensors", "quantized.safetensors", "synth.safetensors"]


@pytest.mark.parametrize("name", BAD_CHECKPOINT_NAMES)
def test_a_bad_checkpoint_is_a_checkpoint_error_naming_the_file(bad_checkpoints, name):
    if name not in bad_checkpoints:
        pytest.skip("the quantized file could not be written (the file format's business)")
    path, pattern = bad_checkpoints[name]
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert path.stem in str(info.value)
    assert not (path.parent / "MARKER").exists()


def test_good_checkpoints_still_load(bad_checkpoints):
    d = bad_checkpoints["text.pt"][0].parent
    ref = _tiny()
    for name in ("good.pt", "good.safetensors"):
        m = load_checkpoint(d / name, mean=(0.5,) * 3, std=(0.25,) * 3)
        for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), k


def test_a_zip_entry_declaring_more_bytes_than_the_file_is_refused_before_torch_reads_it(tmp_path):
    import struct
    import zipfile

    torch.save(_tiny().state_dict(), tmp_path / "a.pt")
    raw = bytearray((tmp_path / "a.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "a.pt") as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    # its central directory entry (signature PK\1\2): sizes at offsets 20 (compressed) and 24
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46: at + 46 + name_len].decode() == info.filename:
            break
        at = raw.find(b"PK\x01\x02", at + 4)
    struct.pack_into("<II", raw, at + 20, 1 << 31, 1 << 31)
    (tmp_path / "b.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="b.pt: zip entry .* declares 2147483648 bytes beyond the file"):
        load_checkpoint(tmp_path / "b.pt")


# --- synthetic calibration files ----------------------------------------------------------------------

import json  # noqa: E402

from ouromamba_fx.gen import FORMAT as SYNTH_FORMAT, SyntheticCalib  # noqa: E402

_IMAGES, _TARGETS = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
_SYNTH_CASES = {
    "int images": ({"images": torch.zeros(4, 3, 8, 8, dtype=torch.int32), "targets": _TARGETS}, {},
                   r"images are I32 \(4, 3, 8, 8\); expected float"),
    "3-d images": ({"images": torch.randn(4, 8, 8), "targets": _TARGETS}, {}, r"expected float \(N, C, H, W\)"),
    "no images": ({"images": torch.zeros(0, 3, 8, 8), "targets": torch.zeros(0, dtype=torch.int64)}, {},
                  "none of them 0"),
    "nan images": ({"images": torch.full((4, 3, 8, 8), float("nan")), "targets": _TARGETS}, {}, "NaN or infinite"),
    "float targets": ({"images": _IMAGES, "targets": _TARGETS.float()}, {}, r"targets are F32 \(4,\); expected integers"),
    "short targets": ({"images": _IMAGES, "targets": _TARGETS[:2]}, {}, r"expected integers \(4,\)"),
    "big target": ({"images": _IMAGES, "targets": torch.tensor([0, 1, 2, 99])}, {}, r"targets outside \[0, 10\)"),
    "negative target": ({"images": _IMAGES, "targets": torch.tensor([0, -5, 2, 3])}, {}, "targets outside"),
    "no targets": ({"images": _IMAGES}, {}, "expected exactly 'images' and 'targets'"),
    "bad settings": ({"images": _IMAGES, "targets": _TARGETS}, {"settings": "{oops"}, "'settings' is not valid JSON"),
    "list settings": ({"images": _IMAGES, "targets": _TARGETS}, {"settings": "[1]"}, "must be a JSON dict"),
    "short mean": ({"images": _IMAGES, "targets": _TARGETS}, {"mean": "[0.5]"}, "mean must be 3 finite numbers"),
    "zero std": ({"images": _IMAGES, "targets": _TARGETS}, {"std": "[0, 0, 0]"}, "std must be 3 finite numbers > 0"),
    "numeric classes": ({"images": _IMAGES, "targets": _TARGETS}, {"classes": "[1, 2]"}, "list of names"),
    "other format": ({"images": _IMAGES, "targets": _TARGETS}, {"format": "something/1"},
                     "not a file written by SyntheticCalib.save"),
}


@pytest.mark.parametrize("case", list(_SYNTH_CASES))
def test_a_bad_synthetic_calibration_file_is_a_data_error(tmp_path, case):
    tensors, meta, pattern = _SYNTH_CASES[case]
    base = {"format": SYNTH_FORMAT, "settings": json.dumps({"num_classes": 10}), "classes": "[]",
            "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]"}
    path = tmp_path / "synth.safetensors"
    save_file(tensors, str(path), metadata={**base, **meta})
    with pytest.raises(DataError, match=pattern) as info:
        SyntheticCalib.load(path)
    assert "synth.safetensors" in str(info.value)


def test_synthetic_calibration_paths_that_are_not_such_files(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        SyntheticCalib.load(tmp_path / "d.safetensors")
    (tmp_path / "t.safetensors").write_text("hello")
    with pytest.raises(DataError, match="t.safetensors'?: cannot read it as safetensors"):
        SyntheticCalib.load(tmp_path / "t.safetensors")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(DataError, match="not a file written by SyntheticCalib.save"):
        SyntheticCalib.load(tmp_path / "w.safetensors")
    good = SyntheticCalib(_IMAGES, _TARGETS, mean=(0.5,) * 3, std=(0.25,) * 3)
    good.save(tmp_path / "good.safetensors")
    back = SyntheticCalib.load(tmp_path / "good.safetensors")
    assert torch.equal(back.images, _IMAGES) and torch.equal(back.targets, _TARGETS)


# --- image folders ----------------------------------------------------------------------------------

import io  # noqa: E402

from PIL import Image  # noqa: E402

from ouromamba_fx.data import ImageFolder, image_loader, read_image  # noqa: E402


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, format="JPEG")
    return buf.getvalue()


def _bomb(side: int) -> bytes:
    """A PNG of a few kB declaring side x side pixels."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("content,pattern", [
    (b"not an image", "is not an image PIL can read"),
    (b"", "is not an image PIL can read"),
    ("truncated", "cannot be read: OSError.*damaged or truncated"),
    ("bomb", "decompression bomb"),
])
def test_unreadable_images_are_data_errors_naming_the_file(tmp_path, content, pattern):
    data = {"truncated": _jpeg()[:300], "bomb": _bomb(10_000)}.get(content, content)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(data)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.jpg").write_bytes(_jpeg())
    loader = image_loader(_tiny(), tmp_path, batch_size=2)
    with pytest.raises(DataError, match=pattern) as info:
        list(loader)
    assert "x.jpg" in str(info.value)


def test_the_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_bomb(64))
    assert read_image(path).size == (64, 64)
    with pytest.raises(DataError, match="declares 64x64 pixels, more than the 1000"):
        read_image(path, max_pixels=1000)


def test_image_folder_arguments_and_layouts(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(_jpeg())
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="limit_per_class must be a whole number >= 1"):
            ImageFolder(tmp_path, limit_per_class=bad)
    with pytest.raises(DataError, match="batch_size must be a whole number >= 1, got 0"):
        image_loader(_tiny(), tmp_path, batch_size=0)
    with pytest.raises(DataError, match="is a file; expected a folder"):
        ImageFolder(tmp_path / "a" / "x.jpg")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "dir.jpg").mkdir()  # a folder with an image's name is not an image
    assert len(ImageFolder(tmp_path)) == 1
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(empty)


# --- the command line: user errors are one line, exit code 2, no traceback --------------------------

from ouromamba_fx.cli import main as cli_main  # noqa: E402


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    save_file(_tiny().state_dict(), str(d / "tiny.safetensors"))
    g = torch.Generator().manual_seed(0)
    for c in range(5):
        (d / "data" / str(c)).mkdir(parents=True)
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(d / "data" / str(c) / "0.jpg")
    (d / "folder").mkdir()
    (d / "a_file").write_text("x")
    return d


@pytest.fixture(scope="module")
def cli_quantized(cli_files):
    out = cli_files / "q.safetensors"
    code = cli_main(["convert", "--checkpoint", str(cli_files / "tiny.safetensors"), "--calib",
                     str(cli_files / "data"), "--config", "W4A4O8", "--out", str(out)])
    if code != 0 or not out.is_file():
        pytest.skip("the quantized file could not be written (the file format's business)")
    return out


def _cli_cases():
    """(id, argv with {d} for the files folder and {q} for a quantized file, message pattern)."""
    ck = ["--checkpoint", "{d}/tiny.safetensors"]
    data = ["--calib", "{d}/data"]
    return [
        ("config", ["convert", *ck, *data, "--config", "BOGUS"], "argument --config: unknown preset 'BOGUS'; known: W8A8"),
        ("model", ["convert", "--model", "bogus", *data], "argument --model: unknown model 'bogus'; known: vim_tiny"),
        ("model eval", ["eval", "--model", "bogus"], "unknown model 'bogus'"),
        ("model no weights", ["eval", "--model", "vim_tiny_patch16_224"], "no weights are bundled for it.*--checkpoint FILE"),
        ("gen n", ["gen", *ck, "--n", "0"], "argument --n: must be >= 1, got 0"),
        ("gen batch", ["gen", *ck, "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        ("gen iters", ["gen", *ck, "--iters", "-1"], "argument --iters: must be >= 0"),
        ("gen lr", ["gen", *ck, "--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
        ("gen temperature", ["gen", *ck, "--temperature", "0"], "argument --temperature: must be a finite number > 0"),
        ("gen neighbourhood", ["gen", *ck, "--neighbourhood", "2"], "argument --neighbourhood: must be odd"),
        ("gen n text", ["gen", *ck, "--n", "many"], "argument --n: 'many' is not a whole number"),
        ("eval batch", ["eval", *ck, "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        ("eval limit", ["eval", *ck, "--limit-per-class", "-1"], "argument --limit-per-class: must be >= 1, got -1"),
        ("convert limit", ["convert", *ck, *data, "--limit-per-class", "-3"], "argument --limit-per-class: must be >= 1"),
        ("convert gen-n", ["convert", *ck, "--gen-n", "0"], "argument --gen-n: must be >= 1"),
        ("convert batch", ["convert", *ck, *data, "--eval", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
        ("bench repeats", ["bench", *ck, "--repeats", "0"], "argument --repeats: must be >= 1"),
        ("bench threads", ["bench", *ck, "--threads", "0"], "argument --threads: must be >= 1"),
        ("diff layer", ["diff", *ck, *data, "--layer", "99"], r"--layer 99 is out of range: the model has layers 0..1"),
        ("diff negative layer", ["diff", *ck, *data, "--layer", "-1"], "argument --layer: must be >= 0"),
        ("diff role", ["diff", *ck, *data, "--role", "bogus"], "argument --role: invalid choice: 'bogus'"),
        ("diff pass", ["diff", *ck, *data, "--pass", "nope", "--pass", "calibrate"], "--pass 'nope': no such pass; passes: capture"),
        ("diff one pass", ["diff", *ck, *data, "--pass", "calibrate"], "give two pass names"),
        ("out missing folder", ["convert", *ck, *data, "--out", "{d}/nowhere/q.safetensors"],
         "--out '.*nowhere/q.safetensors': the folder '.*nowhere' does not exist"),
        ("out under a file", ["convert", *ck, *data, "--out", "{d}/a_file/q.safetensors"], "the folder '.*a_file' does not exist"),
        ("out a folder", ["convert", *ck, *data, "--out", "{d}/folder"], "--out '.*folder' is a folder; give a file name"),
        ("gen out a folder", ["gen", *ck, "--n", "2", "--iters", "0", "--out", "{d}/folder"], "--out '.*folder' is a folder"),
        ("gen grid", ["gen", *ck, "--n", "2", "--iters", "0", "--out", "{d}/s.safetensors", "--grid", "{d}/nowhere/g.png"],
         "--grid '.*nowhere/g.png': the folder"),
        ("png", ["inspect", "{q}", "--png", "{d}/nowhere/x.png"], "--png '.*nowhere/x.png': the folder '.*nowhere' does not exist"),
        ("png a folder", ["inspect", "{q}", "--png", "{d}/folder"], "--png '.*folder' is a folder"),
        ("outliers layer", ["inspect", "{q}", "--outliers", "99"], r"no outlier map for layer 99; layers with maps: \[0, 1\]"),
        ("inspect folder", ["inspect", "{d}/folder"], "file '.*folder' is a folder; expected a file"),
        ("inspect missing", ["inspect", "{d}/missing.safetensors"], "does not exist"),
        ("inspect float checkpoint", ["inspect", "{d}/tiny.safetensors"], "not a quantized model saved by ouromamba-fx"),
        ("checkpoint missing", ["eval", "--checkpoint", "{d}/missing.pt"], "checkpoint '.*missing.pt' does not exist"),
        ("checkpoint folder", ["eval", "--checkpoint", "{d}/folder"], "is a directory; expected a Vision Mamba checkpoint"),
        ("checkpoint text", ["eval", "--checkpoint", "{d}/a_file"], "a_file: not a checkpoint"),
        ("checkpoint quantized", ["eval", "--checkpoint", "{q}"], "a quantized model saved by ouromamba-fx.*--quantized"),
        ("data missing", ["eval", *ck, "--data", "{d}/missing"], "--data '.*missing' does not exist"),
        ("data a file", ["eval", *ck, "--data", "{d}/a_file"], "--data '.*a_file' is a file; expected a folder"),
        ("eval folder", ["convert", *ck, *data, "--eval", "{d}/missing"], "--eval '.*missing' does not exist"),
        ("calib missing", ["convert", *ck, "--calib", "{d}/missing.safetensors"], "--calib '.*missing.safetensors' does not exist"),
        ("calib a checkpoint", ["convert", *ck, "--calib", "{d}/tiny.safetensors"], "not a file written by SyntheticCalib.save"),
        ("quantized a float file", ["eval", *ck, "--quantized", "{d}/tiny.safetensors"], "not a quantized model saved by ouromamba-fx"),
        ("no command", [], "the following arguments are required: command"),
    ]


@pytest.mark.parametrize("case", _cli_cases(), ids=lambda c: c[0])
def test_cli_user_errors_are_one_line(cli_files, cli_quantized, capsys, case):
    _, argv, pattern = case
    argv = [a.replace("{d}", str(cli_files)).replace("{q}", str(cli_quantized)) for a in argv]
    capsys.readouterr()
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert re.search(pattern, lines[0]), lines[0]
    assert lines[0].startswith("ouromamba-fx")
    # found before any work: nothing converted, generated or written
    assert "converting" not in captured.out and "OuroMamba-Gen" not in captured.err
    assert not (cli_files / "s.safetensors").exists()


def test_cli_a_write_failing_after_the_work_is_one_line(cli_files, capsys, monkeypatch):
    def full_disk(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(SyntheticCalib, "save", full_disk)
    out = cli_files / "late.safetensors"
    capsys.readouterr()
    assert cli_main(["gen", "--checkpoint", str(cli_files / "tiny.safetensors"), "--n", "2", "--iters", "0",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]  # (gen's status line goes to stderr too)
    assert len(errors) == 1 and "Traceback" not in err and err.splitlines()[-1] == errors[0]
    assert re.search(r"--out '.*late.safetensors' could not be written: .*No space left on device", errors[0])


def test_cli_help_still_exits_zero(capsys):
    assert cli_main(["convert", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_an_unknown_model_name_is_a_library_error_and_still_a_key_error(bad_checkpoints):
    from ouromamba_fx.errors import UnknownNameError

    good = bad_checkpoints["text.pt"][0].parent / "good.pt"
    with pytest.raises(UnknownNameError, match="^unknown model 'bogus'; known: vim_tiny") as info:
        load_checkpoint(good, name="bogus")
    assert isinstance(info.value, KeyError) and isinstance(info.value, OuroMambaError)


def test_presets_by_name_and_unknown_names():
    from ouromamba_fx.config import preset
    from ouromamba_fx.errors import UnknownNameError

    assert preset("W4A4O8") is of.W4A4O8
    with pytest.raises(UnknownNameError, match="unknown preset 'BOGUS'; known: W8A8"):
        preset("BOGUS")
    with pytest.raises(UnknownNameError):
        of.convert(VisionMamba(tiny_config()).eval(), calib=torch.randn(2, 3, 16, 16), config="BOGUS")
