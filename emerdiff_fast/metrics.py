"""Unsupervised-segmentation metrics (SPEC section 4).

* `unsupervised_miou`: predicted segment ids carry no class, so they are matched to
  ground-truth classes by Hungarian assignment (scipy's linear_sum_assignment, maximising
  overlap). matching="dataset" (STEGO/PiCIE) makes one assignment on the confusion matrix
  summed over all images, which only means something when an id means the same thing in
  every image: `cluster_masks` gives EmerDiff's per-image masks such dataset-wide ids.
  matching="image" (DiffSeg) matches every image separately, which is more lenient: a
  segment id may mean a different class in every image.
* `concept_miou`: the paper's modified protocol. Every pixel carries its mask's embedding;
  the ground-truth pixels of each class are averaged into a concept embedding; each pixel is
  labelled with its most cosine-similar concept. Concepts per image or per dataset (two
  passes: `add` every image, then `update` every image).

Both accumulate statistics image by image (`update`) so a dataset never sits in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class MetricResult:
    miou: float                 # percent, mean over classes present in ground truth or prediction
    pixel_accuracy: float       # percent of valid (non-ignored) pixels
    per_class_iou: np.ndarray   # (num_classes,) percent; NaN for classes absent from both
    assignment: dict            # predicted id -> class (dataset matching); {} otherwise

    def to_dict(self) -> dict:
        return {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy,
                "per_class_iou": [None if np.isnan(v) else float(v) for v in self.per_class_iou],
                "assignment": {int(k): int(v) for k, v in self.assignment.items()}}


def confusion(pred: np.ndarray, gt: np.ndarray, num_pred: int, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_pred, num_classes) pixel counts; ignore_index pixels skipped."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in size: {pred.size} vs {gt.size}")
    valid = gt != ignore_index
    pred, gt = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth label {gt.max()} outside [0, {num_classes}) and not ignore_index")
    if pred.size and (pred.min() < 0 or pred.max() >= num_pred):
        raise ValueError(f"predicted id outside [0, {num_pred})")
    return np.bincount(pred * num_classes + gt, minlength=num_pred * num_classes).reshape(num_pred, num_classes)


def hungarian(conf: np.ndarray) -> dict:
    """Predicted id -> class maximising the matched pixels; extra ids stay unmatched."""
    rows, cols = linear_sum_assignment(conf, maximize=True)
    return dict(zip(rows.tolist(), cols.tolist()))


def _class_scores(tp: np.ndarray, pred_count: np.ndarray, gt_count: np.ndarray) -> MetricResult:
    union = pred_count + gt_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100
    total = gt_count.sum()
    return MetricResult(miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                        pixel_accuracy=float(100 * tp.sum() / total) if total else float("nan"),
                        per_class_iou=iou, assignment={})


def _matched_counts(conf: np.ndarray, mapping: dict, num_classes: int):
    """Per class: true positives and predicted pixels under a segment -> class mapping;
    pixels of unmatched segments are predicted as no class (they only count as misses)."""
    tp = np.zeros(num_classes, np.int64)
    pred_count = np.zeros(num_classes, np.int64)
    for p, c in mapping.items():
        tp[c] += conf[p, c]
        pred_count[c] += conf[p].sum()
    return tp, pred_count


class UnsupervisedMIoU:
    """Accumulates images; `compute()` matches and scores."""

    def __init__(self, num_classes: int, ignore_index: int = 255, matching: str = "dataset"):
        if matching not in ("dataset", "image"):
            raise ValueError(f"matching must be 'dataset' or 'image', got {matching!r}")
        self.num_classes, self.ignore_index, self.matching = num_classes, ignore_index, matching
        self.conf = np.zeros((0, num_classes), np.int64)  # grows with the largest predicted id
        self.tp = np.zeros(num_classes, np.int64)
        self.pred_count = np.zeros(num_classes, np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        num_pred = max(int(np.max(pred, initial=0)) + 1, self.num_classes)
        conf = confusion(pred, gt, num_pred, self.num_classes, self.ignore_index)
        if self.matching == "image":
            tp, pc = _matched_counts(conf, hungarian(conf), self.num_classes)
            self.tp += tp
            self.pred_count += pc
        if conf.shape[0] > self.conf.shape[0]:
            self.conf = np.pad(self.conf, ((0, conf.shape[0] - self.conf.shape[0]), (0, 0)))
        self.conf[: conf.shape[0]] += conf

    def compute(self) -> MetricResult:
        gt_count = self.conf.sum(0)
        if self.matching == "image":
            return _class_scores(self.tp, self.pred_count, gt_count)
        mapping = hungarian(self.conf)
        res = _class_scores(*_matched_counts(self.conf, mapping, self.num_classes), gt_count)
        res.assignment = mapping
        return res


class ClassMIoU:
    """Named predictions (class ids, no matching) against the ground truth, over a data set:
    one confusion matrix. A predicted id outside [0, num_classes) (a fallback name that is no
    class of the data set, or a segment no class voted for, -1) counts as a miss."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.conf = np.zeros((num_classes + 1, num_classes), np.int64)  # last row: no class

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        c = self.num_classes
        pred = np.asarray(pred).astype(np.int64)
        pred = np.where((pred < 0) | (pred >= c), c, pred)
        self.conf += confusion(pred, gt, c + 1, c, self.ignore_index)

    def compute(self) -> MetricResult:
        c = self.num_classes
        return _class_scores(np.diag(self.conf[:c]).copy(), self.conf[:c].sum(1), self.conf.sum(0))


