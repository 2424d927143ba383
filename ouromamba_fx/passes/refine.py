"""Block-wise refinement of the weight scales (``config.refine``), after the reference graph is built.

The released OuroMamba code ends its weight quantization with this step: block by block, the
per-channel weight scales become learnable and are tuned so that the quantized block's output
points the same way as the float block's. Here a *block* is one mixer: the contiguous run of graph
nodes from the first to the last node tagged with its layer index (its quantized linears and
conv1d, the scans, and the activation quantization between them).

How it runs, on the first ``refine.samples`` calibration images:

1. The graph is run once in *float mode* (weights dequantized to the float weights they came
   from, activation quantization skipped): each mixer's float output is the target.
2. The graph is run in *quantized mode* up to the first mixer. For each mixer in order, its
   inputs are what the quantized model computes there (with the mixers before it already
   refined); its weight scales ``s = s0 * exp(t)`` (``t`` one per scale, starting at 0) are
   optimised with Adam on the mean over images and tokens of ``1 - cos(float output, quantized
   output)`` (cosine over a token's channels), rounding passed through by a straight-through
   estimator (weights and activations alike), learning rate decayed to 0 (cosine). The new
   scales are kept only if they lower the loss on all the refinement images; ``weight_q`` and
   ``weight_scale`` are then rewritten (the integer weights re-rounded with the new scale), so
   the reference graph and every lowering built from it use them. Then the quantized model runs
   on to the next mixer.

Activation scales and the outlier rule are those calibration chose; nothing else changes.
"""

from __future__ import annotations

import time

import torch
import torch.fx as fx
import torch.nn.functional as F

from ouromamba_fx.numerics import qrange
from ouromamba_fx.ops.mixed import QUANTIZE_MIXED_OP, quantize_mixed_ref
from ouromamba_fx.ops.quant import DEQUANTIZE_OP, QUANTIZE_OP, dequantize_ref, quantize_ref
from ouromamba_fx.passes.base import Context, Pass, PassError
from ouromamba_fx.passes.calibrate import iter_batches
from ouromamba_fx.progress import progress_bar
from ouromamba_fx.tags import Kind, tag


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """``xq``'s values with the gradient of ``x`` (straight-through estimator)."""
    return x + (xq - x).detach()


class _Weight:
    """One quantized weight under refinement: its float values as ``(N, K)``, the clipping
    search's scale ``s0`` and the learnable log-factor ``t`` (``scale = s0 * exp(t)``)."""

    def __init__(self, gm: fx.GraphModule, module: str, entry: tuple) -> None:
        w, self.q_attr, self.scale_attr, spec = entry
        self.module, self.shape = module, w.shape
        self.w2d = w.reshape(w.shape[0], -1).float()
        self.s0 = _fetch(gm, self.scale_attr).detach().reshape(-1, 1).clone()
        self.qmin, self.qmax = qrange(spec.bits, True)
        self.t = torch.zeros_like(self.s0, requires_grad=True)

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.t)

    def value(self) -> torch.Tensor:
        """The dequantized weight with the current scale: exactly the reference graph's numbers
        without grad, a straight-through estimate of them with grad."""
        s = self.scale()
        if torch.is_grad_enabled():
            x = self.w2d / s
            q = _ste(x, torch.round(x)).clamp(self.qmin, self.qmax)
            return (q * s).reshape(self.shape)
        s = s.detach()
        zp = torch.zeros_like(s)
        return dequantize_ref(quantize_ref(self.w2d, s, zp, self.qmin, self.qmax), s, zp).reshape(self.shape)

    def store(self, gm: fx.GraphModule) -> None:
        """Write the new scale and the re-rounded integer weight into the graph's buffers."""
        with torch.no_grad():
            s = self.scale()
            w_q = quantize_ref(self.w2d, s, torch.zeros_like(s), self.qmin, self.qmax).reshape(self.shape)
            buf_s = _fetch(gm, self.scale_attr)
            buf_s.copy_(s.reshape(buf_s.shape))
            _fetch(gm, self.q_attr).copy_(w_q)


