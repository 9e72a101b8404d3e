"""Model families beyond SD 1.x/2.x-base: SDXL-architecture UNets (two text encoders, the
text_time embedding) and v-prediction checkpoints, each saved with save_pretrained and
loaded back through a folder, as a user's checkpoint would be."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from emerdiff_fast import EmerDiff, EmerDiffConfig, load_pipeline
from emerdiff_fast.config import default_layers
from emerdiff_fast.loading import ModelLoadError

from conftest import rel_err
from test_oracle import _final_latents, oracle_difference_maps
from tiny_models import tiny_sdxl_pipeline, tiny_v_pipeline

SKELETONS = Path(__file__).resolve().parents[2] / "shared" / "model-skeletons"
CFG = EmerDiffConfig(num_masks=4, seed=1)  # resolution and layers: the model's own


def _saved(tmp_path_factory, name: str, pipe):
    folder = tmp_path_factory.mktemp("models") / name
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return _saved(tmp_path_factory, "tiny-sdxl", tiny_sdxl_pipeline())


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    return _saved(tmp_path_factory, "tiny-v", tiny_v_pipeline())


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    return load_pipeline(sdxl_folder)  # as a user's checkpoint: through its folder


@pytest.fixture(scope="module")
def v_pipe(v_folder):
    return load_pipeline(v_folder)


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _skeleton_unet(name: str, **changes):
    path = SKELETONS / name / "unet" / "config.json"
    if not path.exists():
        pytest.skip(f"no {name} skeleton beside this checkout")
    return _meta_unet({**json.loads(path.read_text()), **changes})


@pytest.mark.parametrize("model, changes, block, attentions", [
    ("sd15", {}, 1, (0, 2)),
    ("sd21-base", {}, 1, (0, 2)),
    ("sdxl-base", {}, 0, (0, 2)),
    # SSD-1B and Segmind Vega (their published structures: SDXL's blocks with transformers removed
    # unevenly, up_blocks.0 4/4/10 and 2/2/2 deep, no attention in the mid block): SDXL's layers
    ("sdxl-base", dict(transformer_layers_per_block=[1, 2, 4], mid_block_type="UNetMidBlock2D",
                       reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1]), 0, (0, 2)),
    ("sdxl-base", dict(transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D",
                       reverse_transformer_layers_per_block=[[2, 2, 2], [1, 1, 1], 1]), 0, (0, 2)),
    # one resnet per block, so two attentions per up block (no released model): the rule on it
    ("sdxl-base", dict(layers_per_block=1, transformer_layers_per_block=[1, 1, 4]), 0, (0, 1)),
    # an attention left without transformer blocks is passed over
    ("sdxl-base", dict(transformer_layers_per_block=[1, 2, 4],
                       reverse_transformer_layers_per_block=[[0, 4, 4], [1, 1, 1], [0, 0, 0]]), 0, (1, 2)),
])
def test_default_layers_come_from_the_structure(model, changes, block, attentions):
    unet = _skeleton_unet(model, **changes)
    if "reverse_transformer_layers_per_block" in changes:  # the structure is the one described
        depths = [len(a.transformer_blocks) for a in unet.up_blocks[0].attentions]
        assert depths == changes["reverse_transformer_layers_per_block"][0]
    expected = tuple(f"up_blocks.{block}.attentions.{a}.transformer_blocks.0.attn2" for a in attentions)
    assert default_layers(unet) == expected
    if model.startswith("sd1") or model.startswith("sd2"):  # SD: exactly the authors' (and the old defaults)
        assert expected == (EmerDiffConfig().feature_layer, EmerDiffConfig().modulated_layer)


def test_sdxl_folder_loads_as_sdxl_with_its_own_defaults(sdxl, sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    assert isinstance(sdxl, StableDiffusionXLPipeline)
    seg = EmerDiff(sdxl, CFG, backend="naive")
    assert seg.config.resolution == 128  # sample size 16 x VAE factor 8
    assert seg.config.modulated_layer == "up_blocks.0.attentions.2.transformer_blocks.0.attn2"
    assert seg.feature_grid == (4, 4)
    # a value the user gives is kept
    assert EmerDiff(sdxl, CFG.replace(resolution=192), backend="naive").config.resolution == 192
    half = load_pipeline(sdxl_folder, dtype=torch.float16)  # force_upcast: the VAE stays float32
    assert (half.unet.dtype, half.vae.dtype) == (torch.float16, torch.float32)
    # --random-init on an SDXL config folder: both text encoders, fresh seeded weights, one
    # dtype even where a config says float16 (SDXL base's text_encoder_2 does)
    configs = tmp_path / "configs"
    shutil.copytree(sdxl_folder, configs)
    te2 = configs / "text_encoder_2" / "config.json"
    te2.write_text(json.dumps({**json.loads(te2.read_text()), "torch_dtype": "float16", "dtype": "float16"}))
    fresh = load_pipeline(configs, random_init=True, seed=3)
    assert isinstance(fresh, StableDiffusionXLPipeline) and fresh.text_encoder_2 is not None
    assert {p.dtype for p in fresh.text_encoder_2.parameters()} == {torch.float32}
    assert EmerDiff(fresh, CFG, backend="naive").cond.text_embeds.dtype == torch.float32
    assert fresh.config.force_zeros_for_empty_prompt
    assert not torch.equal(fresh.unet.conv_in.weight, sdxl.unet.conv_in.weight)


@pytest.mark.parametrize("family", ["sdxl", "v"])
def test_fast_equals_reference_and_lambda_zero_vanishes(family, sdxl, v_pipe, rand_image):
    # SDXL at its own 128 px (grid 4x4); the v model at 64 px (SD's grid 2x2: K = 4 fills it)
    pipe, cfg = (sdxl, CFG.replace(resolution=128)) if family == "sdxl" else (v_pipe, CFG.replace(resolution=64))
    image = rand_image(4, 90, 120)
    ref = EmerDiff(pipe, cfg, backend="reference")(image)
    fast = EmerDiff(pipe, cfg, backend="fast")(image)
    assert np.abs(ref.difference_maps).max() > 0.1
    assert rel_err(fast.difference_maps, ref.difference_maps) < 1e-4
    # the same segments from both backends, Triton kernels on (k-means' restart choice and ids)
    assert (fast.labels == ref.labels).mean() >= 0.995
    for backend, tol in (("reference", 0.0), ("fast", 1e-4)):
        seg = EmerDiff(pipe, cfg.replace(lam=0.0), backend=backend)
        x0, finals, result = _final_latents(seg, image)
        assert np.abs(result.difference_maps).max() <= tol
        for run in finals:  # every run ends on the photo's own latent: the inversion holds
            assert float((run - x0[0]).norm() / x0[0].norm()) <= 1e-5


@pytest.mark.usefixtures("triton_off")  # the graphs, the CLI, the memory: not the kernels
def test_compiled_sdxl_unet_traces_once(sdxl, rand_image):
    """The added conditions are graph inputs like the context: one graph for step 0 and one
    for the later steps, reused by the next image without recompiling."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cfg = CFG.replace(num_masks=3, resolution=64)
    seg = EmerDiff(sdxl, cfg, backend="fast", max_batch=4)
    seg.unet_call = torch.compile(sdxl.unet, backend="eager", fullgraph=True, dynamic=False)
    counters.clear()
    first = seg(rand_image(0, 64, 64))
    assert counters["stats"]["unique_graphs"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        seg(rand_image(1, 64, 64))
    assert counters["stats"]["unique_graphs"] == 2
    eager = EmerDiff(sdxl, cfg, backend="fast", max_batch=4)(rand_image(0, 64, 64))
    assert rel_err(first.difference_maps, eager.difference_maps) < 1e-5


def test_v_prediction_reference_matches_the_oracle(rand_image):
    """The float64 oracle takes its reverse step from diffusers' DDIMScheduler, which turns
    v into its prediction itself: an independent check of eps = sqrt(a) v + sqrt(1-a) x."""
    from emerdiff_fast.images import load_image, to_model_input

    pipe = tiny_v_pipeline(dtype=torch.float64)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    cfg = EmerDiffConfig(num_masks=3, resolution=64, seed=2)
    image = rand_image(2, 64, 64)
    ref = EmerDiff(pipe, cfg, backend="reference")(image)
    pixels = to_model_input(load_image(image), cfg.resolution)[None].double()
    expected = oracle_difference_maps(pipe, pixels, torch.from_numpy(ref.low_res_labels).flatten(), cfg).numpy()
    assert rel_err(ref.difference_maps, expected) <= 1e-5
    # and the v model's output is not an epsilon: read as one, the maps differ
    eps_read = EmerDiff(tiny_v_pipeline(dtype=torch.float64), cfg, backend="reference")
    eps_read.schedule = dataclasses.replace(eps_read.schedule, prediction="epsilon")
    assert rel_err(eps_read(image).difference_maps, expected) > 1e-2


def _record_unet_kwargs(unet):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs)

    return seen, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.usefixtures("triton_off")  # what each UNet call gets, not the kernels
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_every_sdxl_unet_call_gets_the_pooled_text_and_the_processing_size(sdxl, rand_image, backend):
    seg = EmerDiff(sdxl, CFG.replace(keep_aspect=True, resolution=128), backend=backend)
    seen, handle = _record_unet_kwargs(sdxl.unet)
    try:
        result = seg(rand_image(0, 100, 150))
    finally:
        handle.remove()
    h, w = seg.processing_size((150, 100))
    assert result.labels.shape == (100, 150) and (h, w) == (128, 160)  # SDXL's sides: multiples of 32
    assert len(seen) > 10  # feature run, the reference run, the modulated runs
    for kwargs in seen:
        added = kwargs["added_cond_kwargs"]
        assert added["time_ids"].tolist() == [[h, w, 0, 0, h, w]] * added["time_ids"].shape[0]
        assert added["text_embeds"].shape == (kwargs["encoder_hidden_states"].shape[0], 32)


