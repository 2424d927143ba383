"""Pass infrastructure: the Pass protocol, the conversion context, graph snapshots, the manager.

A pass is a small object with a ``name``, the facts it ``requires`` and ``provides``, and
``run(gm, ctx) -> bool`` (True if it changed the graph). The manager orders passes by those facts
(a networkx DAG, stable in the given order), runs them, lints and recompiles after each one, keeps
a snapshot of the graph after each pass for diffs, and names the failing pass and the passes that
ran before it when one fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from ouromamba_fx.config import QuantConfig
from ouromamba_fx.errors import OuroMambaError
from ouromamba_fx.tags import META


class PassError(OuroMambaError):
    """A pass failed; the message names it and the passes that ran before it."""


@dataclass
class Context:
    """State shared by the passes of one conversion."""

    config: QuantConfig
    calib: Iterable | None = None
    example: torch.Tensor | None = None  # one calibration batch, for checks and reports
    show_progress: bool = True
    observers: dict[str, torch.nn.Module] = field(default_factory=dict)  # observer name -> module
    float_reasons: dict[str, str] = field(default_factory=dict)  # node/module name -> why float
    log: list[str] = field(default_factory=list)
    facts: set[str] = field(default_factory=lambda: {"captured"})
    state_observers: dict[str, str] = field(default_factory=dict)  # scan state observer -> scan node
    reparam_stats: dict[str, dict] = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)  # module -> Coverage (ouromamba_fx.coverage), after the passes
    # module name -> (float weight, weight_q / weight_scale buffer names, WeightSpec.quant), from
    # QuantizeWeights: what the weight-scale refinement needs after the float modules are gone
    quantized_weights: dict[str, tuple] = field(default_factory=dict)
    refine_stats: dict = field(default_factory=dict)  # what RefineWeights did (mixers refined, losses)
    # Rebuilding a saved model (ouromamba_fx.serialize.load): the passes build the same graph, but
    # every tensor they compute is replaced by the file's, so value searches are skipped.
    replay: bool = False


class Pass:
    name: str = "pass"
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@dataclass(frozen=True)
class NodeInfo:
    """What a snapshot keeps of one node: enough to diff and print it."""

    name: str
    op: str
    target: str
    args: str
    tag: tuple  # sorted items of node.meta["ouromamba"], or ()


def _fmt_arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "(" + ", ".join(_fmt_arg(x) for x in a) + ")"
    return repr(a)


def target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return str(t.name())
    return getattr(t, "__name__", str(t))


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


@dataclass
class Snapshot:
    """The graph after one pass."""

    pass_name: str
    nodes: list[NodeInfo]
    seconds: float = 0.0
    changed: bool = True

    @classmethod
    def of(cls, gm: fx.GraphModule, pass_name: str, seconds: float = 0.0, changed: bool = True) -> "Snapshot":
        infos = [NodeInfo(n.name, n.op, target_name(n), _fmt_arg(tuple(n.args)),
                          _freeze(n.meta.get(META) or {})) for n in gm.graph.nodes]
        return cls(pass_name, infos, seconds, changed)

    def tag(self, info: NodeInfo) -> dict:
        return dict(info.tag)


class PassManager:
    """Runs passes in dependency order with lint, recompile, snapshots and named failures.

    Example:
        >>> pm = PassManager([InsertObservers(), Calibrate(), ...])   # doctest: +SKIP
        >>> gm = pm.run(gm, ctx); [s.pass_name for s in pm.snapshots]  # doctest: +SKIP
    """

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = self.order(passes)
        self.snapshots: list[Snapshot] = []

    @staticmethod
    def order(passes: list[Pass], initial: Iterable[str] = ("captured",)) -> list[Pass]:
        """Topological order by requires/provides, keeping the given order where free."""
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise PassError(f"duplicate pass names in {names}")
        g = nx.DiGraph()
        g.add_nodes_from(range(len(passes)))
        providers: dict[str, list[int]] = {}
        for i, p in enumerate(passes):
            for fact in p.provides:
                providers.setdefault(fact, []).append(i)
        for i, p in enumerate(passes):
            for fact in p.requires:
                if fact in initial:
                    continue
                if fact not in providers:
                    raise PassError(f"pass '{p.name}' requires '{fact}', which no pass provides "
                                    f"(passes: {', '.join(names)})")
                for j in providers[fact]:
                    if j != i:
                        g.add_edge(j, i)
        if not nx.is_directed_acyclic_graph(g):
            cycle = nx.find_cycle(g)
            raise PassError("passes depend on each other in a cycle: "
                            + " -> ".join(passes[a].name for a, _ in cycle))
        return [passes[i] for i in nx.lexicographical_topological_sort(g, key=lambda i: i)]

    def run(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        self.snapshots = [Snapshot.of(gm, "capture")]
        done: list[str] = []
        for p in self.passes:
            missing = [f for f in p.requires if f not in ctx.facts]
            if missing:
                raise PassError(f"pass '{p.name}' needs {missing}, not yet provided after "
                                f"[{', '.join(done) or 'capture'}]")
            start = time.perf_counter()
            try:
                changed = bool(p.run(gm, ctx))
                gm.graph.lint()
                gm.recompile()
            except PassError:
                raise
            except Exception as e:
                raise PassError(f"pass '{p.name}' failed after [{', '.join(['capture'] + done)}]: "
                                f"{type(e).__name__}: {e}") from e
            ctx.facts.update(p.provides)
            done.append(p.name)
            self.snapshots.append(Snapshot.of(gm, p.name, time.perf_counter() - start, changed))
        return gm

