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

    Which one a site gets is its spec's ``search``, decided by the annotate pass.
    """

    name = "choose_act_scales"
    requires = ("calibrated",)
    provides = ("act_scales",)

    def run(self, gm: fx.GraphModule, ctx: Context) -> bool:
        for obs in ctx.observers.values():
            if obs.tok_min is None:
                raise RuntimeError(f"observer {obs.site} saw no data")
            spec = obs.spec
            bits = spec.quant.bits
            qmax = numerics.qmax(bits)
            o = spec.outliers
            outlier = (o.bits, o.k) if o is not None else None
            obs.granularity = spec.granularity_text()
            search = spec.search
            if ctx.replay and search != "affine":
                # Rebuilding a saved model: the scales are read from the file, so only their
                # shape matters here and the searches are skipped.
                absmax = obs.tok_inlier_absmax if outlier else obs.tok_absmax
                s_tok = (absmax / qmax).clamp_min(EPS)
            elif search == "kscale":
                rows, tok = obs.sampled()
                absmax = obs.tok_inlier_absmax if outlier else obs.tok_absmax
                s_tok, obs.groups = kscale_scales(rows, tok, obs.tok_absmean, absmax, bits,
                                                  spec.kscale, obs.consumer_weight, outlier)
            elif search == "mixed":
                rows, tok = obs.sampled()
                base = (obs.tok_inlier_absmax / qmax).clamp_min(EPS)
                s_tok = mixed_ratio_search(rows, tok, base, bits, outlier)
            else:
                sample = obs.sampled() if spec.quant.method == "mse" and not ctx.replay else None
                scale, zp, qmin, qmax_ = act_qparams(obs.tok_min, obs.tok_max, spec.quant, sample)
                obs.qparams = ("affine", *self._broadcast(obs, scale, zp), qmin, qmax_)
                continue
            if outlier:
                obs.qparams = ("mixed", s_tok.clone(), bits, o.bits, o.k, o.n_refresh)
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
