"""Errors that help: each asserts that the message names the problem (and the fix, where there is
one), and that no error leaves the user's float model changed.

Where each error of the list is tested:

* untraceable model: here (through convert) and tests/test_capture.py (capture itself);
* unknown mixer (float + warning + report line; strict=True errors): here;
* empty calib, NaN/Inf calib, wrong shape or dtype: tests/test_convert.py::test_bad_calibration_data_is_named
  (Inf: here);
* inference input of another resolution / sequence length: tests/test_convert.py and here (a
  loaded model keeps the check);
* odd channel counts for int4 packing: here and tests/test_serialize.py (odd widths round-trip);
* convert called twice: tests/test_convert.py (a QuantizedModel) and here (its graph, a loaded model);
* checkpoint with missing / unexpected keys: tests/test_models.py (float checkpoints),
  tests/test_serialize.py (quantized files), here (a kept-float submodule's keys);
* a file from another format version, not ours, or for another model: tests/test_serialize.py.
"""


import pytest
import torch
import torch.nn as nn

import ouromamba_fx as of
from ouromamba_fx.errors import CaptureError, CheckpointError, DataError, OuroMambaError
from ouromamba_fx.ops.int4 import pack_int4, unpack_int4
from ouromamba_fx.passes.base import Pass, PassError
from tests.qfiles import read, write

X = torch.randn(8, 3, 16, 16)


