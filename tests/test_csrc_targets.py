"""The C++ kernels compile for every x86 vector width they have code for, not only this CPU's.

The kernels are built with ``-march=native``, so a machine only ever compiles its own branch of
the ``#if defined(__AVX512F__)`` / ``__AVX__`` code: an AVX2-only change once broke the AVX-512
build of ``mixer_ops.cpp`` (a 256-bit cast compiled in a non-template function), and every op
fell back to its plain-torch reference on AVX-512 CPUs without a test on the AVX2 machine
noticing. Here each source is syntax-checked (``-fsyntax-only``: parsing, templates, intrinsics'
types; no code generation) for the x86 levels other than the one this CPU builds natively (a CPU
with AVX-512 but without VBMI2 checks all three).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "ouromamba_fx" / "kernels" / "cpu"
SOURCES = ("selective_scan.cpp", "selective_scan_q.cpp", "mixer_ops.cpp")
# x86-64: SSE2 only (the generic vector code); v3: AVX2 + FMA; icelake-server: AVX-512 (F, BW, DQ,
# VL) with VNNI and VBMI2, which the epilogue's outlier gather uses
LEVELS = ("x86-64", "x86-64-v3", "icelake-server")

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None,
    reason="needs an x86-64 CPU and g++")


def _native_level() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    words = set(flags.split())
    if "avx512f" in words:
        # without BW or VBMI2 the native build is none of LEVELS: all of them are checked
        return "icelake-server" if {"avx512bw", "avx512_vbmi2"} <= words else "avx512 without vbmi2"
    if "avx2" in words:
        return "x86-64-v3"
    return "x86-64"


def _check(source: str, level: str) -> tuple[str, str, int, str]:
    from torch.utils.cpp_extension import include_paths

    from ouromamba_fx.kernels.cpu.build import compile_flags

    # the flags of the real build (load_cpu_extension), with the level in place of -march=native
    cflags = [f"-march={level}" if f == "-march=native" else f for f in compile_flags()[0]]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", *cflags, "-Wno-psabi", f"-I{CSRC}",
           "-isystem", sysconfig.get_paths()["include"]]
    for p in include_paths():
        cmd += ["-isystem", p]
    proc = subprocess.run(cmd + [str(CSRC / source)], capture_output=True, text=True)
    return source, level, proc.returncode, proc.stderr


def test_kernels_compile_for_the_other_x86_levels():
    native = _native_level()
    jobs = [(s, lv) for s in SOURCES for lv in LEVELS if lv != native]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _check(*job), jobs))
    failed = [f"kernels/cpu/{s} for -march={lv}:\n" + "\n".join(line for line in err.splitlines() if "error" in line)[:1500]
              for s, lv, rc, err in results if rc != 0]
    assert not failed, "\n\n".join(failed)
