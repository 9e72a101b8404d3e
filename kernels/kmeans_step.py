"""Batched k-means steps: fused distance + argmin (assignment) and centroid sums (update),
over a batch of independent problems (images x restarts). Both are deterministic: no
atomics, each output element is reduced by one program in a fixed order.

The R restarts of an image share its points: x is (B, N, D) and the centroids (B*R, K, D),
problem p reading image p // R, so the points are never copied per restart (10 copies of a
COCO-scale dataset pass would be ~7 GB). Offsets are int64: B*R*N*D passes 2^31 there."""
import torch

from ._dispatch import HAVE_TRITON, LAUNCHES, launch_guard, triton_enabled

# rows of x per chunk in the PyTorch fallback's distance matrix (chunk x R*K floats)
TORCH_CHUNK = 16384

# launch configs (kernels/aot.py compiles the same); the assign tiles are the largest that
# compile without register spills on sm_80 (32 x 32 x 64 spilled 56 B per thread)
ASSIGN_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 16, "BLOCK_D": 32}
UPDATE_BLOCKS = {"BLOCK_N": 32, "BLOCK_D": 128}

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _assign_kernel(x_ptr, c_ptr, labels_ptr, dist_ptr, N, K, D, R,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # problem: image b // R, restart b % R
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < N
        x_base = x_ptr + (b // R) * N * D
        c_base = c_ptr + b * K * D
        x_norm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            md = (d0 + offs_d) < D
            xt = tl.load(x_base + offs_n[:, None] * D + d0 + offs_d[None, :], mask=mask_n[:, None] & md[None, :], other=0.0)
            x_norm += tl.sum(xt * xt, axis=1)
        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            c_norm = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                md = (d0 + offs_d) < D
                xt = tl.load(x_base + offs_n[:, None] * D + d0 + offs_d[None, :], mask=mask_n[:, None] & md[None, :], other=0.0)
                ct = tl.load(c_base + offs_k[:, None] * D + d0 + offs_d[None, :], mask=mask_k[:, None] & md[None, :], other=0.0)
                acc += tl.dot(xt, tl.trans(ct), input_precision="ieee")
                c_norm += tl.sum(ct * ct, axis=1)
            dist = x_norm[:, None] - 2.0 * acc + c_norm[None, :]
            dist = tl.where(mask_k[None, :], dist, float("inf"))
            blk_min = tl.min(dist, axis=1)
            blk_arg = tl.argmin(dist, axis=1).to(tl.int32) + k0
            better = blk_min < best  # strict: ties keep the lower index, like torch.argmin
            best = tl.where(better, blk_min, best)
            best_idx = tl.where(better, blk_arg, best_idx)
        tl.store(labels_ptr + b * N + offs_n, best_idx.to(tl.int64), mask=mask_n)
        tl.store(dist_ptr + b * N + offs_n, tl.maximum(best, 0.0), mask=mask_n)

    @triton.jit
    def _update_kernel(x_ptr, labels_ptr, sums_ptr, counts_ptr, N, K, D, R,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            lab = tl.load(labels_ptr + b * N + offs_n, mask=mask_n, other=-1)
            sel = (lab == k) & mask_n
            xt = tl.load(x_ptr + (b // R) * N * D + offs_n[:, None] * D + offs_d[None, :],
                         mask=sel[:, None] & mask_d[None, :], other=0.0)
            acc += tl.sum(xt, axis=0)
            cnt += sel.to(tl.float32)
        tl.store(sums_ptr + (b * K + k) * D + offs_d, acc, mask=mask_d)
        tl.store(counts_ptr + b * K + k, tl.sum(cnt, axis=0), mask=tl.program_id(2) == 0)


def _restarts(x: torch.Tensor, problems: int) -> int:
    if problems % x.shape[0]:
        raise ValueError(f"k-means: {problems} problems do not divide over {x.shape[0]} images")
    return problems // x.shape[0]


def kmeans_assign_torch(x: torch.Tensor, centroids: torch.Tensor):
    """|x|^2 - 2 x.c + |c|^2 against every restart's centroids at once, in row chunks: a
    (chunk, R*K) distance block at a time, x never repeated."""
    b, n, d = x.shape
    r = _restarts(x, centroids.shape[0])
    k = centroids.shape[1]
    c = centroids.view(b, r * k, d)
    cc = (c * c).sum(-1)[:, None, :]
    labels, mind = [], []
    for s in range(0, n, TORCH_CHUNK):
        xs = x[:, s:s + TORCH_CHUNK]
        dist = (xs * xs).sum(-1, keepdim=True) - 2 * torch.bmm(xs, c.transpose(1, 2)) + cc
        m, lab = dist.view(b, xs.shape[1], r, k).min(dim=-1)  # (B, chunk, R)
        labels.append(lab)
        mind.append(m)
    labels, mind = torch.cat(labels, 1), torch.cat(mind, 1)
    return labels.permute(0, 2, 1).reshape(b * r, n), mind.permute(0, 2, 1).reshape(b * r, n).clamp_min(0)


def kmeans_update_torch(x: torch.Tensor, labels: torch.Tensor, k: int):
    """Per-cluster sums of every restart's assignment: one-hot (B, R*K, N) @ x (B, N, D)."""
    b, n, d = x.shape
    r = _restarts(x, labels.shape[0])
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # (B*R, N, K)
    per_image = onehot.view(b, r, n, k).permute(0, 1, 3, 2).reshape(b, r * k, n)
    return torch.bmm(per_image, x).view(b * r, k, d), onehot.sum(1)


@torch.library.custom_op("emerdiff::kmeans_assign", mutates_args=())
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, D), centroids (B*R, K, D), float32 -> (labels (B*R, N) int64, squared
    distance (B*R, N)); problem p is image p // R."""
    if not triton_enabled(x):
        return kmeans_assign_torch(x, centroids)
    x, centroids = x.contiguous(), centroids.contiguous()
    b, n, d = x.shape
    r = _restarts(x, centroids.shape[0])
    k = centroids.shape[1]
    labels = torch.empty((b * r, n), dtype=torch.int64, device=x.device)
    dist = torch.empty((b * r, n), dtype=torch.float32, device=x.device)
    with launch_guard(x):
        _assign_kernel[(b * r, triton.cdiv(n, ASSIGN_BLOCKS["BLOCK_N"]))](x, centroids, labels, dist, n, k, d, r,
                                                                         **ASSIGN_BLOCKS)
    LAUNCHES["kmeans_assign"] += 1
    return labels, dist


@kmeans_assign.register_fake
def _(x, centroids):
    shape = (centroids.shape[0], x.shape[1])
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape)


@torch.library.custom_op("emerdiff::kmeans_update", mutates_args=())
def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, D) float32, labels (B*R, N) -> (per-cluster sums (B*R, K, D), counts (B*R, K))."""
    if not triton_enabled(x):
        return kmeans_update_torch(x, labels, k)
    x, labels = x.contiguous(), labels.contiguous()
    b, n, d = x.shape
    r = _restarts(x, labels.shape[0])
    sums = torch.empty((b * r, k, d), dtype=torch.float32, device=x.device)
    counts = torch.empty((b * r, k), dtype=torch.float32, device=x.device)
    with launch_guard(x):
        _update_kernel[(b * r, k, triton.cdiv(d, UPDATE_BLOCKS["BLOCK_D"]))](x, labels, sums, counts, n, k, d, r,
                                                                            **UPDATE_BLOCKS)
    LAUNCHES["kmeans_update"] += 1
    return sums, counts


@kmeans_update.register_fake
def _(x, labels, k):
    return x.new_empty((labels.shape[0], k, x.shape[2])), x.new_empty((labels.shape[0], k))
