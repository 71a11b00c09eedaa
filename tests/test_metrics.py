"""PSNR and SSIM against hand values and scikit-image's reference SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emu3.metrics import psnr, ssim
from tests.conftest import scene


def test_psnr_hand_values():
    a = scene(32, 32)
    b = a.astype(int)
    b = np.clip(b + 5, 0, 255)
    noisy = b.astype(np.uint8)
    mse = ((noisy.astype(float) - a) ** 2).mean()
    assert psnr(a, noisy) == pytest.approx(10 * math.log10(255**2 / mse))
    assert psnr(a, a) == 100.0
    video = np.stack([a, a])
    assert psnr(video, np.stack([a, noisy])) == pytest.approx((100.0 + psnr(a, noisy)) / 2)


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = scene(48, 64, 1)
    for b in (np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8), scene(48, 64, 2)):
        ref = skimage_metrics.structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
                                                    sigma=1.5, use_sample_covariance=False)
        assert ssim(a, b) == pytest.approx(ref, abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)


def test_metric_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(scene(16, 16), scene(16, 24))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(scene(8, 8), scene(8, 8))
