import torch

from ouromamba_fx.config import ActQuant, WeightQuant
from ouromamba_fx.numerics import qrange
from ouromamba_fx.ops.quant import fake_quantize
from ouromamba_fx.measure import sqnr
from ouromamba_fx.passes.qparams import act_qparams, weight_qparams


def test_qrange():
    assert qrange(4, True) == (-7, 7) and qrange(8, True) == (-127, 127) and qrange(8, False) == (-128, 127)


def test_minmax_weight_scale_is_absmax_over_qmax():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.3]])
    s, zp = weight_qparams(w, WeightQuant(8, method="minmax"))
    torch.testing.assert_close(s, torch.tensor([[2.0 / 127], [0.3 / 127]]))
    assert torch.equal(zp, torch.zeros(2, 1))


def test_lp_clip_search_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 0] *= 12  # one outlier column: clipping it costs less than coarse steps everywhere
    def lp_err(spec):
        s, z = weight_qparams(w, spec)
        return (fake_quantize(w, s, z, -7, 7) - w).abs().pow(2.4).sum(dim=1)
    clip, mm = lp_err(WeightQuant(4)), lp_err(WeightQuant(4, method="minmax"))
    assert (clip <= mm + 1e-6).all() and clip.sum() < 0.9 * mm.sum()


def test_per_token_act_scales_by_hand():
    tok_min = torch.tensor([-1.0, -0.2, -4.0])
    tok_max = torch.tensor([2.0, 0.1, 1.0])
    s, zp, qmin, qmax = act_qparams(tok_min, tok_max, ActQuant(8, "per_token", method="minmax"))
    torch.testing.assert_close(s, torch.tensor([2.0, 0.2, 4.0]) / 127)
    assert (qmin, qmax) == (-127, 127) and not zp.any()
    s, zp, *_ = act_qparams(tok_min, tok_max, ActQuant(8, "per_tensor", method="minmax"))
    torch.testing.assert_close(s, torch.tensor([4.0 / 127]))
    s, zp, qmin, qmax = act_qparams(torch.tensor([0.5]), torch.tensor([3.0]),
                                    ActQuant(8, "per_tensor", symmetric=False, method="minmax"))
    # asymmetric: range [0, 3] (0 always representable) over 255 steps, zero at qmin
    torch.testing.assert_close(s, torch.tensor([3.0 / 255]))
    assert zp.item() == -128


def test_mse_search_clips_a_rare_outlier():
    torch.manual_seed(0)
    rows = torch.randn(2000, 32)
    rows[0, 0] = 60.0
    tok = torch.zeros(2000, dtype=torch.long)
    lo, hi = rows.amin().reshape(1), rows.amax().reshape(1)
    mm = act_qparams(lo, hi, ActQuant(4, "per_tensor", method="minmax"))[0]
    mse = act_qparams(lo, hi, ActQuant(4, "per_tensor", method="mse"), sample=(rows, tok))[0]
    assert mse < mm
    def err(s):
        return (fake_quantize(rows, s, torch.zeros(1), -7, 7) - rows).pow(2).sum()
    assert err(mse) < err(mm)


def test_sqnr():
    x = torch.randn(1000)
    assert sqnr(x, x) == float("inf")
    assert abs(sqnr(x, x + 0.1 * x) - 20.0) < 1e-6
