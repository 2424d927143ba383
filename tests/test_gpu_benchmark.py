"""``benchmarks/gpu.py`` without a GPU: its command line, and a dry run that takes a tiny Vim through
every variant's code path on the CPU (nothing timed, no GPU number claimed)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _gpu_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_runs_as_one_command():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--dry-run" in r.stdout and "Vim-T/S/B" in r.stdout


def test_arguments_are_checked():
    gpu = _gpu_benchmark()
    args = gpu.parse_args(["--models", "vim_tiny,vim_base", "--batches", "1,64", "--variants", "fp16,W4A4O8"])
    assert args.models == ["vim_tiny", "vim_base"] and args.batches == [1, 64] and args.variants == ["fp16", "W4A4O8"]
    assert gpu.parse_args([]).batches == [1, 16, 64]
    for bad in (["--models", "vim_huge"], ["--variants", "fp8"], ["--batches", "1,x"], ["--batches", "0"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)


def test_dry_run_takes_every_variant_through_on_the_cpu(tmp_path, capsys):
    gpu = _gpu_benchmark()
    out = tmp_path / "dry.md"
    assert gpu.main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Dry run") and "nothing timed" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["fp16", "bf16", "W8A8", "W4A4O8"]
    for r in rows:  # the lowered models against their reference graphs; fp16 / bf16 only as close as they are
        top1, rel = float(r.split("|")[3].strip(" %")), float(r.split("|")[4])
        if r.startswith(("| W8A8", "| W4A4O8")):
            assert top1 == 100.0 and rel < 1e-5
        else:
            assert 0 <= top1 <= 100 and rel < 0.1
    assert " ms" not in capsys.readouterr().out
