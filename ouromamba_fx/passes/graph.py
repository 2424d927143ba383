"""Graph analysis helpers (networkx views of FX graphs)."""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from ouromamba_fx.tags import tag

# Ops that move data without changing values (so a row of the producer stays a row).
_VIEW_METHODS = {"transpose", "contiguous", "permute", "reshape", "view", "float"}


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """Directed graph of the FX nodes (edges producer -> consumer), nodes keyed by node name."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, node=n)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def nearest_ancestor(gm: fx.GraphModule, node: fx.Node, role: str, g: nx.DiGraph | None = None) -> fx.Node | None:
    """The closest node upstream of ``node`` tagged with ``role`` (fewest edges), or None."""
    g = g if g is not None else to_networkx(gm)
    dist = nx.single_source_shortest_path_length(g.reverse(copy=False), node.name)
    best = [(d, name) for name, d in dist.items()
            if (t := tag(g.nodes[name]["node"])) and t["role"] == role and not t.get("kind")]
    return g.nodes[min(best)[1]]["node"] if best else None


def split_rows(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """If ``node`` is, through views only, the ``i``-th chunk of ``torch.split(y, sizes, dim=-1)``,
    return (y, first row, row count) of that chunk in y's last dimension; else None."""
    n = node
    while n.op == "call_method" and n.target in _VIEW_METHODS and n.target not in ("reshape", "view"):
        n = n.args[0]
    if not (n.op == "call_function" and n.target is operator.getitem):
        return None
    src, i = n.args
    if not (src.op == "call_function" and src.target is torch.split):
        return None
    sizes = src.args[1] if len(src.args) > 1 else src.kwargs.get("split_size_or_sections")
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
    if not isinstance(sizes, (list, tuple)) or dim not in (-1, 2):
        return None
    return src.args[0], int(sum(sizes[:i])), int(sizes[i])
