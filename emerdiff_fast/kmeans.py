"""Batched k-means (SPEC 1.4): k-means++ initialisation, Lloyd iterations, several restarts,
lowest inertia kept. One implementation serves both paths; the fast path passes the Triton
assignment/update ops, the reference path their plain-PyTorch twins.

Choosing the restart and numbering the clusters must not depend on rounding: the fast path's
Triton steps and the reference's PyTorch steps round differently, so the restarts' inertias
are recomputed from differences (exact_inertia), restarts within INERTIA_RTOL of the lowest
count as tied and the lowest restart index wins, and the winner's clusters are numbered by
their first point in raster order, whatever order its centroids were drawn in.

Empty clusters (choice): re-seeded with the points farthest from their centroids, one per
empty cluster, without a host round-trip. A cluster can only stay empty when there are
fewer distinct feature vectors than K; its mask is then all zero and never wins a pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from emerdiff_fast import kernels

INERTIA_RTOL = 1e-5  # well above float32 noise in a sum over N distances, well below real gaps


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
    # convergence is a host read: on a GPU every 10 iterations (a sync each); on the CPU
    # there is no device to wait for, so every iteration (the same result, fewer iterations)
    res = lloyd(x, init, max_iter, assign, update, check_every=1 if x.device.type == "cpu" else 10)
    inertia = exact_inertia(x, res.labels, res.centroids)
    best = best_restart(inertia.view(b, restarts)) + torch.arange(b, device=x.device) * restarts
    labels, centroids = canonical_order(res.labels[best], res.centroids[best])
    return KMeansResult(labels, centroids, inertia[best])


def exact_inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """sum |x - c|^2 per problem, from the differences: the steps' |x|^2 - 2 x.c + |c|^2 loses
    digits to cancellation (error ~ eps |x|^2 per point), so restarts that found one partition
    would differ by far more than INERTIA_RTOL and each backend would pick its own. One restart
    at a time: a (B, N, D) difference, never (B*R, N, D)."""
    b, n, d = x.shape
    r = labels.shape[0] // b
    labels, centroids = labels.view(b, r, n), centroids.view(b, r, -1, d)
    return torch.stack([(x - centroids[:, i].gather(1, labels[:, i, :, None].expand(-1, -1, d))).square().sum((1, 2))
                        for i in range(r)], 1).view(b * r)


def best_restart(inertia: torch.Tensor, rtol: float = INERTIA_RTOL) -> torch.Tensor:
    """inertia (B, R) -> (B,) the lowest restart index whose inertia is within rtol of the
    lowest (argmax returns the first of equal maxima), without a host round-trip."""
    near = inertia <= inertia.min(1, keepdim=True).values * (1 + rtol)
    return near.to(torch.int32).argmax(1)


def canonical_order(labels: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, N), centroids (B, K, D) -> the same clusters renumbered by their first point
    in raster order (empty clusters last, in their old order)."""
    b, n = labels.shape
    k = centroids.shape[1]
    first = torch.full((b, k), n, dtype=torch.int64, device=labels.device).scatter_reduce(
        1, labels, torch.arange(n, device=labels.device).expand(b, n), "amin")
    order = first.argsort(dim=1, stable=True)  # new id -> old id
    rank = order.argsort(1)                # old id -> new id
    return rank.gather(1, labels), centroids.gather(1, order[..., None].expand(-1, -1, centroids.shape[2]))
