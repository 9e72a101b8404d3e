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

from ..output import atomic_write, read_checkpoint
from .aggregation import AggregationNetwork
from .correspondence import Pair, match, pair_loss, pck
from .extract import Features, FeatureExtractor

log = logging.getLogger("emerdiff_fast")


def model_fingerprint(unet) -> str:
    """A short hash of a UNet's weights (a few values of its first and last parameters): a
    cache shared by two models, or by a model and its random-init twin, keeps them apart."""
    params = list(unet.parameters())
    probe = torch.cat([params[0].detach().flatten()[:256], params[-1].detach().flatten()[:256]]).float().cpu()
    return hashlib.sha1(probe.numpy().tobytes()).hexdigest()[:12]


class FeatureCache:
    """Features of single images, on disk under `root` (and in memory for this process),
    keyed by the image, the extraction settings and the model's weights."""

    def __init__(self, extractor: FeatureExtractor, root=None):
        self.extractor, self.root = extractor, Path(root) if root else None
        self._memory: dict[str, Features] = {}
        cfg = extractor.config
        tag = {k: str(v) for k, v in asdict(cfg).items()}
        tag["model"] = model_fingerprint(extractor.unet)
        self._tag = json.dumps(tag, sort_keys=True)
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)

    def _key(self, image) -> str:
        return hashlib.sha1(f"{image}|{self._tag}".encode()).hexdigest()[:20]

    def _path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root else None

    def _load(self, key: str) -> Features | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        t = load_file(str(path))
        n = len([k for k in t if k.startswith("layer")])
        return Features([t[f"layer{i}"] for i in range(n)], self.extractor.config.save_timestep, t["latents"])

    def _store(self, key: str, feats: Features) -> None:
        path = self._path(key)
        if path is not None:
            from safetensors.torch import save

            data = {f"layer{i}": m.contiguous().cpu() for i, m in enumerate(feats.maps)}
            atomic_write(path, save({**data, "latents": feats.latents.contiguous().cpu()}))
        self._memory[key] = feats

    def get(self, image) -> Features:
        key = self._key(image)
        if key in self._memory:
            return self._memory[key]
        feats = self._load(key)
        if feats is None:
            self._store(key, self.extractor.extract([image]))
        else:
            self._memory[key] = feats
        return self._memory[key]

    def fill(self, images, batch_size: int = 16, progress: bool = False) -> None:
        """Extract every image not cached yet, `batch_size` per inversion (each image's
        features equal its single extraction: the posterior sample is seeded per image)."""
        from tqdm import tqdm

        todo = []
        for image in dict.fromkeys(images):
            key = self._key(image)
            if key not in self._memory:
                feats = self._load(key)
                if feats is None:
                    todo.append(image)
                else:
                    self._memory[key] = feats
        with tqdm(total=len(todo), desc="extract", unit="image", disable=not progress) as bar:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                feats = self.extractor.extract(chunk)
                for j, image in enumerate(chunk):
                    self._store(self._key(image), feats.select(j))
                bar.update(len(chunk))


@dataclass
class TrainConfig:
    steps: int = 5000
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_every: int = 1000
    alpha: float = 0.1
    seed: int = 0


def score_pairs(describe, pairs: list[Pair], load_resolution: int, alpha: float = 0.1,
                progress: bool = False, desc: str = "eval") -> dict:
    """PCK@alpha by image size and by bounding box over all keypoints of `pairs`, overall and
    per category; describe(image) -> its descriptor map (1, P, R, R)."""
    from tqdm import tqdm

    hits: dict[str, dict[str, list]] = {}
    with torch.no_grad():
        for p in tqdm(pairs, desc=desc, unit="pair", disable=not progress):
            pred = match(describe(p.src), describe(p.trg), p.src_kps, p.src_size, p.trg_size, load_resolution)
            h = hits.setdefault(p.category, {"img": [], "box": []})
            h["img"].append(pck(pred, p.trg_kps, p.trg_size, alpha=alpha))
            if p.trg_bbox is not None:
                h["box"].append(pck(pred, p.trg_kps, p.trg_size, bbox=p.trg_bbox, alpha=alpha))

    def summary(img: list, box: list) -> dict:
        img, box = (np.concatenate(v) if v else np.zeros(0) for v in (img, box))
        return {"pck_img": float(img.mean() * 100) if img.size else float("nan"),
                "pck_bbox": float(box.mean() * 100) if box.size else float("nan"), "keypoints": int(img.size)}

    out = summary([a for h in hits.values() for a in h["img"]], [a for h in hits.values() for a in h["box"]])
    out["categories"] = {c: summary(h["img"], h["box"]) for c, h in sorted(hits.items())}
    return out


def evaluate_pairs(net: AggregationNetwork, cache: FeatureCache, pairs: list[Pair], alpha: float = 0.1,
                   descriptor=None, progress: bool = False) -> dict:
    """score_pairs with the network on cached features; `descriptor(features) -> (1, P, R, R)`
    replaces the network (single-layer baselines)."""
    describe = descriptor or net
    return score_pairs(lambda image: describe(cache.get(image)), pairs, cache.extractor.config.load_resolution,
                       alpha, progress)


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
            state = read_checkpoint(out / "last.pt")
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            start, best, history = state["step"], state["best"], state["history"]
            log.info("resuming at step %d (best validation PCK %.1f)", start, best)
    order = np.random.default_rng(cfg.seed).permutation(max(cfg.steps, 1)) % len(train_pairs)
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress, initial=start, total=cfg.steps)
    running = None  # mean loss of the recent steps, for the bar and the history
    last_pck = history[-1]["pck_img"] if history else float("nan")
    for step in bar:
        p = train_pairs[order[step]]
        loss = pair_loss(net(cache.get(p.src)), net(cache.get(p.trg)), p)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = step + 1
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if done % 10 == 0:
            bar.set_postfix(loss=f"{running:.3f}", val_pck=f"{last_pck:.1f}", refresh=False)
        if done % cfg.val_every == 0 or done == cfg.steps:
            score = evaluate_pairs(net, cache, val_pairs, cfg.alpha) if val_pairs else {"pck_img": float("nan")}
            history.append({"step": done, "loss": running, **score})
            last_pck = score["pck_img"]
            bar.set_postfix(loss=f"{running:.3f}", val_pck=f"{last_pck:.1f}")
            if out is not None:
                if score["pck_img"] > best:
                    best = score["pck_img"]
                    net.save(out / "best.safetensors")
                buf = io.BytesIO()
                torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": done, "best": best,
                            "history": history}, buf)
                atomic_write(out / "last.pt", buf.getvalue())
    return {"history": history, "best_pck_img": best}
