"""Diffusion Hyperfeatures (Luo et al., NeurIPS 2023), the project's second system, on the
same loading, schedule and hook machinery as EmerDiff.

    from emerdiff_fast import load_pipeline
    from emerdiff_fast.hyperfeatures import Hyperfeatures
    hf = Hyperfeatures(load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5"))   # all steps
    hf.train(train_pairs, val_pairs, out_dir="runs/hf")        # or Hyperfeatures(..., weights=".../best.safetensors")
    points = hf.match("cat1.jpg", "cat2.jpg", [(120, 80), (200, 150)])
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import load_image
from .aggregation import AggregationConfig, AggregationNetwork
from .correspondence import Pair, match
from .extract import ALL_STEPS, ExtractConfig, FeatureExtractor, Features
from .train import FeatureCache, TrainConfig, evaluate_pairs, train

__all__ = ["Hyperfeatures", "ExtractConfig", "AggregationNetwork", "AggregationConfig", "Features", "Pair",
           "TrainConfig", "ALL_STEPS", "draw_matches", "shipped_weights"]

SHIPPED_DIR = "hyperfeatures"  # a model folder's trained aggregation networks: all-steps / one-step .safetensors


def shipped_weights(source, one_step: bool = False):
    """The aggregation network a model folder ships for its features (the mini model ships
    both variants), or None: a pipeline, "mini" or a folder."""
    from ..loading import model_folder

    folder = model_folder(source)
    path = folder / SHIPPED_DIR / f"{'one-step' if one_step else 'all-steps'}.safetensors" if folder else None
    return path if path is not None and path.is_file() else None


class Hyperfeatures:
    """Extraction (DDIM inversion features), the aggregation network, training and matching.

    one_step=True: the authors' one-step variant (1 timestep, 12 mixing weights) instead of
    all steps (11 timesteps, 132). weights: a saved aggregation network (safetensors).
    cache_dir: where extracted features are cached for training and evaluation.
    """

    def __init__(self, pipe, config: ExtractConfig | None = None, *, one_step: bool = False, weights=None,
                 projection_dim: int = 384, cache_dir=None, compile: bool = False):
        if config is None:
            config = ExtractConfig.one_step() if one_step else ExtractConfig()
        self.extractor = FeatureExtractor(pipe, config, compile=compile)
        self.cache = FeatureCache(self.extractor, cache_dir)
        device = self.extractor.device
        if weights is not None:
            self.net = AggregationNetwork.load(weights, device)
            if list(self.net.config.feature_dims) != self.extractor.dims:
                raise ValueError(f"weights were trained on feature dims {self.net.config.feature_dims}, this model "
                                 f"gives {self.extractor.dims}")
        else:
            self.net = AggregationNetwork(AggregationConfig(tuple(self.extractor.dims), len(config.save_timestep),
                                                            projection_dim,
                                                            output_resolution=self.extractor.config.output_resolution))
            self.net.to(device)

    def extract(self, images) -> Features:
        """Per-layer features of a batch of images (one batched inversion)."""
        return self.extractor.extract(images)

    def describe(self, image) -> torch.Tensor:
        """The hyperfeature map (1, P, R, R) of one image (features cached)."""
        with torch.no_grad():
            return self.net(self.cache.get(image))

    def train(self, train_pairs: list[Pair], val_pairs: list[Pair], config: TrainConfig | None = None, out_dir=None,
              progress: bool = True) -> dict:
        return train(self.net, self.cache, train_pairs, val_pairs, config, out_dir, progress)

    def evaluate(self, pairs: list[Pair], alpha: float = 0.1, progress: bool = False) -> dict:
        return evaluate_pairs(self.net, self.cache, pairs, alpha, progress=progress)

    def match(self, src, tgt, keypoints) -> np.ndarray:
        """(N, 2) x, y keypoints in src -> their nearest neighbours in tgt, x, y pixels."""
        s, t = load_image(src), load_image(tgt)
        return match(self.describe(src), self.describe(tgt), np.asarray(keypoints, float), s.size, t.size,
                     self.extractor.config.load_resolution)


def draw_matches(src, tgt, src_kps, tgt_kps, radius: int = 4) -> Image.Image:
    """The two images side by side with a coloured line between each matched pair. Small
    images are upscaled first (nearest neighbour, the overlay's rule: short side at least
    256 px), and the lines and points drawn at the upscaled size, so 64 px inputs can be read."""
    from ..output import overlay_scale, palette

    a, b = load_image(src), load_image(tgt)
    k = max(overlay_scale((a.height, a.width)), overlay_scale((b.height, b.width)))
    if k > 1:
        a, b = (im.resize((im.width * k, im.height * k), Image.NEAREST) for im in (a, b))
        src_kps, tgt_kps = np.asarray(src_kps, float) * k, np.asarray(tgt_kps, float) * k
    h = max(a.height, b.height)
    canvas = Image.new("RGB", (a.width + b.width, h), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    d = ImageDraw.Draw(canvas)
    colours = palette(max(len(src_kps), 1))
    for i, ((x1, y1), (x2, y2)) in enumerate(zip(np.asarray(src_kps), np.asarray(tgt_kps))):
        c = tuple(int(v) for v in colours[i])
        x2 += a.width
        d.line([(x1, y1), (x2, y2)], fill=c, width=2)
        for x, y in ((x1, y1), (x2, y2)):
            d.ellipse([x - radius, y - radius, x + radius, y + radius], outline="white", fill=c)
    return canvas
