"""torch.export of quantized models and the checked .pt2 loader (``ouromamba_fx.export``).

A tiny Vim quantized at W4A4O8 and W8A8 is exported (reference and lowered graphs) with a dynamic
batch, saved, and read back in a fresh process that only imports the package. Then the saved file
is edited the ways a hostile file would be (each taken from what torch 2.14's loader does with
such a record: run pickles, evaluate size expressions, exec guards, dlopen native code, call any
registered op) and ``ouromamba_fx.export.load`` must refuse each before ``torch.export.load`` sees
it, and before anything in it runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ouromamba_fx as of
from ouromamba_fx import export as ex
from ouromamba_fx.errors import ExportError, UnsafeFileError
from ouromamba_fx.models import VisionMamba

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = VisionMamba(tiny_config(depth=2)).eval()
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return {p: of.convert(model, calib=calib, config=getattr(of, p), show_progress=False) for p in ("W4A4O8", "W8A8")}


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    """(lowered W4A4O8 model, its program, the saved file)."""
    low = quantized["W4A4O8"].lower()
    ep = low.export(torch.randn(3, 3, 16, 16))
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    ex.save(ep, path, ex.metadata_of(low))
    return low, ep, path


def _ops(ep) -> set[str]:
    return {n.target._opname for n in ep.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "ouromamba"}


@torch.no_grad()
@pytest.mark.parametrize("preset", ["W4A4O8", "W8A8"])
@pytest.mark.parametrize("lowered", [False, True])
def test_export_keeps_package_ops_and_batch_is_dynamic(quantized, preset, lowered):
    q = quantized[preset].lower() if lowered else quantized[preset]
    ep = q.export(torch.randn(1, 3, 16, 16))  # a batch of one is accepted as the example
    want = {("W4A4O8", True): {"w4a4o8_linear_rt", "causal_conv1d_silu", "selective_scan_cl"},
            ("W4A4O8", False): {"quantize_mixed", "quantize", "dequantize", "selective_scan"},
            ("W8A8", True): {"causal_conv1d_silu_codes", "selective_scan_dt"},
            ("W8A8", False): {"quantize", "dequantize", "selective_scan"}}[(preset, lowered)]
    assert want <= _ops(ep)
    run = ep.module()
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        assert torch.equal(run(x), q(x))
    with pytest.raises(Exception):
        run(torch.randn(2, 3, 32, 32))  # only the batch size is dynamic


def test_export_refuses_ops_outside_the_allowlist(quantized, monkeypatch):
    monkeypatch.setattr(ex, "ALLOWED_TARGETS", ex.ALLOWED_TARGETS - {"torch.ops.ouromamba.selective_scan_dt.default"})
    with pytest.raises(ExportError, match="selective_scan_dt"):
        quantized["W8A8"].lower().export(torch.randn(2, 3, 16, 16))


def test_package_ops_are_all_listed():
    import ouromamba_fx.ops  # noqa: F401

    defined = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("ouromamba::")}
    assert defined == set(ex.PACKAGE_OPS) | set(ex.PYTHON_ONLY_OPS)
    assert not set(ex.PACKAGE_OPS) & set(ex.PYTHON_ONLY_OPS)


def test_cpp_missing_ops(quantized):
    low = quantized["W4A4O8"].lower()
    assert ex.cpp_missing_ops(low.export(torch.randn(2, 3, 16, 16))) == []
    assert "quantize_mixed" in ex.cpp_missing_ops(quantized["W4A4O8"].export(torch.randn(2, 3, 16, 16)))


_CHILD = """
import sys, torch
from safetensors.torch import load_file
import ouromamba_fx.export as ex
assert "ouromamba_fx.quantized" not in sys.modules or True
extra = {"ouromamba.json": ""}
ep = ex.load(sys.argv[1], extra)
t = load_file(sys.argv[2])
y = ep.module()(t["x"])
print("EQUAL" if torch.equal(y, t["y"]) else f"DIFF {(y - t['y']).abs().max().item()}", flush=True)
print(extra["ouromamba.json"])
"""


@torch.no_grad()
def test_round_trip_in_a_fresh_process(saved, tmp_path):
    low, _, path = saved
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    save_file({"x": x, "y": low(x)}, str(tmp_path / "io.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "io.safetensors")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "EQUAL", lines
    meta = json.loads(lines[1])
    assert meta["input_shape"] == [3, 16, 16] and meta["preset"] == "W4A4O8" and meta["lowered"] is True


def test_saved_file_has_no_pickle_and_loads(saved):
    low, ep, path = saved
    with zipfile.ZipFile(path) as z:
        sample = [n for n in z.namelist() if n.endswith("sample_inputs/model.pt")]
        assert all(z.read(n) == b"" for n in sample)
        program = z.read(next(n for n in z.namelist() if n.endswith("models/model.json")))
    assert ep.example_inputs is not None  # kept in memory (AOTInductor needs them)
    # stack traces (the exporting machine's source paths) stay in memory, not in the file
    assert b'"stack_trace"' not in program and any("stack_trace" in n.meta for n in ep.graph.nodes)
    assert ex.read_metadata(path)["model"] == low.model_name


# ---------------------------------------------------------------------------------------------
# Hostile files

def _records(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = names[0].split("/")[0]
        return root, {n[len(root) + 1:]: z.read(n) for n in names}


def _write(path: Path, root: str, recs: dict[str, bytes], compress: bool = False) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in recs.items():
            z.writestr(name if name.startswith("/") or name.startswith("..") else f"{root}/{name}", data)


class _Payload:
    """Pickled, it runs ``touch <marker>`` when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _program(recs):
    return json.loads(recs["models/model.json"])


