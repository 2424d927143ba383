"""Save / load of quantized models: bit-exact round trips, no pickle, clear errors on bad files."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ouromamba_fx as of
from ouromamba_fx.config import ActQuant, KScale, QuantConfig, Reparam, WeightQuant
from ouromamba_fx.errors import CheckpointError
from ouromamba_fx.models import VisionMamba
from ouromamba_fx.serialize import FORMAT_VERSION, META_KEY, SerializationError
from tests.conftest import tiny_config

X = torch.randn(16, 3, 16, 16)
Y = torch.randn(3, 3, 16, 16)
REPARAM = QuantConfig("W8A8+k+reparam", WeightQuant(8), ActQuant(8), kscale=KScale(candidates=5, k=2),
                      reparam=Reparam(8))
CASES = {  # embed_dim 33: odd in_proj / dt_proj input widths, so int4 packing pads a nibble
    "W8A8": (of.W8A8, 32),
    "W4A4O8": (of.W4A4O8, 33),
    "reparam": (REPARAM, 32),
}


def _model(dim: int) -> VisionMamba:
    torch.manual_seed(1)
    return VisionMamba(tiny_config(embed_dim=dim)).eval()


@pytest.fixture(scope="module")
def converted():
    out = {}
    for key, (cfg, dim) in CASES.items():
        m = _model(dim)
        out[key] = (m, of.convert(m, calib=X, config=cfg, show_progress=False))
    return out


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[META_KEY])


def _rewrite(path, out, doc_fn=None, tensors_fn=None):
    tensors, doc = _read(path)
    if doc_fn:
        doc_fn(doc)
    if tensors_fn:
        tensors_fn(tensors)
    save_file(tensors, str(out), metadata={META_KEY: json.dumps(doc)})
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_round_trip_is_bit_exact(converted, key, tmp_path):
    model, q = converted[key]
    path = tmp_path / "q.safetensors"
    q.save(path)
    q2 = of.load(path, model=model)
    with torch.no_grad():
        assert torch.equal(q(Y), q2(Y))
    sa, sb = q.graph_module.state_dict(), q2.graph_module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert q2.config == q.config and q2.passes == q.passes and q2.sqnr_db == q.sqnr_db
    assert str(q2.report()) == str(q.report())  # report data, outlier statistics and their order
    assert str(q2.diff()) == str(q.diff())  # pass snapshots kept for diffs
    assert q2.model_identity["fingerprint"] == q.model_identity["fingerprint"]
    # a loaded model knows its preprocessing, so it can be evaluated without the float model
    assert q2.pretrained_cfg["input_size"] == (3, 16, 16) and q2.cfg.embed_dim == CASES[key][1]


def test_int4_weights_are_packed_two_per_byte_odd_widths_included(converted, tmp_path):
    _, q = converted["W4A4O8"]
    q.save(tmp_path / "q.safetensors")
    tensors, doc = _read(tmp_path / "q.safetensors")
    name = "layers_0_mixer_dt_proj_weight_q"  # dt_proj: K = dt_rank = 3, odd
    assert doc["graph"]["int4"][name] == [66, 3]
    packed = tensors[name + ".int4"]
    assert packed.dtype == torch.uint8 and packed.shape == (66, 2)
    assert name not in tensors
    packed_bytes = sum(v.numel() for k, v in tensors.items() if k.endswith(".int4"))
    int8_bytes = sum(torch.Size(s).numel() for s in doc["graph"]["int4"].values())
    assert len(doc["graph"]["int4"]) == 2 * 8 and packed_bytes < 0.6 * int8_bytes


def test_load_runs_no_pickle(converted, tmp_path, monkeypatch):
    _, q = converted["W8A8"]
    q.save(tmp_path / "q.safetensors")

    def boom(*a, **k):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)
    q2 = of.load(tmp_path / "q.safetensors")
    assert torch.equal(q(Y), q2(Y))


def test_a_function_outside_the_allow_list_is_refused(converted, tmp_path):
    _, q = converted["W8A8"]
    q.save(tmp_path / "q.safetensors")

    def evil(doc):
        node = next(n for n in doc["graph"]["nodes"] if n["op"] == "call_function")
        node["target"] = "os.system"

    bad = _rewrite(tmp_path / "q.safetensors", tmp_path / "bad.safetensors", doc_fn=evil)
    with pytest.raises(CheckpointError, match="calls 'os.system', which is not in the allow-list"):
        of.load(bad)

    def dunder(doc):
        node = next(n for n in doc["graph"]["nodes"] if n["target"] == "builtins.getattr")
        node["args"]["$tuple"][1] = "__class__"

    bad = _rewrite(tmp_path / "q.safetensors", tmp_path / "bad2.safetensors", doc_fn=dunder)
    with pytest.raises(CheckpointError, match=r"getattr of \('__class__',\) is not allowed"):
        of.load(bad)


def test_new_ouromamba_ops_are_stored_by_qualified_name(converted, tmp_path):
    _, q = converted["reparam"]
    q.save(tmp_path / "q.safetensors")
    _, doc = _read(tmp_path / "q.safetensors")
    targets = {n["target"] for n in doc["graph"]["nodes"] if n["op"] == "call_function"}
    assert {"torch.ops.ouromamba.selective_scan_q.default", "torch.ops.ouromamba.quantize.default"} <= targets


@pytest.mark.parametrize("what,msg", [
    ("missing", "does not exist"),
    ("text", "is not a safetensors file"),
    ("plain", "not a quantized model saved by ouromamba-fx"),
    ("version", f"file format version 99 .*reads version {FORMAT_VERSION}: upgrade ouromamba-fx"),
    ("drop", r"missing keys \(1\): layers_0_mixer_out_proj_weight_scale"),
    ("extra", r"unexpected keys \(1\): surprise"),
])
def test_bad_files_say_what_is_wrong(converted, tmp_path, what, msg):
    _, q = converted["W8A8"]
    good = tmp_path / "q.safetensors"
    q.save(good)
    path = tmp_path / "bad.safetensors"
    if what == "text":
        path.write_text("hello")
    elif what == "plain":
        save_file({"w": torch.zeros(2)}, str(path))
    elif what == "version":
        _rewrite(good, path, doc_fn=lambda d: d.update(format_version=99))
    elif what == "drop":
        _rewrite(good, path, tensors_fn=lambda t: t.pop("layers_0_mixer_out_proj_weight_scale"))
    elif what == "extra":
        _rewrite(good, path, tensors_fn=lambda t: t.update(surprise=torch.zeros(1)))
    with pytest.raises(CheckpointError, match=msg):
        of.load(path)


def test_loading_against_another_model_is_an_error(converted, tmp_path):
    _, q = converted["W8A8"]
    q.save(tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match="quantized from a different model.*embed_dim: file 32 vs model 33"):
        of.load(tmp_path / "q.safetensors", model=_model(33))
    other = _model(32)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(CheckpointError, match="same architecture, different weights"):
        of.load(tmp_path / "q.safetensors", model=other)


def test_unknown_submodule_is_named_at_save(converted, tmp_path):
    _, q = converted["W8A8"]
    gm = q.graph_module
    orig = gm.head
    gm.head = torch.nn.Bilinear(2, 2, 2)
    try:
        with pytest.raises(SerializationError, match=r"submodule 'head' \(Bilinear\) cannot be saved.*register_module"):
            q.save(tmp_path / "q.safetensors")
    finally:
        gm.head = orig


@pytest.mark.parametrize("key", ["W8A8", "W4A4O8"])
def test_lowered_model_round_trips_bit_exact(converted, key, tmp_path):
    """The lowering's fused ops and helper functions are stored by name without changes here."""
    _, q = converted[key]
    lq = q.lower()
    lq.save(tmp_path / "l.safetensors")
    lq2 = of.load(tmp_path / "l.safetensors")
    with torch.no_grad():
        assert torch.equal(lq(Y), lq2(Y))
    assert lq2.passes == lq.passes
