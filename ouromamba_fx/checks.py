"""Checks ``convert`` runs on a model before touching it, each with a message that names the
problem and the fix.

    >>> unknown_mixers(model)            # doctest: +SKIP
    {'layers.3.mixer': 'SS2D'}
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.nn as nn

from ouromamba_fx.capture import MIXER_TYPES
from ouromamba_fx.errors import CaptureError, InputError, OuroMambaError

_KNOWN = tuple(cls for cls, _ in MIXER_TYPES)

# Class names that say "this is a sequence mixer / state-space block" (mamba_ssm's Mamba and
# Mamba2, VMamba's SS2D, MambaVision's mixer, hand-written S6 blocks...).
MIXER_NAME = re.compile(r"mamba|mixer|ss2d|ssm|s6|selective|scan", re.IGNORECASE)


def unknown_mixers(model: nn.Module, leaf_modules=()) -> dict[str, str]:
    """Sub-modules that look like Mamba mixers (by class name) but are none of the mixers capture
    knows (:data:`ouromamba_fx.capture.MIXER_TYPES`) and contain none: qualified name -> class name.
    Containers of known mixers (a Vim block, the model itself), the package's own modules (a
    MambaVision conv stage) and modules named in ``leaf_modules`` are not reported; nested hits are reported once, outermost."""
    found: dict[str, str] = {}
    skip = {x for x in leaf_modules if isinstance(x, str)}
    for name, m in model.named_modules():
        if not name or name in skip or isinstance(m, _KNOWN) or type(m).__module__.startswith("ouromamba_fx."):
            continue
        if any(name.startswith(p + ".") for p in found):
            continue
        if MIXER_NAME.search(type(m).__name__) and not any(isinstance(s, _KNOWN) for s in m.modules()):
            found[name] = type(m).__name__
    return found


def strict_error(unknown: dict[str, str]) -> CaptureError:
    names = ", ".join(f"'{n}' ({t})" for n, t in unknown.items())
    return CaptureError(
        f"convert(strict=True): {len(unknown)} mixer(s) of a type the capture does not know: {names}. "
        f"Their scans cannot be found and quantized. Rebuild them as ouromamba_fx.models.MambaMixer "
        f"(same parameters), or call convert without strict=True to keep them in float.")


def check_not_quantized(model: nn.Module) -> None:
    """An error if ``model`` is (or holds) something convert already produced."""
    graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    for gm in graphs:
        for n in gm.graph.nodes:
            t = n.target
            if (n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == "ouromamba"
                    and t._opname != "selective_scan"):
                raise OuroMambaError(
                    f"convert: the model is already quantized (its graph calls ouromamba::{t._opname} "
                    f"at node {n.name!r}); convert the float model instead")


def check_model(model, who: str) -> None:
    """An :class:`InputError` if ``model`` is not a module, or holds tensors on the ``meta``
    device (shapes without data: nothing can be calibrated, generated or quantized from it)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"{who}: expected a torch.nn.Module, got {type(model).__name__} (load a checkpoint "
                         f"with ouromamba_fx.models.load(path) first)")
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_meta:
            raise InputError(f"{who}: {type(model).__name__} is on the meta device ({name!r} holds a shape "
                             f"but no data); load its weights first (e.g. model.to_empty(device='cpu') then "
                             f"load_state_dict, or ouromamba_fx.models.load(path))")
