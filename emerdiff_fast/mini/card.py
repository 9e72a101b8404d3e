"""Shipping a trained run: its best export goes into the package (`MODEL_DIR`) with
`emerdiff.json` (the model's recommended EmerDiff settings) and `MODEL_CARD.md` (how it was
trained, and what it learned at each evaluation)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import MODEL_DIR, RESOLUTION
from ..loading import RECOMMENDED_FILE
from ..output import read_checkpoint
from ..scenes import HELDOUT_SEEDS

# The mini model's EmerDiff settings. Resolution: its native 64 px (8x8 feature grid).
# K: a scene holds 1-4 shapes and a background, so 6 masks leave room for a split background
# (chosen before any held-out scene was segmented; the paper sweeps K for each data set too).
# lambda and t_modulate: the best of a sweep on 48 validation scenes (seeds 5,000,200..247;
# benchmarks/RESULTS.md, "mini model"). SD's t = 281 leaves this model's images almost
# unchanged away from object edges; modulating from t = 881 lets a mask's region change.
# t = 981 scored higher still but is not on the 25-step grid, so the grid25 and fastest
# presets could not run. Everything else is the method's default.
RECOMMENDED = {"resolution": RESOLUTION, "num_masks": 6, "lam": 300.0, "t_modulate": 881}
# measured caveats shipped beside the settings (emerdiff.json "caveats"; the CLI prints one
# when its feature is used)
CAVEATS = {"labels": "the mini model names segments poorly: class mIoU 0.071 for its named segments against "
                     "0.213 for calling every pixel background (200 held-out scenes, benchmarks/RESULTS.md "
                     "'naming the segments'); do not trust its --labels names"}


def _attention_rows(record: dict) -> list[str]:
    rows = []
    for name, st in record["attention"].items():
        rows.append(f"| {record['step']} | `{name}` | {st['entropy']:.3f} | {st['object_mass']:.3f} | "
                    f"{st['object_share']:.3f} |")
    return rows


def model_card(run: Path, best: dict) -> str:
    cfg = json.loads((run / "train_config.json").read_text())
    vae, unet = (read_checkpoint(run / f) for f in ("vae.pt", "unet.pt"))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.items()
                          if k not in ("train_seeds", "validation_seeds"))
    lines = [
        "# mini: a miniature Stable Diffusion trained on generated scenes",
        "",
        "Knows generated shapes only (emerdiff_fast/scenes.py: flat-coloured discs, rectangles and triangles on "
        "plain, gradient, striped or noisy backgrounds, 64 px). For photographs use a real SD checkpoint.",
        "",
        "## Training",
        f"- Command: `python -m emerdiff_fast.mini train --out RUN {train_args}`, then "
        "`python -m emerdiff_fast.mini ship --run RUN`.",
        f"- Seed {cfg['seed']}. Training scenes: seeds {cfg['train_seeds'][0]}..{cfg['train_seeds'][1] - 1}. "
        f"Checkpoint choice: validation seeds {cfg['validation_seeds'][0]}..{cfg['validation_seeds'][1] - 1}. "
        f"Never used for either: the held-out seeds from {HELDOUT_SEEDS.start} (quality is measured there).",
        f"- VAE: {vae['step']} steps of batch {cfg['vae_batch']}, final reconstruction loss (L1 + MSE on [-1, 1]) "
        f"{vae['rec_loss']:.4f}, {vae['wall_s'] / 60:.1f} min.",
        # the shipped weights are the best evaluation's, which a longer run may have passed
        f"- UNet + text encoder: {best['step']} steps of batch {cfg['unet_batch']} (captions dropped to the empty "
        f"prompt with p = {cfg['caption_drop']}), final loss (mean of the last 500) {best['loss']:.4f}, "
        f"{best['train_wall_s'] / 60:.1f} min; EMA {cfg['ema_decay']} of the weights ships.",
        *([f"- The run went on to step {unet['step']} ({unet['wall_s'] / 60:.1f} min, loss {unet['loss']:.4f}); "
           f"its later evaluations (steps {', '.join(str(r['step']) for r in log if r['step'] > best['step'])}) "
           "scored lower."] if unet["step"] > best["step"] else []),
        "- Wall times are training steps only, on a 2-core CPU (no GPU), evaluations excluded.",
        f"- Shipped: the evaluation at step {best['step']}, the best by EmerDiff's many-to-one mIoU on "
        f"{cfg['eval_scenes']} validation scenes (K = {cfg['eval_masks']}, the method's lambda and t_modulate).",
        "",
        "## Recommended EmerDiff settings (emerdiff.json; used unless overridden)",
        "",
        *[f"- `{k}` = {v}" for k, v in RECOMMENDED.items()],
        "- everything else: the method's defaults (the layers "
        "`up_blocks.1.attentions.{0,2}.transformer_blocks.0.attn2`, 8 feature samples, one modulated step).",
        "- lambda and t_modulate are this model's own, chosen on validation scenes (benchmarks/RESULTS.md, "
        "\"mini model\"); the method's (lambda 10, t_modulate 281, chosen for SD) score lower here.",
        "",
        "## What it learned, at each evaluation (validation scenes)",
        "",
        "Many-to-one mIoU: each segment goes to the instance it overlaps most (metrics.instance_scores). "
        "Scored at the method's lambda 10 and t_modulate 281, the settings during training.",
        "",
        "| step | loss | EmerDiff mIoU | naive mIoU | EmerDiff boundary F1 | naive boundary F1 |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {r['step']} | {r['loss']:.4f} | {r['scores']['fast']['many_to_one_miou']:.3f} | "
          f"{r['scores']['naive']['many_to_one_miou']:.3f} | {r['scores']['fast']['boundary_f1']:.3f} | "
          f"{r['scores']['naive']['boundary_f1']:.3f} |" for r in log],
        "",
        f"Self-attention at t = 281 on {cfg.get('attention_scenes', 32)} validation scenes: entropy / log N (1 = uniform), and the attention mass "
        "a query on an object puts on the same object, beside the object's share of the tokens (equal when the "
        "layer ignores objects).",
        "",
        "| step | layer | entropy | object mass | object share |",
        "| --- | --- | --- | --- | --- |",
        *[row for r in log for row in _attention_rows(r)],
        "",
    ]
    return "\n".join(lines)


HF_HEADING = "## Diffusion Hyperfeatures"


def hyperfeatures_section(target: Path = MODEL_DIR) -> str:
    """The card's section on the shipped aggregation networks, from hyperfeatures/training.json
    (written by benchmarks/hyperfeatures_mini.py --ship); "" when none ship."""
    record = target / "hyperfeatures" / "training.json"
    if not record.exists():
        return ""
    from ..hyperfeatures.baselines import Row, format_rows

    t = json.loads(record.read_text())
    train = "; ".join(f"{k}: best validation PCK@0.1 (image) {v['best_val_pck_img']:.1f}, extraction "
                      f"{v['extract_s'] / 60:.1f} min, training {v['train_s'] / 60:.1f} min"
                      for k, v in t["training"].items())
    return "\n".join([
        HF_HEADING, "",
        "`hyperfeatures/all-steps.safetensors` and `one-step.safetensors`: aggregation networks trained on this "
        "model's DDIM-inversion features of generated correspondence pairs (`scenes --pairs`; training pairs from "
        "training seeds, checkpoints chosen on validation pairs), used by `hyperfeatures eval|match --model mini` "
        "when no --weights is given.", "",
        f"- Command: `{t['command']}`", f"- Training (2-core CPU): {train}.", "",
        "Held-out pairs (test split, held-out seeds, never used for training or choices):", "",
        format_rows([Row(**r) for r in t["rows"]]), ""])


def with_hyperfeatures(card: str, target: Path = MODEL_DIR) -> str:
    """`card` with its hyperfeatures section replaced by the current one."""
    head = card.split(HF_HEADING)[0].rstrip() + "\n"
    section = hyperfeatures_section(target)
    return head + ("\n" + section if section else "")


def ship(run: str | Path, target: Path = MODEL_DIR) -> Path:
    run = Path(run)
    best = json.loads((run / "best.json").read_text())
    if target.exists():  # aggregation networks shipped before fit the old weights' features: gone with them
        shutil.rmtree(target)
    shutil.copytree(run / "best", target)
    (target / RECOMMENDED_FILE).write_text(json.dumps({**RECOMMENDED, "caveats": CAVEATS}, indent=1) + "\n")
    (target / "MODEL_CARD.md").write_text(model_card(run, best))
    return target
