"""Building the C++ CPU kernels: one lazy, thread-safe extension per source file of this folder.

Each ``.cpp`` here is compiled on first use with ``torch.utils.cpp_extension.load`` (``-O3
-march=native``, OpenMP) and cached in torch's extension directory. :class:`CpuExtension` is the
one way the ops get a module: ``get()`` returns it, or None when the build failed (a
``RuntimeWarning`` names the file and the reason, once) or when the environment variable
``OUROMAMBA_SCAN_BACKEND=reference`` asks for the plain-torch references everywhere (machines
without a C++ compiler); the ops then run their ``*_ref`` twins.

* :data:`SELECTIVE_SCAN` -- ``selective_scan.cpp``: the float scan, forward and backward.
* :data:`SELECTIVE_SCAN_Q` -- ``selective_scan_q.cpp``: the reparameterized / integer-input scans
  and the state statistics of calibration.
* :data:`MIXER_OPS` -- ``mixer_ops.cpp``: conv1d + SiLU, the outlier rule with mixed
  quantization, the W4A4O8 epilogue and the AVX2 int4 GEMM.

Every source includes ``om_vec.h`` (vector helpers for AVX-512, AVX2 and plain C++).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent
HEADER = "om_vec.h"
ENV_BACKEND = "OUROMAMBA_SCAN_BACKEND"

__all__ = ["CpuExtension", "compile_flags", "cpu_tag", "load_cpu_extension", "SELECTIVE_SCAN", "SELECTIVE_SCAN_Q",
           "MIXER_OPS"]


def cpu_tag() -> str:
    """A short hash of the CPU's features, so ``-march=native`` builds are not shared across CPUs."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    text += line
                    break
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) of every kernel build."""
    cflags = ["-O3"]
    ldflags: list[str] = []
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        cflags += ["-march=native", "-mprefer-vector-width=512"]
    elif machine in ("aarch64", "arm64"):
        cflags += ["-mcpu=native"]
    if sys.platform != "darwin":  # Apple clang has no -fopenmp
        cflags += ["-fopenmp"]
        ldflags += ["-fopenmp"]
    return cflags, ldflags


def load_cpu_extension(stem: str, source: Path):
    """Compile (or load from torch's extension cache) one kernel file of this folder.

    The extension's name carries the CPU's feature hash and a hash of the source and of
    ``om_vec.h``: torch's cache only watches the listed sources, so editing the header would
    otherwise reuse a stale build."""
    from torch.utils import cpp_extension

    header = source.parent / HEADER
    for f in (source, header):
        if not f.is_file():
            raise FileNotFoundError(f"the kernel source ouromamba_fx/kernels/cpu/{f.name} is missing "
                                    "(is it listed as package data?)")
    digest = hashlib.sha1(source.read_bytes() + header.read_bytes()).hexdigest()[:8]
    cflags, ldflags = compile_flags()
    return cpp_extension.load(
        name=f"ouromamba_{stem}_{cpu_tag()}_{digest}",
        sources=[str(source)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(source.parent)],
        verbose=False,
    )


_env_warned = False


def _forced_reference() -> bool:
    """Whether ``OUROMAMBA_SCAN_BACKEND=reference`` (any other value but ``cpp`` is warned about, once)."""
    global _env_warned
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced not in ("", "cpp", "reference") and not _env_warned:
        _env_warned = True
        warnings.warn(f"ouromamba_fx: ignoring {ENV_BACKEND}={forced!r} (expected 'cpp' or 'reference')",
                      RuntimeWarning, stacklevel=4)
    return forced == "reference"


def _short(reason: str) -> str:
    return reason if len(reason) <= 2000 else reason[:1000] + "\n[...]\n" + reason[-1000:]


class CpuExtension:
    """The C++ kernels of ``<stem>.cpp``, built on the first :meth:`get` (thread-safe)."""

    def __init__(self, stem: str, what: str) -> None:
        self.stem, self.what = stem, what
        self.source = CSRC / f"{stem}.cpp"
        self._lock = threading.Lock()
        self._tried = False
        self._ext = None
        self._reason: str | None = None

    def _build(self):
        return load_cpu_extension(self.stem, self.source)

    def get(self):
        """The compiled module, or None when the plain-torch references are in use (see module docstring)."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._load()
                    self._tried = True
        return self._ext

    def _load(self) -> None:
        if _forced_reference():
            self._ext, self._reason = None, f"{ENV_BACKEND}=reference"
            return
        try:
            self._ext, self._reason = self._build(), None
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
            self._ext, self._reason = None, _short(f"{type(exc).__name__}: {exc}".strip())
            warnings.warn(f"ouromamba_fx: could not build {self.what} (ouromamba_fx/kernels/cpu/{self.source.name}), "
                          f"because: {self._reason}\nUsing the plain-torch reference instead, which is correct but "
                          f"much slower. Install a C++ compiler with OpenMP (e.g. g++) and ninja to get the "
                          f"fast kernels.", RuntimeWarning, stacklevel=4)

    def backend(self) -> str:
        """``"cpp"`` when the kernels are in use (building them if needed), else ``"reference"``."""
        return "reference" if self.get() is None else "cpp"

    @property
    def reason(self) -> str | None:
        """Why the references are in use (None while the kernels are)."""
        self.get()
        return self._reason


SELECTIVE_SCAN = CpuExtension("selective_scan", "the fused C++ selective-scan kernel")
SELECTIVE_SCAN_Q = CpuExtension("selective_scan_q", "the C++ quantized selective scan")
MIXER_OPS = CpuExtension("mixer_ops", "the C++ mixer kernels")
