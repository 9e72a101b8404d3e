import itertools

import numpy as np
import pytest

from emerdiff_fast.metrics import concept_miou, confusion, unsupervised_miou


def test_perfect_prediction_under_any_permutation():
    gt = np.random.default_rng(0).integers(0, 4, (2, 10, 10))
    for perm in ([3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 1, 0]):
        preds = np.array(perm)[gt]
        for matching in ("dataset", "image"):
            r = unsupervised_miou(preds, gt, 4, matching=matching)
            assert r.miou == pytest.approx(100) and r.pixel_accuracy == pytest.approx(100)


def test_known_confusion_matrix():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[5, 5, 5, 2]])  # ids need not be small or contiguous
    r = unsupervised_miou([pred], [gt], 2)
    assert r.assignment == {5: 0, 2: 1}
    assert r.per_class_iou == pytest.approx([200 / 3, 50])
    assert r.miou == pytest.approx((200 / 3 + 50) / 2) and r.pixel_accuracy == pytest.approx(75)


def test_ignore_index_pixels_do_not_count():
    gt = np.array([[0, 1, 255, 255]])
    pred = np.array([[0, 1, 1, 0]])
    r = unsupervised_miou([pred], [gt], 2)
    assert r.miou == pytest.approx(100) and r.pixel_accuracy == pytest.approx(100)


def test_more_segments_than_classes():
    gt = np.array([[0, 0, 0, 1, 1, 1]])
    pred = np.array([[0, 0, 2, 1, 1, 3]])  # segments 2 and 3 stay unmatched: wrong
    r = unsupervised_miou([pred], [gt], 2)
    assert r.pixel_accuracy == pytest.approx(100 * 4 / 6)
    assert r.per_class_iou == pytest.approx([200 / 3, 200 / 3])


def test_image_missing_classes():
    gts = [np.array([[0, 0, 1, 1]]), np.array([[2, 2, 2, 2]])]  # class 2 only in image 2, class 3 nowhere
    preds = [np.array([[1, 1, 0, 0]]), np.array([[3, 3, 3, 3]])]
    r = unsupervised_miou(preds, gts, 4)
    assert r.miou == pytest.approx(100)  # absent class 3 is NaN and left out of the mean
    assert np.isnan(r.per_class_iou[3])


def _brute_force(preds, gts, n):
    conf = sum(confusion(p, g, n, n) for p, g in zip(preds, gts))
    best = None
    for perm in itertools.permutations(range(n)):
        tp = np.array([conf[perm.index(c), c] for c in range(n)])
        iou = tp / (conf.sum(1)[[perm.index(c) for c in range(n)]] + conf.sum(0) - tp)
        if best is None or tp.sum() > best[0]:
            best = (tp.sum(), 100 * np.nanmean(iou))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_dataset_matching_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    gts = [rng.integers(0, 4, (6, 7)) for _ in range(3)]
    preds = [np.where(rng.random(g.shape) < 0.6, (g + 1) % 4, rng.integers(0, 4, g.shape)) for g in gts]
    r = unsupervised_miou(preds, gts, 4)
    tp_sum, miou = _brute_force(preds, gts, 4)
    assert r.pixel_accuracy == pytest.approx(100 * tp_sum / 42 / 3)
    assert r.miou == pytest.approx(miou)
    assert unsupervised_miou(preds, gts, 4, matching="image").pixel_accuracy >= r.pixel_accuracy - 1e-9


def test_image_matching_is_more_lenient():
    gts = [np.array([[0, 1]]), np.array([[0, 1]])]
    preds = [np.array([[0, 1]]), np.array([[1, 0]])]  # ids swap meaning between images
    assert unsupervised_miou(preds, gts, 2, matching="image").miou == pytest.approx(100)
    assert unsupervised_miou(preds, gts, 2, matching="dataset").pixel_accuracy == pytest.approx(50)


def test_concept_protocol():
    labels = np.array([[0, 0, 1, 2]])
    emb = np.array([[1.0, 0], [0.9, 0.1], [0, 1]])
    gt = np.array([[0, 0, 0, 1]])
    # concept 0 = mean of segments 0,0,1 -> close to [1, 0]; concept 1 = [0, 1]: all correct
    r = concept_miou([labels], [emb], [gt], 2)
    assert r.miou == pytest.approx(100)
    # a segment whose embedding is nearer the other class's concept is mislabelled
    emb_bad = np.array([[1.0, 0], [0, 1], [0, 1]])
    r = concept_miou([labels], [emb_bad], [gt], 2)
    assert r.pixel_accuracy == pytest.approx(75) and r.per_class_iou == pytest.approx([200 / 3, 50])


def test_concepts_per_dataset_differs_from_per_image():
    labels = [np.array([[0, 1]]), np.array([[0, 1]])]
    embs = [np.array([[1.0, 0], [0, 1]]), np.array([[0, 1.0], [1, 0]])]  # embeddings swap per image
    gts = [np.array([[0, 1]]), np.array([[0, 1]])]
    assert concept_miou(labels, embs, gts, 2, concepts="image").miou == pytest.approx(100)
    assert concept_miou(labels, embs, gts, 2, concepts="dataset").miou < 100


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in size"):
        unsupervised_miou([np.zeros((2, 2), int)], [np.zeros((3, 3), int)], 2)
    with pytest.raises(ValueError, match="outside"):
        unsupervised_miou([np.zeros((2, 2), int)], [np.full((2, 2), 7)], 2)
