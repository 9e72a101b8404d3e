"""The built-in `mini` model: a miniature Stable Diffusion trained here on generated scenes
(scenes.py), shipped as a standard diffusers folder (`MODEL_DIR`), so `load_pipeline("mini")`
loads it offline like any SD checkpoint.

It knows generated shapes only (flat-coloured discs, rectangles and triangles on plain,
gradient, striped or noisy backgrounds at 64 px). For photographs use a real SD checkpoint.

Architecture (all standard diffusers/transformers classes):
* AutoencoderKL, f = 4 (64 px -> 4 x 16 x 16 latents), scaling factor measured on the
  training scenes so the latents have unit variance;
* UNet2DConditionModel with SD's block naming at 3 levels: up_blocks.1 runs at 8 x 8 and
  holds `up_blocks.1.attentions.{0,2}.transformer_blocks.0.attn2` (EmerDiff's feature and
  modulated layers). Attention only at 8 x 8 and in the mid block (a first probe measured
  that attention at 16 x 16 learns near-uniform maps, which spread the modulation);
* CLIPTextModel with a CLIP tokenizer whose BPE merges make every caption word one token;
* SD's noise schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction).

`emerdiff.json` beside the weights holds the model's recommended EmerDiff settings
(loading.recommended_settings), used wherever the user does not set them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..scenes import BACKGROUNDS, CLASSES, COLOURS

MODEL_DIR = Path(__file__).with_name("model")
RESOLUTION = 64
MAX_TOKENS = 24  # the longest caption (4 shapes) is 21 tokens with start and end
CROSS_DIM = 64


def caption_words() -> list[str]:
    words = {"a", "an", "and", "on", "background", *COLOURS, *CLASSES[1:], *BACKGROUNDS.values()}
    return sorted(words)


def _bpe(tokens: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: merge the lowest-ranked adjacent pair until none is ranked."""
    while len(tokens) > 1:
        pairs = [(tokens[i], tokens[i + 1]) for i in range(len(tokens) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(tokens):
            if i < len(tokens) - 1 and (tokens[i], tokens[i + 1]) == best:
                merged.append(tokens[i] + tokens[i + 1])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        tokens = merged
    return tokens


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A vocabulary and merge list under which each of `words` is a single token (merges
    are added, lowest rank first, until every word's BPE is one token), over a base of
    lower-case letters, digits and punctuation so any text still tokenizes."""
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for w in words:
            pieces = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
            if len(pieces) > 1:
                ranks[(pieces[0], pieces[1])] = len(ranks)
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
                changed = True
    return vocab, sorted(ranks, key=ranks.get)


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(caption_words())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=MAX_TOKENS)


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
                block_out_channels=(32, 64, 64), sample_size=RESOLUTION,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def unet_config() -> dict:
    return dict(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(48, 96, 96), norm_num_groups=16, attention_head_dim=4,
                cross_attention_dim=CROSS_DIM,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def text_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=4 * CROSS_DIM,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                projection_dim=CROSS_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build_models(seed: int = 0):
    """Untrained (seeded) VAE, UNet, text encoder and tokenizer of the mini architecture."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config())
        unet = UNet2DConditionModel(**unet_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    return vae, unet, text_encoder, tokenizer