def unsupervised_miou(preds, gts, num_classes: int, ignore_index: int = 255, matching: str = "dataset") -> MetricResult:
    """mIoU and pixel accuracy of unlabelled segmentations after Hungarian matching."""
    metric = UnsupervisedMIoU(num_classes, ignore_index, matching)
    for p, g in zip(preds, gts, strict=True):
        metric.update(p, g)
    return metric.compute()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _concepts(class_sums: np.ndarray, class_pixels: np.ndarray):
    """Classes with pixels, and their unit-norm mean embeddings."""
    present = np.flatnonzero(class_pixels > 0)
    return present, _normalise(class_sums[present] / class_pixels[present, None])


@dataclass
class ConceptMIoU:
    """The paper's modified protocol. Each image is given as (segment labels (H, W), segment
    embeddings (K, C), ground truth (H, W)): a pixel's embedding is its segment's, so all
    sums over pixels reduce to sums over segments weighted by the segment/class overlap.

    concepts="image": `update` each image once. concepts="dataset": two passes, so no image
    is kept in memory: `add` every image (sums the concept embeddings), then `update` every
    image (labels it with the dataset's concepts)."""

    num_classes: int
    ignore_index: int = 255
    concepts: str = "image"      # "image": concepts from each image; "dataset": one set for all
    _conf: np.ndarray = field(init=False, repr=False)
    _sums: np.ndarray | None = field(default=None, init=False, repr=False)
    _pixels: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.concepts not in ("image", "dataset"):
            raise ValueError(f"concepts must be 'image' or 'dataset', got {self.concepts!r}")
        self._conf = np.zeros((self.num_classes, self.num_classes), np.int64)  # gt x predicted class

    def _overlap(self, labels, embeddings, gt):
        emb = np.asarray(embeddings, np.float64)
        overlap = confusion(labels, gt, emb.shape[0], self.num_classes, self.ignore_index)  # (K, classes)
        return overlap, emb

    def add(self, labels: np.ndarray, embeddings: np.ndarray, gt: np.ndarray) -> None:
        """Pass 1 of concepts="dataset": accumulate every class's summed pixel embeddings."""
        overlap, emb = self._overlap(labels, embeddings, gt)
        sums, pixels = overlap.T @ emb, overlap.sum(0)
        self._sums = sums if self._sums is None else self._sums + sums
        self._pixels = pixels if self._pixels is None else self._pixels + pixels

    def update(self, labels: np.ndarray, embeddings: np.ndarray, gt: np.ndarray) -> None:
        """Label every segment (hence its pixels) with its most cosine-similar concept."""
        overlap, emb = self._overlap(labels, embeddings, gt)
        if self.concepts == "image":
            present, concepts = _concepts(overlap.T @ emb, overlap.sum(0))
        elif self._sums is None:
            raise RuntimeError("concepts='dataset' needs add() on every image before update()")
        else:
            present, concepts = _concepts(self._sums, self._pixels)
        if present.size:
            seg_class = present[np.argmax(_normalise(emb) @ concepts.T, axis=1)]  # (K,)
            np.add.at(self._conf, (slice(None), seg_class), overlap.T)

    def compute(self) -> MetricResult:
        tp = np.diag(self._conf)
        return _class_scores(tp, self._conf.sum(0), self._conf.sum(1))


def concept_miou(labels, embeddings, gts, num_classes: int, ignore_index: int = 255, concepts: str = "image") -> MetricResult:
    labels, embeddings, gts = list(labels), list(embeddings), list(gts)
    metric = ConceptMIoU(num_classes, ignore_index, concepts)
    if concepts == "dataset":
        for lab, emb, gt in zip(labels, embeddings, gts, strict=True):
            metric.add(lab, emb, gt)
    for lab, emb, gt in zip(labels, embeddings, gts, strict=True):
        metric.update(lab, emb, gt)
    return metric.compute()


