"""Activation observers and the pass that inserts them before every quantized input.

A *site* is one activation tensor that will be quantized: the input of a mixer's linear or conv
module, or one input (``delta``, ``B``, ``C``, ...) of a scan. Each site gets one observer module,
inserted as a ``call_module`` node between the producer and the consumer; observers pass their
input through unchanged while they record statistics.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ouromamba_fx.passes.annotate import site_spec
from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.passes.spec import ActSpec
from ouromamba_fx.tags import META, op_nodes, tag


class ActObserver(nn.Module):
    """Records, over calibration batches, the statistics static scales are chosen from.

    Statistics: per-token-position min/max (reduced over batch and channels), per-channel max |x|,
    and a seeded random sample of up to ``sample_rows`` rows (one token's channels each, with its
    token index) for clipping searches.

    Args:
        spec: the site (its key names the observer in messages), the observed tensor's token and
            channel axes (e.g. 1 and 2 for ``(B, L, C)``), the sample size and its seed; with an
            outlier rule, the per-token max |x| of the inliers (|x| <= theta) is recorded too.
    """

    def __init__(self, spec: ActSpec) -> None:
        super().__init__()
        self.spec = spec
        self.site = spec.key
        self.outlier_k = spec.outliers.k if spec.outliers is not None else None
        self.tok_abssum: torch.Tensor | None = None
        self.tok_inlier_absmax: torch.Tensor | None = None
        self.count = 0
        self.consumer_weight: torch.Tensor | None = None  # the float weight the site feeds, if linear
        self.token_axis, self.channel_axis = spec.token_axis, spec.channel_axis
        self.sample_rows = spec.calib_sample
        self.gen = torch.Generator().manual_seed(spec.seed)
        self.batches = 0
        self.tok_min: torch.Tensor | None = None
        self.tok_max: torch.Tensor | None = None
        self.chan_absmax: torch.Tensor | None = None
        self.sample: list[torch.Tensor] = []  # rows (n, C)
        self.sample_tok: list[torch.Tensor] = []  # their token indices (n,)
        self.shape: tuple[int, ...] | None = None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as (batch, tokens, channels)."""
        return x.movedim((self.token_axis, self.channel_axis), (-2, -1)).reshape(-1, x.shape[self.token_axis], x.shape[self.channel_axis])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_axis < 0 or self.channel_axis < 0:  # counted from the end: fixed on first use
            self.token_axis, self.channel_axis = self.token_axis % x.dim(), self.channel_axis % x.dim()
        r = self.rows(x.detach().float())
        if not torch.isfinite(r).all():
            raise ValueError(f"observer {self.site}: non-finite activations during calibration")
        tmin, tmax = r.amin(dim=(0, 2)), r.amax(dim=(0, 2))
        a = r.abs()
        cmax = a.amax(dim=(0, 1))
        tsum = a.sum(dim=(0, 2))
        if self.outlier_k is not None:
            theta = a.mean(-1, keepdim=True) + self.outlier_k * a.std(-1, keepdim=True, unbiased=False)
            inl = a.masked_fill(a > theta, 0.0).amax(dim=(0, 2))
            self.tok_inlier_absmax = inl if self.tok_inlier_absmax is None else torch.maximum(self.tok_inlier_absmax, inl)
        self.tok_abssum = tsum if self.tok_abssum is None else self.tok_abssum + tsum
        self.count += r.shape[0] * r.shape[2]
        if self.tok_min is None:
            self.shape = tuple(x.shape[1:])
            self.tok_min, self.tok_max, self.chan_absmax = tmin, tmax, cmax
        else:
            if tuple(x.shape[1:]) != self.shape:
                raise ValueError(f"observer {self.site}: calibration batches change shape "
                                 f"{self.shape} -> {tuple(x.shape[1:])}")
            self.tok_min = torch.minimum(self.tok_min, tmin)
            self.tok_max = torch.maximum(self.tok_max, tmax)
            self.chan_absmax = torch.maximum(self.chan_absmax, cmax)
        have = sum(len(s) for s in self.sample)
        if have < self.sample_rows:
            flat = r.reshape(-1, r.shape[-1])
            take = torch.randperm(flat.shape[0], generator=self.gen)[: self.sample_rows - have]
            self.sample.append(flat[take].clone())
            self.sample_tok.append(take % r.shape[1])
        self.batches += 1
        return x

    @property
    def tok_absmax(self) -> torch.Tensor:
        return torch.maximum(self.tok_min.abs(), self.tok_max.abs())

    @property
    def tok_absmean(self) -> torch.Tensor:
        return self.tok_abssum / max(self.count, 1)

    def sampled(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.sample), torch.cat(self.sample_tok)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, bits={self.spec.quant.bits}, {self.spec.quant.granularity}, batches={self.batches}"


class InsertObservers(Pass):
    """Insert an :class:`ActObserver` before every activation the site specs quantize."""

    name = "insert_observers"
    requires = ("annotated",)
    provides = ("observers",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed = False
        for node in op_nodes(gm):
            for spec in site_spec(node).acts():
                obs_name = spec.key.replace(".", "_").replace(":", "_in_") + "_obs"
                obs = ActObserver(spec)
                if spec.feeds_linear:
                    obs.consumer_weight = gm.get_submodule(node.target).weight.detach()
                gm.add_submodule(obs_name, obs)
                ctx.observers[obs_name] = obs
                with gm.graph.inserting_before(node):
                    obs_node = gm.graph.call_module(obs_name, (node.args[spec.arg_index],))
                obs_node.meta[META] = {**tag(node), "kind": "observer", "site": spec.key, "input": spec.input}
                node.update_arg(spec.arg_index, obs_node)
                changed = True
        return changed
