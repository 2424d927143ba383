"""``convert``: capture a model, run the pass pipeline, return a quantized module."""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from ouromamba_fx.capture import capture
from ouromamba_fx.config import W8A8, QuantConfig, preset
from ouromamba_fx.checks import check_model, check_not_quantized, strict_error, unknown_mixers
from ouromamba_fx.errors import CaptureError, DataError, InferenceOnlyError, InputError, OuroMambaError
from ouromamba_fx.ops import gemm
from ouromamba_fx.ops.mixed import outlier_fraction, outlier_map
from ouromamba_fx.numerics import is_float
from ouromamba_fx.passes.act_scales import ChooseActScales
from ouromamba_fx.passes.base import Context, Pass, PassManager, Snapshot
from ouromamba_fx.passes.calibrate import Calibrate, check_batch, iter_batches
from ouromamba_fx.passes.observers import InsertObservers
from ouromamba_fx.passes.qdq import QuantizeActivations
from ouromamba_fx.passes.reparam import ObserveScanStates, ReparameterizeScan
from ouromamba_fx.passes.weights import QuantizeWeights
from ouromamba_fx.progress import console
from ouromamba_fx.passes.qparams import sqnr
from ouromamba_fx.models.identity import model_identity
from ouromamba_fx.tags import op_nodes, tag


def default_passes(config: QuantConfig, input_shape: tuple[int, ...] | None = None) -> list[Pass]:
    """The pipeline for ``config``. Weights are quantized before calibration so that activation
    statistics see the quantized weights upstream."""
    passes: list[Pass] = []
    if config.reparam is not None:
        passes += [ObserveScanStates(),
                   Calibrate(input_shape, "calibrate_states", ("state_observers",), ("states_calibrated",)),
                   ReparameterizeScan()]
    return passes + [InsertObservers(), QuantizeWeights(), Calibrate(input_shape), ChooseActScales(),
                     QuantizeActivations()]


