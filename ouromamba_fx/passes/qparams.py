"""Choosing quantization parameters: weight clipping search and activation scales.

Pure tensor functions, no graphs; the passes call them.
"""

from __future__ import annotations

import torch

from ouromamba_fx.config import ActQuant, WeightQuant
from ouromamba_fx import numerics
from ouromamba_fx.numerics import EPS, qrange
from ouromamba_fx.ops.mixed import mixed_fake_quant_rows, outlier_mask
from ouromamba_fx.ops.quant import fake_quantize


def weight_qparams(w: torch.Tensor, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (or per-tensor) symmetric scales for a weight viewed as ``(N, K)``.

    With ``method="lp_clip"`` each row's clipping ratio is searched among ``spec.candidates``
    values evenly spaced in ``[spec.min_ratio, 1]``, keeping the one with the least
    ``sum |w - fq(w)|^p`` (p = 2.4 by default, as PTQ4VM and OuroMamba do).

    Returns ``(scale (N, 1) or (1, 1), zero_point of the same shape)``.
    """
    if not spec.symmetric:
        raise NotImplementedError("asymmetric weight quantization is not supported; use symmetric=True")
    w = w.detach().float()
    qmin, qmax = qrange(spec.bits, True)
    per_channel = spec.granularity == "per_channel"
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    base = (amax / qmax).clamp_min(EPS)
    zp = torch.zeros_like(base)
    if spec.method == "minmax" or spec.candidates == 1:
        return base, zp
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for ratio in torch.linspace(spec.min_ratio, 1.0, spec.candidates).tolist():
        s = base * ratio
        err = (fake_quantize(w, s, zp, qmin, qmax) - w).abs().pow(spec.p)
        err = err.sum(dim=1, keepdim=True) if per_channel else err.sum().reshape(1, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best, zp


def search_ratio(err, ratios: int = 16, min_ratio: float = 0.25) -> float:
    """The clipping ratio in [min_ratio, 1] with the least ``err(ratio)``: a coarse grid of
    ``ratios`` points, then a fine grid around the best of them."""
    step = (1.0 - min_ratio) / (ratios - 1)
    best = min((min_ratio + i * step for i in range(ratios)), key=err)
    fine = [min(1.0, max(min_ratio, best + (i - ratios // 2) * step / ratios)) for i in range(ratios + 1)]
    return min(fine + [best], key=err)


def act_qparams(tok_min: torch.Tensor, tok_max: torch.Tensor, spec: ActQuant,
                sample: tuple[torch.Tensor, torch.Tensor] | None = None,
                ratios: int = 16, min_ratio: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Static activation scales from per-token-position min/max.

    Returns ``(scale, zero_point, qmin, qmax)`` with scale of shape ``(1,)`` (per tensor) or
    ``(L,)`` (per token position). With ``method="mse"`` one clipping ratio for the whole tensor
    is searched on ``sample`` = (rows (n, C), their token indices (n,)) for the least squared error.
    """
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    per_token = spec.granularity == "per_token"
    lo = tok_min if per_token else tok_min.amin().reshape(1)
    hi = tok_max if per_token else tok_max.amax().reshape(1)
    if spec.symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(EPS)
        zp = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    if spec.method == "mse" and sample is not None:
        rows, tok = sample
        idx = tok if per_token else torch.zeros_like(tok)
        s_rows = scale[idx].unsqueeze(1)
        z_rows = zp[idx].unsqueeze(1)

        def err(ratio: float) -> float:
            s = s_rows * ratio
            z = z_rows if spec.symmetric else (qmin - torch.round(lo[idx].unsqueeze(1) / s)).clamp(qmin, qmax)
            return (fake_quantize(rows, s, z, qmin, qmax) - rows).pow(2).sum().item()

        scale = scale * search_ratio(err, ratios, min_ratio)
        if not spec.symmetric:
            zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp, qmin, qmax


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 100) -> torch.Tensor:
    """Deterministic 1-D k-means (Lloyd, initialised at evenly spaced quantiles).

    Returns labels (len(values),) in 0..k-1, ordered so that label 0 has the smallest centre.
    """
    v = values.detach().double().flatten()
    k = max(1, min(k, int(v.unique().numel())))
    centres = torch.quantile(v, torch.linspace(0, 1, k, dtype=torch.float64))
    labels = torch.zeros_like(v, dtype=torch.long)
    for _ in range(iters):
        new = (v[:, None] - centres[None, :]).abs().argmin(dim=1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        for g in range(k):
            if (labels == g).any():
                centres[g] = v[labels == g].mean()
    order = torch.argsort(centres)
    return torch.argsort(order)[labels]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def mixed_rows_fq(rows: torch.Tensor, s_rows: torch.Tensor, bits: int, outlier) -> torch.Tensor:
    """Fake-quantize independent rows (n, C) with per-row inlier scales (n,): plain symmetric, or
    OuroMamba mixed precision when ``outlier`` = (outlier_bits, k) (per-row rule, no windows)."""
    qmax = numerics.qmax(bits)
    if outlier is None:
        s = s_rows.reshape(-1, 1)
        return torch.round(rows / s).clamp(-qmax, qmax) * s
    obits, k = outlier
    r = rows.unsqueeze(0)  # (1, n, C): the rows as the time-steps of one sample, one scale each
    s = s_rows.reshape(-1)
    mask = outlier_mask(r, s, qmax, k, 1)
    return mixed_fake_quant_rows(r, s, mask, bits, obits).squeeze(0)


def kscale_scales(rows: torch.Tensor, tok: torch.Tensor, tok_absmean: torch.Tensor,
                  tok_absmax: torch.Tensor, bits: int, ks, weight: torch.Tensor | None = None,
                  outlier=None) -> tuple[torch.Tensor, torch.Tensor]:
    """k-scaled static scales per token position.

    Token positions are grouped by 1-D k-means on mean |x|; each group's scale starts at
    ``max|x_group| / (qmax - 0.5)`` and is searched among ``ks.candidates`` multiples in
    ``[ks.lo, ks.hi]`` for the highest cosine similarity between the layer output on quantized and
    float inputs (``rows @ weight.T`` when the site feeds a linear ``weight``, else the input
    itself). Returns (per-token scales (L,), group labels (L,)).
    """
    qmax = numerics.qmax(bits)
    labels = kmeans_1d(tok_absmean, ks.k)
    n_groups = int(labels.max()) + 1
    scales = torch.empty(n_groups)
    cands = torch.linspace(ks.lo, ks.hi, ks.candidates).tolist()
    row_group = labels[tok]
    w = weight.float() if weight is not None else None
    for g in range(n_groups):
        init = (tok_absmax[labels == g].max() / (qmax - 0.5)).clamp_min(EPS)
        xg = rows[row_group == g][: ks.search_rows]
        if len(xg) == 0:
            scales[g] = init
            continue
        ref = xg @ w.T if w is not None else xg
        best, best_cos = init, -2.0
        for c in cands:
            s = init * c
            xq = mixed_rows_fq(xg, s.expand(len(xg)), bits, outlier)
            cos = _cosine(xq @ w.T if w is not None else xq, ref)
            if cos > best_cos:
                best, best_cos = s, cos
        scales[g] = best
    if ks.pow2 and n_groups > 1:
        s0 = scales[0]
        scales = s0 * torch.pow(2.0, torch.round(torch.log2(scales / s0)))
    return scales[labels], labels


def mixed_ratio_search(rows: torch.Tensor, tok: torch.Tensor, base: torch.Tensor, bits: int,
                       outlier, ratios: int = 16, min_ratio: float = 0.25) -> torch.Tensor:
    """Per-token inlier scales ``base * ratio`` with one ratio searched for the least squared error
    of the mixed-precision quantization on the sample rows."""
    s_rows = base[tok]

    def err(ratio: float) -> float:
        return (mixed_rows_fq(rows, s_rows * ratio, bits, outlier) - rows).pow(2).sum().item()

    return base * search_ratio(err, ratios, min_ratio)