def test_sdxl_empty_prompt_respects_force_zeros():
    from emerdiff_fast.conditioning import empty_prompt

    zeros = empty_prompt(tiny_sdxl_pipeline(), "cpu", torch.float32, (128, 128))
    assert zeros.context.abs().max() == 0 and zeros.text_embeds.abs().max() == 0
    pipe = tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False)
    encoded = empty_prompt(pipe, "cpu", torch.float32, (128, 128))
    assert encoded.context.shape == (1, 77, 64) and encoded.context.abs().max() > 0
    with torch.inference_mode():  # SDXL's rule: penultimate hidden states of both encoders
        ids = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
        first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(encoded.context[..., :32], first)


def test_sdxl_hyperfeatures_and_label_heat_maps(sdxl, rand_image):
    from emerdiff_fast.hyperfeatures import ExtractConfig, FeatureExtractor
    from emerdiff_fast.vocabulary import Vocabulary

    ex = FeatureExtractor(sdxl, ExtractConfig(num_timesteps=5, save_timestep=(4, 0), load_resolution=128))
    assert ex.config.layers == tuple((i, j) for i in range(3) for j in range(3))  # SDXL's 9 decoder resnets
    feats = ex.extract([rand_image(1, 64, 64)])
    assert [m.shape[:2] for m in feats.maps] == [(1, 2)] * 9 and all(torch.isfinite(m.float()).all()
                                                                       for m in feats.maps)
    seen, handle = _record_unet_kwargs(sdxl.unet)
    try:
        maps = Vocabulary(sdxl, ["a", "b c"], resolution=128).heat_maps(rand_image(2, 64, 80))
    finally:
        handle.remove()
    assert maps.shape == (2, 64, 80) and torch.isfinite(maps).all()
    assert all(k["added_cond_kwargs"]["text_embeds"].abs().max() > 0 for k in seen)  # the labels' pooled text


