"""Building the C++ CPU kernels: one shared library of this folder's sources, lazy and thread-safe.

The sources are plain libtorch code (no Python bindings): the library registers its kernels with
PyTorch's dispatcher, so the Python package and a C++ program (``examples/cpp/``) use the same
code. :data:`CPU_LIBRARY` compiles it on first use with ``torch.utils.cpp_extension.load``
(``-O3 -march=native``, OpenMP; cached in torch's extension directory under a name carrying this
CPU's feature hash and a hash of the sources) and loads it with ``torch.ops.load_library``.
Loading does two things:

* ``torch.ops.ouromamba_cpu.*`` -- the kernels themselves, which the ops of
  :mod:`ouromamba_fx.ops` call where they still compose them in Python; :data:`SELECTIVE_SCAN`,
  :data:`SELECTIVE_SCAN_Q` and :data:`MIXER_OPS` hand them out by family (``get()`` returns an
  object with the kernels as attributes, or None when the references are in use).
* the C++ CPU kernels of the public ``ouromamba::*`` ops (``kernels/cpu/ops.cpp``: the scans,
  conv1d + SiLU, quantization, the W8A8 and W4A4O8 linears, mixed fake quantization) are
  registered with the dispatcher under those ops, which the Python package defines: from then on
  a CPU call of those ops runs C++ from end to end (no Python per call, in eager mode, under
  ``torch.compile`` and in AOTInductor packages alike). :attr:`CpuLibrary.dispatching` turns this
  off and on (the ops then run their Python implementations, which call the same kernels).

When the build fails (a ``RuntimeWarning`` names the file and the reason, once per family) or the
environment variable ``OUROMAMBA_SCAN_BACKEND=reference`` asks for the plain-torch references
everywhere (machines without a C++ compiler), nothing is loaded and the ops run their ``*_ref``
twins.

Sources: ``selective_scan.cpp`` (the float scan, forward and backward), ``selective_scan_q.cpp``
(the reparameterized / integer-input scans and the state statistics of calibration),
``mixer_ops.cpp`` (conv1d + SiLU, the outlier rule with mixed quantization, the W4A4O8 epilogue and
the AVX2 int4 GEMM), ``ops.cpp`` (the public ops' C++ kernels) and ``register.cpp`` (the
registrations); headers ``om_vec.h`` (vector helpers for AVX-512, AVX2 and plain C++),
``om_parallel.h`` (work items shared among threads as they come free) and ``kernels.h``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

CSRC = Path(__file__).resolve().parent
SOURCES = ("selective_scan.cpp", "selective_scan_q.cpp", "mixer_ops.cpp", "ops.cpp", "register.cpp")
HEADERS = ("om_vec.h", "om_parallel.h", "kernels.h")
ENV_BACKEND = "OUROMAMBA_SCAN_BACKEND"

__all__ = ["CpuExtension", "CpuLibrary", "compile_flags", "cpu_tag", "source_digest", "CPU_LIBRARY",
           "SELECTIVE_SCAN", "SELECTIVE_SCAN_Q", "MIXER_OPS"]


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


def _files() -> list[Path]:
    files = [CSRC / name for name in SOURCES + HEADERS]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"the kernel source ouromamba_fx/kernels/cpu/{f.name} is missing "
                                    "(is it listed as package data?)")
    return files


def source_digest() -> str:
    """A hash of every source and header: torch's cache only watches the sources it compiles, so
    editing a header would otherwise reuse a stale build."""
    return hashlib.sha1(b"".join(f.read_bytes() for f in _files())).hexdigest()[:8]


def _build_and_load() -> str:
    """Compile (or find in torch's extension cache) and load the library; returns its path."""
    from torch.utils import cpp_extension

    files = _files()
    cflags, ldflags = compile_flags()
    return cpp_extension.load(
        name=f"ouromamba_cpu_{cpu_tag()}_{source_digest()}",
        sources=[str(f) for f in files if f.suffix == ".cpp"],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
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


class CpuLibrary:
    """The compiled library: built and loaded once per process by :meth:`load` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: str | None = None
        self._error: BaseException | None = None
        self._dispatching = False
        # called once the library is loaded (ouromamba_fx.ops.gemm passes on the GEMM choice of a
        # use() block entered before)
        self.on_load: list = []

    def load(self) -> str:
        """The library's path, building and loading it on the first call (and registering the
        public ops' C++ kernels); re-raises the first call's error on later calls."""
        if self._path is None and self._error is None:
            with self._lock:
                if self._path is None and self._error is None:
                    try:
                        path = _build_and_load()
                    except Exception as exc:  # noqa: BLE001 - kept, re-raised to every caller
                        self._error = exc
                    else:
                        self._register()
                        self._path = path
        if self._error is not None:
            raise self._error
        return self._path

    def _register(self) -> None:
        import torch

        torch.ops.ouromamba_cpu.set_dispatch(True)
        self._dispatching = True
        for hook in self.on_load:
            hook()

    @property
    def loaded(self) -> bool:
        return self._path is not None

    @property
    def path(self) -> str | None:
        """The loaded library's file (None before :meth:`load`)."""
        return self._path

    @property
    def dispatching(self) -> bool:
        """Whether CPU calls of the public ops run their C++ kernels (True once loaded). Setting it
        False makes them run their Python implementations (tests of those; ``monkeypatch.setattr``
        restores it)."""
        return self._dispatching

    @dispatching.setter
    def dispatching(self, on: bool) -> None:
        if not self.loaded:
            return
        import torch

        torch.ops.ouromamba_cpu.set_dispatch(bool(on))
        self._dispatching = bool(on)


CPU_LIBRARY = CpuLibrary()


def _kernels(names: dict[str, str]) -> SimpleNamespace:
    """The library's kernels under the names the ops call them by."""
    import torch

    ns = torch.ops.ouromamba_cpu
    return SimpleNamespace(**{attr: getattr(ns, op).default for attr, op in names.items()})


class CpuExtension:
    """One family of kernels of the library (``<stem>.cpp``), loaded on the first :meth:`get`
    (thread-safe); a failed build is warned about once per family."""

    def __init__(self, stem: str, what: str, names: dict[str, str]) -> None:
        self.stem, self.what, self.names = stem, what, names
        self.source = CSRC / f"{stem}.cpp"
        self._lock = threading.Lock()
        self._tried = False
        self._ext = None
        self._reason: str | None = None

    def _build(self):
        CPU_LIBRARY.load()
        return _kernels(self.names)

    def get(self):
        """The kernels (attributes named as in ``names``), or None when the plain-torch references
        are in use (see module docstring)."""
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


SELECTIVE_SCAN = CpuExtension("selective_scan", "the fused C++ selective-scan kernel",
                              {"fwd": "scan_fwd", "bwd": "scan_bwd"})
SELECTIVE_SCAN_Q = CpuExtension("selective_scan_q", "the C++ quantized selective scan",
                                {"fwd": "qscan_fwd", "state_stats": "qscan_state_stats"})
MIXER_OPS = CpuExtension("mixer_ops", "the C++ mixer kernels",
                         {name: name for name in ("conv_silu", "conv_silu_codes", "linear_mixed_fake", "mixed_quant",
                                                  "w4a4o8_epilogue", "w4a4o8_finish", "outlier_density",
                                                  "outlier_weights", "u4_available", "u4_pack", "u4_linear", "u4_mm",
                                                  "s16_pack", "s16_mm")})