@dataclass
class DatasetClusters:
    """Dataset-consistent segment ids for the traditional protocol: every image's mask
    embeddings clustered together, so an id means the same thing in every image."""

    ids: list[np.ndarray]    # per image, (K,) dataset cluster of each of its masks
    num_clusters: int        # min(requested, number of non-empty masks)
    inertia: float


def cluster_masks(embeddings: list[np.ndarray], sizes: list[np.ndarray], num_clusters: int, *, seed: int = 0,
                  restarts: int = 10, max_iter: int = 100, device="cpu") -> DatasetClusters:
    """k-means (the project's batched k-means: k-means++, `restarts` restarts, lowest inertia)
    over the embeddings of all non-empty masks of all images (choice: each mask is one
    point, unweighted by its area, in the raw feature space the per-image k-means uses).
    Empty masks (size 0) take their nearest centroid. With fewer non-empty masks than
    requested clusters (a --limit run), one cluster per mask."""
    import torch

    from .kmeans import kmeans

    keep = [np.asarray(s) > 0 for s in sizes]
    points = np.concatenate([np.asarray(e, np.float32)[k] for e, k in zip(embeddings, keep)])
    if not len(points):
        raise ValueError("no non-empty masks to cluster")
    c = min(num_clusters, len(points))
    x = torch.from_numpy(points).to(device)[None]
    res = kmeans(x, c, restarts=restarts, max_iter=max_iter, seed=seed,
                 use_triton=torch.device(device).type == "cuda")
    centroids = res.centroids[0].cpu().numpy().astype(np.float64)
    labels = res.labels[0].cpu().numpy()
    ids, start = [], 0
    for e, k in zip(embeddings, keep):
        e = np.asarray(e, np.float64)
        mine = ((e[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)  # nearest centroid
        mine[k] = labels[start:start + k.sum()]  # the k-means' own labels where the mask took part
        start += int(k.sum())
        ids.append(mine)
    return DatasetClusters(ids, c, float(res.inertia[0]))


# ---- per-image instance metrics (generated scenes: benchmarks/quality.py, mini model) ----
def _overlaps(pred: np.ndarray, gt: np.ndarray):
    """Overlap counts (P, G) of predicted segments with ground-truth instances (ids compacted:
    absent ids take no row or column), each pixel's segment row, and the instance ids."""
    _, p = np.unique(np.asarray(pred).ravel(), return_inverse=True)
    g_ids, g = np.unique(np.asarray(gt).ravel(), return_inverse=True)
    n_p, n_g = p.max() + 1, len(g_ids)
    return np.bincount(p * n_g + g, minlength=n_p * n_g).reshape(n_p, n_g), p, g_ids


def many_to_one(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The prediction with each segment relabelled as the ground-truth instance it overlaps
    most."""
    inter, p, g_ids = _overlaps(pred, gt)
    return g_ids[inter.argmax(1)][p].reshape(np.asarray(gt).shape)


def many_to_one_miou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean IoU over the ground-truth instances (background included) of `many_to_one`'s
    merged prediction. It scores boundaries, not the segment count: over-segmenting costs
    nothing."""
    merged, gt = many_to_one(pred, gt), np.asarray(gt)
    ious = [((merged == j) & (gt == j)).sum() / ((merged == j) | (gt == j)).sum() for j in np.unique(gt)]
    return float(np.mean(ious))


def hungarian_miou(pred: np.ndarray, gt: np.ndarray) -> float:
    """One-to-one matching of segments to instances maximising IoU; unmatched instances
    score 0."""
    inter = _overlaps(pred, gt)[0]
    iou = inter / (inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / iou.shape[1])


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label."""
    b = np.zeros(labels.shape, bool)
    b[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    b[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    b[1:] |= labels[1:] != labels[:-1]
    b[:-1] |= labels[1:] != labels[:-1]
    return b


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, np.ones((2 * radius + 1,) * 2, bool))


def boundary_f1(pred: np.ndarray, gt: np.ndarray, tolerance: int = 1) -> float:
    """F1 of boundary pixels, a match being within `tolerance` px (Chebyshev)."""
    bp, bg = _boundary(np.asarray(pred)), _boundary(np.asarray(gt))
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    precision = (bp & _dilate(bg, tolerance)).sum() / bp.sum()
    recall = (bg & _dilate(bp, tolerance)).sum() / bg.sum()
    return float(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))


def instance_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Per-image scores against an instance map. Boundary F1 is taken on the many-to-one
    merged prediction, so it scores object boundaries, not boundaries between segments
    that cover one object."""
    return {"many_to_one_miou": many_to_one_miou(pred, gt), "hungarian_miou": hungarian_miou(pred, gt),
            "boundary_f1": boundary_f1(many_to_one(pred, gt), gt)}
