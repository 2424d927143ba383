"""Save / load of quantized models: bit-exact round trips, no pickle, clear errors on bad files."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

import ouromamba_fx as of
from ouromamba_fx.config import ActQuant, KScale, QuantConfig, Reparam, WeightQuant
from ouromamba_fx.errors import CheckpointError
from ouromamba_fx.models import VisionMamba
from ouromamba_fx.serialize import FORMAT_VERSION, SerializationError
from tests.qfiles import read as _read
from tests.qfiles import rewrite as _rewrite
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
    name = "layers_0_mixer_dt_proj_weight_q"  # dt_proj: (66, K = dt_rank = 3), K odd
    packed = tensors[name + ".int4"]
    assert packed.dtype == torch.uint8 and packed.shape == (66, 2)
    assert name not in tensors
    int4 = {k: v for k, v in tensors.items() if k.endswith(".int4")}
    unpacked = dict(q.graph_module.named_buffers())
    assert len(int4) == 2 * 8  # per layer: in_proj, out_proj and conv1d, x_proj, dt_proj per direction
    packed_bytes = sum(v.numel() for v in int4.values())
    int8_bytes = sum(unpacked[k.removesuffix(".int4")].numel() for k in int4)
    assert packed_bytes < 0.6 * int8_bytes


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


def test_the_file_holds_no_graph_and_load_rebuilds_it(converted, tmp_path):
    _, q = converted["reparam"]
    q.save(tmp_path / "q.safetensors")
    _, doc = _read(tmp_path / "q.safetensors")
    assert set(doc) == {"format", "format_version", "library_version", "torch_version", "config", "model",
                        "example_shape", "input_shape", "checksum", "leaf_modules", "lowered", "report"}
    q2 = of.load(tmp_path / "q.safetensors")
    targets = {n.target for n in q2.graph_module.graph.nodes if n.op == "call_function"}
    assert {torch.ops.ouromamba.selective_scan_q.default, torch.ops.ouromamba.quantize.default} <= targets
    assert [n.name for n in q2.graph_module.graph.nodes] == [n.name for n in q.graph_module.graph.nodes]


@pytest.mark.parametrize("what,msg", [
    ("missing", "does not exist"),
    ("text", "is not a safetensors file"),
    ("plain", "not a quantized model saved by ouromamba-fx"),
    ("version", f"file format version 99 .*reads version {FORMAT_VERSION}: upgrade ouromamba-fx"),
    ("v1", "version 1 files carry graph code, which this version no longer reads"),
    ("drop", r"missing keys \(1\): layers_0_mixer_out_proj_weight_scale"),
    ("extra", r"unexpected keys \(1\): surprise"),
    ("dir", "is not a file"),
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
    elif what == "v1":
        _rewrite(good, path, doc_fn=lambda d: d.update(format_version=1))
    elif what == "drop":
        _rewrite(good, path, tensors_fn=lambda t: t.pop("layers_0_mixer_out_proj_weight_scale"))
    elif what == "extra":
        _rewrite(good, path, tensors_fn=lambda t: t.update(surprise=torch.zeros(1)))
    elif what == "dir":
        path.mkdir()
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


def test_custom_pipelines_cannot_be_saved(tmp_path):
    from ouromamba_fx.convert import default_passes

    m = _model(32)
    q = of.convert(m, calib=X, passes=default_passes(of.W8A8, (3, 16, 16)), show_progress=False)
    with pytest.raises(SerializationError, match="custom passes= list"):
        q.save(tmp_path / "q.safetensors")


class _Wrapped(torch.nn.Module):
    """A user's own model class: the library cannot rebuild it from a config."""

    def __init__(self, vim):
        super().__init__()
        self.vim = vim
        self.pretrained_cfg = vim.pretrained_cfg

    def forward(self, x):
        return self.vim(x)


def test_a_model_the_library_cannot_rebuild_loads_with_model_given(tmp_path):
    m = _Wrapped(_model(32)).eval()
    q = of.convert(m, calib=X, show_progress=False)
    q.save(tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot rebuild a 'tests.test_serialize._Wrapped'.*model=\.\.\."):
        of.load(tmp_path / "q.safetensors")
    q2 = of.load(tmp_path / "q.safetensors", model=m)
    with torch.no_grad():
        assert torch.equal(q(Y), q2(Y))
    with pytest.raises(CheckpointError, match="file tests.test_serialize._Wrapped vs model "):
        of.load(tmp_path / "q.safetensors", model=m.vim)


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
