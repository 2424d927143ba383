"""``convert``: capture a model, run the pass pipeline, return a :class:`~ouromamba_fx.quantized.QuantizedModel`."""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from ouromamba_fx.capture import capture
from ouromamba_fx.checks import check_model, check_not_quantized, strict_error, unknown_mixers
from ouromamba_fx.config import W8A8, QuantConfig, preset
from ouromamba_fx.coverage import attention_matmuls, module_coverage, summary
from ouromamba_fx.errors import CaptureError, DataError, OuroMambaError
from ouromamba_fx.measure import layer_sqnr
from ouromamba_fx.numerics import is_float
from ouromamba_fx.ops.scan_quant import SCAN_REPARAM_OP
from ouromamba_fx.models.families import canonical_copy, upstream_modules
from ouromamba_fx.models.identity import model_identity
from ouromamba_fx.passes.base import Context, Pass, PassManager
from ouromamba_fx.passes.calibrate import check_batch, iter_batches
from ouromamba_fx.passes.pipeline import default_passes
from ouromamba_fx.progress import console
from ouromamba_fx.quantized import QuantizedModel

__all__ = ["convert", "default_passes"]


def _input_shape(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = cfg.get("input_size")
    return tuple(shape) if shape else None


def _collect_calib(calib, input_shape) -> list[torch.Tensor]:
    batches = [check_batch(x, i, input_shape) for i, x in enumerate(iter_batches(calib))]
    if not batches:
        raise DataError("calib is empty: it yielded no batches")
    return batches


def _capture(model: nn.Module, leaves: tuple) -> fx.GraphModule:
    try:
        return capture(model, leaf_modules=leaves)
    except CaptureError as e:
        name = getattr(e, "module", "")
        if not name:
            raise
        raise CaptureError(f"{e}\nFrom convert: convert(model, ..., leaf_modules=[{name!r}]) keeps it "
                           f"in float.") from e


def leaf_names(model: nn.Module, leaf_modules) -> list[str]:
    """The qualified names of the sub-modules ``leaf_modules`` (names or types) selects, outermost
    only: what a saved file records so that loading traces the same leaves."""
    names = {x for x in leaf_modules if isinstance(x, str)}
    types_ = tuple(x for x in leaf_modules if isinstance(x, type))
    found: list[str] = []
    for name, m in model.named_modules():
        if name and (name in names or (types_ and isinstance(m, types_))) and \
                not any(name.startswith(p + ".") for p in found):
            found.append(name)
    missing = sorted(names - {n for n, _ in model.named_modules()})
    if missing:
        raise CaptureError(f"convert: leaf_modules names not found in the model: {missing}")
    return found


def model_name(model: nn.Module) -> str:
    name = type(model).__name__
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "embed_dim") and hasattr(cfg, "depth"):
        name = f"{name}(d={cfg.embed_dim}, depth={cfg.depth})"
    return name


def build(model: nn.Module, config: QuantConfig, batches: list[torch.Tensor], leaves: list[str],
          *, passes: list[Pass] | None = None, show_progress: bool = False, replay: bool = False,
          unknown: dict[str, str] | None = None):
    """Capture a copy of ``model`` and run the pass pipeline on it: the one path both
    :func:`convert` and :func:`ouromamba_fx.load` (``replay=True``: same graph, tensors to be
    replaced by a file's) take. Returns (float copy, quantized graph, context, pass manager)."""
    unknown = unknown if unknown is not None else unknown_mixers(model, leaves)
    all_leaves = tuple(leaves) + tuple(n for n in unknown if n not in leaves)
    input_shape = _input_shape(model)
    work = copy.deepcopy(model).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        gm = _capture(work, all_leaves)
        ctx = Context(config, calib=batches, example=batches[0][:32], show_progress=show_progress,
                      replay=replay)
        ctx.float_reasons.update({m: f"unknown mixer type {t}: kept in float" for m, t in unknown.items()})
        ctx.float_reasons.update({m: "leaf_modules: kept in float" for m in leaves if m not in unknown})
        pm = PassManager(passes if passes is not None else default_passes(config, input_shape))
        gm = pm.run(gm, ctx)
        ctx.float_reasons.update(attention_matmuls(gm))
        ctx.coverage = module_coverage(work, gm, ctx.float_reasons)
    for p in gm.parameters():  # a quantized model is for inference: nothing of it is trained
        p.requires_grad_(False)
    return work, gm, ctx, pm