def _input_shape(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    shape = cfg.get("input_size")
    return tuple(shape) if shape else None


def _collect_calib(calib, input_shape) -> list[torch.Tensor]:
    batches = [check_batch(x, i, input_shape) for i, x in enumerate(iter_batches(calib))]
    if not batches:
        raise DataError("calib is empty: it yielded no batches")
    return batches


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the outputs of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.outputs = names, {}
        self.outlier_fraction: dict[str, torch.Tensor] = {}
        self.outlier_maps: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.outputs[n.name] = out.detach()
        t = tag(n) or {}
        if t.get("kind") == "quantize_mixed":  # outlier statistics for the report
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.outlier_fraction[t["site"]] = outlier_fraction(*args)
            self.outlier_maps[t["site"]] = outlier_map(*args)
        return out


def node_input_bits(node: fx.Node) -> dict[str, tuple[int, str]]:
    """For each quantized activation input of ``node``: its input name -> (bits, granularity)."""
    found = {}
    for a in node.all_input_nodes:
        t = tag(a) or {}
        if t.get("kind") == "dequantize":
            qt = tag(a.args[0]) or {}
            found[qt.get("input", "x")] = (qt["bits"], qt["granularity"])
        elif t.get("kind") == "quantize_mixed":
            bits = f"{t['bits']}" + ("O16" if is_float(t["outlier_bits"]) else f"O{t['outlier_bits']}")
            found[t.get("input", "x")] = (bits, t["granularity"])
    return found


@torch.no_grad()
def layer_sqnr(float_gm: fx.GraphModule, q_gm: fx.GraphModule, x: torch.Tensor):
    """SQNR (dB) of every mixer op's output in ``q_gm`` against the same op in ``float_gm`` on
    input ``x`` (errors accumulate along the network, as they do in use), and the fraction of
    channels flagged as outliers per time-step at each mixed-precision site."""
    pairs = {n.name: tag(n).get("source", n.name) for n in op_nodes(q_gm)}
    rf, rq = _Recorder(float_gm, set(pairs.values())), _Recorder(q_gm, set(pairs))
    rf.run(x)
    rq.run(x)
    sq = {name: sqnr(rf.outputs[src], rq.outputs[name]) for name, src in pairs.items()
          if src in rf.outputs and name in rq.outputs}
    return sq, rq.outlier_fraction, rq.outlier_maps


def _nan_rows(t: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN in the rows (first axis) of the samples flagged ``bad``."""
    if not t.is_floating_point() or t.dim() == 0 or t.shape[0] != bad.shape[0]:
        return t
    return t.masked_fill(bad.view(-1, *([1] * (t.dim() - 1))), float("nan"))


class QuantizedModel(nn.Module):
    """A quantized model: the reference quantized FX graph plus what conversion learned.

    Call it like the original model. ``report()`` shows what was quantized and how well;
    ``diff(a, b)`` shows what a pass changed; ``passes`` lists the passes that ran.

    Inputs (the same for :meth:`lower`'s model and under ``torch.compile``):

    * float32 images ``(batch, C, H, W)`` at the calibrated resolution, normalised as the float
      model expects; float16, bfloat16 and float64 images are cast to float32 (the logits are
      float32). Integer images (uint8 pixels) are refused with an :class:`InputError`: normalise
      them first (``ouromamba_fx.data.model_transform(model)``).
    * A sample holding a NaN or an infinity gives NaN logits (every output of that sample), as
      the float model does; the other samples of the batch are computed as if it were not there,
      bit for bit. (Quantization would otherwise clamp the NaN away into confident logits.)
    * A batch of 0 images gives an empty ``(0, num_classes)`` result.
    * Inference only: the parameters do not require gradients, and a call that would record
      gradients (grad mode on, and an input or parameter that requires them) raises
      :class:`InferenceOnlyError` (the rounding steps have no useful gradient).
    * Inputs or a model on the ``meta`` device raise an :class:`InputError`.
    """

    def __init__(self, gm: fx.GraphModule, config: QuantConfig, snapshots: list[Snapshot],
                 float_reasons: dict[str, str], log: list[str], input_shape: tuple[int, ...] | None,
                 sqnr_db: dict[str, float], model_name: str = "model") -> None:
        super().__init__()
        self.graph_module = gm
        self.config = config
        self.snapshots = snapshots
        self.float_reasons = float_reasons
        self.log = log
        self.input_shape = input_shape
        self.sqnr_db = sqnr_db
        self.model_name = model_name
        self.outlier_fraction: dict[str, torch.Tensor] = {}  # site -> fraction flagged per step
        self.outlier_maps: dict[str, torch.Tensor] = {}  # site -> (steps, channels) fraction of samples flagged
        self.model_identity: dict | None = None  # the float model: class, config, weights fingerprint
        self.example_shape: tuple[int, ...] | None = None  # (C, H, W) of the calibration images
        self.leaf_modules: list[str] = []  # sub-modules traced as float leaves (a saved file keeps them)
        self.custom_passes = False  # converted with passes=...: the file format cannot rebuild it
        self.lower_options: dict[str, bool] | None = None  # set on lowered models: how they were lowered
        self.cpu_gemm = "auto"  # the integer GEMM path calls run with (ouromamba_fx.ops.gemm.use)
        self.reference: "QuantizedModel | None" = None  # a lowered model's reference graph (for save)
        for p in gm.parameters():  # inference only (see the class docstring)
            p.requires_grad_(False)

    @property
    def passes(self) -> list[str]:
        return [s.pass_name for s in self.snapshots]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        # Non-finite samples: run them as zeros (no NaN reaches an integer kernel) and give NaN
        # for all their outputs afterwards; samples are independent, so the others are unchanged.
        finite = torch.isfinite(x)
        bad = ~finite.flatten(1).all(1) if x.dim() > 1 else ~finite
        with gemm.use(self.cpu_gemm):
            y = self.graph_module(torch.where(finite, x, 0.0))
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: _nan_rows(t, bad), y)

    def _check_input(self, x) -> torch.Tensor:
        """``x`` as float32 after the checks of the class docstring, or an error saying what is wrong."""
        name = self.model_name
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name}: expected a tensor of images, got {type(x).__name__}")
        ref = next(iter(self.graph_module.parameters()), None)
        if ref is None:
            ref = next(iter(self.graph_module.buffers()), None)
        if x.is_meta or (ref is not None and ref.is_meta):
            where = "the input is" if x.is_meta else "the quantized model is"
            raise InputError(f"{name}: {where} on the meta device, which holds shapes but no data; "
                             f"quantized models run on real tensors (load or convert the model on the "
                             f"CPU, and pass real images)")
        if ref is not None and x.device != ref.device:
            raise InputError(f"{name}: the input is on {x.device} and the model on {ref.device}; move "
                             f"one of them (x.to({str(ref.device)!r}))")
        if x.is_complex() or not x.is_floating_point():
            raise InputError(f"{name}: input of dtype {x.dtype}; a quantized model takes normalised float "
                             f"images (uint8 pixels: apply the model's transform, "
                             f"ouromamba_fx.data.model_transform(model), or x.float() / 255 then the "
                             f"model's mean/std)")
        if self.input_shape is not None and tuple(x.shape[1:]) != tuple(self.input_shape):
            raise InputError(
                f"{name} was quantized for inputs (batch, {', '.join(map(str, self.input_shape))}) "
                f"and its static per-token scales are tied to that sequence length; got "
                f"{tuple(x.shape)}. Resize inputs to the calibrated resolution, or convert again "
                f"with calibration data at the new resolution.")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.graph_module.parameters())):
            raise InferenceOnlyError(
                f"{name} is a quantized model for inference only: its rounding steps have no useful "
                f"gradient, so it computes none. Call it under torch.no_grad() (or "
                f"torch.inference_mode()) with inputs that do not require grad; for gradients use the "
                f"float model.")
        return x if x.dtype == torch.float32 else x.float()

    def save(self, path) -> None:
        """Write this model to a ``.safetensors`` file (no pickle); ``ouromamba_fx.load(path)``
        rebuilds it with bit-identical outputs. See :mod:`ouromamba_fx.serialize`."""
        from ouromamba_fx.serialize import save

        save(self, path)

    def outlier_map(self, layer: int | str) -> dict[str, torch.Tensor]:
        """Outlier maps of one layer (index) or site (name part): site -> ``(time-steps, channels)``
        fraction of calibration samples flagged as outliers. See :mod:`ouromamba_fx.outliers`."""
        from ouromamba_fx.outliers import select

        return select(self.outlier_maps, layer)

    def lower(self, cpu_gemm: str = "auto", **options) -> "QuantizedModel":
        """A copy whose graph runs fused integer ops (``w8a8_linear``, ``w4a4o8_linear``,
        ``selective_scan_qi``...) instead of the reference quantize/dequantize arithmetic; its
        :attr:`passes` continue with one entry per lowering rule. ``torch.compile(q,
        backend="ouromamba")`` applies the same rules and then Inductor. Options: see
        :func:`ouromamba_fx.lowering.lower.lowering_passes`; ``cpu_gemm`` (``auto``, ``int_mm``,
        ``emulated``) chooses the CPU's integer GEMM path for the copy's calls
        (:mod:`ouromamba_fx.ops.gemm`; the same numbers either way)."""
        from ouromamba_fx.lowering.lower import lower_quantized

        return lower_quantized(self, cpu_gemm, **options)

    def report(self):
        from ouromamba_fx.report import Report

        return Report.of(self)

    def diff(self, pass_a: str | None = None, pass_b: str | None = None, layer: int | None = None,
             role: str | None = None, collapse: bool = True, verbose: bool = False):
        """What changed between the graphs after ``pass_a`` and after ``pass_b`` (names from
        :attr:`passes`; default: every pass against the one before)."""
        from ouromamba_fx.diff import diff_snapshots, pass_diffs

        if pass_a is None and pass_b is None:
            return pass_diffs(self.snapshots, layer=layer, role=role, collapse=collapse, verbose=verbose)
        by_name = {s.pass_name: s for s in self.snapshots}
        for p in (pass_a, pass_b):
            if p not in by_name:
                raise KeyError(f"no pass named {p!r}; passes: {', '.join(by_name)}")
        return diff_snapshots(by_name[pass_a], by_name[pass_b], layer=layer, role=role, collapse=collapse,
                              verbose=verbose)


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
    for p in gm.parameters():  # a quantized model is for inference: nothing of it is trained
        p.requires_grad_(False)
    return work, gm, ctx, pm


def convert(model: nn.Module, calib=None, config: QuantConfig = W8A8, *,
            passes: list[Pass] | None = None, show_progress: bool = True,
            gen_options: dict | None = None, lower: bool = False, strict: bool = False,
            leaf_modules: tuple = ()) -> QuantizedModel:
    """Quantize ``model`` with ``config``; the model itself is not changed.

    Args:
        model: a vision Mamba (e.g. from :mod:`ouromamba_fx.models`).
        calib: calibration images: a tensor ``(N, C, H, W)``, or any iterable of image batches or
            ``(images, labels)`` pairs (a DataLoader), normalised as the model expects. ``None``
            (the default): data-free, ``ouromamba_fx.gen(model, **gen_options)`` synthesises them
            (OuroMamba-Gen; about 7 minutes for 128 images of the reference model on 2 CPU cores),
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

    Example:
        >>> q = convert(model, calib=image_loader(model, "calib/", labels=False), config=W8A8)  # doctest: +SKIP
        >>> print(q.report())                                                                      # doctest: +SKIP
    """
    if isinstance(model, QuantizedModel):  # before check_model: its message is the clearer one
        raise OuroMambaError(f"convert: {model.model_name} is already quantized "
                             f"({model.config.name}); convert the float model instead")
    check_model(model, "convert")
    if any(isinstance(m, QuantizedModel) for m in model.modules()):
        raise OuroMambaError("convert: the model contains an already-quantized sub-model")
    check_not_quantized(model)
    leaves = leaf_names(model, leaf_modules)
    unknown = unknown_mixers(model, leaves)
    if unknown and strict:
        raise strict_error(unknown)
    for mod, typ in unknown.items():
        warnings.warn(f"convert: '{mod}' ({typ}) looks like a mixer the capture does not know; it stays "
                      f"in float (strict=True makes this an error)", stacklevel=2)
    if isinstance(config, str):
        config = preset(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"convert: config must be a QuantConfig or a preset name (e.g. ouromamba_fx.W8A8 "
                        f"or \"W8A8\"), got {type(config).__name__}")
    if calib is not None and gen_options:
        raise ValueError("convert: gen_options only apply when calib is None (data-free); "
                         "drop one of them")
    from ouromamba_fx.gen import SyntheticCalib, gen

    calib_note = None
    if calib is None:
        if show_progress:
            console.print("[cyan]no calib given[/]: generating data-free calibration images with "
                          "OuroMamba-Gen (pass calib=... to use real images)")
        calib = gen(model, show_progress=show_progress, **(gen_options or {}))
    if isinstance(calib, SyntheticCalib):
        st = calib.settings
        calib_note = (f"calibration: data-free, {len(calib.images)} OuroMamba-Gen images "
                      f"(loss={st.get('loss')}, {st.get('iters')} iterations, seed {st.get('seed')})")
    input_shape = _input_shape(model)
    batches = _collect_calib(calib, input_shape)
    if calib_note is None:
        calib_note = f"calibration: {sum(len(b) for b in batches)} user-supplied images"
    work, gm, ctx, pm = build(model, config, batches, leaves, passes=passes, show_progress=show_progress,
                              unknown=unknown)
    ctx.log.insert(0, calib_note)
    ctx.log.append(f"passes: {', '.join(s.pass_name for s in pm.snapshots)}")
    # `work` is still a float model (passes only remove modules from the graph's own
    # hierarchy); folding rescaled x_proj rows exactly, so it is the right float reference.
    with torch.random.fork_rng(devices=[]):
        sq, outliers, maps = layer_sqnr(capture(work, tuple(leaves) + tuple(unknown)), gm, ctx.example)
    name = model_name(model)
    q = QuantizedModel(gm, config, pm.snapshots, ctx.float_reasons, ctx.log, input_shape, sq, name)
    q.outlier_fraction, q.outlier_maps = outliers, maps
    q.model_identity = model_identity(model, name)
    q.leaf_modules = leaves
    q.example_shape = tuple(batches[0].shape[1:])
    q.custom_passes = passes is not None
    worst = min((v for v in sq.values() if math.isfinite(v)), default=float("inf"))
    if show_progress:
        console.print(f"[green]converted[/] {name} with {config.name}: {len(sq)} ops quantized, "
                      f"worst output SQNR {worst:.1f} dB")
    return q.lower() if lower else q
