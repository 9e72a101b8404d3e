import numpy as np
import pytest
import torch
from scipy import ndimage

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
    a, b = torch.zeros(1, 3, 4, 5), torch.zeros(1, 3, 4, 5)
    b[0] = torch.tensor([3.0, 4.0, 0.0])[:, None, None]  # constant images: the blur keeps them
    d = difference_map(a, b)
    assert d.shape == (1, 4, 5) and torch.allclose(d, torch.full((1, 4, 5), 5.0))


def _scipy_blur(x: np.ndarray) -> np.ndarray:
    """3x3 Gaussian, sigma 0.8, per channel; torch's 'reflect' padding is scipy's 'mirror'."""
    sigma = (0,) * (x.ndim - 2) + (0.8, 0.8)
    return ndimage.gaussian_filter(x, sigma=sigma, mode="mirror", truncate=1.25)  # radius int(1.25 * 0.8 + .5) = 1


@pytest.mark.parametrize("shape", [(2, 3, 17, 23), (1, 3, 5, 4), (3, 2, 64, 9)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_image_blur_matches_scipy(shape, dtype, tol):
    from emerdiff_fast.maps import IMAGE_BLUR_RADIUS, IMAGE_BLUR_SIGMA

    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64).to(dtype)
    got = gaussian_blur(x, IMAGE_BLUR_SIGMA, IMAGE_BLUR_RADIUS)
    assert np.abs(got.double().numpy() - _scipy_blur(x.double().numpy())).max() < tol


def test_difference_map_blurs_the_images_then_takes_the_rgb_norm():
    g = torch.Generator().manual_seed(1)
    minus, plus = torch.rand(2, 3, 19, 21, generator=g), torch.rand(2, 3, 19, 21, generator=g)
    expected = np.linalg.norm(_scipy_blur(minus.double().numpy()) - _scipy_blur(plus.double().numpy()), axis=1)
    assert np.abs(difference_map(minus, plus).numpy() - expected).max() < 1e-6


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