class _Runner:
    """Runs ranges of a reference graph's nodes on an environment (node -> value), in one of two
    modes: ``float`` (float weights, activation quantization skipped) or quantized (the graph's
    own ops; the weights in ``self.weights`` from their learnable scales, with straight-through
    rounding when grad is enabled)."""

    def __init__(self, gm: fx.GraphModule, ctx: Context) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=i) for i, n in enumerate(self.nodes)}
        self.float_mode = False
        self.weights: dict[str, _Weight] = {}  # scale buffer name -> weight under refinement
        # scale buffer name -> (module name, its ctx.quantized_weights entry)
        self.by_scale = {e[2]: (m, e) for m, e in ctx.quantized_weights.items()}

    def advance(self, env: dict, lo: int, hi: int) -> None:
        """Execute nodes ``lo..hi-1`` into ``env``, dropping values no later node needs."""
        for i in range(lo, hi):
            n = self.nodes[i]
            if n.op in ("placeholder", "output"):
                continue
            env[n] = self._exec(n, env)
            for a in n.all_input_nodes:
                if self.last_use[a] <= i and a in env:
                    del env[a]

    def _exec(self, n: fx.Node, env: dict):
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "get_attr":
            return _fetch(self.gm, n.target)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        t = n.target
        if t is DEQUANTIZE_OP and (tag(n) or {}).get("kind") == Kind.WEIGHT:
            scale_attr = n.args[1].target
            if self.float_mode:
                return self.by_scale[scale_attr][1][0].float()
            if scale_attr in self.weights:
                return self.weights[scale_attr].value()
            return t(*args, **kwargs)
        grad = torch.is_grad_enabled()
        if t is QUANTIZE_OP and (self.float_mode or grad):
            x = args[0]
            return x if self.float_mode else _ste(x, dequantize_ref(quantize_ref(x.detach(), *args[1:]),
                                                                  args[1], args[2]))
        if t is DEQUANTIZE_OP and args[0].is_floating_point():  # after a float-mode / STE quantize
            return args[0]
        if t is QUANTIZE_MIXED_OP and (self.float_mode or grad):
            x = args[0]
            return x if self.float_mode else _ste(x, quantize_mixed_ref(x.detach(), *args[1:]))
        return t(*args, **kwargs)


def _regions(runner: _Runner) -> list[tuple[int, int, list[str]]]:
    """(first node index, last node index, scale buffers of its quantized weights) per mixer
    with quantized weights, in graph order."""
    spans: dict[int, list[int]] = {}
    weights: dict[int, list[str]] = {}
    for i, n in enumerate(runner.nodes):
        layer = (tag(n) or {}).get("layer")
        if layer is None:
            continue
        span = spans.setdefault(layer, [i, i])
        span[1] = i
        if n.op == "call_function" and n.target is DEQUANTIZE_OP and tag(n).get("kind") == Kind.WEIGHT \
                and n.args[1].target in runner.by_scale:
            weights.setdefault(layer, []).append(n.args[1].target)
    out = sorted((lo, hi, weights[layer]) for layer, (lo, hi) in spans.items() if layer in weights)
    for (_, hi_a, _), (lo_b, _, _) in zip(out, out[1:]):
        if lo_b <= hi_a:
            raise PassError("refine_weights: the nodes of two mixers interleave in the graph; block-wise "
                            "refinement needs each mixer's nodes contiguous (set config.refine=None)")
    return out


def _batched(values: list, sizes: list[int]):
    """Per-batch values of one node joined along the batch axis (tensors whose first axis is the
    batch); anything else must be the same for every batch and is taken once."""
    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and all(
            isinstance(v, torch.Tensor) and v.shape[0] == s for v, s in zip(values, sizes)):
        return torch.cat([v.detach() for v in values])
    return first


def _take(v, idx: torch.Tensor, n: int):
    return v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v


def _loss(outs: list, targets: list) -> torch.Tensor:
    """Mean over outputs, images and tokens of ``1 - cos`` between the quantized and float outputs,
    cosine over the last axis (a token's channels). Per token rather than per flattened image: every
    token counts, whatever its norm (Vim classifies from one token, the class token; on the
    reference model a flattened-image cosine traded agreement with the float model for it)."""
    per = [1 - F.cosine_similarity(o.float(), t.float(), dim=-1) for o, t in zip(outs, targets)]
    return torch.stack([p.mean() for p in per]).mean()


