"""Training and evaluating the aggregation network on keypoint pairs, from cached features.

Features are extracted once per image and cached on disk (safetensors, bf16, native
resolution, atomic writes; keyed by the image and the extraction settings), so training
never re-runs the UNet. Hyperparameters as the authors' configs/train.yaml: AdamW, lr 1e-3,
weight decay 0, 5000 steps of one pair (their batch of 2 images), validation PCK@0.1 every
1000 steps; the best checkpoint by validation PCK is kept, and `last.pt` (network,
optimizer, step, best) makes a run resumable.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..output import atomic_write
from .aggregation import AggregationNetwork
from .correspondence import Pair, match, pair_loss, pck
from .extract import Features, FeatureExtractor

log = logging.getLogger("emerdiff_fast")


class FeatureCache:
    """Features of single images, on disk under `root` (and in memory for this process)."""

    def __init__(self, extractor: FeatureExtractor, root=None):
        self.extractor, self.root = extractor, Path(root) if root else None
        self._memory: dict[str, Features] = {}
        cfg = extractor.config
        self._tag = json.dumps({k: str(v) for k, v in asdict(cfg).items()}, sort_keys=True)
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)

    def _key(self, image) -> str:
        return hashlib.sha1(f"{image}|{self._tag}".encode()).hexdigest()[:20]

    def get(self, image) -> Features:
        key = self._key(image)
        if key in self._memory:
            return self._memory[key]
        path = self.root / f"{key}.safetensors" if self.root else None
        if path is not None and path.exists():
            from safetensors.torch import load_file

            t = load_file(str(path))
            n = len([k for k in t if k.startswith("layer")])
            feats = Features([t[f"layer{i}"] for i in range(n)], self.extractor.config.save_timestep, t["latents"])
        else:
            feats = self.extractor.extract([image])
            if path is not None:
                from safetensors.torch import save

                data = {f"layer{i}": m.contiguous().cpu() for i, m in enumerate(feats.maps)}
                atomic_write(path, save({**data, "latents": feats.latents.contiguous().cpu()}))
        self._memory[key] = feats
        return feats


@dataclass
class TrainConfig:
    steps: int = 5000
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_every: int = 1000
    alpha: float = 0.1
    seed: int = 0


def evaluate_pairs(net: AggregationNetwork, cache: FeatureCache, pairs: list[Pair], alpha: float = 0.1,
                   descriptor=None, progress: bool = False) -> dict:
    """PCK@alpha by image size and by bounding box over all keypoints of `pairs`.
    `descriptor(features) -> (1, P, R, R)` replaces the network (single-layer baselines);
    progress: a bar over the pairs."""
    from tqdm import tqdm

    describe = descriptor or net
    hits_img, hits_box = [], []
    load = cache.extractor.config.load_resolution
    with torch.no_grad():
        for p in tqdm(pairs, desc="eval", unit="pair", disable=not progress):
            hs, ht = describe(cache.get(p.src)), describe(cache.get(p.trg))
            pred = match(hs, ht, p.src_kps, p.src_size, p.trg_size, load)
            hits_img.append(pck(pred, p.trg_kps, p.trg_size, alpha=alpha))
            if p.trg_bbox is not None:
                hits_box.append(pck(pred, p.trg_kps, p.trg_size, bbox=p.trg_bbox, alpha=alpha))
    img = np.concatenate(hits_img) if hits_img else np.zeros(0)
    box = np.concatenate(hits_box) if hits_box else np.zeros(0)
    return {"pck_img": float(img.mean() * 100) if img.size else float("nan"),
            "pck_bbox": float(box.mean() * 100) if box.size else float("nan"), "keypoints": int(img.size)}


def train(net: AggregationNetwork, cache: FeatureCache, train_pairs: list[Pair], val_pairs: list[Pair],
          config: TrainConfig | None = None, out_dir=None, progress: bool = True) -> dict:
    """Train; returns the history. With out_dir: best.safetensors (best validation PCK) and
    last.pt (resume state) are written there, and an existing last.pt is resumed."""
    from tqdm import tqdm

    cfg = config or TrainConfig()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(out_dir) if out_dir else None
    start, best, history = 0, -1.0, []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "last.pt").exists():
            state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            start, best, history = state["step"], state["best"], state["history"]
            log.info("resuming at step %d (best validation PCK %.1f)", start, best)
    order = np.random.default_rng(cfg.seed).permutation(max(cfg.steps, 1)) % len(train_pairs)
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        p = train_pairs[order[step]]
        loss = pair_loss(net(cache.get(p.src)), net(cache.get(p.trg)), p)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = step + 1
        if done % cfg.val_every == 0 or done == cfg.steps:
            score = evaluate_pairs(net, cache, val_pairs, cfg.alpha) if val_pairs else {"pck_img": float("nan")}
            history.append({"step": done, "loss": float(loss.detach()), **score})
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", pck=f"{score['pck_img']:.1f}")
            if out is not None:
                if score["pck_img"] > best:
                    best = score["pck_img"]
                    net.save(out / "best.safetensors")
                buf = io.BytesIO()
                torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": done, "best": best,
                            "history": history}, buf)
                atomic_write(out / "last.pt", buf.getvalue())
    return {"history": history, "best_pck_img": best}
