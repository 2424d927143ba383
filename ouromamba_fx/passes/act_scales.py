"""Choose static activation scales from what the observers recorded."""

from __future__ import annotations

import torch.fx as fx

from ouromamba_fx import numerics
from ouromamba_fx.numerics import EPS
from ouromamba_fx.passes.base import Context, Pass
from ouromamba_fx.passes.qparams import act_qparams, kscale_scales, mixed_ratio_search


class ChooseActScales(Pass):
    """Per observer, the static scales of its site, stored as ``obs.qparams``:

    * plain: scale and zero point per tensor or per token position (config granularity, min-max
      or MSE-searched clipping) -> ``("affine", scale, zero_point, qmin, qmax)``;
    * k-scaled (``config.kscale``): k group scales over token positions -> per-token scales;
    * outlier sites (``config.outliers``): per-token *inlier* scales from the inliers' statistics
      -> ``("mixed", s_in (L,), inlier_bits, outlier_bits, k, n_refresh)``.
    """

    name = "choose_act_scales"
    requires = ("calibrated",)
    provides = ("act_scales",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        cfg = ctx.config
        for obs in ctx.observers.values():
            if obs.tok_min is None:
                raise RuntimeError(f"observer {obs.site} saw no data")
            bits = obs.spec.bits
            qmax = numerics.qmax(bits)
            outlier = (cfg.outliers.bits, obs.outlier_k) if obs.outlier_k is not None else None
            if ctx.replay and (cfg.kscale is not None or outlier):
                # Rebuilding a saved model: the scales are read from the file, so only their
                # shape matters here and the searches are skipped.
                absmax = obs.tok_inlier_absmax if outlier else obs.tok_absmax
                s_tok = (absmax / qmax).clamp_min(EPS)
                obs.granularity = f"k{cfg.kscale.k}-scaled" if cfg.kscale is not None else "per_token"
            elif cfg.kscale is not None:
                rows, tok = obs.sampled()
                absmax = obs.tok_inlier_absmax if outlier else obs.tok_absmax
                s_tok, obs.groups = kscale_scales(rows, tok, obs.tok_absmean, absmax, bits,
                                                  cfg.kscale, obs.consumer_weight, outlier)
                obs.granularity = f"k{cfg.kscale.k}-scaled"
            elif outlier:
                rows, tok = obs.sampled()
                base = (obs.tok_inlier_absmax / qmax).clamp_min(EPS)
                s_tok = mixed_ratio_search(rows, tok, base, bits, outlier)
                obs.granularity = "per_token"
            else:
                sample = obs.sampled() if obs.spec.method == "mse" and not ctx.replay else None
                scale, zp, qmin, qmax_ = act_qparams(obs.tok_min, obs.tok_max, obs.spec, sample)
                obs.granularity = obs.spec.granularity
                obs.qparams = ("affine", *self._broadcast(obs, scale, zp), qmin, qmax_)
                continue
            if outlier:
                obs.granularity += "+outliers"
                obs.qparams = ("mixed", s_tok.clone(), bits, cfg.outliers.bits, obs.outlier_k,
                               cfg.outliers.n_refresh)
            else:
                obs.qparams = ("affine", *self._broadcast(obs, s_tok, s_tok.new_zeros(s_tok.shape)),
                               -qmax, qmax)
        return False

    @staticmethod
    def _broadcast(obs, scale, zp):
        """Shape scale / zero point to broadcast against the observed tensor (batch, *obs.shape)."""
        shape = [1] * (len(obs.shape) + 1)
        if scale.numel() > 1:
            shape[obs.token_axis] = scale.numel()
        return scale.reshape(shape), zp.reshape(shape)