class RefineWeights(Pass):
    """Refine each mixer's weight scales in turn (see the module docstring); logs how many mixers
    were refined and the loss before and after."""

    name = "refine_weights"
    requires = ("reference_graph",)
    provides = ("weights_refined",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        rc = ctx.config.refine
        if rc is None or ctx.replay:  # a saved model's scales come from its file
            return False
        start, cpu_start = time.perf_counter(), time.process_time()
        runner = _Runner(gm, ctx)
        regions = _regions(runner)
        if not regions:
            ctx.log.append("refine weights: no mixer with quantized weights, nothing refined")
            return False
        batches = self._images(ctx, rc.samples)
        sizes = [len(b) for b in batches]
        n_img = sum(sizes)
        outputs = [[n for n in runner.nodes[lo:hi + 1] if runner.last_use[n] > hi] for lo, hi, _ in regions]
        inputs = [sorted({a for n in runner.nodes[lo:hi + 1] for a in n.all_input_nodes
                          if runner.index[a] < lo}, key=runner.index.get) for lo, hi, _ in regions]
        end = regions[-1][1] + 1
        placeholder = [n for n in runner.nodes if n.op == "placeholder"]
        if len(placeholder) != 1:
            raise PassError(f"refine_weights: expected a graph of one input, got {len(placeholder)}")
        gm.eval()
        for p in gm.parameters():  # only the scale factors are optimised
            p.requires_grad_(False)
        # 1. float targets: each mixer's outputs in the float model, per batch
        targets: list[list[list[torch.Tensor]]] = [[[] for _ in outs] for outs in outputs]
        runner.float_mode = True
        with torch.no_grad():
            for x in batches:
                env = {placeholder[0]: x}
                pos = 0
                for r, (lo, hi, _) in enumerate(regions):
                    runner.advance(env, pos, hi + 1)
                    pos = hi + 1
                    for k, o in enumerate(outputs[r]):
                        targets[r][k].append(env[o].detach())
        runner.float_mode = False
        # 2. mixer by mixer on the quantized model's own inputs
        gen = torch.Generator().manual_seed(ctx.config.seed)
        envs = [{placeholder[0]: x} for x in batches]
        pos = 0
        refined, improved, losses, stopped = 0, 0, [], False
        total = len(regions) * rc.iters
        with progress_bar("refine weight scales", total, ctx.show_progress) as advance:
            for r, (lo, hi, scale_attrs) in enumerate(regions):
                with torch.no_grad():
                    for env in envs:
                        runner.advance(env, pos, lo)
                pos = lo
                if rc.budget is not None and time.perf_counter() - start >= rc.budget:
                    stopped = True
                    break
                ins = {a: _batched([env[a] for env in envs], sizes) for a in inputs[r]}
                tgt = [torch.cat(t) for t in targets[r]]
                weights = {s: _Weight(gm, *runner.by_scale[s]) for s in scale_attrs}
                runner.weights = weights
                done, before, after = self._optimise(runner, lo, hi, ins, tgt, outputs[r], n_img, rc, gen,
                                                     weights, start, advance)
                runner.weights = {}
                if not done:
                    stopped = True
                    break
                refined += 1
                if after < before:
                    improved += 1
                    for w in weights.values():
                        w.store(gm)
                losses.append((before, min(before, after)))
                targets[r] = []  # free the targets of this mixer
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        # CPU time beside wall time: on a shared machine the wall time says little of the cost
        text = (f"refine weights: {refined} of {len(regions)} mixers refined on {n_img} calibration images "
                f"({rc.iters} Adam steps each, batch {rc.batch}, lr {rc.lr:g}) in {seconds:.1f} s "
                f"({cpu:.1f} s CPU)")
        if losses:
            b = sum(x[0] for x in losses) / len(losses)
            a = sum(x[1] for x in losses) / len(losses)
            text += (f"; new scales kept in {improved} of them (the others gained nothing); mixer output "
                     f"1-cos mean {b:.4g} -> {a:.4g}")
        if stopped:
            text += f"; time budget {rc.budget:g} s reached, the other mixers keep their clipping-search scales"
        ctx.log.append(text)
        ctx.refine_stats = {"mixers": len(regions), "refined": refined, "improved": improved,
                            "losses": losses, "seconds": seconds, "cpu_seconds": cpu,
                            "budget_reached": stopped}
        return refined > 0

    @staticmethod
    def _images(ctx: Context, samples: int) -> list[torch.Tensor]:
        out, n = [], 0
        for x in (ctx.calib if isinstance(ctx.calib, list) else iter_batches(ctx.calib)):
            x = x[: samples - n].float()
            out.append(x)
            n += len(x)
            if n >= samples:
                break
        return out

    @staticmethod
    def _optimise(runner: _Runner, lo: int, hi: int, ins: dict, tgt: list, outs: list, n_img: int, rc, gen,
                  weights: dict, start: float, advance) -> tuple[bool, float, float]:
        """Adam on one mixer's log-scale factors. Returns (finished within the budget, loss on all
        refinement images before, after)."""

        def run(idx: torch.Tensor) -> list[torch.Tensor]:
            env = {a: _take(v, idx, n_img) for a, v in ins.items()}
            runner.advance(env, lo, hi + 1)
            return [env[o] for o in outs]

        def full_loss() -> float:
            with torch.no_grad():
                parts = []
                for chunk in torch.arange(n_img).split(64):
                    parts.append(_loss(run(chunk), [t[chunk] for t in tgt]) * len(chunk))
                return float(sum(parts) / n_img)

        def over() -> bool:
            return rc.budget is not None and time.perf_counter() - start >= rc.budget

        before = full_loss()
        opt = torch.optim.Adam([w.t for w in weights.values()], lr=rc.lr)
        # cosine decay to 0: late steps settle instead of flipping roundings back and forth
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, rc.iters)
        for _ in range(rc.iters):
            if over():
                return False, before, before
            idx = torch.randperm(n_img, generator=gen)[: rc.batch]
            with torch.enable_grad():
                loss = _loss(run(idx), [t[idx] for t in tgt])
                opt.zero_grad()
                loss.backward()
            opt.step()
            sched.step()
            advance(1, loss=loss.item())
        if over():
            return False, before, before
        return True, before, full_loss()