def test_v_prediction_hyperfeatures_invert_with_the_converted_noise(v_pipe, rand_image):
    """Two DDIM inversion steps written out by hand, with eps = sqrt(a) v + sqrt(1 - a) x."""
    from emerdiff_fast.hyperfeatures import ExtractConfig, FeatureExtractor
    from emerdiff_fast.hyperfeatures.extract import ddim_step

    ex = FeatureExtractor(v_pipe, ExtractConfig(num_timesteps=2, save_timestep=(0, 1), load_resolution=128))
    assert ex.prediction == "v_prediction" and ex.walk == [-1, 0, 500]
    x = ex.encode([rand_image(3, 64, 64)])
    a = ex.alpha
    with torch.inference_mode():
        for i in range(2):
            v = v_pipe.unet(x, torch.tensor([float(ex.walk[i])]), **ex.cond.kwargs(1)).sample
            eps = a[i].sqrt() * v + (1 - a[i]).sqrt() * x
            x, read_as_eps = ddim_step(x, eps, a[i], a[i + 1]), ddim_step(x, v, a[i], a[i + 1])
    got = ex._run(ex.encode([rand_image(3, 64, 64)]), inversion=True).latents
    assert torch.allclose(got, x, atol=1e-5)
    assert not torch.allclose(got, read_as_eps, atol=1e-3)


