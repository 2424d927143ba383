"""Opening a quantized file runs no code from it, and every tampered file ends in a library error.

Each attack writes its payload so that, if any string of the file were ever executed (as graph
code, an import, an attribute path or a shell command), a marker file would appear. Edits are
re-signed (the header's checksum recomputed, as a deliberate attacker would) so they reach the
checks behind the checksum; unsigned edits must stop at the checksum.
"""

import json
import random
import signal
import struct
import time

import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx.errors import CheckpointError, OuroMambaError
from ouromamba_fx.models import VisionMamba
from ouromamba_fx.serialize import META_KEY
from tests.conftest import tiny_config
from tests.qfiles import read, write

X = torch.randn(8, 3, 16, 16)


def _payloads(marker):
    """Strings that create ``marker`` if evaluated as Python or run by a shell."""
    py = f"__import__('os').system('touch {marker}')"
    return [py, f"x=1; {py}", f"x={py}", f"self.__class__.__init__.__globals__['os'].system('touch {marker}')",
            f"$(touch {marker})", "os.system", "torch.ops.aten.from_file.default", "__class__", "a.__dict__"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    torch.manual_seed(3)
    model = VisionMamba(tiny_config(embed_dim=16, depth=1)).eval()
    out = {"model": model}
    for name, cfg in (("W8A8", of.W8A8), ("W4A4O8", of.W4A4O8)):
        q = of.convert(model, calib=X, config=cfg, show_progress=False)
        q.save(d / f"{name}.safetensors")
        q.lower().save(d / f"{name}_lowered.safetensors")
        out[name] = (q, d / f"{name}.safetensors")
    return out


def _loads_or_library_error(path, marker, model=None):
    """Load ``path``: a library error, or a model that runs; never code from the file."""
    try:
        q = of.load(path, model=model)
    except OuroMambaError:
        q = None
    if q is not None:
        with torch.no_grad():
            assert q(X).shape == (8, 5)
    assert not marker.exists(), f"{path.name} ran code from the file"
    return q


def test_version_1_graph_code_is_refused_before_anything_runs(files, tmp_path):
    """The attack that worked on format v1: Python in a placeholder target and a kwargs key."""
    marker = tmp_path / "pwned"
    py = f"__import__('os').system('touch {marker}')"
    _, good = files["W8A8"]
    tensors, _ = read(good)
    doc = {"format": "ouromamba_fx.quantized", "format_version": 1, "graph": {"nodes": [
        {"name": "x", "op": "placeholder", "target": f"x={py}", "args": [], "kwargs": {}},
        {"name": "y", "op": "call_function", "target": "torch.add", "args": [{"$node": "x"}, 1],
         "kwargs": {f"alpha={py}, other": 1}},
        {"name": "output", "op": "output", "target": "output", "args": [{"$node": "y"}], "kwargs": {}}]}}
    write(tmp_path / "v1.safetensors", tensors, doc, sign=False)
    with pytest.raises(CheckpointError, match="version 1 files carry graph code"):
        of.load(tmp_path / "v1.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("extra", ["graph", "nodes", "modules", "code", "targets"])
def test_graph_keys_in_a_version_2_header_are_refused(files, tmp_path, extra):
    marker = tmp_path / "pwned"
    _, good = files["W8A8"]
    tensors, doc = read(good)
    doc[extra] = {"nodes": [{"name": "x", "op": "placeholder", "target": _payloads(marker)[2]}],
                  "attr": "a.b.__class__", "kwargs": {_payloads(marker)[1]: 1}}
    write(tmp_path / "bad.safetensors", tensors, doc)
    with pytest.raises(CheckpointError, match=rf"unknown fields \['{extra}'\]"):
        of.load(tmp_path / "bad.safetensors")
    assert not marker.exists()


def _string_paths(v, path=()):
    """Paths to every string value and every object key of a JSON document."""
    if isinstance(v, str):
        yield path, "value"
    elif isinstance(v, dict):
        for k, x in v.items():
            yield path + (k,), "key"
            yield from _string_paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _string_paths(x, path + (i,))


def _set(doc, path, payload, where):
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if where == "key":
        parent[payload] = parent.pop(path[-1])
    else:
        parent[path[-1]] = payload


@pytest.mark.parametrize("which", ["W8A8", "W4A4O8"])
def test_payloads_in_every_string_and_key_of_the_header(files, tmp_path, which):
    marker = tmp_path / "pwned"
    _, good = files[which]
    tensors, doc = read(good)
    doc["report"]["log"].append("a log line")  # so the list of log lines has a string to replace
    paths = list(_string_paths(doc))
    assert len(paths) > 40
    outcomes = {"error": 0, "loaded": 0}
    for i, (path, where) in enumerate(paths):
        for payload in _payloads(marker)[i % 3:: 3]:
            d = json.loads(json.dumps(doc))
            _set(d, path, payload, where)
            f = write(tmp_path / "p.safetensors", tensors, d)
            q = _loads_or_library_error(f, marker)
            outcomes["loaded" if q is not None else "error"] += 1
    # strings that are only shown (log lines, versions) load; everything else is refused
    assert outcomes["error"] > outcomes["loaded"] > 0


def test_payloads_reach_the_cli_inspect_as_text_only(files, tmp_path, capsys):
    from ouromamba_fx.cli import main

    marker = tmp_path / "pwned"
    _, good = files["W8A8"]
    tensors, doc = read(good)
    doc["report"]["log"] = _payloads(marker) + ["[link=file:///etc/passwd]click[/link] [bold red]markup"]
    write(tmp_path / "p.safetensors", tensors, doc)
    assert main(["inspect", str(tmp_path / "p.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "[bold red]markup" in out  # printed as text, not interpreted as markup
    doc["config"]["name"] = _payloads(marker)[1]
    doc["config"]["act"]["granularity"] = _payloads(marker)[0]
    write(tmp_path / "p2.safetensors", tensors, doc)
    assert main(["inspect", str(tmp_path / "p2.safetensors")]) != 0
    assert "granularity must be one of" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("change,msg", [
    (lambda t: t.update(layers_0_mixer_in_proj_weight_q=t["layers_0_mixer_in_proj_weight_q"].float()),
     r"'layers_0_mixer_in_proj_weight_q' is torch.float32 .* expects torch.int8"),
    (lambda t: t.update(layers_0_mixer_in_proj_weight_q=t["layers_0_mixer_in_proj_weight_q"][:, :-1].contiguous()),
     r"'layers_0_mixer_in_proj_weight_q' is torch.int8 \(64, 15\), the rebuilt graph expects torch.int8 \(64, 16\)"),
    (lambda t: t.update(layers_0_mixer_in_proj_weight_scale=t["layers_0_mixer_in_proj_weight_scale"].double()),
     r"weight_scale' is torch.float64"),
    (lambda t: t.update(head_weight=torch.zeros(5, 16)), r"unexpected keys \(1\): head_weight"),
    (lambda t: t["layers_0_mixer_in_proj_weight_scale"].mul_(-1), r"scale tensor .* holds values <= 0"),
    (lambda t: t["layers_0_mixer_in_proj_weight_scale"].zero_(), r"scale tensor .* holds values <= 0"),
    (lambda t: t["pos_embed"].fill_(float("nan")), r"tensor 'pos_embed' holds NaN or Inf"),
    (lambda t: t["layers.0.mixer.A_log"].fill_(float("inf")), r"holds NaN or Inf"),
    (lambda t: t["layers_0_mixer_in_proj_weight_q"].fill_(-128), r"8-bit weight .* holds values in \[-128, -128\]"),
    (lambda t: t.update({"__stats__/outlier_fraction/evil": torch.zeros(4)}), "sites the graph does not have"),
])
def test_swapped_dtypes_shapes_and_values(files, tmp_path, change, msg):
    _, good = files["W8A8"]
    tensors, doc = read(good)
    change(tensors)
    write(tmp_path / "bad.safetensors", tensors, doc)
    with pytest.raises(CheckpointError, match=msg):
        of.load(tmp_path / "bad.safetensors")


def test_int4_weights_and_outlier_statistics_are_checked(files, tmp_path):
    _, good = files["W4A4O8"]
    tensors, doc = read(good)
    name = "layers_0_mixer_out_proj_weight_q.int4"
    bad = dict(tensors, **{name: tensors[name].view(torch.int8)})
    write(tmp_path / "a.safetensors", bad, doc)
    with pytest.raises(CheckpointError, match=r"packed int4 tensor 'layers_0_mixer_out_proj_weight_q' is torch.int8"):
        of.load(tmp_path / "a.safetensors")
    stat = next(k for k in tensors if k.startswith("__stats__/outlier_map/"))
    for value in (torch.full_like(tensors[stat], 2.0), tensors[stat][:-1].contiguous()):
        write(tmp_path / "b.safetensors", dict(tensors, **{stat: value}), doc)
        with pytest.raises(CheckpointError, match="is not a float32 .* tensor of fractions"):
            of.load(tmp_path / "b.safetensors")


def test_another_models_tensors_are_refused(files, tmp_path):
    model = files["model"]
    other = VisionMamba(tiny_config(embed_dim=16, depth=1)).eval()  # same architecture, other weights
    q_other = of.convert(other, calib=X, config=of.W8A8, show_progress=False)
    q_other.save(tmp_path / "other.safetensors")
    _, good = files["W8A8"]
    _, doc = read(good)
    other_tensors, other_doc = read(tmp_path / "other.safetensors")
    # the header of one file with the tensors (and even the checksum) of the other
    write(tmp_path / "mixed.safetensors", other_tensors, dict(doc, checksum=other_doc["checksum"]), sign=False)
    with pytest.raises(CheckpointError, match="header and tensors do not match its checksum"):
        of.load(tmp_path / "mixed.safetensors", model=model)
    with pytest.raises(CheckpointError, match="quantized from a different model .* same architecture, different weights"):
        of.load(tmp_path / "other.safetensors", model=model)


def test_huge_declared_sizes_are_refused_before_allocating(files, tmp_path):
    _, good = files["W8A8"]
    tensors, doc = read(good)
    # a safetensors header declaring a 2^40-element tensor in a small file
    header = json.dumps({"__metadata__": {META_KEY: json.dumps(doc)},
                         "w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}).encode()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        of.load(tmp_path / "a.safetensors")
    # an architecture config describing a huge model, and a huge image shape: refused quickly
    cases = [("model", lambda d: d["model"]["config"].update(embed_dim=2**14), "fp32 parameters, more than the file"),
             ("model", lambda d: d["model"]["config"].update(img_size=2**16, patch_size=1), "-element activation"),
             ("model", lambda d: d["model"]["config"].update(d_state=2**22), "-element activation"),
             ("shape", lambda d: d.update(example_shape=[3, 2**15, 2**15], input_shape=[3, 2**15, 2**15]),
              "is not an image shape")]
    for _, edit, msg in cases:
        d = json.loads(json.dumps(doc))
        edit(d)
        write(tmp_path / "b.safetensors", tensors, d)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=msg):
            of.load(tmp_path / "b.safetensors")
        assert time.perf_counter() - start < 5
    # deeply nested JSON and an oversized header
    nested = "[" * 100_000 + "]" * 100_000
    write(tmp_path / "c.safetensors", tensors, nested, sign=False)
    with pytest.raises(CheckpointError):
        of.load(tmp_path / "c.safetensors")


# --- fuzzing -----------------------------------------------------------------------------------------

_VALUES = [None, True, False, 0, -1, 1, 7, 2**31, 2**63, -2**63, 1e308, -1e-308, 0.5, float("nan"),
           float("inf"), "", "x", "W8A8", "per_token", "in_proj", "__class__", "a" * 5000, [], {}, [1, 2, 3],
           [[[[[[[[[[1]]]]]]]]]], {"$node": "x"}, {"a": {"b": {"c": None}}}, ["in_proj", "scan"]]


def _json_paths(v, path=()):
    yield path
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _json_paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _json_paths(x, path + (i,))


def _mutate(seed: int, blob: bytes, tensors: dict, doc: dict, path):
    """One seeded mutation of a saved file, written to ``path``; returns its description."""
    rng = random.Random(seed)
    kind = rng.choice(["bytes", "truncate", "length", "value", "value", "value", "drop", "add"])
    if kind in ("bytes", "truncate", "length"):
        b = bytearray(blob)
        if kind == "bytes":
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "truncate":
            b = b[: rng.randrange(len(b))]
        else:
            b[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(b), 2**63, rng.randrange(2**64)]))
        path.write_bytes(bytes(b))
        return kind
    d = json.loads(json.dumps(doc))
    target = rng.choice([p for p in _json_paths(d) if p and p[0] != "checksum"])
    parent = d
    for p in target[:-1]:
        parent = parent[p]
    if kind == "value":
        parent[target[-1]] = rng.choice(_VALUES)
    elif kind == "drop":
        parent.pop(target[-1]) if isinstance(parent, dict) else parent.pop(target[-1])
    elif isinstance(parent, dict):
        parent[rng.choice(["x", "__class__", "graph", "a.b"])] = rng.choice(_VALUES)
    else:
        parent.insert(target[-1], rng.choice(_VALUES))
    write(path, tensors, d, sign=rng.random() < 0.7)
    return f"{kind} at {target}"


def _alarm(signum, frame):
    raise TimeoutError("load took more than 30 s")


@pytest.mark.parametrize("which", ["W8A8", "W4A4O8_lowered"])
def test_fuzzed_files_end_in_a_library_error_or_a_correct_load(files, tmp_path, which):
    marker = tmp_path / "pwned"
    good = files[which.split("_")[0]][1].with_name(f"{which}.safetensors")
    blob = good.read_bytes()
    tensors, doc = read(good)
    results = {"error": 0, "loaded": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for seed in range(160):
            f = tmp_path / f"f{seed % 4}.safetensors"
            what = _mutate(seed, blob, tensors, doc, f)
            signal.alarm(30)
            try:
                q = _loads_or_library_error(f, marker)
            except Exception as e:  # noqa: BLE001 - the test's point: name the seed that escaped
                raise AssertionError(f"seed {seed} ({what}): {type(e).__name__}: {e}") from e
            finally:
                signal.alarm(0)
            results["loaded" if q is not None else "error"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    assert results["error"] > 100 and results["loaded"] > 0, results
