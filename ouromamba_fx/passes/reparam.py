"""Scan hidden-state reparameterization (k-scaled PTQ for Vim, MLSP 2025) and factor folding.

Three passes:

* ``observe_scan_states`` swaps each scan for a :class:`ScanStateObserver` that runs the scan and
  records mean and max of ``|h|`` over the batch per (channel, step, state);
* ``calibrate_states`` (a :class:`~ouromamba_fx.passes.calibrate.Calibrate`) feeds the data;
* ``reparameterize_scan`` computes ``r_C, r_L, r_N`` (each the mean of ``H = mean_batch |h|`` over
  the other two axes, raised to ``p_i = std_i / (std_C + std_L + std_N)``), folds ``r_N`` into the
  ``x_proj`` rows that produce B (``/ r_N``) and C (``* r_N``) when the graph shows where those rows
  are, and replaces the scan by ``ouromamba::selective_scan_q`` with ``r_C, r_L`` (and ``r_N`` if
  not folded) as constants and the state scales (one per time-step, or per time-step and channel /
  state index: ``Reparam.granularity``). ``Reparam(factors=False)`` keeps all factors 1: the state
  is quantized without the reparameterization.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ouromamba_fx import numerics
from ouromamba_fx.numerics import EPS
from ouromamba_fx.ops.scan import SCAN_OP
from ouromamba_fx.ops.scan_quant import SCAN_REPARAM_OP, scan_state_stats
from ouromamba_fx.passes.annotate import site_spec
from ouromamba_fx.passes.base import Context, Pass, PassError
from ouromamba_fx.passes.graph import nearest_ancestor, split_rows, to_networkx
from ouromamba_fx.passes.spec import StateSpec
from ouromamba_fx.tags import META, Kind, Role, carry, tag


class ScanStateObserver(nn.Module):
    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site
        self.h_sum: torch.Tensor | None = None
        self.h_max: torch.Tensor | None = None
        self.count = 0

    def forward(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        if B.dim() != 3 or C.dim() != 3:
            raise ValueError(f"{self.site}: reparameterization needs B, C of shape (batch, d_state, L)")
        s, m = scan_state_stats(u, delta, A, B, C, delta_bias, delta_softplus)
        self.h_sum = s if self.h_sum is None else self.h_sum + s
        self.h_max = m if self.h_max is None else torch.maximum(self.h_max, m)
        self.count += u.shape[0]
        return SCAN_OP(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


class ObserveScanStates(Pass):
    name = "observe_scan_states"
    requires = ("annotated",)
    provides = ("state_observers",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        ctx.state_observers = {}
        for node in list(gm.graph.nodes):
            if not (node.op == "call_function" and node.target is SCAN_OP and tag(node)):
                continue
            state = site_spec(node).state
            if state is None:
                raise PassError(f"{self.name}: config.reparam is not set, so the scan states of "
                                f"{node.name} have nothing to be reparameterized with")
            if not isinstance(state, StateSpec):
                continue
            name = state.site.replace(".", "_") + "_state_obs"
            gm.add_submodule(name, ScanStateObserver(state.site))
            ctx.state_observers[name] = node.name
            with gm.graph.inserting_before(node):
                obs = gm.graph.call_module(name, node.args, node.kwargs)
            carry(node, obs)  # it *is* the scan while calibrating
            obs.meta["orig_name"] = node.name
            node.replace_all_uses_with(obs)
            gm.graph.erase_node(node)
        return bool(ctx.state_observers)


def state_amax(scaled_max: torch.Tensor, granularity: str) -> torch.Tensor:
    """The calibrated max of ``|h'|`` (d_inner, L, d_state) per scale of ``granularity``: ``(L,)``
    for ``"step"``, ``(d_inner, L, 1)`` for ``"step_channel"``, ``(1, L, d_state)`` for ``"step_state"``
    (the shapes ``ouromamba::selective_scan_q`` takes as ``state_scale``)."""
    if granularity == "step":
        return scaled_max.amax(dim=(0, 2))
    if granularity == "step_channel":
        return scaled_max.amax(dim=2, keepdim=True)
    if granularity == "step_state":
        return scaled_max.amax(dim=0, keepdim=True)
    raise ValueError(f"state_amax: unknown granularity {granularity!r}")


def rank1_factors(h_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_C, r_L, r_N) from H (d_inner, L, d_state) as in the k-scaled PTQ paper."""
    h = h_mean.double().clamp_min(EPS)
    means = [h.mean(dim=(1, 2)), h.mean(dim=(0, 2)), h.mean(dim=(0, 1))]
    stds = [m.std(unbiased=False) if m.numel() > 1 else m.new_zeros(()) for m in means]
    total = sum(stds)
    powers = [s / total if total > 0 else s.new_tensor(1 / 3) for s in stds]
    return tuple((m ** p).float() for m, p in zip(means, powers))


