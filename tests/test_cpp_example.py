"""examples/cpp: a C++ program without Python classifies an image with the bundled model, quantized.

The example (the package's op library and ``classify``) is built with cmake against this torch's
libtorch into a cache folder reused while its sources stay the same (``examples/cpp/build.py``;
a cold build takes a few minutes). The bundled reference model is quantized at W4A4O8 (the preset
whose lowered graph runs the most C++ ops: the W4A4O8 linears with their outlier detection, mixed
fake quantization, conv1d + SiLU, the channels-last scan), exported, compiled with AOTInductor
and run three ways on bundled images: the lowered model in Python, the package from Python, the
package from the C++ program. The C++ program must print the prediction of the Python package
for each image (bit-identical logits: the same package on the same kernels), and the lowered
model's top-1.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import ouromamba_fx as of
from ouromamba_fx import export as ex
from ouromamba_fx.data import bundled_samples, model_transform, read_image
from ouromamba_fx.models import reference_model

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ["cat/4500.jpg", "ship/4501.jpg", "dog/4502.jpg", "airplane/4503.jpg"]


def _builder():
    spec = importlib.util.spec_from_file_location("cpp_example_build", ROOT / "examples" / "cpp" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def classify() -> Path:
    builder = _builder()
    missing = builder.missing_tools()
    if missing:
        pytest.skip(f"building examples/cpp needs {' and '.join(missing)} on PATH")
    return builder.build() / "classify"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(lowered model, AOTInductor package path, images as the model takes them). The package is
    made by the command line: ``ouromamba-fx export q.safetensors --out PKG --aoti``."""
    from ouromamba_fx.cli import main

    model = reference_model().eval()
    transform = model_transform(model)
    calib = torch.stack([transform(read_image(p)) for p in sorted(Path(bundled_samples()).glob("*/450[5-9].jpg"))][:8])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine's busy cores make multi-threaded small ops crawl
    try:
        q = of.convert(model, calib=calib, config=of.W4A4O8, show_progress=False)
        low = q.lower()
        folder = tmp_path_factory.mktemp("aoti")
        q.save(folder / "q.safetensors")
        path = folder / "ref_w4a4o8.pt2"
        assert main(["export", str(folder / "q.safetensors"), "--out", str(path), "--aoti"]) == 0
    finally:
        torch.set_num_threads(threads)
    images = torch.stack([transform(read_image(Path(bundled_samples()) / p)) for p in IMAGES])
    return low, path, images


def _ppm(src: Path, dst: Path) -> Path:
    from PIL import Image

    img = np.asarray(Image.open(src).convert("RGB"))
    dst.write_bytes(f"P6\n{img.shape[1]} {img.shape[0]}\n255\n".encode() + img.tobytes())
    return dst


def _run(classify: Path, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    # AOTInductor extracts the package into $TMPDIR (a crash would leave it there: keep it in tmp)
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(classify), *args], capture_output=True, text=True, env=env, timeout=600)


@torch.no_grad()
def test_cpp_program_classifies_bundled_images(classify, package, tmp_path, capsys):
    low, pkg, images = package
    ppms = [str(_ppm(Path(bundled_samples()) / p, tmp_path / f"{i}.ppm")) for i, p in enumerate(IMAGES)]
    proc = _run(classify, [str(pkg), *ppms, "--logits", str(tmp_path / "logits.f32"),
                           "--dump-input", str(tmp_path / "input.f32")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with capsys.disabled():
        print("\n[examples/cpp classify, bundled model at W4A4O8]\n" + proc.stdout.rstrip())

    # the C++ program's preprocessing is the Python transform's, bit for bit
    x_cpp = torch.from_numpy(np.fromfile(tmp_path / "input.f32", dtype=np.float32)).reshape(images.shape)
    assert torch.equal(x_cpp, images)
    # the same package from Python gives the same logits; the lowered model the same top-1
    logits = torch.from_numpy(np.fromfile(tmp_path / "logits.f32", dtype=np.float32)).reshape(len(IMAGES), -1)
    from_python = ex.load_aoti(pkg)(images)
    rel = ((logits - from_python).abs().max() / from_python.abs().max()).item()
    assert rel <= 1e-5, rel
    eager = low(images)
    assert torch.equal(logits.argmax(1), eager.argmax(1))
    classes = low.model_identity["config"]["classes"]
    for line, path, k in zip(proc.stdout.splitlines(), ppms, eager.argmax(1).tolist()):
        assert line == f"{path}: {k} {classes[k]} p={line.rsplit('p=', 1)[1]}"


@torch.no_grad()
def test_cpp_program_reads_jpeg_or_says_it_cannot(classify, package, tmp_path):
    low, pkg, images = package
    jpg = Path(bundled_samples()) / IMAGES[1]
    proc = _run(classify, [str(pkg), str(jpg)], tmp_path)
    if proc.returncode == 0:  # built with libjpeg: the Python model's class for the same image
        assert proc.stdout.startswith(f"{jpg}: {low(images[1:2]).argmax().item()} ")
    else:
        assert "reads PPM only" in proc.stderr
    bad = _run(classify, [str(pkg), str(tmp_path / "missing.ppm")], tmp_path)
    assert bad.returncode == 1 and "missing.ppm: cannot open" in bad.stderr
