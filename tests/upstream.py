"""Access to the upstream implementations the family tests compare against (never copied here).

* mamba-ssm / mambavision: installed packages. On a CPU-only machine, without letting pip touch
  torch: ``MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install -c constraints.txt
  --no-deps --no-build-isolation mamba-ssm``, then ``pip install -c constraints.txt --no-deps
  mambavision transformers regex tokenizers`` (mamba-ssm's package imports transformers), and
  ``fvcore iopath portalocker termcolor tabulate`` for VMamba's file. mamba-ssm's ``selective_scan_interface``
  imports its compiled CUDA extension ``selective_scan_cuda`` at import time; on a CPU-only
  machine :func:`install_scan_stub` puts a forward-only stand-in into ``sys.modules`` first, which
  computes with mamba-ssm's own plain-torch ``selective_scan_ref`` (so the comparison is against
  upstream's reference maths, not against this package's op).
* VMamba (MzeroMiko/VMamba, not installable): a checkout named by ``OUROMAMBA_VMAMBA_SRC``; its
  ``classification/models`` folder is imported as a private package. That file's cross-scan
  helpers enter ``torch.cuda.device(x.device)`` even for CPU tensors, so they are rebound to the
  file's own pure-torch ``CrossScanF`` / ``CrossMergeF`` autograd functions.

Every helper calls ``pytest.skip`` when the upstream code is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

VMAMBA_ENV = "OUROMAMBA_VMAMBA_SRC"


def _stub_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *_):
    # Contract of the CUDA kernel's forward as mamba-ssm's SelectiveScanFn calls it: returns
    # (out, x[, out_z]), x being the kernel's chunk states of which only x[:, :, -1, 1::2] (the
    # last state) is read.
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    out, last = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus,
                                   return_last_state=True)
    x = last.new_zeros(*last.shape[:2], 1, 2 * last.shape[2])
    x[..., 0, 1::2] = last
    if z is None:
        return out, x
    return out, x, (out.float() * F.silu(z.float())).to(out.dtype)


def _stub_bwd(*args, **kwargs):
    raise NotImplementedError("tests/upstream.py: the selective_scan_cuda stand-in is forward-only")


def install_scan_stub() -> None:
    if "selective_scan_cuda" in sys.modules:
        return
    try:  # the real extension, if this machine has one
        importlib.import_module("selective_scan_cuda")
        return
    except ImportError:
        pass
    mod = types.ModuleType("selective_scan_cuda")
    mod.fwd, mod.bwd = _stub_fwd, _stub_bwd
    sys.modules["selective_scan_cuda"] = mod


def mamba_simple():
    """mamba-ssm's ``mamba_simple`` module (skips when mamba-ssm is not installed)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm is not installed")
    install_scan_stub()
    return importlib.import_module("mamba_ssm.modules.mamba_simple")


def mamba_block():
    mamba_simple()
    return importlib.import_module("mamba_ssm.modules.block")


def mambavision():
    """NVlabs' ``mambavision.models.mamba_vision`` module (skips when not installed)."""
    if importlib.util.find_spec("mambavision") is None or importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mambavision / mamba-ssm are not installed")
    install_scan_stub()
    return importlib.import_module("mambavision.models.mamba_vision")


def vmamba():
    """MzeroMiko/VMamba's ``classification/models/vmamba.py`` from the checkout in
    ``$OUROMAMBA_VMAMBA_SRC`` (skips when unset or incomplete)."""
    root = os.environ.get(VMAMBA_ENV)
    if not root:
        pytest.skip(f"{VMAMBA_ENV} is not set (path of a MzeroMiko/VMamba checkout)")
    pkg_dir = Path(root) / "classification" / "models"
    if not (pkg_dir / "vmamba.py").is_file():
        pytest.skip(f"{VMAMBA_ENV}={root}: no classification/models/vmamba.py there")
    for dep in ("fvcore", "einops"):
        if importlib.util.find_spec(dep) is None:
            pytest.skip(f"VMamba's model file needs {dep}, which is not installed")
    name = "_ouromamba_test_vmamba"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                      submodule_search_locations=[str(pkg_dir)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
        vm = sys.modules[name + ".vmamba"]
        csm = sys.modules[name + ".csm_triton"]
        vm.cross_scan_fn = lambda x, in_channel_first=True, out_channel_first=True, one_by_one=False, \
            scans=0, force_torch=False: csm.CrossScanF.apply(x, in_channel_first, out_channel_first,
                                                            one_by_one, scans)
        vm.cross_merge_fn = lambda y, in_channel_first=True, out_channel_first=True, one_by_one=False, \
            scans=0, force_torch=False: csm.CrossMergeF.apply(y, in_channel_first, out_channel_first,
                                                             one_by_one, scans)
    return sys.modules[name + ".vmamba"]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
