"""Keypoint pairs, the training loss, nearest-neighbour matching and PCK (the authors'
archs/correspondence_utils.py and train_hyperfeatures.py, written anew). Keypoints are
(x, y) in the pixels of their original image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .aggregation import TEMPERATURE


@dataclass
class Pair:
    src: object                 # image path (or anything load_image takes)
    trg: object
    src_kps: np.ndarray         # (N, 2) x, y
    trg_kps: np.ndarray         # (N, 2) x, y, corresponding to src_kps row by row
    src_size: tuple[int, int]   # (W, H) of the original image
    trg_size: tuple[int, int]
    trg_bbox: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2
    category: str = ""
    name: str = ""


def pair_images(pairs: list[Pair]) -> list:
    """Every image of `pairs`, source then target, in pair order."""
    return [im for p in pairs for im in (p.src, p.trg)]


def grid_index(kps: np.ndarray, size: tuple[int, int], r: int) -> torch.Tensor:
    """(N, 2) x, y in an image of `size` (W, H) -> flat indices on an r x r grid (rounded, clipped)."""
    x = np.clip(np.round(kps[:, 0] * r / size[0]), 0, r - 1)
    y = np.clip(np.round(kps[:, 1] * r / size[1]), 0, r - 1)
    return torch.from_numpy((y * r + x).astype(np.int64))


def _flat_unit(h: torch.Tensor) -> torch.Tensor:
    """(1, P, R, R) -> (R*R, P) unit vectors."""
    return F.normalize(h[0].flatten(1).T, dim=1)


def pair_loss(h_src: torch.Tensor, h_trg: torch.Tensor, pair: Pair) -> torch.Tensor:
    """Symmetric cross-entropy over cosine similarities / 0.07: each source keypoint's
    descriptor against every target position (the right one is its keypoint), and back."""
    r = h_src.shape[-1]
    s, t = _flat_unit(h_src), _flat_unit(h_trg)
    si = grid_index(pair.src_kps, pair.src_size, r).to(s.device)
    ti = grid_index(pair.trg_kps, pair.trg_size, r).to(s.device)
    loss_st = F.cross_entropy(s[si] @ t.T / TEMPERATURE, ti)
    loss_ts = F.cross_entropy(t[ti] @ s.T / TEMPERATURE, si)
    return (loss_st + loss_ts) / 2


def match(h_src: torch.Tensor, h_trg: torch.Tensor, src_kps: np.ndarray, src_size, trg_size,
          load_resolution: int) -> np.ndarray:
    """Nearest neighbour of each source keypoint in the target, as the authors: both maps
    upsampled (bilinear) to load_resolution, cosine similarity, argmax; returned as (N, 2)
    x, y in the target's original pixels."""
    L = load_resolution
    hs = F.interpolate(h_src.float(), size=L, mode="bilinear")
    ht = F.interpolate(h_trg.float(), size=L, mode="bilinear")
    si = grid_index(src_kps, src_size, L).to(hs.device)
    best = (_flat_unit(hs)[si] @ _flat_unit(ht).T).argmax(1).cpu().numpy()
    xy = np.stack([best % L, best // L], 1).astype(np.float64)
    return xy * np.array([trg_size[0] / L, trg_size[1] / L])


def pck(pred: np.ndarray, target: np.ndarray, trg_size, bbox=None, alpha: float = 0.1) -> np.ndarray:
    """Per keypoint: correct when within alpha * max(W, H) of the image, or with `bbox`
    (x1, y1, x2, y2) of the object's box."""
    ref = max(bbox[2] - bbox[0], bbox[3] - bbox[1]) if bbox is not None else max(trg_size)
    return np.linalg.norm(pred - target, axis=1) <= alpha * ref
