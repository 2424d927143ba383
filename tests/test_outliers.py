import pytest
import torch

from ouromamba_fx.ops.mixed import (QUANTIZE_MIXED_OP, mixed_fake_quant_rows, outlier_fraction, outlier_mask,
                                    quantize_mixed_ref, resample_steps)


def planted(b=2, length=12, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, c, generator=g)
    x[0, 3, 5] = 40.0   # sample 0, step 3, channel 5
    x[1, 7, 9] = -35.0  # sample 1, step 7, channel 9
    return x


def test_planted_outliers_are_flagged_per_sample_and_step():
    x = planted()
    s_in = torch.full((12,), 4.0 / 7)  # inliers up to ~4 fit; 40 does not
    mask = outlier_mask(x, s_in, 7, k=3.0, n_refresh=1)
    assert mask[0, 3, 5] and mask[1, 7, 9]
    assert not mask[1, 3].any() and not mask[0, 7].any()  # decided per sample, not batch-wide
    # every flagged value sits at a step that triggers (its max |x| would clip at 4) and is above
    # that step's threshold
    steps = mask.any(-1)
    assert (x.abs().amax(-1)[steps] > 4.0).all()
    a = x.abs()
    theta = a.mean(-1, keepdim=True) + 3 * a.std(-1, keepdim=True, unbiased=False)
    assert (a[mask] > theta.expand_as(a)[mask]).all()


def test_mask_persists_within_refresh_window_and_resets():
    x = planted()
    s_in = torch.full((12,), 4.0 / 7)
    mask = outlier_mask(x, s_in, 7, k=3.0, n_refresh=5)  # windows [0-4], [5-9], [10-11]
    assert mask[0, 3:5, 5].all()          # flagged at 3, kept to the end of its window
    assert not mask[0, :3, 5].any()       # not before it was seen
    assert not mask[0, 5:, 5].any()       # reset at the next window
    assert mask[1, 7:10, 9].all() and not mask[1, 10:, 9].any()


def test_no_trigger_when_inliers_fit():
    x = planted()
    mask = outlier_mask(x, torch.full((12,), 50.0 / 7), 7, k=3.0, n_refresh=1)
    assert not mask.any()


def test_mixed_fake_quant_by_hand():
    rows = torch.tensor([[[1.0, -2.0, 0.4, 30.0]]])  # one sample, one step
    mask = torch.tensor([[[False, False, False, True]]])
    out = mixed_fake_quant_rows(rows, torch.tensor([0.5]), mask, 4, 8)
    # inliers: round(x / 0.5) clamped to [-7, 7] times 0.5; outlier: 8-bit with scale 30 / 127
    torch.testing.assert_close(out, torch.tensor([[[1.0, -2.0, 0.5, 30.0]]]))
    out16 = mixed_fake_quant_rows(rows * 1.01, torch.tensor([0.5]), mask, 4, 16)
    assert out16[0, 0, 3] == rows[0, 0, 3] * 1.01  # outliers kept in float


def test_other_sequence_lengths_resample_scales():
    s = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(resample_steps(s, 5), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    assert resample_steps(s, 3) is s and resample_steps(torch.tensor([2.0]), 4).tolist() == [2.0] * 4
    x = torch.randn(2, 64, 20)  # (B, C, L): 20 steps, scales calibrated for 9
    y = quantize_mixed_ref(x, torch.full((9,), 0.3), 2, 1, 4, 8, 3.0, 10)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_layouts_agree():
    x = torch.randn(3, 10, 16)
    s = torch.rand(10) + 0.2
    a = quantize_mixed_ref(x, s, 1, 2, 4, 8, 3.0, 4)
    b = quantize_mixed_ref(x.transpose(1, 2), s, 2, 1, 4, 8, 3.0, 4).transpose(1, 2)
    assert torch.equal(a, b)
    frac = outlier_fraction(x, s, 1, 2, 4, 8, 3.0, 4)
    assert frac.shape == (10,) and (frac >= 0).all() and (frac <= 1).all()


def test_op_opcheck():
    x = torch.randn(2, 6, 8)
    torch.library.opcheck(QUANTIZE_MIXED_OP, (x, torch.rand(6) + 0.1, 1, 2, 4, 8, 3.0, 2))
