"""The mini model's parts: tokenizer, architecture, grid arithmetic, recommended settings,
and a training smoke test (a few steps, finite falling losses, a checkpoint that resumes)."""
import json

import numpy as np
import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig, recommended_config
from emerdiff_fast.config import layer_grid
from emerdiff_fast.loading import recommended_settings
from emerdiff_fast.output import CheckpointError, read_checkpoint
from emerdiff_fast.mini import MAX_TOKENS, build_models, build_tokenizer, caption_words
from emerdiff_fast.scenes import render_batch

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)


def test_every_caption_word_is_one_token():
    tok = build_tokenizer()
    for w in caption_words():
        assert tok.tokenize(w) == [w + "</w>"], w
    _, _, captions = render_batch(range(500))
    assert max(len(tok(c).input_ids) for c in captions) <= MAX_TOKENS
    assert len(tok.tokenize("a zebra")) > 2  # unknown words still tokenize (as characters)


def test_architecture_has_sd_naming_and_an_8x8_feature_grid():
    vae, unet, text, _ = build_models()
    names = dict(unet.named_modules())
    for layer in ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.2.transformer_blocks.0.attn2"):
        assert layer in names
        assert layer_grid(unet.config, vae.config, (64, 64), layer) == (8, 8)
    # no attention at the 16x16 level (measured to learn near-uniform maps in a first probe)
    assert not any(".attentions." in n for n in names if n.startswith(("down_blocks.0", "up_blocks.2")))
    assert unet.config.cross_attention_dim == text.config.hidden_size


def test_layer_grid_is_sds_one_32nd_on_the_tiny_model(tiny_pipe):
    u, v = tiny_pipe.unet.config, tiny_pipe.vae.config
    assert layer_grid(u, v, (512, 512), "up_blocks.1.attentions.2.transformer_blocks.0.attn2") == (16, 16)
    assert layer_grid(u, v, (512, 512), "up_blocks.3.attentions.0.transformer_blocks.0.attn1") == (64, 64)
    assert layer_grid(u, v, (512, 512), "down_blocks.2.attentions.0.transformer_blocks.0.attn1") == (16, 16)
    assert layer_grid(u, v, (512, 512), "mid_block.attentions.0.transformer_blocks.0.attn1") == (8, 8)


def test_recommended_settings_from_a_model_folder(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    assert recommended_settings(tmp_path) == {}
    (tmp_path / "emerdiff.json").write_text(json.dumps({"resolution": 128, "num_masks": 5}))
    assert recommended_settings(tmp_path) == {"resolution": 128, "num_masks": 5}
    from emerdiff_fast import load_pipeline

    pipe = load_pipeline(tmp_path)
    assert EmerDiff(pipe).config == EmerDiffConfig(resolution=128, num_masks=5)
    assert recommended_config(pipe, num_masks=7) == EmerDiffConfig(resolution=128, num_masks=7)
    (tmp_path / "emerdiff.json").write_text(json.dumps({"masks": 5}))
    with pytest.raises(ValueError, match="unknown settings: masks"):
        recommended_settings(tmp_path)


def test_eval_refuses_a_cache_made_at_other_model_settings(tmp_path):
    """A model's own settings beyond the CLI options (the mini model's t_modulate) are part
    of eval's run.json: a cache made before they changed is refused, not mixed in."""
    from emerdiff_fast.cli import make_parser
    from emerdiff_fast.commands.common import resolve_model_args
    from emerdiff_fast.evaluate import _settings, start_run

    model = tmp_path / "model"
    model.mkdir()
    argv = ["eval", "--dataset", "shapes", "--root", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "out")]

    def settings(t_modulate):
        (model / "emerdiff.json").write_text(json.dumps({"resolution": 64, "t_modulate": t_modulate}))
        args = make_parser().parse_args(argv)
        resolve_model_args(args)
        return _settings(args)

    start_run(tmp_path / "out", settings(481))
    start_run(tmp_path / "out", settings(481))  # same settings: resumes
    with pytest.raises(ValueError, match=r"model_settings: \{'t_modulate': 481\} there, \{'t_modulate': 881\} now"):
        start_run(tmp_path / "out", settings(881))


def test_training_smoke_losses_fall_and_the_checkpoint_resumes(tmp_path):
    from emerdiff_fast.mini.train import TrainConfig, train

    cfg = TrainConfig(pool=16, vae_steps=8, vae_batch=4, unet_steps=6, unet_batch=8, unet_lr=1e-3, warmup=1,
                      checkpoint_every=3, eval_every=3, eval_scenes=1, eval_masks=3, attention_scenes=2)
    train(tmp_path / "a", cfg.__class__(**{**cfg.__dict__, "unet_steps": 3}), progress=False)
    first = read_checkpoint(tmp_path / "a" / "unet.pt")  # what resuming reads: tensors and plain containers
    assert first["step"] == 3
    train(tmp_path / "a", cfg, progress=False)           # resumes at step 3
    train(tmp_path / "b", cfg, progress=False)           # the same run, uninterrupted
    a, b = (read_checkpoint(tmp_path / r / "unet.pt") for r in "ab")
    assert a["step"] == b["step"] == 6
    for key in ("unet", "ema_unet", "text"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]
    losses = [r["loss"] for r in log]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    vae = read_checkpoint(tmp_path / "b" / "vae.pt")
    assert vae["step"] == 8 and np.isfinite(vae["rec_loss"])
    assert (tmp_path / "b" / "best" / "model_index.json").exists()
    from emerdiff_fast import load_pipeline

    pipe = load_pipeline(tmp_path / "b" / "best")        # a standard diffusers folder
    assert pipe.vae.config.scaling_factor != 0.18215     # measured on the scenes, not SD's


class _RunsCode:
    """Unpickling this calls Path.touch: what a hostile checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path, capsys):
    from emerdiff_fast.mini.__main__ import main

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "step": _RunsCode(marker)}, run / "vae.pt")
    with pytest.raises(CheckpointError, match="vae.pt: refused"):
        read_checkpoint(run / "vae.pt")
    assert main(["train", "--out", str(run), "--pool", "4", "--quiet"]) == 2  # resuming the run
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log's lines
    assert err.startswith(f"error: {run / 'vae.pt'}: refused") and "could run code" in err, err
    assert not marker.exists()
    torch.load(run / "vae.pt", weights_only=False)  # the check can fail: unrestricted loading runs it
    assert marker.exists()


def test_every_checkpoint_read_goes_through_read_checkpoint():
    from pathlib import Path

    import emerdiff_fast

    package = Path(emerdiff_fast.__file__).parent
    loads = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py") if p.name != "output.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if "torch.load(" in line]
    assert not loads, loads