@pytest.mark.usefixtures("triton_off")  # the graphs, the CLI, the memory: not the kernels
def test_cli_segments_with_saved_folders(sdxl_folder, v_folder, photo_path, tmp_path, capsys):
    from PIL import Image

    from emerdiff_fast.cli import main

    for folder, size in ((sdxl_folder, []), (v_folder, ["--resolution", "64"])):  # SDXL: its own 128
        out = tmp_path / folder.name
        rc = main(["segment", str(photo_path), "--out", str(out), "--model", str(folder), "--masks", "3",
                   *size, "--quiet"])
        assert rc == 0
        assert Image.open(out / "astronaut.labels.png").size == (96, 80)
        assert "Loading" not in capsys.readouterr().err  # --quiet hides diffusers' and transformers' bars


def test_unsupported_pipelines_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="is a FluxPipeline; EmerDiff runs on StableDiffusionPipeline and "
                                             "StableDiffusionXLPipeline"):
        load_pipeline(folder)


def test_single_sdxl_file_is_recognised_by_its_tensor_names(tmp_path):
    from safetensors.torch import save_file

    from emerdiff_fast.loading import _single_file_class

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, tmp_path / "xl.safetensors")
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, tmp_path / "sd.safetensors")
    assert _single_file_class(tmp_path / "xl.safetensors") == "StableDiffusionXLPipeline"
    assert _single_file_class(tmp_path / "sd.safetensors") == "StableDiffusionPipeline"


