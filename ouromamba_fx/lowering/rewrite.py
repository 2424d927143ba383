"""One driver for every lowering rule: a rule is data (what to match, what to build), the driver
does the rest, the same way for all of them.

A :class:`Rule` has a pass name, the noun of its log line and one or more :class:`Pattern`\\ s,
each a ``match(gm, node, state)`` that returns a :class:`Match` (or None) and a
``build(gm, match, state)`` that creates the replacement nodes and returns a :class:`Built`.
:class:`RewritePass` runs a rule as a :class:`~ouromamba_fx.passes.base.Pass` (so the pass
manager lints, recompiles and snapshots after it, and ``QuantizedModel.diff`` shows what it
changed): for every node in graph order, match, build with new nodes inserted before the match's
anchor, copy tags, replace the anchor's uses, erase the anchor and the nodes the match consumed;
between patterns and at the end, drop dead nodes and buffers; log ``"<name>: <count> <noun>"``.
``state`` is a dict that lives for one pattern's run (e.g. int4 weights packed once per weight);
a match that declines a node for a reason the user should see (an op kept float by choice) counts
it in ``state["notes"]`` (a Counter of reasons), and the pass logs one line per reason after its
count: ``"<name>: <reason> (<count>)"``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx
from torch import Tensor

from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.tags import keep_tag


@dataclass
class Match:
    """A place where a pattern applies."""

    anchor: fx.Node  # new nodes go before it; its uses go to the built node
    fields: dict = field(default_factory=dict)  # what build needs (nodes, constants, numbers)
    erase: tuple[fx.Node, ...] = ()  # erased after the anchor, in this order (nodes it consumed)


@dataclass
class Built:
    """What a build made."""

    out: fx.Node | None  # takes over the anchor's uses; None: the anchor was changed in place
    tags: tuple[tuple[fx.Node, fx.Node, dict], ...] = ()  # (tag source, new node, extra keys)
    keep_tensor_meta: bool = False  # give ``out`` the anchor's recorded shape


@dataclass(frozen=True)
class Pattern:
    match: Callable[[fx.GraphModule, fx.Node, dict], Match | None]
    build: Callable[[fx.GraphModule, Match, dict], Built]


@dataclass(frozen=True)
class Rule:
    name: str  # the pass name (snapshots, q.passes, diff)
    noun: str  # the log line: "<name>: <count> <noun>"
    patterns: tuple[Pattern, ...]
    cleanup: bool = True  # drop dead nodes and unread buffers afterwards


def new_const(gm: fx.GraphModule, base: str, value: Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` under a fresh name from ``base``; a get_attr node
    before ``before``."""
    name = re.sub(r"[^0-9a-zA-Z_]", "_", base)
    i, cand = 0, name
    while hasattr(gm, cand):
        i += 1
        cand = f"{name}_{i}"
    gm.register_buffer(cand, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(cand)


def cleanup(gm: fx.GraphModule) -> None:
    """Drop dead nodes, then the module buffers no ``get_attr`` reads any more (buffers of the
    modules the graph calls, such as a BatchNorm's running statistics, are theirs: kept)."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    for name in [n for n, _ in gm.named_buffers()]:
        if name not in used and not name.startswith(called):
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, leaf)


def apply(gm: fx.GraphModule, pattern: Pattern, notes: Counter | None = None) -> int:
    """Rewrite every match of ``pattern`` in ``gm``; returns how many. The reasons the match gave
    for the nodes it declined (``state["notes"]``) are added to ``notes``."""
    count, state = 0, {}
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        m = pattern.match(gm, node, state)
        if m is None:
            continue
        with gm.graph.inserting_before(m.anchor):
            built = pattern.build(gm, m, state)
        for src, dst, extra in built.tags:
            keep_tag(src, dst, **extra)
        if built.out is not None:
            if built.keep_tensor_meta:
                built.out.meta["tensor_meta"] = m.anchor.meta.get("tensor_meta")
            m.anchor.replace_all_uses_with(built.out)
            for n in (m.anchor, *m.erase):
                gm.graph.erase_node(n)
        count += 1
    if notes is not None:
        notes.update(state.get("notes", {}))
    return count


class RewritePass(Pass):
    """A :class:`Rule` run as a pass."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.name = rule.name

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        changed, notes = 0, Counter()
        for i, pattern in enumerate(self.rule.patterns):
            if i:
                gm.graph.eliminate_dead_code()
            changed += apply(gm, pattern, notes)
        if self.rule.cleanup:
            cleanup(gm)
        ctx.log.append(f"{self.name}: {changed} {self.rule.noun}")
        ctx.log += [f"{self.name}: {why} ({n})" for why, n in notes.items()]
        return bool(changed)

    def __repr__(self) -> str:
        return f"RewritePass({self.name!r})"
