"""What a conversion did: a rich table per quantized op, and what stayed float and why."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch.fx as fx
from rich.table import Table
from rich.text import Text

from ouromamba_fx.coverage import summary
from ouromamba_fx.diff import render
from ouromamba_fx.numerics import is_float
from ouromamba_fx.passes.spec import SiteSpec, StateSpec, WeightSpec
from ouromamba_fx.tags import ABSORBED, SPEC, SPEC_NODE, Kind, tag


@dataclass
class Row:
    name: str
    role: str
    layer: int | None
    direction: str | None
    weight: str
    inputs: str
    sqnr: float


def _inputs_text(spec: SiteSpec) -> str:
    """``x: A8 per_token``, or the scan's inputs grouped by how they are quantized."""
    groups: dict[tuple[str, str], list[str]] = {}
    for a in spec.acts():
        groups.setdefault((a.bits_text(), a.granularity_text()), []).append(a.input)
    return "; ".join(f"{','.join(names)}: A{b} {g}" for (b, g), names in groups.items()) or "float"


def _weight_text(spec: SiteSpec, t: dict) -> str:
    """The weight column: the weight's bits, or the scan state's (with reparameterization)."""
    if isinstance(spec.state, StateSpec):
        rp = spec.state.reparam
        scales = {"step": "per_step", "step_channel": "per_step_channel", "step_state": "per_step_state"}
        return ("state float" if is_float(rp.state_bits) else f"state S{rp.state_bits} {scales[rp.granularity]}") + \
            ("" if rp.factors else ", not reparameterized") + (", r_N folded" if t.get("folded_r_n") else "")
    if isinstance(spec.weight, WeightSpec):
        return f"W{spec.weight.quant.bits} {spec.weight.quant.granularity}"
    return "float"


def _site_row(spec, t: dict, spec_node: str, sqnr_db: dict[str, float]) -> Row | None:
    if spec is None:
        return None
    if not spec.acts() and not isinstance(spec.weight, WeightSpec) and not isinstance(spec.state, StateSpec):
        return None
    return Row(spec.name, spec.role, t["layer"], t["direction"], _weight_text(spec, t),
               _inputs_text(spec), sqnr_db.get(spec_node, float("nan")))


def _rows(n: fx.Node, sqnr_db: dict[str, float]) -> list[Row | None]:
    """The report rows of a mixer op, from its site spec (None if nothing of it is quantized):
    first those of the sites a fused op computes inside it (a scan's dt_proj), then its own."""
    rows = [_site_row(spec, t, name, sqnr_db) for spec, t, name in n.meta.get(ABSORBED, ())]
    return rows + [_site_row(n.meta.get(SPEC), tag(n), n.meta.get(SPEC_NODE, n.name), sqnr_db)]


def _site_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that carry a site spec: the mixer ops of a reference graph, and in a lowered
    graph the fused ops that replaced them (and the ops no rule matched)."""
    return [n for n in gm.graph.nodes if SPEC in n.meta and (tag(n) or {}).get("kind") in (None, Kind.FUSED)]


def _group_floats(reasons: dict[str, str]) -> list[tuple[str, str]]:
    """Merge entries that differ only by layer index: ``layers.*.mixer.scan:u (8 layers)``."""
    groups: dict[tuple[str, str], set[str]] = {}
    for name, why in reasons.items():
        m = re.match(r"(.*?layers\.)(\d+)(\..*)", name)
        key = (f"{m.group(1)}*{m.group(3)}", why) if m else (name, why)
        groups.setdefault(key, set()).add(m.group(2) if m else "")
    out = []
    for (pattern, why), layers in sorted(groups.items()):
        n = len(layers - {""})
        out.append((f"{pattern} ({n} layers)" if n > 1 else
                    pattern.replace("*", next(iter(layers))) if n == 1 else pattern, why))
    return out


@dataclass
class Report:
    title: str
    rows: list[Row]
    floats: list[tuple[str, str]]
    log: list[str]
    outliers: list[tuple[str, float, float]] = None  # site, mean and max fraction of channels flagged per step

    @classmethod
    def of(cls, q) -> "Report":
        rows = [r for n in _site_nodes(q.graph_module) for r in _rows(n, q.sqnr_db) if r is not None]
        cov = getattr(q, "coverage", {}) or {}
        shown = set(q.float_reasons)
        floats = _group_floats({**q.float_reasons, **{n: c.why for n, c in cov.items()
                                                       if not c.quantized and n not in shown}})
        outliers = [(site, float(f.mean()), float(f.max())) for site, f in q.outlier_fraction.items()]
        log = list(q.log)
        if cov and not any(line.startswith("parameter-bearing modules:") for line in log):
            log.append(summary(cov))
        return cls(f"{q.model_name} quantized with {q.config.name}", rows, floats, log, outliers)

    def __rich_console__(self, console, options):
        table = Table(title=self.title, title_justify="left", header_style="bold")
        for col, justify in [("op", "left"), ("role", "left"), ("layer", "right"), ("dir", "left"),
                             ("weights", "left"), ("activations", "left"), ("SQNR dB", "right")]:
            table.add_column(col, justify=justify)
        for r in self.rows:
            style = "red" if r.sqnr < 10 else ("yellow" if r.sqnr < 20 else "")
            sq = "inf" if math.isinf(r.sqnr) else f"{r.sqnr:.1f}"
            table.add_row(r.name, r.role, "" if r.layer is None else str(r.layer), r.direction or "",
                          r.weight, r.inputs, Text(sq, style=style))
        yield table
        yield Text(f"{len(self.rows)} ops quantized; SQNR: each op's output vs the float model on a "
                   f"calibration batch (errors accumulate through the layers)", style="dim")
        if self.outliers:
            ot = Table(title="outlier channels (fraction of channels flagged per time-step, calibration batch)",
                       title_justify="left", header_style="bold")
            for col in ("site", "mean", "max over steps"):
                ot.add_column(col, justify="left" if col == "site" else "right")
            for site, mean, mx in self.outliers:
                ot.add_row(site, f"{100 * mean:.2f}%", f"{100 * mx:.2f}%")
            yield ot
        if self.floats:
            ft = Table(title="kept in float", title_justify="left", header_style="bold")
            ft.add_column("what")
            ft.add_column("why")
            for what, why in self.floats:
                ft.add_row(what, why)
            yield ft
        for line in self.log:
            yield Text(line, style="dim")

    def __str__(self) -> str:
        return render(self)
