"""Image fidelity metrics: hand-computed values and agreement with scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cryosift.metrics import (
    cc,
    image_metrics,
    mse,
    psnr,
    rescale_to_reference,
    scale_invariant_psnr,
    ssim,
)

SEED = 20240611


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """A smooth-ish zero-mean reference stack (different ranges per image) and a noisy copy."""
    rng = np.random.default_rng(SEED)
    ref = rng.normal(size=(5, 32, 32)).cumsum(axis=2) * rng.uniform(0.5, 3.0, size=(5, 1, 1))
    pred = ref + rng.normal(scale=1.5, size=ref.shape)
    return pred, ref


def test_mse_hand_computed() -> None:
    ref = np.zeros((2, 4, 4))
    pred = np.zeros((2, 4, 4))
    pred[0] += 0.5  # every pixel off by 0.5 -> 0.25
    pred[1, 0, 0] = 4.0  # one pixel off by 4 -> 16 / 16
    np.testing.assert_allclose(mse(pred, ref), [0.25, 1.0])


def test_psnr_known_mse_and_range() -> None:
    ref = np.linspace(-1.0, 1.0, 16 * 16).reshape(16, 16)  # range 2
    pred = ref + 0.1  # mse 0.01
    out = psnr(pred, ref)
    assert out.shape == (1,)
    np.testing.assert_allclose(out, 10 * np.log10(4.0 / 0.01), rtol=1e-12)
    # explicit data range overrides the reference's own
    np.testing.assert_allclose(psnr(pred, ref, data_range=1.0), 10 * np.log10(1.0 / 0.01))


def test_psnr_range_is_per_image() -> None:
    ref = np.stack([np.linspace(0, 1, 256), np.linspace(0, 10, 256)]).reshape(2, 16, 16)
    pred = ref + 0.1
    expected = 10 * np.log10(np.array([1.0, 100.0]) / 0.01)
    np.testing.assert_allclose(psnr(pred, ref), expected, rtol=1e-12)


def test_psnr_matches_skimage(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    expected = [
        peak_signal_noise_ratio(r, p, data_range=r.max() - r.min())
        for p, r in zip(pred, ref, strict=True)
    ]
    np.testing.assert_allclose(psnr(pred, ref), expected, rtol=1e-10)
    per_image = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = [
        peak_signal_noise_ratio(r, p, data_range=d)
        for p, r, d in zip(pred, ref, per_image, strict=True)
    ]
    np.testing.assert_allclose(psnr(pred, ref, data_range=per_image), expected, rtol=1e-10)


def test_psnr_constant_reference_nan_and_perfect_inf() -> None:
    ref = np.stack([np.zeros((8, 8)), np.arange(64.0).reshape(8, 8)])
    out = psnr(ref.copy(), ref)
    assert np.isnan(out[0])
    assert np.isposinf(out[1])


def _careamics_si_psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    """CAREamics' scale_invariant_psnr, rewritten here as an independent reference."""
    rng = (gt.max() - gt.min()) / gt.std()
    gt_ = (gt - gt.mean()) / gt.std()
    x = pred - pred.mean()
    x = x * np.sum(gt_ * x) / np.sum(x * x)
    return float(10 * np.log10(rng**2 / np.mean((gt_ - x) ** 2)))


