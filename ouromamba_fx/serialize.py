"""Save and load quantized models: one ``.safetensors`` file of tensors and plain data.

    >>> q.save("vim_w8a8.safetensors")                       # doctest: +SKIP
    >>> q2 = ouromamba_fx.load("vim_w8a8.safetensors")       # doctest: +SKIP
    >>> torch.equal(q(x), q2(x))                             # doctest: +SKIP
    True

What the file holds (``FORMAT_VERSION`` 2: tensors, and a header of plain data with a checksum)
and how it is written and checked: :mod:`ouromamba_fx.fileformat`.

Why loading a file cannot run code
----------------------------------
The file holds no graph. :func:`load` rebuilds the graph by running the library's own code: the
float model's class (the user's ``model=``, or one of
:data:`ouromamba_fx.models.identity.ARCHITECTURES` built from the file's architecture config), its
capture, and the default pass pipeline for the file's config, on a random input of the recorded
shape (:func:`ouromamba_fx.convert.build` with ``replay=True``); a lowered model is lowered again
with the recorded options. What the file contributes is therefore limited to:

1. values of known types: every header field is checked against its annotation by
   :func:`ouromamba_fx.plaindata.from_plain` (scalars, lists, string-keyed objects; unknown keys
   are errors) and then by the dataclass that uses it (``QuantConfig`` and ``VimConfig``
   validate their ranges). No header string is ever used as code, an import path, an attribute
   path or a node target: config strings are compared with fixed choices (bits, granularities,
   roles) or matched as ``fnmatch`` patterns against module names; ``leaf_modules`` must name
   sub-modules of the model (looked up in ``named_modules()``); report keys must name nodes of
   the rebuilt graph; log lines are only printed, as plain text.
2. tensors, each matched by name to a tensor the rebuilt graph created, with the same dtype and
   shape (read from the safetensors header before any tensor data is read), finite where it is
   floating point, positive where it is a scale, within the integer range of its bit width where
   it is a quantized weight; copied into the rebuilt tensors
   (:func:`ouromamba_fx.fileformat.load_tensors`). Sizes: a model rebuilt from its
   config is sized on the ``meta`` device first and must fit the file's tensor bytes, and one
   image's largest activation is bounded (:data:`~ouromamba_fx.models.identity.MAX_ACTIVATION`).

safetensors itself reads no pickle and checks that every declared tensor lies inside the file.
So the code that runs at load is the library's (and the user's model's) own, with the same
structure as at conversion; the file only chooses numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ouromamba_fx.convert import _input_shape, build, model_name
from ouromamba_fx.errors import CheckpointError
from ouromamba_fx.fileformat import (FORMAT_VERSION, META_KEY, Header, SerializationError, load_tensors, read,
                                     read_header, stats)
from ouromamba_fx.fileformat import write as save
from ouromamba_fx.lowering.lower import OPTION_NAMES
from ouromamba_fx.measure import Recorder
from ouromamba_fx.models.families import canonical_copy
from ouromamba_fx.models.identity import class_path, model_fingerprint, model_identity, rebuild
from ouromamba_fx.quantized import QuantizedModel
from ouromamba_fx.tags import op_nodes

__all__ = ["save", "load", "read_header", "FORMAT_VERSION", "META_KEY", "SerializationError"]


def _float_model(path: Path, header: Header, model: nn.Module | None, tensor_bytes: int) -> nn.Module:
    rec = header.model
    if model is None:
        try:
            return rebuild(rec.class_path, rec.config, 9 * tensor_bytes + 2**20)
        except ValueError as e:
            raise CheckpointError(f"{path.name}: {e}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"load: model must be the float nn.Module, got {type(model).__name__}")
    model = canonical_copy(model)  # upstream VMamba / MambaVision / Mamba: rebuilt as at convert
    fp = model_fingerprint(model)
    if fp == rec.fingerprint and class_path(model) == rec.class_path:
        return model
    diffs = []
    mine = getattr(model, "cfg", None)
    if rec.config and mine is not None and hasattr(mine, "to_dict"):
        mine = mine.to_dict()
        diffs = [f"{k}: file {rec.config[k]!r} vs model {mine[k]!r}" for k in sorted(rec.config)
                 if k in mine and _arch_field(k) and json.dumps(rec.config[k]) != json.dumps(_plain(mine[k]))]
    what = "; ".join(diffs) if diffs else (
        f"file {rec.class_path} vs model {class_path(model)}" if class_path(model) != rec.class_path
        else "same architecture, different weights")
    raise CheckpointError(f"{path.name} was quantized from a different model than the one given "
                          f"(fingerprint {rec.fingerprint[:12]} vs {fp[:12]}): {what}")


def _arch_field(k: str) -> bool:  # preprocessing and class names do not make another architecture
    return k not in ("mean", "std", "crop_pct", "classes")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _rebuild(header: Header, model: nn.Module, where: str):
    """Run capture and the default pipeline on ``model`` (same graph as at conversion)."""
    want = _input_shape(model)
    if want is not None and tuple(want) != tuple(header.example_shape):
        raise CheckpointError(f"{where}: calibrated for images {header.example_shape}, but the model "
                              f"takes {tuple(want)}")
    names = {n for n, _ in model.named_modules()}
    bad = [n for n in header.leaf_modules if n not in names]
    if bad:
        raise CheckpointError(f"{where}: leaf_modules {[b[:60] for b in bad[:3]]} are not sub-modules "
                              f"of the model")
    x = torch.randn((1, *header.example_shape), generator=torch.Generator().manual_seed(0))
    try:
        _, gm, ctx, pm = build(model, header.config, [x], list(header.leaf_modules), replay=True)
        rec = Recorder(gm, set())
        with torch.no_grad():
            rec.run(x)
    except Exception as e:  # noqa: BLE001 - whatever the model's code raises, named with the file
        raise CheckpointError(f"{where}: the graph could not be rebuilt: {type(e).__name__}: "
                              f"{str(e)[:300]}") from e
    return gm, ctx, pm, rec


def load(path: str | Path, model: nn.Module | None = None):
    """Rebuild a :class:`~ouromamba_fx.QuantizedModel` saved with :func:`save`: the graph from
    the library's code, the tensors from the file (see the module docstring: no code from the
    file runs).

    Args:
        path: the ``.safetensors`` file.
        model: the float model it was quantized from; checked against the file's fingerprint.
            Needed for models the library cannot rebuild from their config alone (anything but
            the classes in :data:`ouromamba_fx.models.identity.ARCHITECTURES`).

    Example:
        >>> q = ouromamba_fx.load("vim_w8a8.safetensors")   # doctest: +SKIP
        >>> print(q.report())                               # doctest: +SKIP
    """
    path = Path(path)
    doc, header, raw = read(path)
    float_model = _float_model(path, header, model, sum(v.numel() * v.element_size() for v in raw.values()))
    gm, ctx, pm, rec = _rebuild(header, float_model, path.name)
    load_tensors(gm, raw, path.name)

    ops = {n.name for n in op_nodes(gm)}
    rep = header.report
    unknown = sorted(set(rep.sqnr_db) - ops)
    if unknown:
        raise CheckpointError(f"{path.name}: report entries for ops the graph does not have: "
                              f"{', '.join(u[:60] for u in unknown[:5])}")
    snapshots = pm.snapshots
    if len(rep.pass_seconds) == len(snapshots):
        for s, sec in zip(snapshots, rep.pass_seconds):
            s.seconds = sec
    name = model_name(float_model)
    q = QuantizedModel(gm, header.config, snapshots, ctx.float_reasons, list(rep.log),
                       header.input_shape, dict(rep.sqnr_db), name)
    q.coverage = ctx.coverage
    q.outlier_fraction = stats(raw, rec.outlier_fraction, "outlier_fraction", path.name)
    q.outlier_maps = stats(raw, rec.outlier_maps, "outlier_map", path.name)
    q.model_identity = {**model_identity(float_model, name), "fingerprint": header.model.fingerprint}
    q.leaf_modules = list(header.leaf_modules)
    q.example_shape = tuple(header.example_shape)
    if isinstance(getattr(float_model, "pretrained_cfg", None), dict):
        q.pretrained_cfg = dict(float_model.pretrained_cfg)
    if getattr(float_model, "cfg", None) is not None:
        q.cfg = float_model.cfg
    q.eval()
    if header.lowered is not None:
        q = _lower(q, header.lowered, path.name)
    return q


def _lower(q, options: dict[str, bool | str], where: str):
    bad = sorted(set(options) - set(OPTION_NAMES))
    if bad:
        raise CheckpointError(f"{where}: unknown lowering options {[b[:40] for b in bad[:5]]}")
    try:
        return q.lower(**options)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where}: lowering with {options} failed: {type(e).__name__}: "
                              f"{str(e)[:300]}") from e