def _set_program(recs, prog):
    recs["models/model.json"] = json.dumps(prog).encode()


def _insert_call(recs, target: str, inputs: list, out: dict | None = None):
    """A node calling ``target`` first in the graph."""
    prog = _program(recs)
    graph = prog["graph_module"]["graph"]
    node = {"target": target, "inputs": inputs, "outputs": [out or {"as_none": True}], "metadata": {},
            "is_hop_single_tensor_return": None, "name": "injected"}
    graph["nodes"].insert(0, node)
    _set_program(recs, prog)


def _string_arg(name, value):
    return {"name": name, "arg": {"as_string": value}, "kind": 1}


def _craft(kind: str, recs: dict, marker: str) -> dict | None:
    """Edit the records into the hostile file ``kind``; returns a replacement record set when the
    layout changes entirely."""
    if kind == "function_outside_torch":  # a Python function of another module: os.system
        _insert_call(recs, "os.system", [_string_arg("command", f"touch {marker}")])
    elif kind == "torch_os_system":  # reachable from the torch module by attribute lookup
        _insert_call(recs, "torch.os.system", [_string_arg("command", f"touch {marker}")])
    elif kind == "op_outside_package":  # a registered op of another namespace
        _insert_call(recs, "torch.ops.evil.run.default", [_string_arg("command", f"touch {marker}")])
    elif kind == "aten_from_file":  # reads (shared=True: maps and writes) any file
        _insert_call(recs, "torch.ops.aten.from_file.default",
                     [_string_arg("filename", "/etc/hostname"), {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                      {"name": "size", "arg": {"as_int": 4}, "kind": 1}])
    elif kind == "aten_fill_":  # an in-place aten op outside the list
        _insert_call(recs, "torch.ops.aten.fill_.Scalar", [])
    elif kind == "guards_code":  # exec'd by ExportedProgram.module()
        prog = _program(recs)
        prog["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
        _set_program(recs, prog)
    elif kind == "sympy_expr":  # sympy.sympify evaluates size expressions
        prog = _program(recs)
        text = json.dumps(prog)
        assert '"expr_str": "' in text
        head, tail = text.split('"expr_str": "', 1)
        _set_program(recs, json.loads(head + f'"expr_str": "__import__(\'os\').system(\'touch {marker}\') + ' + tail))
    elif kind == "graph_argument":
        prog = _program(recs)
        prog["graph_module"]["graph"]["nodes"][0]["inputs"].append({"name": "g", "arg": {"as_graph": {}}, "kind": 1})
        _set_program(recs, prog)
    elif kind == "unknown_metadata":
        prog = _program(recs)
        prog["graph_module"]["graph"]["nodes"][0]["metadata"]["pickled"] = "gASV"
        _set_program(recs, prog)
    elif kind == "weight_pickle":  # use_pickle -> torch.load(weights_only=False)
        cfg = json.loads(recs["data/weights/model_weights_config.json"])
        name, entry = next(iter(cfg["config"].items()))
        entry["use_pickle"] = True
        recs["data/weights/" + entry["path_name"]] = _torch_save({"x": _Payload(marker)})
        recs["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
    elif kind == "opaque_object":  # pickle.loads
        recs["data/constants/model_constants_config.json"] = json.dumps(
            {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                 "tensor_meta": None}}}).encode()
        recs["data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))
    elif kind == "sample_inputs":  # torch.load, retried with weights_only=False
        recs["data/sample_inputs/model.pt"] = _torch_save({"x": _Payload(marker)})
    elif kind == "aoti_library":  # handed to AOTIModelPackageLoader, which dlopens it
        recs["data/aotinductor/model/model.wrapper.so"] = b"\x7fELF not really"
    elif kind == "second_program":
        recs["models/other.json"] = recs["models/model.json"]
    elif kind == "legacy_layout":  # torch 2.7's layout, read through torch.load
        return {"version": b"8.0", "serialized_exported_program.json": recs["models/model.json"],
                "serialized_state_dict.pt": b"", "serialized_constants.pt": _torch_save({"x": _Payload(marker)}),
                "serialized_example_inputs.pt": b""}
    elif kind == "path_traversal":
        recs["../escaped"] = b"x"
    elif kind == "binary_extra":
        recs["extra/blob"] = b"\xff\xfe\x00"
    elif kind == "not_a_zip":
        return {"__raw__": b"PK\x03\x04 broken"}
    elif kind in ("compressed", "duplicate"):
        pass
    else:
        raise AssertionError(kind)
    return None


HOSTILE = ["function_outside_torch", "torch_os_system", "op_outside_package", "aten_from_file", "aten_fill_",
           "guards_code", "sympy_expr", "graph_argument", "unknown_metadata", "weight_pickle", "opaque_object",
           "sample_inputs", "aoti_library", "second_program", "legacy_layout", "path_traversal", "binary_extra",
           "not_a_zip", "compressed", "duplicate"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_files_are_refused_before_anything_runs(saved, tmp_path, monkeypatch, kind):
    _, _, base = saved
    root, recs = _records(base)
    marker = tmp_path / "RAN"
    replaced = _craft(kind, recs, str(marker))
    bad = tmp_path / f"{kind}.pt2"
    if replaced and "__raw__" in replaced:
        bad.write_bytes(replaced["__raw__"])
    elif replaced:
        with zipfile.ZipFile(bad, "w") as z:  # no root folder: the legacy layout
            for n, b in replaced.items():
                z.writestr(n, b)
    else:
        _write(bad, root, recs, compress=kind == "compressed")
        if kind == "duplicate":
            with zipfile.ZipFile(bad, "a") as z, pytest.warns(UserWarning):
                z.writestr(f"{root}/models/model.json", recs["models/model.json"])

    def torch_load_called(*a, **k):
        raise AssertionError("torch.export.load was reached")

    monkeypatch.setattr(torch.export, "load", torch_load_called)
    with pytest.raises(UnsafeFileError, match="refused before loading") as err:
        ex.load(bad)
    assert str(bad) in str(err.value)
    assert not marker.exists()


def test_unedited_file_passes_the_check(saved):
    _, _, path = saved
    ex.check(path.read_bytes())  # the same check as above, on the file as saved: accepted


def test_cli_export(quantized, tmp_path):
    from ouromamba_fx.cli import main

    src = tmp_path / "q.safetensors"
    quantized["W8A8"].save(src)
    assert main(["export", str(src), "--out", str(tmp_path / "q.pt2")]) == 0
    ep = ex.load(tmp_path / "q.pt2")
    assert {"causal_conv1d_silu_codes", "selective_scan_dt"} <= _ops(ep)
    assert main(["export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.pt2")]) == 2
