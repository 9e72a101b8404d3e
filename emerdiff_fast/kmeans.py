"""Batched k-means (SPEC 1.4): k-means++ initialisation, Lloyd iterations, several restarts,
lowest inertia kept. One implementation serves both paths; the fast path passes the Triton
assignment/update ops, the reference path their plain-PyTorch twins.

Empty clusters (choice): re-seeded with the points farthest from their centroids, one per
empty cluster, without a host round-trip. A cluster can only stay empty when there are
fewer distinct feature vectors than K; its mask is then all zero and never wins a pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from emerdiff_fast import kernels


@dataclass
class KMeansResult:
    labels: torch.Tensor     # (B, N) int64
    centroids: torch.Tensor  # (B, K, D) float32
    inertia: torch.Tensor    # (B,)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), c (B, R, D) -> (B*R, N) squared distances |x|^2 - 2 x.c + |c|^2, without
    an (R, N, D) difference tensor (the restarts share x)."""
    b, r = c.shape[:2]
    d2 = (x * x).sum(-1)[:, :, None] - 2 * torch.bmm(x, c.transpose(1, 2)) + (c * c).sum(-1)[:, None, :]
    return d2.clamp_min(0).permute(0, 2, 1).reshape(b * r, -1)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, restarts: int = 1) -> torch.Tensor:
    """x (B, N, D) -> (B*restarts, K, D) initial centroids by D^2 sampling, batched; problem
    p draws from image p // restarts."""
    b, n, d = x.shape
    img = torch.arange(b * restarts, device=x.device) // restarts
    first = torch.randint(n, (b * restarts,), generator=generator, device=x.device)
    centroids = [x[img, first]]
    d2 = _sq_dist(x, centroids[0].view(b, restarts, d))
    for _ in range(1, k):
        # all-zero weights (every point already a centre) fall back to uniform sampling
        weights = d2 + (d2.sum(1, keepdim=True) <= 0).to(d2.dtype)
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        centroids.append(x[img, pick])
        d2 = torch.minimum(d2, _sq_dist(x, centroids[-1].view(b, restarts, d)))
    return torch.stack(centroids, 1)


def lloyd(x: torch.Tensor, centroids: torch.Tensor, max_iter: int, assign: Callable, update: Callable,
          check_every: int = 10) -> KMeansResult:
    """Lloyd iterations on x (B, N, D) from centroids (B*R, K, D) (problem p on image p // R)
    until the assignment stops changing (checked every `check_every` iterations, the only
    host synchronisation) or `max_iter`. Once assignments repeat, the centroids are a fixed
    point, so checking less often cannot change the result."""
    k = centroids.shape[1]
    img = torch.arange(centroids.shape[0], device=x.device) // (centroids.shape[0] // x.shape[0])
    labels, dist = assign(x, centroids)
    for it in range(max_iter):
        sums, counts = update(x, labels, k)
        means = sums / counts.clamp_min(1)[..., None]
        empty = counts == 0
        rank = (empty.cumsum(1) - 1).clamp_min(0)                # j-th empty cluster ...
        far = dist.argsort(dim=1, descending=True)               # ... gets the j-th farthest point
        reseed = x[img[:, None], torch.gather(far, 1, rank)]
        centroids = torch.where(empty[..., None], reseed, means)
        new_labels, dist = assign(x, centroids)
        if (it + 1) % check_every == 0 or it + 1 == max_iter:
            if torch.equal(new_labels, labels):
                labels = new_labels
                break
        labels = new_labels
    return KMeansResult(labels, centroids, dist.sum(1))


def kmeans(features: torch.Tensor, k: int, *, restarts: int = 10, max_iter: int = 100, seed: int = 0,
           use_triton: bool = False) -> KMeansResult:
    """features (B, N, D) -> best of `restarts` runs per problem. Seeded per image; the
    generator lives on the features' device, so one device gives one answer. The restarts
    share the features (never copied per restart: kernels/kmeans_step.py)."""
    b, n, d = features.shape
    if k > n:
        raise ValueError(f"cannot form {k} clusters from {n} feature vectors")
    x = features.float()
    # one generator per image, so an image's clusters do not depend on its batch-mates
    init = torch.cat([kmeans_plusplus(x[i:i + 1], k, torch.Generator(device=x.device).manual_seed(seed), restarts)
                      for i in range(b)])
    assign, update = ((kernels.kmeans_assign, kernels.kmeans_update) if use_triton
                      else (kernels.kmeans_assign_torch, kernels.kmeans_update_torch))
    res = lloyd(x, init, max_iter, assign, update)
    best = res.inertia.view(b, restarts).argmin(1) + torch.arange(b, device=x.device) * restarts
    return KMeansResult(res.labels[best], res.centroids[best], res.inertia[best])
