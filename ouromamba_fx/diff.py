"""Graph diffs between pass snapshots, printed with rich, readable for deep models.

Repeated layers that a pass changed in the same way are collapsed into one block
("layers 0-23: identical changes, layer 0 shown"); filters keep one layer or one role.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.text import Text

from ouromamba_fx.passes.base import NodeInfo, Snapshot

_LAYER_RE = re.compile(r"(layers[._])\d+")
STYLE = {"+": "green", "-": "red", "~": "yellow"}


@dataclass
class Change:
    kind: str  # "+" added, "-" removed, "~" retagged or rewired
    node: NodeInfo
    before: NodeInfo | None = None

    @property
    def tag(self) -> dict:
        return dict(self.node.tag)

    def signature(self) -> tuple:
        t = self.tag
        return (self.kind, self.node.op, _LAYER_RE.sub(r"\1*", self.node.target),
                t.get("role"), t.get("kind"), t.get("direction"), t.get("input"))

    def line(self) -> Text:
        t = self.tag
        label = " ".join(str(x) for x in (t.get("role"), t.get("direction"), t.get("kind"), t.get("input"))
                         if x)
        bits = t.get("bits") or t.get("weight_bits")
        if bits:
            label += f" {bits}b"
        if t.get("granularity"):
            label += f" {t['granularity']}"
        text = Text(f"  {self.kind} ", style=STYLE[self.kind])
        text.append(f"{self.node.name} = {self.node.op} {self.node.target}{self.node.args}",
                    style=STYLE[self.kind])
        if label:
            text.append(f"  [{label}]", style="dim")
        if self.kind == "~" and self.before is not None:
            what = []
            if self.before.tag != self.node.tag:
                what.append("tag")
            if self.before.args != self.node.args:
                what.append(f"inputs {self.before.args} -> {self.node.args}")
            if self.before.target != self.node.target:
                what.append(f"target {self.before.target} -> {self.node.target}")
            text.append(f"  ({'; '.join(what)})", style="yellow dim")
        return text


@dataclass
class GraphDiff:
    before: str
    after: str
    changes: list[Change] = field(default_factory=list)
    collapse: bool = True
    seconds: float = 0.0
    verbose: bool = False

    @property
    def counts(self) -> dict[str, int]:
        return {k: sum(c.kind == k for c in self.changes) for k in "+-~"}

    def blocks(self) -> list[tuple[str, list[Change]]]:
        """(heading, changes) per layer, identical layers merged when collapsing."""
        by_layer: dict = {}
        for c in self.changes:
            by_layer.setdefault(c.tag.get("layer"), []).append(c)
        layers = sorted((k for k in by_layer if k is not None))
        out = []
        if None in by_layer:
            out.append(("outside the mixers", by_layer[None]))
        i = 0
        while i < len(layers):
            j = i
            sig = [c.signature() for c in by_layer[layers[i]]]
            while (self.collapse and j + 1 < len(layers) and layers[j + 1] == layers[j] + 1
                   and [c.signature() for c in by_layer[layers[j + 1]]] == sig):
                j += 1
            head = (f"layer {layers[i]}" if i == j else
                    f"layers {layers[i]}-{layers[j]}: identical changes in each, layer {layers[i]} shown")
            out.append((head, by_layer[layers[i]]))
            i = j + 1
        return out

    def __rich_console__(self, console, options):
        c = self.counts
        yield Text(f"── {self.before} → {self.after}: +{c['+']} added, -{c['-']} removed, "
                   f"~{c['~']} changed" + (f" ({self.seconds:.2f} s)" if self.seconds else ""),
                   style="bold")
        if not self.changes:
            yield Text("  (no change to the graph)", style="dim")
        for head, changes in self.blocks():
            yield Text(f" {head}", style="bold cyan")
            consts = [ch for ch in changes if ch.node.op == "get_attr"]
            if consts and not self.verbose:
                kinds = {"+": "added", "-": "removed", "~": "changed"}
                summary = ", ".join(f"{sum(c.kind == k for c in consts)} {word}"
                                    for k, word in kinds.items() if any(c.kind == k for c in consts))
                yield Text(f"  · constants (get_attr): {summary}; verbose=True lists them", style="dim")
            yield from (ch.line() for ch in changes if self.verbose or ch.node.op != "get_attr")

    def __str__(self) -> str:
        return render(self)


@dataclass
class DiffList:
    diffs: list[GraphDiff]

    def __rich_console__(self, console, options):
        yield Group(*self.diffs)

    def __iter__(self):
        return iter(self.diffs)

    def __str__(self) -> str:
        return render(self)


def render(obj, width: int = 140) -> str:
    con = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    con.print(obj)
    return con.export_text()


def _keep(info: NodeInfo, layer: int | None, role: str | None) -> bool:
    t = dict(info.tag)
    return (layer is None or t.get("layer") == layer) and (role is None or t.get("role") == role)


def diff_snapshots(a: Snapshot, b: Snapshot, layer: int | None = None, role: str | None = None,
                   collapse: bool = True, verbose: bool = False) -> GraphDiff:
    """Nodes ``b`` added, removed, retagged or rewired relative to ``a``, in graph order."""
    old = {n.name: n for n in a.nodes}
    new = {n.name: n for n in b.nodes}
    changes = [Change("-", n) for n in a.nodes if n.name not in new]
    for n in b.nodes:
        if n.name not in old:
            changes.append(Change("+", n))
        elif (old[n.name].tag, old[n.name].args, old[n.name].target) != (n.tag, n.args, n.target):
            changes.append(Change("~", n, old[n.name]))
    changes = [c for c in changes if _keep(c.node, layer, role)]
    return GraphDiff(a.pass_name, b.pass_name, changes, collapse, b.seconds, verbose)


def pass_diffs(snapshots: list[Snapshot], **kw) -> DiffList:
    return DiffList([diff_snapshots(a, b, **kw) for a, b in zip(snapshots, snapshots[1:])])
