"""Measuring a quantized graph against its float model: SQNR per op and the outlier statistics
of each mixed-precision site, on one calibration batch."""

from __future__ import annotations

import torch
import torch.fx as fx

from ouromamba_fx.ops.mixed import outlier_fraction, outlier_map
from ouromamba_fx.tags import Kind, op_nodes, tag


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref, app = reference.detach().double(), approx.detach().double()
    noise = (ref - app).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()


class Recorder(fx.Interpreter):
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
        if t.get("kind") == Kind.QUANTIZE_MIXED:  # outlier statistics for the report
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.outlier_fraction[t["site"]] = outlier_fraction(*args)
            self.outlier_maps[t["site"]] = outlier_map(*args)
        return out


@torch.no_grad()
def layer_sqnr(float_gm: fx.GraphModule, q_gm: fx.GraphModule, x: torch.Tensor):
    """SQNR (dB) of every mixer op's output in ``q_gm`` against the same op in ``float_gm`` on
    input ``x`` (errors accumulate along the network, as they do in use), and the fraction of
    channels flagged as outliers per time-step at each mixed-precision site."""
    pairs = {n.name: tag(n).get("source", n.name) for n in op_nodes(q_gm)}
    rf, rq = Recorder(float_gm, set(pairs.values())), Recorder(q_gm, set(pairs))
    rf.run(x)
    rq.run(x)
    sq = {name: sqnr(rf.outputs[src], rq.outputs[name]) for name, src in pairs.items()
          if src in rf.outputs and name in rq.outputs}
    return sq, rq.outlier_fraction, rq.outlier_maps
