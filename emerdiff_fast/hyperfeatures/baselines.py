"""What the aggregated hyperfeatures are measured against (`hyperfeatures eval --baselines`):

* `aggregated`: the trained network over all saved timesteps (the method);
* `one-step`: the trained one-step variant (one UNet call on the clean latent);
* `best-layer`: one raw decoder feature map at one saved timestep, the (layer, timestep)
  with the best validation PCK@0.1 (by image) among all of them: the paper's single-layer
  baseline, chosen on validation pairs only;
* `pixels`: the RGB image itself at the load resolution (nearest neighbour on colour);
* `latent`: the VAE latent the inversion starts from.

Every descriptor goes through the same matching (bilinear upsampling to the load
resolution, cosine nearest neighbour) and the same PCK.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..images import load_image, to_model_input
from .correspondence import Pair
from .train import FeatureCache, evaluate_pairs, score_pairs

log = logging.getLogger("emerdiff_fast")
ROW_NAMES = ("aggregated", "one-step", "best-layer", "pixels", "latent")


@dataclass
class Row:
    """One line of the table: PCK@0.1 by bounding box and by image, over `keypoints`."""
    name: str
    pck_bbox: float
    pck_img: float
    keypoints: int
    categories: dict = field(default_factory=dict)
    detail: str = ""   # e.g. which layer best-layer chose

    @classmethod
    def of(cls, name: str, score: dict, detail: str = "") -> "Row":
        return cls(name, score["pck_bbox"], score["pck_img"], score["keypoints"], score.get("categories", {}), detail)


def pixel_descriptor(load_resolution: int):
    """image -> (1, 3, L, L) RGB in [-1, 1] at the load resolution."""
    return lambda image: to_model_input(load_image(image), load_resolution, Image.BILINEAR)[None]


def latent_descriptor(cache: FeatureCache):
    """image -> its VAE latent (the posterior sample the inversion starts from)."""
    return lambda image: cache.extractor.encode([image]).float()


def best_layer(cache: FeatureCache, val_pairs: list[Pair], progress: bool = False) -> tuple[int, int, dict]:
    """(layer index, timestep index, validation score) of the best raw (layer, timestep)
    descriptor on `val_pairs` by PCK@0.1 (image)."""
    from tqdm import tqdm

    cfg = cache.extractor.config
    candidates = [(layer, t) for layer in range(len(cfg.layers)) for t in range(len(cfg.save_timestep))]
    best = None
    for layer, t in tqdm(candidates, desc="best layer", unit="layer", disable=not progress):
        score = evaluate_pairs(None, cache, val_pairs, descriptor=lambda f, l=layer, s=t: f.maps[l][:, s].float())
        if best is None or score["pck_img"] > best[2]["pck_img"]:
            best = (layer, t, score)
    return best


def layer_name(cache: FeatureCache, layer: int, t: int) -> str:
    cfg = cache.extractor.config
    block, resnet = cfg.layers[layer]
    return f"up_blocks.{block}.resnets.{resnet} at step index {cfg.save_timestep[t]}"


def baseline_rows(all_steps, one_step, test_pairs: list[Pair], val_pairs: list[Pair] | None,
                  progress: bool = False) -> list[Row]:
    """The table's rows on `test_pairs`. all_steps / one_step: Hyperfeatures objects with
    trained weights (one_step may be None: its row is left out); val_pairs None or empty:
    no best-layer row (it must be chosen on validation pairs, never on the test pairs)."""
    rows = [Row.of("aggregated", all_steps.evaluate(test_pairs, progress=progress))]
    if one_step is not None:
        rows.append(Row.of("one-step", one_step.evaluate(test_pairs, progress=progress)))
    else:
        log.info("no one-step weights: the one-step row is left out")
    cache = all_steps.cache
    if val_pairs:
        layer, t, val = best_layer(cache, val_pairs, progress)
        name = layer_name(cache, layer, t)
        score = evaluate_pairs(None, cache, test_pairs, descriptor=lambda f: f.maps[layer][:, t].float(),
                               progress=progress)
        rows.append(Row.of("best-layer", score, f"{name} (validation PCK@0.1 image {val['pck_img']:.1f})"))
    else:
        log.info("no validation pairs: the best-layer row is left out (it is chosen on validation pairs)")
    load = cache.extractor.config.load_resolution
    rows.append(Row.of("pixels", score_pairs(pixel_descriptor(load), test_pairs, load, progress=progress,
                                             desc="pixels")))
    with torch.no_grad():
        rows.append(Row.of("latent", score_pairs(latent_descriptor(cache), test_pairs, load, progress=progress,
                                                 desc="latent")))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A markdown table: one row per descriptor, then per-category PCK@0.1 (bbox)."""
    cats = sorted({c for r in rows for c in r.categories})
    head = ["descriptor", "PCK@0.1 bbox", "PCK@0.1 image", "keypoints", *(f"{c} (bbox)" for c in cats)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        per_cat = [f"{r.categories[c]['pck_bbox']:.1f}" if c in r.categories else "" for c in cats]
        lines.append(f"| {r.name} | {r.pck_bbox:.1f} | {r.pck_img:.1f} | {r.keypoints} | " + " | ".join(per_cat)
                     + (" |" if per_cat else "|"))
    details = [f"- {r.name}: {r.detail}" for r in rows if r.detail]
    return "\n".join(lines + ([""] + details if details else []))