def test_si_psnr_matches_careamics_formula(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    expected = [_careamics_si_psnr(r, p) for p, r in zip(pred, ref, strict=True)]
    np.testing.assert_allclose(scale_invariant_psnr(pred, ref), expected, rtol=1e-10)


def test_si_psnr_invariant_to_gain_and_offset(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    base = scale_invariant_psnr(pred, ref)
    np.testing.assert_allclose(scale_invariant_psnr(3.0 * pred + 5.0, ref), base, rtol=1e-10)
    np.testing.assert_allclose(scale_invariant_psnr(-0.2 * pred - 1.0, ref), base, rtol=1e-10)
    # the least-squares fit can only lower the error
    assert np.all(base >= psnr(pred, ref) - 1e-12)
    # a rescaled perfect prediction is perfect (up to rounding: > 250 dB)
    assert np.all(scale_invariant_psnr(2.0 * ref - 7.0, ref) > 250.0)
    # and plain PSNR punishes the gain
    assert np.all(psnr(3.0 * pred + 5.0, ref) < base - 3.0)


def test_si_psnr_constant_prediction_predicts_the_mean() -> None:
    ref = np.arange(64.0).reshape(8, 8)
    out = scale_invariant_psnr(np.full((8, 8), 3.0), ref)
    np.testing.assert_allclose(out, 10 * np.log10(63.0**2 / ref.var()), rtol=1e-12)


def test_rescale_to_reference_is_least_squares(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    fit = rescale_to_reference(pred, ref)
    for p, r, f in zip(pred, ref, fit, strict=True):
        design = np.stack([p.ravel(), np.ones(p.size)], axis=1)
        coef, *_ = np.linalg.lstsq(design, r.ravel(), rcond=None)
        np.testing.assert_allclose(f.ravel(), design @ coef, atol=1e-9)


def test_cc_self_negative_and_numpy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    np.testing.assert_allclose(cc(ref, ref), 1.0, atol=1e-12)
    np.testing.assert_allclose(cc(-ref, ref), -1.0, atol=1e-12)
    np.testing.assert_allclose(cc(4.0 * pred + 2.0, ref), cc(pred, ref), rtol=1e-12)
    expected = [np.corrcoef(p.ravel(), r.ravel())[0, 1] for p, r in zip(pred, ref, strict=True)]
    np.testing.assert_allclose(cc(pred, ref), expected, rtol=1e-10)
    assert np.isnan(cc(np.ones((8, 8)), np.arange(64.0).reshape(8, 8))[0])


def test_ssim_matches_skimage(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    expected = [
        structural_similarity(p, r, data_range=r.max() - r.min())
        for p, r in zip(pred, ref, strict=True)
    ]
    np.testing.assert_allclose(ssim(pred, ref), expected, rtol=1e-10)
    np.testing.assert_allclose(ssim(ref, ref), 1.0, atol=1e-12)
    assert np.all(ssim(pred, ref) < 0.99)


def test_single_reference_broadcasts_over_stack(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    one = ref[0]
    np.testing.assert_allclose(psnr(pred, one), [psnr(p, one)[0] for p in pred])
    np.testing.assert_allclose(cc(pred, one), [cc(p, one)[0] for p in pred])


def test_float32_input_accumulates_accurately(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, ref = pair
    out32 = psnr(pred.astype(np.float32), ref.astype(np.float32))
    assert out32.dtype == np.float64
    np.testing.assert_allclose(out32, psnr(pred, ref), atol=1e-4)
    np.testing.assert_allclose(
        scale_invariant_psnr(pred.astype(np.float32), ref.astype(np.float32)),
        scale_invariant_psnr(pred, ref),
        atol=1e-4,
    )


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="image shapes"):
        psnr(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="numbers of images"):
        cc(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="stack"):
        mse(np.zeros(8), np.zeros(8))


def test_image_metrics_keys_means_and_undefined_images(
    pair: tuple[np.ndarray, np.ndarray],
) -> None:
    pred, ref = pair
    out = image_metrics(pred, ref)
    assert list(out) == ["psnr", "si_psnr", "cc", "ssim", "mse"]
    assert all(type(v) is float for v in out.values())
    assert out["psnr"] == pytest.approx(psnr(pred, ref).mean(), rel=1e-12)
    assert out["si_psnr"] == pytest.approx(scale_invariant_psnr(pred, ref).mean(), rel=1e-12)
    assert out["cc"] == pytest.approx(cc(pred, ref).mean(), rel=1e-12)
    assert out["ssim"] == pytest.approx(ssim(pred, ref).mean(), rel=1e-12)
    assert out["mse"] == pytest.approx(mse(pred, ref).mean(), rel=1e-12)
    # a constant reference (pure-noise junk) is left out of the undefined metrics only
    ref2 = np.concatenate([ref, np.zeros((1, 32, 32))])
    pred2 = np.concatenate([pred, np.ones((1, 32, 32))])
    out2 = image_metrics(pred2, ref2)
    assert out2["psnr"] == pytest.approx(out["psnr"], rel=1e-12)
    assert out2["cc"] == pytest.approx(out["cc"], rel=1e-12)
    assert out2["mse"] == pytest.approx(mse(pred2, ref2).mean(), rel=1e-12)
