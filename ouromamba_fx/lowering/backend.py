"""The ``ouromamba`` torch.compile backend: lower the reference quantized graph, then Inductor.

    >>> import ouromamba_fx as of                     # registers the backend
    >>> fast = torch.compile(q, backend="ouromamba")  # q = of.convert(model, calib, of.W8A8)  # doctest: +SKIP
    >>> fast(x)                                                                                # doctest: +SKIP

What it does with the graph Dynamo hands it:

1. *freeze*: module parameters and buffers arrive as graph inputs (Dynamo lifts them); the rules
   need their values (a zero point must be 0, an int4 weight must be packed), so they become
   constants of the graph (``get_attr``). The compiled function then ignores them at call time:
   like Inductor's own ``freezing``, it serves inference on the weights it was compiled with
   (re-compile after changing them).
2. *lower*: the rules of :mod:`ouromamba_fx.lowering.rules` (the same as ``QuantizedModel.lower``).
3. *Inductor*: ``torch._inductor.compile_fx.compile_fx`` on the lowered graph. Every fused op is a
   ``torch.library`` custom op with a fake implementation, so Inductor treats it as an opaque call
   and compiles the float glue (norms, residual adds, gating, transposes) around it.

Graphs without quantization ops (a float model) pass through step 2 unchanged, so the backend is
also plain freezing + Inductor for them. Registered under the name ``ouromamba`` when
:mod:`ouromamba_fx` is imported, and as a ``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from ouromamba_fx.lowering.lower import OPTION_NAMES, lower_graph
from ouromamba_fx.ops import gemm

NAME = "ouromamba"
_MODULE_STATE = re.compile(r"\._(parameters|buffers)\[")


def _is_module_state(node: fx.Node, example) -> bool:
    if not isinstance(example, torch.Tensor):
        return False
    if isinstance(example, torch.nn.Parameter):
        return True
    ga = node.meta.get("grapharg")
    source = getattr(getattr(ga, "source", None), "name", None)
    source = source() if callable(source) else source
    return bool(source and _MODULE_STATE.search(str(source)))


def freeze_module_inputs(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Turn the placeholders that carry module parameters/buffers into constants of ``gm`` (in
    place); returns the indices of the inputs still to pass at call time."""
    keep = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not _is_module_state(node, ex):
            keep.append(i)
            continue
        name = f"_frozen_{i}"
        gm.register_buffer(name, ex.detach())
        with gm.graph.inserting_before(first):
            c = gm.graph.get_attr(name)
        c.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "tensor_meta")})
        node.replace_all_uses_with(c)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return keep


def ouromamba_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Dynamo backend: freeze module state, lower quantize/dequantize patterns to fused integer
    ops, compile the rest with Inductor.

    ``torch.compile(q, backend="ouromamba", options={...})``: the keys ``conv_silu``,
    ``int8_conv2d``, ``conv2d_min_k``, ``integer_scan``, ``int8_inline``, ``int4_inline``, ``mixed_fused``, ``scan_cl``,
    ``fast_decay``, ``dt_scan``, ``conv_codes``, ``scan_combine`` and ``inproj_epilogue`` choose lowering rules
    (:func:`~ouromamba_fx.lowering.lower.lowering_passes`), ``cpu_gemm`` the integer GEMM path
    (``auto``, ``int_mm``, ``emulated``: :mod:`ouromamba_fx.ops.gemm`; compilation and every call of
    the compiled function run with it), any other key is an Inductor config patch."""
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    lowering = {k: options.pop(k) for k in OPTION_NAMES if k in options}
    cpu_gemm = gemm.check_choice(options.pop("cpu_gemm", "auto"))
    # Freeze on a copy of the graph: Dynamo passes the compiled function the inputs of the graph it
    # handed over as that graph looks after the backend returns, so removing its placeholders in
    # place would make it pass fewer arguments than ``keep`` indexes. The copy is also a fresh
    # GraphModule without Dynamo's metadata: Inductor would otherwise look the frozen constants up
    # among the parameters Dynamo recorded and not find them.
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    gm = fx.GraphModule(gm, graph)
    keep = freeze_module_inputs(gm, example_inputs)
    with gemm.use(cpu_gemm):  # the decomposed linears pick their GEMM while Inductor traces them
        gm, _, _ = lower_graph(gm, **lowering)
        compiled = compile_fx(gm, [example_inputs[i] for i in keep], config_patches=options or None)

    # compile_fx on a plain GraphModule returns a function of positional tensors (AOT autograd's
    # non-boxed convention for nn.Module inputs); Dynamo passes every input of its own (unchanged)
    # graph, of which the compiled function takes the kept ones.
    def run(*args):
        with gemm.use(cpu_gemm):  # the opaque ops pick theirs at run time
            return compiled(*[args[i] for i in keep])

    return run


def register() -> None:
    """Register the backend name with Dynamo (idempotent; leaves it to the entry point when Dynamo
    has discovered the package's ``torch_dynamo_backends`` entry point, which would otherwise be
    registered twice)."""
    from torch._dynamo.backends import registry

    if NAME in registry._COMPILER_FNS:
        return
    if registry._BACKENDS.get(NAME) is not None:  # discovered entry point: torch loads it itself
        return
    registry.register_backend(ouromamba_backend, name=NAME)
