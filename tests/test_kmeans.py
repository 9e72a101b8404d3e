import pytest
import torch

from emerdiff_fast.kmeans import kmeans, kmeans_plusplus, lloyd
from emerdiff_fast import kernels


def _blobs(b=2, per=20, k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, d, generator=g) * 10
    x = centres.repeat_interleave(per, 1) + 0.1 * torch.randn(b, k * per, d, generator=g)
    return x, torch.arange(k).repeat_interleave(per)


@pytest.mark.parametrize("use_triton", [False, True])
def test_recovers_separated_blobs(use_triton):
    x, truth = _blobs()
    res = kmeans(x, 4, restarts=4, seed=0, use_triton=use_triton)
    for b in range(2):
        # same partition up to renaming: each true blob maps to exactly one cluster
        pairs = {(int(t), int(p)) for t, p in zip(truth, res.labels[b])}
        assert len(pairs) == 4
    assert res.centroids.shape == (2, 4, 8) and (res.inertia < 0.02 * 80 * 8 * 2).all()


def test_seeded_and_triton_agrees_with_torch():
    x = torch.randn(3, 64, 20, generator=torch.Generator().manual_seed(1))
    a = kmeans(x, 6, restarts=3, seed=7)
    b = kmeans(x, 6, restarts=3, seed=7)
    c = kmeans(x, 6, restarts=3, seed=7, use_triton=True)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.labels, c.labels)
    assert torch.allclose(a.centroids, c.centroids, atol=1e-5)


def test_restarts_keep_lowest_inertia():
    x = torch.randn(1, 50, 5, generator=torch.Generator().manual_seed(2))
    best = kmeans(x, 5, restarts=8, seed=0)
    singles = [kmeans(x, 5, restarts=1, seed=s).inertia.item() for s in range(3)]
    assert best.inertia.item() <= min(singles) + 1e-4


def test_empty_cluster_is_reseeded():
    x = torch.tensor([[[0.0], [0.1], [10.0], [10.1], [20.0]]])
    init = torch.tensor([[[0.05], [10.05], [100.0]]])  # third centre attracts nobody
    res = lloyd(x, init, 20, kernels.kmeans_assign_torch, kernels.kmeans_update_torch)
    assert sorted(set(res.labels[0].tolist())) == [0, 1, 2]


def test_duplicate_points_do_not_crash():
    x = torch.zeros(1, 10, 3)
    res = kmeans(x, 4, restarts=2)
    assert res.labels.shape == (1, 10) and torch.isfinite(res.centroids).all()


def test_plusplus_picks_distinct_points():
    x, _ = _blobs(b=1)
    c = kmeans_plusplus(x, 4, torch.Generator().manual_seed(0))
    assert torch.cdist(c[0], c[0]).add(torch.eye(4) * 1e3).min() > 5  # one per blob


def test_too_many_clusters():
    with pytest.raises(ValueError, match="cannot form 9 clusters from 8"):
        kmeans(torch.randn(1, 8, 2), 9)


def test_batch_members_do_not_influence_each_other():
    x = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(4))
    together = kmeans(x, 5, restarts=3, seed=1)
    for i in range(3):
        alone = kmeans(x[i:i + 1], 5, restarts=3, seed=1)
        assert torch.equal(together.labels[i], alone.labels[0])


def _rounding_twin(monkeypatch, eps: float = 2e-7):
    """Make the 'Triton' assignment the PyTorch one with its distances off by float32 rounding
    of |x|^2 - 2 x.c + |c|^2 (~eps |x|^2): a stand-in for another implementation's rounding
    (the interpreted kernels round too much like PyTorch to show it)."""
    def assign(x, centroids):
        labels, dist = kernels.kmeans_assign_torch(x, centroids)
        g = torch.Generator().manual_seed(int(centroids.shape[0]))
        scale = x.square().sum(-1).repeat_interleave(centroids.shape[0] // x.shape[0], 0)
        return labels, dist + eps * scale * torch.randn(dist.shape, generator=g)
    monkeypatch.setattr(kernels, "kmeans_assign", assign)
    monkeypatch.setattr(kernels, "kmeans_update", kernels.kmeans_update_torch)


def test_rounding_noise_picks_the_same_restart_and_the_same_ids(monkeypatch):
    """Restarts that converge to one partition have inertias equal up to rounding; the two
    backends' rounding must not pick different restarts (and so different label ids)."""
    x, _ = _blobs(b=3, per=15, k=5, d=6, seed=3)
    plain = kmeans(x, 5, restarts=10, seed=2)
    _rounding_twin(monkeypatch)
    twin = kmeans(x, 5, restarts=10, seed=2, use_triton=True)
    assert torch.equal(plain.labels, twin.labels)


def test_near_tied_restarts_go_to_the_lowest_index():
    from emerdiff_fast.kmeans import best_restart

    # the issue's inertias: PyTorch's two best restarts, then the Triton kernels'
    inertia = torch.tensor([[1581.16895, 1581.16907, 1600.0], [1581.16919, 1581.16882, 1600.0],
                            [1600.0, 1500.0, 1500.001], [1500.0, 1400.0, 1300.0]])
    assert best_restart(inertia).tolist() == [0, 0, 1, 2]


def test_ids_are_numbered_by_first_point_in_raster_order():
    from emerdiff_fast.kmeans import canonical_order

    labels = torch.tensor([[2, 2, 0, 3, 0, 2], [1, 1, 1, 1, 0, 0]])
    centroids = torch.arange(8.0).view(2, 4, 1)
    new, c = canonical_order(labels, centroids)
    assert new.tolist() == [[0, 0, 1, 2, 1, 0], [0, 0, 0, 0, 1, 1]]
    # the centroids follow their clusters; empty clusters (1 of image 0; 2, 3 of image 1) go last
    assert c[..., 0].tolist() == [[2, 0, 3, 1], [5, 4, 6, 7]]
    x = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(5))
    res = kmeans(x, 4, restarts=3)
    for row in res.labels:
        firsts = [int((row == k).nonzero()[0]) for k in range(4)]
        assert firsts == sorted(firsts) and firsts[0] == 0


def test_checking_convergence_every_iteration_changes_nothing():
    """The CPU checks convergence every iteration (no device to sync), a GPU every 10: once
    the assignment repeats the centroids are a fixed point, so both give the same result."""
    g = torch.Generator().manual_seed(11)
    for trial in range(6):
        x = torch.randn(2, 40 + 7 * trial, 5, generator=g)
        init = torch.cat([kmeans_plusplus(x[i:i + 1], 6, torch.Generator().manual_seed(trial), 4) for i in range(2)])
        every = lloyd(x, init, 100, kernels.kmeans_assign_torch, kernels.kmeans_update_torch, check_every=1)
        tenth = lloyd(x, init, 100, kernels.kmeans_assign_torch, kernels.kmeans_update_torch, check_every=10)
        assert torch.equal(every.labels, tenth.labels) and torch.equal(every.centroids, tenth.centroids)
