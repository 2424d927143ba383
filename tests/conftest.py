"""Shared fixtures. The project's data (reference checkpoint, CIFAR-10 folders) lives in a
``shared/`` folder beside the repository; override with OUROMAMBA_SHARED.

``OUROMAMBA_CPU_INT8_GEMM=int_mm|emulated`` runs every test with that CPU integer GEMM path
(:func:`ouromamba_fx.ops.gemm.use`), e.g. the emulated one on a CPU that would pick ``int_mm``."""

import os
from pathlib import Path

import pytest
import torch

import ouromamba_fx  # noqa: F401
from ouromamba_fx.models import VimConfig, VisionMamba
from ouromamba_fx.ops import gemm

# Under pytest-xdist the workers share the machine's cores: each runs torch on its share, so that
# the workers' OpenMP threads do not spin-wait against each other on the same cores. (The tests of
# thread-count invariance set their own counts.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _CORES // _WORKERS))

SHARED = Path(os.environ.get("OUROMAMBA_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p}")
    return p


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_gemm():
    with gemm.use(os.environ.get("OUROMAMBA_CPU_INT8_GEMM", "auto")):
        yield


def tiny_config(**kw) -> VimConfig:
    base = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, d_state=4, num_classes=5,
                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)
    return VimConfig(**{**base, **kw})


@pytest.fixture
def tiny_vim() -> VisionMamba:
    return VisionMamba(tiny_config()).eval()


@pytest.fixture(scope="session")
def reference():
    return ouromamba_fx.models.reference_model()
