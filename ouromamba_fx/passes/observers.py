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

from ouromamba_fx.config import ActQuant
from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.tags import LINEAR_ROLES, META, scan_site, site_key, tag

# Scan argument positions (the op's schema: u, delta, A, B, C, D, z, delta_bias, delta_softplus).
SCAN_ARG = {"u": 0, "delta": 1, "B": 3, "C": 4, "z": 6}


class ActObserver(nn.Module):
    """Records, over calibration batches, the statistics static scales are chosen from.

    Statistics: per-token-position min/max (reduced over batch and channels), per-channel max |x|,
    and a seeded random sample of up to ``sample_rows`` rows (one token's channels each, with its
    token index) for clipping searches.

    Args:
        token_axis, channel_axis: axes of the observed tensor (e.g. 1 and 2 for ``(B, L, C)``).
    """

    def __init__(self, site: str, token_axis: int, channel_axis: int, spec: ActQuant,
                 sample_rows: int = 4096, seed: int = 0, outlier_k: float | None = None) -> None:
        super().__init__()
        self.site, self.spec = site, spec
        self.outlier_k = outlier_k  # if set: also record per-token max |x| of inliers (|x| <= theta)
        self.tok_abssum: torch.Tensor | None = None
        self.tok_inlier_absmax: torch.Tensor | None = None
        self.count = 0
        self.consumer_weight: torch.Tensor | None = None  # the float weight the site feeds, if linear
        self.token_axis, self.channel_axis = token_axis, channel_axis
        self.sample_rows = sample_rows
        self.gen = torch.Generator().manual_seed(seed)
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
        return f"site={self.site!r}, bits={self.spec.bits}, {self.spec.granularity}, batches={self.batches}"


def quant_sites(gm: fx.GraphModule):
    """Yield (consumer node, arg index, site name, input name, token axis, channel axis) for every
    activation a config could quantize, in graph order. Linear inputs: channels last, tokens on
    the axis before (axes counted from the end, fixed by the observer on the first batch; (B, H,
    W, C) inputs get one scale per image column index); conv inputs (B, C, L) / (B, C, H, W):
    channels on axis 1, time-steps (rows of the image) on axis 2."""
    for node in list(gm.graph.nodes):
        t = tag(node)
        if t is None or t.get("kind"):
            continue
        role = t["role"]
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv1d, nn.Conv2d)):
            yield node, 0, node.target, "x", 2, 1
        elif role in LINEAR_ROLES or node.op == "call_module":
            yield node, 0, node.target, "x", -2, -1
        elif role == "scan":
            scan = scan_site(t)
            for name, idx in SCAN_ARG.items():
                if idx < len(node.args) and isinstance(node.args[idx], fx.Node):
                    yield node, idx, scan, name, 2, 1


class InsertObservers(Pass):
    """Insert an :class:`ActObserver` before every activation the config quantizes."""

    name = "insert_observers"
    provides = ("observers",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        cfg = ctx.config
        changed = False
        for node, idx, site, inp, tok_axis, ch_axis in quant_sites(gm):
            t = tag(node)
            key = site_key(site, inp)
            if t["role"] not in cfg.roles:
                ctx.float_reasons[key] = f"role {t['role']} not in config.roles"
                continue
            if t["role"] == "scan" and inp not in cfg.scan_inputs:
                ctx.float_reasons[key] = f"scan input {inp} not in config.scan_inputs"
                continue
            act, _, skip = cfg.for_module(site)
            if skip:
                ctx.float_reasons[key] = "skipped by config.overrides"
                continue
            if act.is_float:
                ctx.float_reasons[key] = f"activation bits {act.bits} (float) by config"
                continue
            obs_name = key.replace(".", "_").replace(":", "_in_") + "_obs"
            k = None
            if cfg.outliers is not None and t["role"] in cfg.outliers.roles:
                k = cfg.outliers.k_delta if inp == "delta" else cfg.outliers.k
            obs = ActObserver(key, tok_axis, ch_axis, act, cfg.calib_sample, cfg.seed + len(ctx.observers), k)
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
                obs.consumer_weight = gm.get_submodule(node.target).weight.detach()
            gm.add_submodule(obs_name, obs)
            ctx.observers[obs_name] = obs
            src = node.args[idx]
            with gm.graph.inserting_before(node):
                obs_node = gm.graph.call_module(obs_name, (src,))
            obs_node.meta[META] = {**t, "kind": "observer", "site": key, "input": inp}
            node.update_arg(idx, obs_node)
            changed = True
        return changed