@pytest.mark.usefixtures("triton_off")  # the graphs, the CLI, the memory: not the kernels
def test_memory_model_on_the_sdxl_skeleton_matches_a_real_cpu_run():
    """The meta-device trace against the same fast-path UNet call run for real on the CPU
    (full-size SDXL base, uninitialised weights: activations do not depend on their values),
    both counted by the same live-tensor tracker; tests/test_memory.py checks the tracker
    against the process's resident memory on the tiny model."""
    from emerdiff_fast.attention import Modulation, RunState, SharedProcessor, installed, make_processors
    from emerdiff_fast.conditioning import placeholder
    from emerdiff_fast.memory import MemoryModel, meta_models, peak_bytes

    if not (SKELETONS / "sdxl-base" / "unet" / "config.json").exists():
        pytest.skip("no sdxl-base skeleton beside this checkout")
    configs = [json.loads((SKELETONS / "sdxl-base" / p / "config.json").read_text()) for p in ("unet", "vae")]
    members, res = 3, 128
    unet = meta_models(*configs, torch.float32)[0].to_empty(device="cpu")
    _, layer = default_layers(unet)
    state = RunState(mode="shared", modulated_layer=layer, modulate_now=True)
    state.modulation = Modulation(torch.zeros(members, 16), torch.zeros(members, dtype=torch.long),
                                  torch.zeros(members))
    x = torch.randn(members, 4, res // 8, res // 8)
    cond = placeholder(unet.config, (res, res), torch.float32, "cpu").kwargs(members)
    with installed(unet, make_processors(unet, SharedProcessor, state)):
        real = peak_bytes(lambda: unet(x, torch.tensor(281), **cond).sample,
                          [*unet.parameters(), *unet.buffers(), x, *cond["added_cond_kwargs"].values(),
                           cond["encoder_hidden_states"]])
    predicted = MemoryModel.of(*configs, res, torch.float32, layer).unet_call(members)
    assert predicted > 10e6
    assert abs(real / predicted - 1) < 0.01, (real, predicted)


def test_a_pipeline_passed_in_keeps_a_force_upcast_vae_in_float32(our_log, monkeypatch):
    """SDXL's VAE overflows in float16 (NaN maps): the force_upcast rule holds for pipelines the
    user built, and for decode_dtype="float16", not only for checkpoints load_pipeline reads."""
    from emerdiff_fast import segmenter

    monkeypatch.setattr(segmenter, "_SAID", set())  # the once-only messages, fresh for this test
    half = load_pipeline(tiny_sdxl_pipeline(), dtype=torch.float16)
    assert (half.unet.dtype, half.vae.dtype) == (torch.float16, torch.float32)
    user = tiny_sdxl_pipeline().to(torch.float16)  # built and cast by the user, handed to EmerDiff
    EmerDiff(user, CFG.replace(resolution=128), backend="naive")
    assert user.vae.dtype == torch.float32
    seg = EmerDiff(tiny_sdxl_pipeline(), CFG.replace(resolution=128, decode_dtype="float16"), backend="naive")
    assert seg.decode_vae.dtype == torch.float32
    assert "decode_dtype=float16: this VAE's config says force_upcast" in our_log.text
    sd = load_pipeline("tiny")  # its VAE config does not name force_upcast (AutoencoderKL fills in True)
    assert sd.vae.config.force_upcast and load_pipeline(sd, dtype=torch.float16).vae.dtype == torch.float16


def test_edm_schedules_per_channel_latents_and_mismatched_unets_are_refused_in_one_line():
    from diffusers import EDMEulerScheduler

    pipe = load_pipeline("tiny")
    pipe.scheduler = EDMEulerScheduler()  # Playground v2.5, CosXL
    with pytest.raises(ModelLoadError, match="EDMEulerScheduler, an EDM noise schedule"):
        EmerDiff(pipe, CFG.replace(resolution=64))
    pipe = load_pipeline("tiny")
    pipe.vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)  # Playground v2.5's VAE
    with pytest.raises(ModelLoadError, match="latents_mean/latents_std"):
        load_pipeline(pipe)
    sd = load_pipeline("tiny")
    sd.unet = tiny_sdxl_pipeline().unet  # as a single SDXL .ckpt read as SD would load
    with pytest.raises(ModelLoadError, match="addition_embed_type is 'text_time'.*single .ckpt"):
        load_pipeline(sd)


def test_generate_and_extract_share_the_empty_prompt(monkeypatch):
    """Hyperfeatures on SDXL: generate("") conditions on what extract does (zeros where
    force_zeros_for_empty_prompt), not on "" through both encoders."""
    from emerdiff_fast.hyperfeatures import ExtractConfig, FeatureExtractor

    ex = FeatureExtractor(tiny_sdxl_pipeline(), ExtractConfig(num_timesteps=1, save_timestep=(0,)))
    seen = []

    def run(x, inversion, cond=None):
        seen.append(cond)
        raise KeyboardInterrupt  # stop before any UNet call

    monkeypatch.setattr(ex, "_run", run)
    with pytest.raises(KeyboardInterrupt):
        ex.generate(1, "")
    assert seen[0] is ex.cond and ex.cond.context.abs().max() == 0


def test_api_resolutions_follow_the_model(tiny_pipe):
    from emerdiff_fast.hyperfeatures import ExtractConfig, FeatureExtractor
    from emerdiff_fast.vocabulary import Vocabulary

    sdxl = tiny_sdxl_pipeline()  # sample size 16 x VAE factor 8: 128 px
    assert FeatureExtractor(sdxl).config.load_resolution == 128
    assert FeatureExtractor(sdxl).config.output_resolution == 16
    assert FeatureExtractor(tiny_pipe).config.load_resolution == EmerDiff(tiny_pipe, backend="naive").config.resolution
    assert FeatureExtractor(sdxl, ExtractConfig(load_resolution=64)).config.load_resolution == 64
    assert Vocabulary(sdxl, ["a"]).resolution == 128 and Vocabulary(sdxl, ["a"], resolution=64).resolution == 64
