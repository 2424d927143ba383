"""The one pass that decides: every mixer op gets a :class:`~ouromamba_fx.passes.spec.SiteSpec`.

A *site* is one activation tensor that may be quantized: the input of a mixer's linear or conv
module, or one input (``delta``, ``B``, ``C``, ...) of a scan. :class:`AnnotateSites` reads the
config (roles, scan inputs, overrides, bits, outlier and k-scale settings, reparam) once per op
and writes the result into ``node.meta[tags.SPEC]``; the passes after it only carry it out.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ouromamba_fx.config import QuantConfig
from ouromamba_fx.passes.base import Context, Pass, PassError
from ouromamba_fx.passes.spec import (ActSpec, FloatReason, KeptFloat, OutlierSpec, SiteSpec, StateSpec,
                                      WeightSpec)
from ouromamba_fx.tags import LINEAR_ROLES, SPEC, WEIGHT_ROLES, Role, scan_site, site_key, tag

# Scan argument positions (the op's schema: u, delta, A, B, C, D, z, delta_bias, delta_softplus).
SCAN_ARG = {"u": 0, "delta": 1, "B": 3, "C": 4, "z": 6}


def quant_sites(node: fx.Node, gm: fx.GraphModule | None = None):
    """(arg index, site name, input name, token axis, channel axis) of every activation of an op
    ``node`` a config could quantize. Linear inputs: channels last, tokens on the axis before
    (axes counted from the end, fixed by the observer on the first batch: (B, H, W, C) inputs get
    one scale per image column); conv inputs (B, C, L) / (B, C, H, W): channels on axis 1,
    time-steps (image rows) on axis 2. Stem and downsampling layers are convs or linears: the
    module (``gm``) says which."""
    t = tag(node)
    role = t["role"]
    if _is_conv(node, gm) or role in (Role.CONV1D, Role.CONV2D):
        yield 0, node.target, "x", 2, 1
    elif role in LINEAR_ROLES or node.op == "call_module":
        yield 0, node.target, "x", -2, -1
    elif role == Role.SCAN:
        for name, idx in SCAN_ARG.items():
            if idx < len(node.args) and isinstance(node.args[idx], fx.Node):
                yield idx, scan_site(t), name, 2, 1


def _is_conv(node: fx.Node, gm: fx.GraphModule | None) -> bool:
    return gm is not None and node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                                       (nn.Conv1d, nn.Conv2d))


def _is_linear(node: fx.Node, gm: fx.GraphModule | None) -> bool:
    return gm is not None and node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear)


def site_spec(node: fx.Node) -> SiteSpec:
    """The spec AnnotateSites wrote on ``node``; an error naming the pass to run if there is none."""
    spec = node.meta.get(SPEC)
    if spec is None:
        raise PassError(f"node {node.name} has no site spec: run AnnotateSites "
                        f"(ouromamba_fx.passes.annotate) first")
    return spec


class AnnotateSites(Pass):
    """Write a :class:`SiteSpec` on every mixer op and record what stays float in
    ``ctx.float_reasons`` (scan states first, then activations, then weights)."""

    name = "annotate"
    provides = ("annotated",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        cfg = ctx.config
        specs = []
        n_quantized = 0
        for node in gm.graph.nodes:
            t = tag(node)
            if t is None or t.get("kind"):
                continue
            inputs = []
            for idx, site, inp, tok, ch in quant_sites(node, gm):
                a = self._act(cfg, node, t["role"], idx, site, inp, tok, ch, cfg.seed + n_quantized,
                              _is_linear(node, gm))
                n_quantized += isinstance(a, ActSpec)
                inputs.append(a)
            name = scan_site(t) if t["role"] == Role.SCAN else str(node.target)
            spec = SiteSpec(name, t["role"], self._weight(cfg, node, t["role"]), tuple(inputs),
                            self._state(cfg, t))
            node.meta[SPEC] = spec
            specs.append(spec)
        # This order (and setdefault for weights: an activation's reason wins) is the order the
        # report lists and saved files store.
        states = [s.state for s in specs]
        acts = [a for s in specs for a in s.inputs]
        for x in states + acts:
            if isinstance(x, KeptFloat):
                ctx.float_reasons[x.key] = x.text
        for s in specs:
            if isinstance(s.weight, KeptFloat):
                ctx.float_reasons.setdefault(s.weight.key, s.weight.text)
        return False

    @staticmethod
    def _act(cfg: QuantConfig, node, role, idx, site, inp, tok, ch, seed, linear: bool) -> ActSpec | KeptFloat:
        key = site_key(site, inp)
        if role not in cfg.roles:
            return KeptFloat(key, FloatReason.ROLE, (("role", role),))
        if role == Role.SCAN and inp not in cfg.scan_inputs:
            return KeptFloat(key, FloatReason.SCAN_INPUT, (("input", inp),))
        act, _, skip = cfg.for_module(site, role)
        if skip:
            return KeptFloat(key, FloatReason.OVERRIDE)
        if act.is_float:
            return KeptFloat(key, FloatReason.ACT_BITS, (("bits", act.bits),))
        outliers = None
        if cfg.outliers is not None and role in cfg.outliers.roles:
            o = cfg.outliers
            outliers = OutlierSpec(o.bits, o.k_delta if inp == "delta" else o.k, o.n_refresh)
        return ActSpec(site, inp, idx, tok, ch, act, cfg.kscale, outliers, cfg.calib_sample, seed,
                       feeds_linear=linear)

    @staticmethod
    def _weight(cfg: QuantConfig, node, role) -> WeightSpec | KeptFloat | None:
        if node.op != "call_module" or role not in WEIGHT_ROLES:
            return None
        if role not in cfg.roles:
            return KeptFloat(node.target, FloatReason.ROLE, (("role", role),))
        _, wq, skip = cfg.for_module(node.target, role)
        if skip:
            return KeptFloat(node.target, FloatReason.OVERRIDE)
        if wq.is_float:
            return KeptFloat(node.target, FloatReason.WEIGHT_BITS, (("bits", wq.bits),))
        return WeightSpec(node.target, wq)

    @staticmethod
    def _state(cfg: QuantConfig, t: dict) -> StateSpec | KeptFloat | None:
        if t["role"] != Role.SCAN or cfg.reparam is None:
            return None
        site = scan_site(t)
        if cfg.for_module(site, Role.SCAN)[2]:
            return KeptFloat(site + ":state", FloatReason.OVERRIDE)
        return StateSpec(site, cfg.reparam)
