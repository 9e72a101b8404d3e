"""Training the mini model: the VAE first, then the UNet and the text encoder together
(SD's recipe at miniature scale), on generated scenes of TRAIN_SEEDS.

Everything is seeded and resumable: each stage keeps `vae.pt` / `unet.pt` in the run folder
(weights, EMA weights, optimiser, step), written atomically every `checkpoint_every` steps
and at the end; a rerun of the same command continues where the last one stopped, and
batch b of a stage is the same whether or not the run was interrupted before it.

At every `eval_every` UNet steps the EMA weights are exported as a diffusers folder
(`export/`) and scored on VALIDATION_SEEDS (never the held-out seeds that measure
quality): attention statistics, and EmerDiff's and the naive baseline's many-to-one mIoU.
The best export by EmerDiff's validation mIoU is kept in `best/`; `log.jsonl` holds every
evaluation.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import RESOLUTION, build_models
from ..config import EmerDiffConfig
from ..loading import SD_SCHEDULER
from ..output import read_checkpoint
from ..scenes import TRAIN_SEEDS, VALIDATION_SEEDS, render_batch

log = logging.getLogger("emerdiff_fast")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    pool: int = 40_000              # training scenes: TRAIN_SEEDS[:pool]
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6            # SD's KL weight: latents barely regularised, scale measured
    unet_steps: int = 20_000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 500
    caption_drop: float = 0.15      # captions replaced by the empty prompt (as SD is trained)
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    eval_every: int = 2000
    eval_scenes: int = 8            # validation scenes segmented at each evaluation
    eval_masks: int = 6
    attention_scenes: int = 32      # validation scenes for the attention statistics


def assemble_pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**SD_SCHEDULER, prediction_type="epsilon"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _save(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _batch_index(seed: int, stage: int, step: int, n: int, batch: int) -> torch.Tensor:
    """Batch `step` of a stage, the same after a resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000_007 + step)
    return torch.randint(0, n, (batch,), generator=g)


def _lr(step: int, cfg_lr: float, warmup: int, total: int | None = None) -> float:
    if step < warmup:
        return cfg_lr * (step + 1) / warmup
    if total is None:
        return cfg_lr
    return cfg_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _bar(total: int, initial: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not progress, mininterval=5)


def train_vae(run: Path, cfg: TrainConfig, images: np.ndarray, progress: bool = True):
    vae, _, _, _ = build_models(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt, step, wall = run / "vae.pt", 0, 0.0
    if ckpt.exists():
        state = read_checkpoint(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, wall = state["step"], state["wall_s"]
    bar = _bar(cfg.vae_steps, step, "vae", progress)
    vae.train()
    while step < cfg.vae_steps:
        started = time.time()
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_lr, 100, cfg.vae_steps)
        x = _pixels(images[_batch_index(cfg.seed, 0, step, len(images), cfg.vae_batch).numpy()])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        wall += time.time() - started
        bar.update(1)
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            _save(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                         "rec_loss": rec_loss.item(), "wall_s": wall})
    bar.close()
    vae.eval()
    return vae


