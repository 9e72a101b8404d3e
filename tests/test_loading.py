import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig, ModelLoadError, load_pipeline


def _unet_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))


def test_tiny_is_seeded_and_sd_shaped(tiny_pipe):
    again = load_pipeline("tiny")
    assert _unet_equal(again, tiny_pipe)
    assert not _unet_equal(load_pipeline("tiny", seed=1), tiny_pipe)
    assert len(tiny_pipe.unet.up_blocks[1].attentions) == 3


def test_save_pretrained_roundtrip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(tmp_path / "pipe")
    assert _unet_equal(loaded, tiny_pipe)
    cfg = EmerDiffConfig(num_masks=3, resolution=64)
    img = torch.rand(3, 64, 64)
    a = EmerDiff(loaded, cfg, backend="naive")(img)
    b = EmerDiff(tiny_pipe, cfg, backend="naive")(img)
    assert (a.labels == b.labels).all()


def test_random_init_from_config_folder(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "cfg")
    for f in (tmp_path / "cfg").rglob("*.safetensors"):
        f.unlink()  # a skeleton: configs and tokenizer only
    a = load_pipeline(tmp_path / "cfg", random_init=True, seed=5)
    b = load_pipeline(tmp_path / "cfg", random_init=True, seed=5)
    assert _unet_equal(a, b) and not _unet_equal(a, tiny_pipe)
    with pytest.raises(ModelLoadError, match="not a diffusers config folder"):
        load_pipeline(tmp_path, random_init=True)


def test_pipeline_object_passes_through(tiny_pipe):
    assert load_pipeline(tiny_pipe) is tiny_pipe


@pytest.mark.parametrize("source, words", [
    ("/nonexistent/model", "not found"),
    ("./missing.safetensors", "not found"),
])
def test_missing_weights_give_one_line_error(source, words):
    with pytest.raises(ModelLoadError, match=words) as exc:
        load_pipeline(source)
    assert "\n" not in str(exc.value) and "--model tiny" in str(exc.value)


def test_folder_without_pipeline(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        load_pipeline(tmp_path)


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once when huggingface_hub is imported (earlier in the worker): offline for this test too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="could not load weights from 'nobody/no-such-model'") as exc:
        load_pipeline("nobody/no-such-model")
    assert exc.value.__cause__ is None and "\n" not in str(exc.value)


def test_bad_single_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_pipeline(f, config=tmp_path)


def test_variant_and_hub_options_reach_from_pretrained(tiny_pipe, tmp_path, monkeypatch):
    """A real fp16 variant saved by the test, found only with --variant fp16; the CLI's hub
    options arrive at diffusers' from_pretrained unchanged."""
    tiny_pipe.save_pretrained(tmp_path / "pipe", variant="fp16")
    assert any(".fp16." in p.name for p in (tmp_path / "pipe" / "unet").iterdir())
    loaded = load_pipeline(tmp_path / "pipe", variant="fp16", local_files_only=True)
    assert _unet_equal(loaded, tiny_pipe)
    from diffusers import StableDiffusionPipeline

    from emerdiff_fast.cli import main

    seen = {}

    def fake(source, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", fake)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    rc = main(["segment", str(img), "--out", str(tmp_path / "o"), "--model", "org/model", "--variant", "fp16",
               "--revision", "abc123", "--local-files-only", "--cache-dir", str(tmp_path / "hf"), "--quiet"])
    assert rc == 2
    assert {k: seen[k] for k in ("variant", "revision", "local_files_only", "cache_dir")} == {
        "variant": "fp16", "revision": "abc123", "local_files_only": True, "cache_dir": str(tmp_path / "hf")}
