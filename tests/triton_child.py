"""Run a Triton test file again in a child process under ``TRITON_INTERPRET=1``.

The interpreter flag is read when triton is imported, so the kernels' tests run in a fresh
interpreter; the parent test passes only if every child test passed and none was skipped.
"""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def assert_passes_in_interpreter(test_file: str) -> None:
    path = Path(test_file).resolve()
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(path)]
    r = subprocess.run(cmd, cwd=path.parents[1], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0 and " passed" in tail and "skipped" not in tail, r.stdout[-6000:] + r.stderr[-3000:]


@contextmanager
def pinned(kernel, config):
    """Runs the autotuned ``kernel`` with ``config`` only (the interpreter otherwise runs the first)."""
    saved = kernel.configs
    kernel.configs = [config]
    try:
        yield
    finally:
        kernel.configs = saved
