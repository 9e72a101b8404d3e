"""What a segmentation returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import EmerDiffConfig


@dataclass
class SegmentationResult:
    labels: np.ndarray                    # (H, W) int32 segment ids at the input image's size
    low_res_labels: np.ndarray            # (h, w) int32 k-means clusters on the feature grid
    difference_maps: np.ndarray | None    # (K, R, R) float32 at processing resolution R, unsmoothed; None for "naive"
    mask_embeddings: np.ndarray           # (K, C) float32 mean feature of each mask
    config: EmerDiffConfig
    backend: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (see README)

    @property
    def num_masks(self) -> int:
        return self.config.num_masks

    def pixel_embeddings(self) -> np.ndarray:
        """(H, W, C): every pixel inherits its segment's embedding (SPEC 1.9)."""
        return self.mask_embeddings[self.labels]
