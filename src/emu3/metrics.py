"""Reconstruction metrics on uint8 frames: PSNR and SSIM (Wang et al. 2004).

SSIM uses the paper's settings: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
population covariances, only positions where the window fits, averaged over channels. This is
scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`, which the tests compare against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _frames(a: np.ndarray) -> torch.Tensor:
    t = torch.tensor(np.asarray(a), dtype=torch.float64)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (T, H, W, 3) frames, got {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2)  # (T, 3, H, W)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of 10 log10(255^2 / MSE); identical frames count as 100 dB."""
    x, y = _frames(a), _frames(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x - y).pow(2).flatten(1).mean(1)
    per_frame = torch.where(mse > 0, 10 * torch.log10(255.0**2 / mse.clamp_min(1e-12)), torch.full_like(mse, 100.0))
    return float(per_frame.mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames and channels (uint8 data range 255)."""
    x, y = _frames(a), _frames(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11, got {x.shape[-2]}x{x.shape[-1]}")
    g = _gaussian_window()
    c = x.shape[1]
    wy = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)  # separable: along H, then along W
    wx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wy, groups=c), wx, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean(dim=(1, 2, 3)).mean())