class ReparameterizeScan(Pass):
    name = "reparameterize_scan"
    requires = ("states_calibrated",)
    provides = ("scan_reparameterized",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        g = to_networkx(gm)
        ctx.reparam_stats = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node.target not in ctx.state_observers:
                continue
            spec = site_spec(node).state.reparam
            qmax = numerics.qmax(spec.state_bits)
            obs: ScanStateObserver = gm.get_submodule(node.target)
            h_mean = obs.h_sum / max(obs.count, 1)
            if spec.factors:
                r_c, r_l, r_n = rank1_factors(h_mean)
            else:  # the ablation: the state quantized as it is
                r_c, r_l, r_n = (torch.ones(k, dtype=torch.float32) for k in h_mean.shape)
            scaled_max = obs.h_max / (r_c[:, None, None] * r_l[None, :, None] * r_n[None, None, :])
            state_scale = (state_amax(scaled_max, spec.granularity) / qmax).clamp_min(EPS)
            folded = spec.factors and spec.fold and self._fold(gm, g, node, r_n)
            base = obs.site.replace(".", "_")
            consts = {"r_c": r_c, "r_l": r_l, "r_n": torch.ones_like(r_n) if folded else r_n,
                      "state_scale": state_scale}
            with gm.graph.inserting_before(node):
                attrs = []
                for k, v in consts.items():
                    gm.register_buffer(f"{base}_{k}", v.clone())
                    a = gm.graph.get_attr(f"{base}_{k}")
                    a.meta[META] = {**tag(node), "kind": Kind.SCAN_CONST}
                    attrs.append(a)
                new = gm.graph.call_function(SCAN_REPARAM_OP, tuple(node.args) + tuple(attrs) + (spec.state_bits,))
            carry(node, new, reparam=True, folded_r_n=folded, state_bits=spec.state_bits,
                  source=node.meta.get("orig_name", node.name))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            ctx.reparam_stats[obs.site] = {"folded_r_n": folded,
                                           "state_range_before": float(obs.h_max.amax() / obs.h_max.amax(dim=(0, 2)).clamp_min(EPS).min()),
                                           "state_range_after": float(scaled_max.amax() / scaled_max.amax(dim=(0, 2)).clamp_min(EPS).min())}
            ctx.log.append(f"{obs.site}: state " + ("reparameterized" if spec.factors else "quantized without "
                           "reparameterization") + (", r_N folded into x_proj" if folded else "")
                           + f", {spec.granularity} scales")
        gm.delete_all_unused_submodules()
        return True

    @staticmethod
    def _fold(gm: fx.GraphModule, g, scan: fx.Node, r_n: torch.Tensor) -> bool:
        """Scale x_proj's B rows by 1/r_N and C rows by r_N, if the graph shows which rows they are."""
        b_rows, c_rows = split_rows(scan.args[3]), split_rows(scan.args[4])
        xp = nearest_ancestor(gm, scan.args[3], Role.X_PROJ, g)
        if b_rows is None or c_rows is None or xp is None or xp.op != "call_module":
            return False
        if b_rows[0] is not xp or c_rows[0] is not xp or b_rows[2] != r_n.numel() or c_rows[2] != r_n.numel():
            return False
        w = gm.get_submodule(xp.target).weight
        with torch.no_grad():
            w[b_rows[1]:b_rows[1] + b_rows[2]] /= r_n[:, None]
            w[c_rows[1]:c_rows[1] + c_rows[2]] *= r_n[:, None]
        return True
