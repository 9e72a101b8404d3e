"""From masks and decoded images to label maps (SPEC 1.7-1.9) and the naive baseline."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def difference_map(img_minus: torch.Tensor, img_plus: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) x2 -> per-pixel RGB L2 distance (B, H, W), in float32."""
    return (img_minus.float() - img_plus.float()).pow(2).sum(1).sqrt()


def _gaussian_1d(sigma: float, size: int, device, dtype) -> torch.Tensor:
    """Normalised weights of radius ceil(3 sigma), cut to what reflect padding of a side of
    `size` allows (and renormalised, so constants stay constant)."""
    radius = min(max(1, math.ceil(3 * sigma)), size - 1)
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    w = torch.exp(-0.5 * (xs / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian over the last two dims of (K, H, W), reflect padding; sigma in px."""
    if sigma <= 0:
        return maps
    x = maps[:, None]
    wh = _gaussian_1d(sigma, x.shape[-2], maps.device, maps.dtype)
    ww = _gaussian_1d(sigma, x.shape[-1], maps.device, maps.dtype)
    ph, pw = wh.numel() // 2, ww.numel() // 2
    x = F.conv2d(F.pad(x, (0, 0, ph, ph), mode="reflect"), wh.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (pw, pw, 0, 0), mode="reflect"), ww.view(1, 1, 1, -1))
    return x[:, 0]


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
