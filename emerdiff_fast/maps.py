"""From masks and decoded images to label maps (SPEC 1.7-1.9) and the naive baseline."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# The authors blur both decoded images with torchvision's gaussian_blur(kernel_size=3),
# whose default sigma for a 3-tap kernel is 0.3 * ((3 - 1) * 0.5 - 1) + 0.8 = 0.8, with
# reflect padding (SPEC 1.7).
IMAGE_BLUR_SIGMA = 0.8
IMAGE_BLUR_RADIUS = 1


def difference_map(img_minus: torch.Tensor, img_plus: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) x2 -> d = || blur(I-) - blur(I+) ||_2 over RGB, (B, H, W) float32.
    The blur is linear, so it is applied once, to the per-channel difference."""
    diff = img_minus.float() - img_plus.float()
    return gaussian_blur(diff, IMAGE_BLUR_SIGMA, IMAGE_BLUR_RADIUS).pow(2).sum(1).sqrt()


def _gaussian_1d(sigma: float, radius: int, size: int, device, dtype) -> torch.Tensor:
    """Normalised weights exp(-x^2 / 2 sigma^2), x = -radius..radius, the radius cut to what
    reflect padding of a side of `size` allows (renormalised, so constants stay constant)."""
    radius = min(radius, size - 1)
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (xs / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian over the last two dims of (..., H, W), reflect padding (torch's,
    which does not repeat the edge pixel: torchvision's and scipy.ndimage's 'mirror').
    sigma in px; radius defaults to ceil(3 sigma); sigma <= 0 returns the input."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    h, w = maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    wh = _gaussian_1d(sigma, radius, h, maps.device, maps.dtype)
    ww = _gaussian_1d(sigma, radius, w, maps.device, maps.dtype)
    ph, pw = wh.numel() // 2, ww.numel() // 2
    x = F.conv2d(F.pad(x, (0, 0, ph, ph), mode="reflect"), wh.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (pw, pw, 0, 0), mode="reflect"), ww.view(1, 1, 1, -1))
    return x.reshape(maps.shape)


def assign_labels(maps: torch.Tensor) -> torch.Tensor:
    """label(x, y) = argmax_i maps[i, x, y]."""
    return maps.argmax(0)


def masks_from_labels(low_res_labels: torch.Tensor, k: int) -> torch.Tensor:
    """(h, w) cluster ids -> (K, h*w) binary float masks M_i."""
    return F.one_hot(low_res_labels.flatten(), k).T.float()


def naive_upsample(low_res_labels: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
    """The paper's "SD" row: bilinear upsampling of the K mask indicators, then argmax."""
    ind = F.one_hot(low_res_labels, k).permute(2, 0, 1).float()[None]
    return F.interpolate(ind, size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def mask_embeddings(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C) features, (N,) labels -> (K, C) means; an empty cluster's embedding is zero."""
    onehot = F.one_hot(labels, k).float()
    return (onehot.T @ features.float()) / onehot.sum(0).clamp_min(1)[:, None]