class DataDependentHead(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return -self.fc(x)


class MySSMixer(nn.Module):
    """A mixer the capture does not know (its class name says so)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.proj(x))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def _unchanged(model, snap) -> bool:
    sd, training = snap
    now = model.state_dict()
    return now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd) and model.training == training


def test_untraceable_module_is_named_with_operation_and_the_convert_fix(tiny_vim):
    tiny_vim.head = DataDependentHead(32, 5)
    snap = _snapshot(tiny_vim)
    with pytest.raises(CaptureError) as info:
        of.convert(tiny_vim, calib=X, show_progress=False)
    msg = str(info.value)
    assert "cannot trace module 'head' (DataDependentHead)" in msg
    assert "data-dependent Python control flow" in msg and "x.mean() > 0" in msg
    assert "convert(model, ..., leaf_modules=['head'])" in msg
    assert _unchanged(tiny_vim, snap)
    q = of.convert(tiny_vim, calib=X, leaf_modules=["head"], show_progress=False)  # the fix works
    assert ("head", "leaf_modules: kept in float") in q.report().floats


def test_unknown_mixer_stays_float_with_a_warning_and_a_report_line(tiny_vim):
    tiny_vim.layers[1].mixer = MySSMixer(32)
    with pytest.warns(UserWarning, match=r"'layers.1.mixer' \(MySSMixer\) looks like a mixer the capture does not know"):
        q = of.convert(tiny_vim, calib=X, show_progress=False)
    rep = q.report()
    assert ("layers.1.mixer", "unknown mixer type MySSMixer: kept in float") in rep.floats
    assert {r.layer for r in rep.rows} == {0}  # only the known mixer was quantized
    with torch.no_grad():
        assert torch.isfinite(q(X[:2])).all()


def test_unknown_mixer_in_strict_mode_is_an_error(tiny_vim):
    tiny_vim.layers[1].mixer = MySSMixer(32)
    snap = _snapshot(tiny_vim)
    with pytest.raises(CaptureError, match=r"strict=True.*'layers.1.mixer' \(MySSMixer\).*MambaMixer"):
        of.convert(tiny_vim, calib=X, strict=True, show_progress=False)
    assert _unchanged(tiny_vim, snap)


def test_inf_in_calibration_is_named(tiny_vim):
    bad = X.clone()
    bad[0, 0, 0, :3] = float("inf")
    with pytest.raises(DataError, match="calib batch 0: 3 NaN or Inf values"):
        of.convert(tiny_vim, calib=bad, show_progress=False)


def test_convert_of_a_quantized_graph_or_loaded_model_is_an_error(tiny_vim, tmp_path):
    q = of.convert(tiny_vim, calib=X, show_progress=False)
    with pytest.raises(OuroMambaError, match=r"already quantized \(its graph calls ouromamba::"):
        of.convert(q.graph_module, calib=X, show_progress=False)
    q.save(tmp_path / "q.safetensors")
    loaded = of.load(tmp_path / "q.safetensors")
    with pytest.raises(OuroMambaError, match="is already quantized"):
        of.convert(loaded, calib=X)
    # the loaded model keeps the calibrated resolution check
    with pytest.raises(ValueError, match=r"quantized for inputs \(batch, 3, 16, 16\).*got \(1, 3, 20, 20\)"):
        loaded(torch.randn(1, 3, 20, 20))


def test_int4_packing_with_odd_widths(tmp_path):
    w = torch.randint(-7, 8, (4, 5), dtype=torch.int8)  # K = 5, odd
    packed = pack_int4(w)
    assert packed.shape == (4, 3) and torch.equal(unpack_int4(packed, 5), w)
    with pytest.raises(ValueError, match=r"k=4 does not match a packed weight with 3 bytes per row"):
        unpack_int4(packed, 4)
    with pytest.raises(ValueError, match=r"values must lie in \[-8, 7\]"):
        pack_int4(torch.full((2, 3), 9, dtype=torch.int8))


def test_a_quantized_file_with_a_bad_packed_int4_tensor_or_wrong_keys(tiny_vim, tmp_path):
    q = of.convert(tiny_vim, calib=X, config=of.W4A4O8, show_progress=False)
    good = tmp_path / "q.safetensors"
    q.save(good)
    tensors, doc = read(good)
    name = "layers_0_mixer_dt_proj_weight_q.int4"  # (64, dt_rank 2) -> (64, 1) bytes
    bad = write(tmp_path / "bad.safetensors", dict(tensors, **{name: torch.zeros(64, 3, dtype=torch.uint8)}), doc)
    with pytest.raises(CheckpointError, match=r"packed int4 tensor 'layers_0_mixer_dt_proj_weight_q' is "
                                              r"torch.uint8 \(64, 3\), expected uint8 \(64, 1\)"):
        of.load(bad)
    bad = {k: v for k, v in tensors.items() if k != "head.bias"}
    bad["head.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\): head.bias.*unexpected keys \(1\): head.extra"):
        of.load(write(tmp_path / "bad2.safetensors", bad, doc))
    # without the matching checksum, any edit of the tensors is caught before anything is rebuilt
    write(tmp_path / "bad3.safetensors", dict(tensors, **{name: tensors[name] ^ 1}), doc, sign=False)
    with pytest.raises(CheckpointError, match="header and tensors do not match its checksum"):
        of.load(tmp_path / "bad3.safetensors")


class _Boom(Pass):
    name = "boom"
    requires = ("reference_graph",)

    def run(self, gm, ctx):
        raise RuntimeError("kaboom")


def test_no_error_leaves_the_float_model_changed(tiny_vim):
    """Errors at every stage: before capture, in capture, in calibration data, and in a pass that
    runs after the scan reparameterization has folded factors into (a copy of) x_proj."""
    from ouromamba_fx.convert import default_passes

    snap = _snapshot(tiny_vim.train())
    cfg = of.W8A8.replace(reparam=of.Reparam(8))
    with pytest.raises(PassError, match=r"pass 'boom' failed after \[capture, .*reparameterize_scan.*\]: RuntimeError: kaboom"):
        of.convert(tiny_vim, calib=X, config=cfg, passes=default_passes(cfg, (3, 16, 16)) + [_Boom()],
                   show_progress=False)
    assert _unchanged(tiny_vim, snap)
    with pytest.raises(DataError):
        of.convert(tiny_vim, calib=[X, torch.randn(2, 3, 8, 8)], show_progress=False)
    assert _unchanged(tiny_vim, snap)
    with pytest.raises(CaptureError):
        of.convert(tiny_vim, calib=X, leaf_modules=["no.such.module"], show_progress=False)
    assert _unchanged(tiny_vim, snap)