@torch.inference_mode()
def encode_pool(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, float]:
    """Latent means of every scene, and the scaling factor that gives them unit variance."""
    means = torch.cat([vae.encode(_pixels(images[i:i + batch])).latent_dist.mean
                       for i in range(0, len(images), batch)])
    return means, float(1.0 / means.std())


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_unet(run: Path, cfg: TrainConfig, latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor,
               vae, tokenizer, progress: bool = True) -> None:
    from diffusers import DDPMScheduler

    _, unet, text_encoder, _ = build_models(cfg.seed + 1)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ckpt, step, wall = run / "unet.pt", 0, 0.0
    if ckpt.exists():
        state = read_checkpoint(ckpt)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        step, wall = state["step"], state["wall_s"]
    sched = DDPMScheduler(**SD_SCHEDULER)
    bar = _bar(cfg.unet_steps, step, "unet+text", progress)
    unet.train()
    text_encoder.train()
    losses = []
    while step < cfg.unet_steps:
        started = time.time()
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.unet_lr, cfg.warmup)
        idx = _batch_index(cfg.seed, 1, step, len(latents), cfg.unet_batch)
        g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        drop = torch.rand(len(idx), generator=g) < cfg.caption_drop
        ids = torch.where(drop[:, None], empty_ids[None], token_ids[idx])
        ctx = text_encoder(ids)[0]
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        step += 1
        wall += time.time() - started  # training time only: evaluations are not counted
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            _save(ckpt, {"unet": unet.state_dict(), "text": text_encoder.state_dict(),
                         "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                         "opt": opt.state_dict(), "step": step, "wall_s": wall,
                         "loss": float(np.mean(losses[-500:]))})
        if step % cfg.eval_every == 0 or step == cfg.unet_steps:
            pipe = assemble_pipeline(vae, ema_unet, ema_text, tokenizer)
            evaluate(run, pipe, cfg, step, float(np.mean(losses[-500:])), wall)
    bar.close()


def evaluate(run: Path, pipe, cfg: TrainConfig, step: int, loss: float, wall: float) -> dict:
    from .diagnostics import attention_stats, segment_scores

    seeds = list(VALIDATION_SEEDS[:cfg.eval_scenes])
    config = EmerDiffConfig(resolution=RESOLUTION, num_masks=cfg.eval_masks)
    t0 = time.time()
    record = {"step": step, "loss": loss, "train_wall_s": wall,
              "scores": segment_scores(pipe, seeds, config),
              "attention": attention_stats(pipe, list(VALIDATION_SEEDS[:cfg.attention_scenes]))}
    record["eval_s"] = time.time() - t0
    export = run / "export"
    if export.exists():
        shutil.rmtree(export)
    pipe.save_pretrained(export)
    best_file = run / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    if best is None or record["scores"]["fast"]["many_to_one_miou"] > best["scores"]["fast"]["many_to_one_miou"]:
        if (run / "best").exists():
            shutil.rmtree(run / "best")
        shutil.copytree(export, run / "best")
        best_file.write_text(json.dumps(record, indent=1))
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    fast, naive = record["scores"]["fast"], record["scores"]["naive"]
    log.info("step %d: loss %.4f, validation many-to-one mIoU EmerDiff %.3f / naive %.3f, boundary F1 %.3f / %.3f",
             step, loss, fast["many_to_one_miou"], naive["many_to_one_miou"], fast["boundary_f1"], naive["boundary_f1"])
    return record


def train(run: str | Path, cfg: TrainConfig = TrainConfig(), progress: bool = True) -> Path:
    """Train (or resume) a mini model in the folder `run`; returns it."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    cfg_file = run / "train_config.json"
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        fixed = ("seed", "pool", "vae_steps", "vae_batch", "vae_lr", "vae_kl", "unet_batch", "unet_lr")
        diff = [k for k in fixed if old.get(k) != asdict(cfg)[k]]
        if diff:
            raise ValueError(f"{run} holds a run with other settings ({', '.join(diff)}); use another --out")
    cfg_file.write_text(json.dumps({**asdict(cfg), "train_seeds": [TRAIN_SEEDS[0], TRAIN_SEEDS[0] + cfg.pool],
                                    "validation_seeds": [VALIDATION_SEEDS[0], VALIDATION_SEEDS[-1] + 1]}, indent=1))
    log.info("rendering %d training scenes", cfg.pool)
    images, _, captions = render_batch(TRAIN_SEEDS[:cfg.pool], RESOLUTION)
    vae = train_vae(run, cfg, images, progress)
    cache = run / "latents.pt"
    if cache.exists():
        latents, scale = read_checkpoint(cache)
    else:
        latents, scale = encode_pool(vae, images)
        _save(cache, (latents, scale))
    vae.register_to_config(scaling_factor=scale)
    del images
    _, _, _, tokenizer = build_models(cfg.seed)

    def ids(texts):
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    train_unet(run, cfg, latents * scale, ids(captions), ids([""])[0], vae, tokenizer, progress)
    return run