def _quantizes_states(gm: fx.GraphModule, config: QuantConfig) -> bool:
    """Whether the graph quantizes scan hidden states (a reparameterized scan with integer state
    bits): quantization even when every weight and activation stays float."""
    if config.reparam is None or is_float(config.reparam.state_bits):
        return False
    return any(n.op == "call_function" and n.target is SCAN_REPARAM_OP for n in gm.graph.nodes)


def convert(model: nn.Module, calib=None, config: QuantConfig = W8A8, *,
            passes: list[Pass] | None = None, show_progress: bool = True,
            gen_options: dict | None = None, lower: bool = False, strict: bool = False,
            leaf_modules: tuple = (), allow_float: bool = False) -> QuantizedModel:
    """Quantize ``model`` with ``config``; the model itself is not changed.

    Args:
        model: a vision Mamba: from :mod:`ouromamba_fx.models`, or the unmodified upstream code
            of MambaVision (NVlabs), VMamba v0/v2 (MzeroMiko) or a model of mamba-ssm ``Mamba``
            blocks, which are rebuilt first as the package's equal modules
            (:func:`ouromamba_fx.models.canonicalize`, sharing the weights; the log says so).
        calib: calibration images: a tensor ``(N, C, H, W)``, or any iterable of image batches or
            ``(images, labels)`` pairs (a DataLoader), normalised as the model expects. ``None``
            (the default): data-free, ``ouromamba_fx.gen(model, **gen_options)`` synthesises them
            (OuroMamba-Gen; by default 64 images x 50 steps, about 100 steps of ~0.5 s for the
            reference model on 2 quiet CPU cores: benchmarks/gen_time.md),
            and the log and report say so.
        config: a :class:`QuantConfig`, a preset (``W8A8``, ``W6A6``, ``W4A8``, ``W4A4O8``) or its name.
        passes: replace the default pipeline (see :func:`default_passes`). Such a model cannot be
            saved: loading rebuilds the graph with the default pipeline.
        gen_options: keyword arguments for :func:`ouromamba_fx.gen` when ``calib`` is None
            (e.g. ``{"n": 64, "seed": 1}``); an error if ``calib`` is given.
        lower: return the lowered model (fused integer ops, :meth:`QuantizedModel.lower`) instead
            of the reference quantized graph.
        strict: an error for sub-modules that look like mixers the capture does not know (by class
            name, see :func:`ouromamba_fx.checks.unknown_mixers`); without it they stay in float,
            with a warning and a line in the report.
        leaf_modules: module names or types to keep as opaque float modules (see :func:`capture`).
        allow_float: return the model even if nothing in it was quantized (by default that is
            an error: a float model handed back with a warning is easily mistaken for success).

    Example:
        >>> q = convert(model, calib=image_loader(model, "calib/", labels=False), config=W8A8)  # doctest: +SKIP
        >>> print(q.report())                                                                      # doctest: +SKIP
    """
    model, config, leaves, unknown, rebuilt = _validate(model, calib, config, gen_options, strict, leaf_modules)
    batches, calib_note = _calibration(model, calib, gen_options, show_progress)
    work, gm, ctx, pm = build(model, config, batches, leaves, passes=passes, show_progress=show_progress,
                              unknown=unknown)
    ctx.log.insert(0, calib_note)
    if rebuilt:
        ctx.log.insert(1, "rebuilt as ouromamba_fx modules (same weights, same outputs): "
                       + ", ".join(f"{n or 'the model'} ({c})" for n, c in rebuilt.items()))
    ctx.log.append(summary(ctx.coverage))
    if not allow_float and not any(c.quantized for c in ctx.coverage.values()) and not _quantizes_states(gm, config):
        floats = "; ".join(f"{n}: {c.why}" for n, c in list(ctx.coverage.items())[:8])
        raise OuroMambaError(
            f"convert: nothing in {model_name(model)} was quantized with {config.name} ({floats}"
            f"{'; ...' if len(ctx.coverage) > 8 else ''}). Check config.roles / overrides and leaf_modules, "
            f"or pass allow_float=True to get the float model back on purpose")
    ctx.log.append(f"passes: {', '.join(s.pass_name for s in pm.snapshots)}")
    q = _measure(model, work, gm, ctx, pm, tuple(leaves) + tuple(unknown), batches)
    q.leaf_modules = leaves
    q.custom_passes = passes is not None
    if show_progress:
        worst = min((v for v in q.sqnr_db.values() if math.isfinite(v)), default=float("inf"))
        console.print(f"[green]converted[/] {q.model_name} with {config.name}: {len(q.sqnr_db)} ops "
                      f"quantized, worst output SQNR {worst:.1f} dB")
    return q.lower() if lower else q


