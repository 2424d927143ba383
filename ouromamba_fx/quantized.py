"""``QuantizedModel``: a quantized graph with what conversion learned, callable like the model.

:func:`ouromamba_fx.convert` returns one; :meth:`QuantizedModel.lower` gives the copy that runs
fused ops; :func:`ouromamba_fx.load` rebuilds one from a file. Its methods read the results
layer (:mod:`~ouromamba_fx.report`, :mod:`~ouromamba_fx.diff`, :mod:`~ouromamba_fx.outliers`,
:mod:`~ouromamba_fx.fileformat`) and run the lowering (:mod:`ouromamba_fx.lowering.lower`).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ouromamba_fx.config import QuantConfig
from ouromamba_fx.diff import diff_snapshots, pass_diffs
from ouromamba_fx.errors import InferenceOnlyError, InputError
from ouromamba_fx.fileformat import write
from ouromamba_fx.lowering.lower import lower_graph
from ouromamba_fx.ops import gemm
from ouromamba_fx.outliers import select
from ouromamba_fx.passes.base import Snapshot
from ouromamba_fx.report import Report


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
        self.coverage: dict = {}  # parameter-bearing module -> Coverage (ouromamba_fx.coverage)
        self.custom_passes = False  # converted with passes=...: the file format cannot rebuild it
        self.lower_options: dict[str, bool | str] | None = None  # set on lowered models: how they were lowered
        self.cpu_gemm = "auto"  # the integer GEMM path calls run with (ouromamba_fx.ops.gemm.use)
        self.reference: "QuantizedModel | None" = None  # a lowered model's reference graph (for save)
        for p in gm.parameters():  # inference only (see the class docstring)
            p.requires_grad_(False)

    @property
    def lowered(self) -> bool:
        """Whether the graph runs fused ops (a copy made by :meth:`lower`)."""
        return self.lower_options is not None

    @property
    def passes(self) -> list[str]:
        return [s.pass_name for s in self.snapshots]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        # Non-finite samples: run them as zeros (no NaN reaches an integer kernel) and give NaN
        # for all their outputs afterwards; samples are independent, so the others are unchanged.
        # A sample is bad when the max of its |x| is not finite (max propagates NaN and inf): one
        # plain reduction (reducing the element mask per sample compiled to a slow kernel).
        bad = ~torch.isfinite(x.flatten(1).abs().amax(1)) if x.dim() > 1 else ~torch.isfinite(x)
        with gemm.use(self.cpu_gemm):
            y = self.graph_module(torch.where(torch.isfinite(x), x, 0.0))
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
        write(self, path)

    def outlier_map(self, layer: int | str) -> dict[str, torch.Tensor]:
        """Outlier maps of one layer (index) or site (name part): site -> ``(time-steps, channels)``
        fraction of calibration samples flagged as outliers. See :mod:`ouromamba_fx.outliers`."""
        return select(self.outlier_maps, layer)

    def lower(self, cpu_gemm: str = "auto", **options) -> "QuantizedModel":
        """A copy whose graph runs fused integer ops (``w8a8_linear``, ``w4a4o8_linear``,
        ``selective_scan_qi``...) instead of the reference quantize/dequantize arithmetic; its
        :attr:`passes` continue with one entry per lowering rule, so ``diff`` shows each rule.
        ``torch.compile(q, backend="ouromamba")`` applies the same rules and then Inductor.
        Options: see :func:`ouromamba_fx.lowering.lower.lowering_passes`; ``cpu_gemm`` (``auto``,
        ``int_mm``, ``emulated``) chooses the CPU's integer GEMM path for the copy's calls
        (:mod:`ouromamba_fx.ops.gemm`; the same numbers either way)."""
        if self.lower_options is not None:
            return self
        gemm.check_choice(cpu_gemm)
        gm, snaps, log = lower_graph(copy.deepcopy(self.graph_module), **options)
        out = copy.copy(self)  # shares config, reports and statistics; own module tables and graph
        out._modules, out._parameters, out._buffers = dict(self._modules), dict(self._parameters), dict(self._buffers)
        out.graph_module = gm
        out.snapshots = list(self.snapshots) + snaps[1:]
        out.log = list(self.log) + log
        out.lower_options = dict(options)
        out.cpu_gemm = cpu_gemm
        # The reference model's tensors are what a saved file holds. Kept outside the module tree
        # (not a submodule): its tensors are not the lowered model's parameters.
        out.__dict__["reference"] = self
        return out

    def export(self, example_input: torch.Tensor, max_batch: int | None = None) -> torch.export.ExportedProgram:
        """This model as a ``torch.export`` program (``ExportedProgram``) for inputs shaped like
        ``example_input``, with a dynamic batch size (1 to ``max_batch``, default
        :data:`ouromamba_fx.export.MAX_BATCH`). The graph holds the package's ops
        (``torch.ops.ouromamba.*``) and aten ops: the reference graph's ops here, the fused ones
        of a lowered copy (``q.lower().export(x)``, the one to deploy). Save it with
        :func:`ouromamba_fx.export.save`, read it back with :func:`ouromamba_fx.export.load`,
        compile it with :func:`ouromamba_fx.export.compile_aoti`. See :mod:`ouromamba_fx.export`."""
        from ouromamba_fx.export import MAX_BATCH, export_program

        return export_program(self, example_input, max_batch=max_batch or MAX_BATCH)

    def report(self) -> Report:
        """What was quantized and how well (a rich table; ``print`` gives text)."""
        return Report.of(self)

    def diff(self, pass_a: str | None = None, pass_b: str | None = None, layer: int | None = None,
             role: str | None = None, collapse: bool = True, verbose: bool = False):
        """What changed between the graphs after ``pass_a`` and after ``pass_b`` (names from
        :attr:`passes`; default: every pass against the one before)."""
        if pass_a is None and pass_b is None:
            return pass_diffs(self.snapshots, layer=layer, role=role, collapse=collapse, verbose=verbose)
        by_name = {s.pass_name: s for s in self.snapshots}
        for p in (pass_a, pass_b):
            if p not in by_name:
                raise KeyError(f"no pass named {p!r}; passes: {', '.join(by_name)}")
        return diff_snapshots(by_name[pass_a], by_name[pass_b], layer=layer, role=role, collapse=collapse,
                              verbose=verbose)
