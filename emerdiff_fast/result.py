"""What a segmentation returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import EmerDiffConfig


@dataclass
class SegmentationResult:
    labels: np.ndarray                    # (H, W) int32 segment ids at the input image's size
    low_res_labels: np.ndarray            # (h, w) int32 k-means clusters on the feature grid
    difference_maps: np.ndarray | None    # (K, R, R) float32 at the processing size (R x R, or with
                                          # keep_aspect its own H x W), unsmoothed; None for "naive"
    mask_embeddings: np.ndarray           # (K, C) float32 mean feature of each mask
    config: EmerDiffConfig
    backend: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (see docs/api.md)
    class_names: list[str] | None = None  # named segments (vocabulary.name_result): the label list
    segment_labels: np.ndarray | None = None  # (K,) int: each segment's index into class_names

    @property
    def class_map(self) -> np.ndarray | None:
        """(H, W) per-pixel index into class_names, once the segments are named."""
        return None if self.segment_labels is None else self.segment_labels[self.labels]

    @property
    def num_masks(self) -> int:
        return self.config.num_masks

    def pixel_embeddings(self) -> np.ndarray:
        """(H, W, C): every pixel inherits its segment's embedding (SPEC 1.9)."""
        return self.mask_embeddings[self.labels]