def _validate(model: nn.Module, calib, config, gen_options, strict: bool, leaf_modules) -> tuple:
    """Check the arguments before any work: (the model, upstream modules rebuilt on a copy, config,
    leaf module names, unknown mixers, the rebuilt upstream modules)."""
    if isinstance(model, QuantizedModel):  # before check_model: its message is the clearer one
        raise OuroMambaError(f"convert: {model.model_name} is already quantized "
                             f"({model.config.name}); convert the float model instead")
    check_model(model, "convert")
    if any(isinstance(m, QuantizedModel) for m in model.modules()):
        raise OuroMambaError("convert: the model contains an already-quantized sub-model")
    check_not_quantized(model)
    rebuilt = upstream_modules(model)
    model = canonical_copy(model)
    leaves = leaf_names(model, leaf_modules)
    unknown = unknown_mixers(model, leaves)
    if unknown and strict:
        raise strict_error(unknown)
    for mod, typ in unknown.items():
        warnings.warn(f"convert: '{mod}' ({typ}) looks like a mixer the capture does not know; it stays "
                      f"in float (strict=True makes this an error)", stacklevel=3)
    if isinstance(config, str):
        config = preset(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"convert: config must be a QuantConfig or a preset name (e.g. ouromamba_fx.W8A8 "
                        f"or \"W8A8\"), got {type(config).__name__}")
    if calib is not None and gen_options:
        raise ValueError("convert: gen_options only apply when calib is None (data-free); "
                         "drop one of them")
    return model, config, leaves, unknown, rebuilt


def _calibration(model: nn.Module, calib, gen_options, show_progress: bool) -> tuple[list[torch.Tensor], str]:
    """The calibration batches (OuroMamba-Gen images when ``calib`` is None) and the log line
    saying where they came from."""
    from ouromamba_fx.gen import SyntheticCalib, gen

    if calib is None:
        if show_progress:
            console.print("[cyan]no calib given[/]: generating data-free calibration images with "
                          "OuroMamba-Gen (pass calib=... to use real images)")
        calib = gen(model, show_progress=show_progress, **(gen_options or {}))
    batches = _collect_calib(calib, _input_shape(model))
    if isinstance(calib, SyntheticCalib):
        st = calib.settings
        return batches, (f"calibration: data-free, {len(calib.images)} OuroMamba-Gen images "
                         f"(loss={st.get('loss')}, {st.get('iters')} iterations, seed {st.get('seed')})")
    return batches, f"calibration: {sum(len(b) for b in batches)} user-supplied images"


def _measure(model: nn.Module, work: nn.Module, gm: fx.GraphModule, ctx: Context, pm: PassManager,
             leaves: tuple, batches: list[torch.Tensor]) -> QuantizedModel:
    """The QuantizedModel with each op's output SQNR against the float model and the outlier
    statistics, measured on one calibration batch."""
    # `work` is still a float model (passes only remove modules from the graph's own
    # hierarchy); folding rescaled x_proj rows exactly, so it is the right float reference.
    with torch.random.fork_rng(devices=[]):
        sq, outliers, maps = layer_sqnr(capture(work, leaves), gm, ctx.example)
    name = model_name(model)
    q = QuantizedModel(gm, ctx.config, pm.snapshots, ctx.float_reasons, ctx.log, _input_shape(model), sq, name)
    q.outlier_fraction, q.outlier_maps = outliers, maps
    q.model_identity = model_identity(model, name)
    q.example_shape = tuple(batches[0].shape[1:])
    q.coverage = ctx.coverage
    return q
