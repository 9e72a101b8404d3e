import torch

from emerdiff_fast.maps import (assign_labels, difference_map, gaussian_blur, mask_embeddings, masks_from_labels,
                                naive_upsample)


def test_argmax_on_hand_made_maps():
    maps = torch.zeros(3, 4, 4)
    maps[0, :2] = 1.0        # top half -> 0
    maps[1, 2:, :2] = 2.0    # bottom-left -> 1
    maps[2, 2:, 2:] = 3.0    # bottom-right -> 2
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2], [1, 1, 2, 2]])
    assert torch.equal(assign_labels(maps), expected)


def test_gaussian_blur_properties():
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1.0
    out = gaussian_blur(impulse, 2.0)
    assert abs(out.sum().item() - 1.0) < 1e-5          # mass preserved away from borders
    assert out[0, 10, 10] == out.max()                 # peak stays put
    assert torch.allclose(out[0], out[0].T, atol=1e-7)  # isotropic
    assert torch.allclose(out[0], out[0].flip(0), atol=1e-7)
    assert torch.equal(gaussian_blur(impulse, 0.0), impulse)
    const = torch.full((2, 7, 9), 3.0)
    assert torch.allclose(gaussian_blur(const, 5.0), const, atol=1e-5)  # reflect padding, radius > size


def test_blur_then_argmax_removes_isolated_pixel():
    maps = torch.zeros(2, 9, 9)
    maps[0] = 1.0
    maps[1, 4, 4] = 2.0  # one noisy pixel
    assert assign_labels(maps)[4, 4] == 1
    assert (assign_labels(gaussian_blur(maps, 1.5)) == 0).all()


def test_difference_map_is_rgb_l2():
    a, b = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    b[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])
    d = difference_map(a, b)
    assert d.shape == (1, 2, 2) and d[0, 0, 0] == 5.0 and d[0, 1, 1] == 0.0


def test_naive_upsample_hand_made_masks():
    low = torch.tensor([[0, 1], [2, 2]])
    up = naive_upsample(low, 3, (8, 8))
    assert up.shape == (8, 8)
    assert (up[:4, :4] == 0).all() and (up[:4, 4:] == 1).all() and (up[4:] == 2).all()
    uniform = naive_upsample(torch.full((2, 2), 1), 3, (6, 6))
    assert (uniform == 1).all()


def test_masks_and_embeddings():
    labels = torch.tensor([0, 2, 2, 0])
    masks = masks_from_labels(labels.view(2, 2), 3)
    assert torch.equal(masks, torch.tensor([[1., 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]))
    feats = torch.tensor([[1.0, 0], [0, 2], [0, 4], [3, 0]])
    emb = mask_embeddings(feats, labels, 3)
    assert torch.equal(emb, torch.tensor([[2.0, 0], [0, 0], [0, 3]]))
