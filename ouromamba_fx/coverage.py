"""What a conversion did to every parameter-bearing module of the float model: quantized, folded,
or kept in float, and why.

    >>> cov = module_coverage(model, gm, float_reasons)      # doctest: +SKIP
    >>> cov["levels.2.blocks.0.norm1"]
    Coverage(quantized=False, why='normalisation layer: kept in float (elementwise, not a matmul)')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ouromamba_fx.capture import MIXER_TYPES, _nearest_producer
from ouromamba_fx.tags import tag

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)
_MIXERS = tuple(cls for cls, _ in MIXER_TYPES)
SDPA_REASON = ("attention matmuls (softmax(q k^T) v, activation x activation) in "
               "scaled_dot_product_attention: kept in float by design; its qkv and proj linears are quantized "
               "per config")


@dataclass(frozen=True)
class Coverage:
    quantized: bool
    why: str


def _quantized_modules(gm: fx.GraphModule) -> dict[str, str]:
    found = {}
    for n in gm.graph.nodes:
        t = tag(n) or {}
        if "weight_bits" in t and not t.get("kind") and t.get("target"):
            found[t["target"]] = f"weights W{t['weight_bits']} {t['weight_granularity']}"
    return found


def attention_matmuls(gm: fx.GraphModule) -> dict[str, str]:
    """``<attention module>.matmuls`` -> why, for every scaled-dot-product attention in ``gm``."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
            src = _nearest_producer(n.args[0], "attn", max_depth=12)
            where = tag(src)["module"] if src is not None else n.name
            out[f"{where}.matmuls"] = SDPA_REASON
    return out


def _type_reason(m: nn.Module, params: list[str]) -> str:
    if isinstance(m, _NORMS) or "norm" in type(m).__name__.lower():
        return "normalisation layer: kept in float (elementwise, not a matmul)"
    if isinstance(m, _MIXERS):
        return f"scan parameters ({', '.join(params)}): float inputs of the scan op"
    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return f"{type(m).__name__} with no role ouromamba_fx quantizes (not a mixer, MLP, attention, stem, " \
               f"downsampling or head layer)"
    return f"{', '.join(params)} used by float elementwise ops ({type(m).__name__})"


def module_coverage(model: nn.Module, gm: fx.GraphModule, float_reasons: dict[str, str]) -> dict[str, Coverage]:
    """Every module of ``model`` that holds parameters of its own -> quantized or why not."""
    quantized = _quantized_modules(gm)
    folded = dict(gm.meta.get("folded_bn", {}))
    opaque = {n.target for n in gm.graph.nodes if n.op == "call_module" and tag(n) is None}
    out: dict[str, Coverage] = {}
    for name, m in model.named_modules():
        params = [k for k, _ in m.named_parameters(recurse=False)]
        if not params:
            continue
        if name in quantized:
            out[name] = Coverage(True, quantized[name])
        elif name in folded:
            conv = folded[name]
            out[name] = Coverage(conv in quantized, f"BatchNorm folded into {conv}"
                                 + (" (quantized)" if conv in quantized else " (float)"))
        elif name in float_reasons:
            out[name] = Coverage(False, float_reasons[name])
        else:
            leaf = next((p for p in float_reasons if name.startswith(p + ".")), None)
            whole = next((p for p in opaque if name.startswith(p + ".")), None)
            if leaf is not None:
                out[name] = Coverage(False, f"inside {leaf}: {float_reasons[leaf]}")
            elif whole is not None:
                out[name] = Coverage(False, f"inside {whole} ({type(model.get_submodule(whole)).__name__}), "
                                            f"traced as one float module")
            else:
                out[name] = Coverage(False, _type_reason(m, params))
    return out


def summary(cov: dict[str, Coverage]) -> str:
    n_q = sum(c.quantized for c in cov.values())
    return f"parameter-bearing modules: {n_q} of {len(cov)} quantized"
