"""Configure and build examples/cpp (the op library and ``classify``) into a cached build folder.

    python examples/cpp/build.py                 # prints the folder holding classify and libouromamba_ops.so
    python examples/cpp/build.py --build-dir b   # a folder of your choice

The default folder is ``$XDG_CACHE_HOME/ouromamba_fx/cpp_example/<key>`` (``~/.cache`` without
XDG_CACHE_HOME), where the key hashes the kernel sources, this folder's files, the torch version
and this CPU's features (the kernels are built with ``-march=native``): a build is reused until one
of them changes. Needs cmake (>= 3.18), a C++20 compiler with OpenMP, and the torch of this Python.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[1] / "ouromamba_fx" / "kernels" / "cpu"


def missing_tools() -> list[str]:
    """The build tools not found on PATH."""
    need = {"cmake": shutil.which("cmake"), "a C++ compiler (c++, g++ or clang++)":
            shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")}
    return [name for name, found in need.items() if not found]


def build_key() -> str:
    import torch

    sys.path.insert(0, str(HERE.parents[1]))
    from ouromamba_fx.kernels.cpu.build import cpu_tag

    h = hashlib.sha1()
    for f in sorted(KERNELS.glob("*.cpp")) + sorted(KERNELS.glob("*.h")) + [HERE / "CMakeLists.txt", HERE / "classify.cpp"]:
        h.update(f.name.encode() + f.read_bytes())
    h.update(torch.__version__.encode() + cpu_tag().encode() + sys.executable.encode())
    return h.hexdigest()[:12]


def default_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ouromamba_fx" / "cpp_example" / build_key()


def build(build_dir: Path | None = None, jobs: int = 2, quiet: bool = True) -> Path:
    """Build (or reuse) the example; returns the build folder. Raises RuntimeError with the tools'
    output on failure."""
    build_dir = Path(build_dir) if build_dir else default_dir()
    if (build_dir / "classify").is_file() and (build_dir / "BUILD_OK").is_file():
        return build_dir
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"examples/cpp needs {' and '.join(missing)} on PATH")
    build_dir.mkdir(parents=True, exist_ok=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [["cmake", "-S", str(HERE), "-B", str(build_dir), *gen, "-DCMAKE_BUILD_TYPE=Release",
              f"-DPYTHON_EXECUTABLE={sys.executable}"],
             ["cmake", "--build", str(build_dir), "-j", str(jobs)]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=quiet, text=True)
        if proc.returncode != 0:
            out = (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:] if quiet else ""
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out}")
    (build_dir / "BUILD_OK").write_text("ok\n")
    return build_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=None)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args()
    try:
        print(build(args.build_dir, args.jobs, quiet=False))
    except RuntimeError as e:
        print(f"examples/cpp/build.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
