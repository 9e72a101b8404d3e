"""Diffusion Hyperfeatures: hooks, DDIM bookkeeping, the aggregation network's learning,
checkpoints, readers and the CLI, on the tiny model and constructed data."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from emerdiff_fast.hyperfeatures import (AggregationConfig, AggregationNetwork, ExtractConfig, Features,
                                         Hyperfeatures, Pair, TrainConfig)
from emerdiff_fast.hyperfeatures.correspondence import grid_index, match, pck
from emerdiff_fast.hyperfeatures.extract import ALL_STEPS, FeatureExtractor, ddim_grid
from emerdiff_fast.hyperfeatures.train import evaluate_pairs, train


def test_hooks_capture_the_12_decoder_resnets(tiny_pipe):
    ex = FeatureExtractor(tiny_pipe, ExtractConfig(load_resolution=128))
    f = ex.extract(torch.rand(2, 3, 128, 128) * 2 - 1)
    side = 128 // 8
    expect = [(2, 11, c, side >> (3 - i), side >> (3 - i)) for i in range(4)
              for c in [tiny_pipe.unet.up_blocks[i].resnets[j].conv2.out_channels for j in range(3)]]
    assert [tuple(m.shape) for m in f.maps] == expect and f.dims == ex.dims
    assert all(m.dtype == torch.bfloat16 for m in f.maps) and f.save_timestep == ALL_STEPS
    # one-step: the UNet on the clean latent at t = -1; its conv2 outputs, captured independently
    ex1 = FeatureExtractor(tiny_pipe, ExtractConfig.one_step(load_resolution=128, storage_dtype=torch.float32))
    x = ex1.encode(torch.rand(1, 3, 128, 128) * 2 - 1)
    seen = {}
    handles = [tiny_pipe.unet.up_blocks[i].resnets[j].conv2.register_forward_hook(
        lambda m, a, o, k=(i, j): seen.__setitem__(k, o)) for i in range(4) for j in range(3)]
    with torch.inference_mode():
        tiny_pipe.unet(x, torch.tensor([-1.0]), encoder_hidden_states=ex1.context)
    for h in handles:
        h.remove()
    f1 = ex1._run(x, inversion=True)
    for layer, (i, j) in enumerate(ex1.config.layers):
        assert torch.allclose(f1.maps[layer][:, 0], seen[(i, j)], atol=1e-6)
    # the residual branch, not the block output (which adds the shortcut)
    assert f1.maps[0].shape[2] == tiny_pipe.unet.up_blocks[0].resnets[0].conv2.out_channels


def test_ddim_inversion_then_sampling_reconstructs(tiny_pipe):
    """With a noise predictor that is exact for the trajectory (a constant eps: x_t =
    sqrt(a_t) x0 + sqrt(1 - a_t) eps is then the DDIM path both ways), inversion followed by
    sampling returns the latent to float32 rounding (measured 1.0e-6; bound 1e-5). It tests
    the walk, the alphas and the saved-index bookkeeping; with a real model the error is
    DDIM inversion's own (the eps of the next step stands in for the current one), which a
    random tiny model makes meaningless (measured: relative error 5.3-5.5)."""
    ex = FeatureExtractor(tiny_pipe, ExtractConfig(load_resolution=64, save_timestep=(0, 49)))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ex.unet_call = lambda x, t, encoder_hidden_states: SimpleNamespace(sample=eps.expand_as(x).to(x.dtype))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noisy = ex._run(x0, inversion=True).latents
    a980 = ex.alpha[-1]
    assert torch.allclose(noisy, a980.sqrt() * x0 + (1 - a980).sqrt() * eps, atol=1e-5)
    back = ex._run(noisy, inversion=False).latents
    assert float((back - x0).norm() / x0.norm()) < 1e-5
    assert ddim_grid(50)[:3] == [0, 20, 40] and ex.walk[0] == -1 and ex.alpha[0] == 1


def synthetic(seed=0, S=64, R=32, L=6, T=2, C=8):
    """Features that warp with their image: layer 0 at timestep 0 encodes the base image's x
    coordinate (random Fourier features), layer 1 its y; every other (layer, timestep) is
    noise. One layer alone is ambiguous along the other axis; both together locate a point."""
    rng = np.random.default_rng(seed)
    freqs, phases = rng.uniform(1, 6, (2, C // 2)), rng.uniform(0, 6.3, (2, C // 2))

    def warp():
        ang, sc = rng.uniform(-0.3, 0.3), rng.uniform(0.85, 1.15)
        tx, ty = rng.uniform(-6, 6, 2)
        c, s = np.cos(ang) * sc, np.sin(ang) * sc
        m = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
        m[:2, 2] = [S / 2 - c * S / 2 + s * S / 2 + tx, S / 2 - s * S / 2 - c * S / 2 + ty]
        return m

    def features(m, k):
        g = np.random.default_rng(1000 + k)
        ys, xs = np.mgrid[0:R, 0:R] * (S / R) + S / R / 2
        inv = np.linalg.inv(m)
        base = (inv[:2, :2] @ np.stack([xs, ys], -1).reshape(-1, 2).T).T + inv[:2, 2]
        maps = []
        for layer in range(L):
            per_t = []
            for t in range(T):
                if t == 0 and layer < 2:
                    arg = base[:, layer:layer + 1] / S * 2 * np.pi * freqs[layer] + phases[layer]
                    f = np.concatenate([np.sin(arg), np.cos(arg)], 1)
                else:
                    f = g.normal(0, 1, (R * R, C))
                per_t.append(torch.tensor(f.T.reshape(C, R, R), dtype=torch.float32))
            maps.append(torch.stack(per_t)[None])
        return Features(maps, tuple(range(T)), torch.zeros(1))

    ms = {f"i{k}": np.eye(3) if k == 0 else warp() for k in range(24)}
    feats = {n: features(m, k) for k, (n, m) in enumerate(ms.items())}
    grid = np.stack(np.meshgrid(np.arange(6, S - 6, 6), np.arange(6, S - 6, 6)), -1).reshape(-1, 2).astype(float)

    def pair(a, b):
        pa = (ms[a][:2, :2] @ grid.T).T + ms[a][:2, 2]
        pb = (ms[b][:2, :2] @ grid.T).T + ms[b][:2, 2]
        ok = (pa >= 1).all(1) & (pa < S - 1).all(1) & (pb >= 1).all(1) & (pb < S - 1).all(1)
        return Pair(a, b, pa[ok], pb[ok], (S, S), (S, S), trg_bbox=(0, 0, S, S))

    names = list(ms)
    cache = SimpleNamespace(get=feats.__getitem__, extractor=SimpleNamespace(config=SimpleNamespace(load_resolution=S)))
    train_pairs = [pair(a, b) for a in names[:16] for b in names[:16] if a != b]
    held_out = [pair(a, b) for a in names[16:] for b in names[16:] if a != b]
    return cache, train_pairs, held_out, AggregationConfig((C,) * L, T, projection_dim=16, num_norm_groups=8,
                                                           output_resolution=R)


def test_training_learns_to_mix_layers(tmp_path):
    """Pairs from one image and known affine warps of it, held-out warps for scoring: the
    trained network beats the untrained one and every single layer, and its mixing weights
    move to the two informative maps (measured: 8.7 -> 81.7 PCK@0.1; best single layer 18.9)."""
    torch.manual_seed(0)
    cache, train_pairs, held_out, cfg = synthetic()
    net = AggregationNetwork(cfg)
    untrained = evaluate_pairs(net, cache, held_out)["pck_img"]
    singles = [evaluate_pairs(net, cache, held_out, descriptor=lambda f, l=l, t=t: f.maps[l][:, t])["pck_img"]
               for l in range(6) for t in range(2)]
    res = train(net, cache, train_pairs, held_out, TrainConfig(steps=300, val_every=100), out_dir=tmp_path,
                progress=False)
    trained = evaluate_pairs(net, cache, held_out)["pck_img"]
    assert trained > untrained + 30 and trained > max(singles) + 30, (untrained, max(singles), trained)
    w = net.mixing()
    assert w[0, :2].min() > w.flatten()[2:].max()  # the informative maps weigh most
    assert res["best_pck_img"] == max(h["pck_img"] for h in res["history"])
    best = AggregationNetwork.load(tmp_path / "best.safetensors")
    assert (tmp_path / "last.pt").exists() and best.config == cfg


def test_checkpoint_round_trip_and_resume(tmp_path):
    torch.manual_seed(1)
    cache, train_pairs, held_out, cfg = synthetic(seed=2)
    net = AggregationNetwork(cfg)
    train(net, cache, train_pairs, held_out[:5], TrainConfig(steps=20, val_every=10), out_dir=tmp_path, progress=False)
    net.save(tmp_path / "net.safetensors")
    loaded = AggregationNetwork.load(tmp_path / "net.safetensors")
    f = cache.get("i3")
    with torch.no_grad():
        assert torch.equal(net(f), loaded(f))
    # a second run with more steps resumes at step 20 and continues to 30
    again = AggregationNetwork(cfg)
    res = train(again, cache, train_pairs, held_out[:5], TrainConfig(steps=30, val_every=10), out_dir=tmp_path,
                progress=False)
    assert [h["step"] for h in res["history"]] == [10, 20, 30]


def test_matching_and_pck_by_hand():
    h = torch.zeros(1, 2, 4, 4)
    h[0, 0] = torch.arange(16.0).view(4, 4)
    h[0, 1] = 1.0
    kps = np.array([[1.0, 2.0]])  # x, y in a 4x4 image
    assert grid_index(kps, (4, 4), 4).tolist() == [9]
    found = match(h, h, kps, (4, 4), (8, 8), 4)  # target twice as large
    assert np.allclose(found, [[2.0, 4.0]])
    assert pck(np.array([[0, 0], [10, 0]]), np.zeros((2, 2)), (100, 50)).tolist() == [True, True]
    assert pck(np.array([[0, 0], [10.5, 0]]), np.zeros((2, 2)), (100, 50), bbox=(0, 0, 20, 50)).tolist() == [True,
                                                                                                           False]


def _spair_fixture(root):
    for cat, names in (("cat", ("2008_000001", "2008_000002")),):
        (root / "JPEGImages" / cat).mkdir(parents=True)
        for n in names:
            Image.new("RGB", (60, 40), (120, 30, 30)).save(root / "JPEGImages" / cat / f"{n}.jpg")
    (root / "PairAnnotation/test").mkdir(parents=True)
    ann = {"src_imname": "2008_000001.jpg", "trg_imname": "2008_000002.jpg", "category": "cat",
           "src_kps": [[10, 12], [30, 20]], "trg_kps": [[11, 13], [33, 22]], "src_bndbox": [5, 5, 50, 35],
           "trg_bndbox": [6, 4, 52, 36], "src_imsize": [60, 40, 3], "trg_imsize": [60, 40, 3]}
    (root / "PairAnnotation/test/000001-2008_000001-2008_000002:cat.json").write_text(json.dumps(ann))
    return root


def test_spair_reader(tmp_path):
    from emerdiff_fast.hyperfeatures.datasets import PairDataError, spair_pairs

    pairs = spair_pairs(_spair_fixture(tmp_path), "test")
    p = pairs[0]
    assert p.src.name == "2008_000001.jpg" and p.src.exists() and p.category == "cat"
    assert p.trg_kps.tolist() == [[11, 13], [33, 22]] and p.trg_bbox == (6, 4, 52, 36) and p.trg_size == (60, 40)
    with pytest.raises(PairDataError, match="PairAnnotation/trn"):
        spair_pairs(tmp_path, "train")


def test_cub_reader(tmp_path):
    from emerdiff_fast.hyperfeatures.datasets import cub_pairs

    (tmp_path / "images/001.Black_footed_Albatross").mkdir(parents=True)
    (tmp_path / "parts").mkdir()
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    parts = []
    for i in range(1, 4):
        rel = f"001.Black_footed_Albatross/img_{i}.jpg"
        Image.new("RGB", (50, 30)).save(tmp_path / "images" / rel)
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} 1")
        lines["train_test_split.txt"].append(f"{i} 0")
        lines["bounding_boxes.txt"].append(f"{i} 2.0 3.0 40.0 20.0")
        for part in range(1, 16):
            parts.append(f"{i} {part} {part * 2.0} {part * 1.5} {1 if part % (i + 1) else 0}")
    for name, rows in lines.items():
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    (tmp_path / "parts/part_locs.txt").write_text("\n".join(parts) + "\n")
    pairs = cub_pairs(tmp_path, pairs_per_class=4, seed=0)
    assert len(pairs) == 4 and [p.name for p in pairs] == [p.name for p in cub_pairs(tmp_path, 4, seed=0)]
    for p in pairs:
        s, t = int(p.name.split("-")[0]), int(p.name.split("-")[1])
        shared = [k for k in range(1, 16) if k % (s + 1) and k % (t + 1)]
        assert p.src_kps.tolist() == [[k * 2.0, k * 1.5] for k in shared] and p.trg_bbox == (2.0, 3.0, 42.0, 23.0)
        assert p.src_size == (50, 30)


def test_api_and_cli_match_draws_the_lines(tiny_pipe, photo_path, tmp_path, capsys):
    from emerdiff_fast.cli import main

    hf = Hyperfeatures(tiny_pipe, ExtractConfig.one_step(load_resolution=64), projection_dim=16,
                       cache_dir=tmp_path / "cache")
    found = hf.match(photo_path, photo_path, [(10, 10), (50, 40)])
    assert found.shape == (2, 2) and (found >= 0).all()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # one image, cached once
    out = tmp_path / "m.png"
    rc = main(["hyperfeatures", "match", str(photo_path), str(photo_path), "--points", "10,10;50,40", "--model",
               "tiny", "--one-step", "--load-resolution", "64", "--out", str(out)])
    assert rc == 0 and Image.open(out).size == (2 * 96 * 4, 80 * 4)  # upscaled: short side 80 -> 320
    assert "wrote" in capsys.readouterr().out


def test_generation_mode(tiny_pipe):
    ex = FeatureExtractor(tiny_pipe, ExtractConfig(load_resolution=64, num_timesteps=10, save_timestep=(0, 9)))
    f, images = ex.generate(2, prompt="a photo of a cat", seed=3)
    g, _ = ex.generate(2, prompt="", seed=3)
    assert len(images) == 2 and images[0].size == (64, 64) and f.maps[0].shape[:2] == (2, 2)
    assert not torch.equal(f.maps[-1], g.maps[-1])  # the prompt conditions the run


def test_cli_train_then_eval_on_spair_layout(tmp_path, capsys):
    from emerdiff_fast.cli import main

    root = _spair_fixture(tmp_path / "spair")
    for split in ("trn", "val"):
        (root / "PairAnnotation" / split).mkdir()
        for f in (root / "PairAnnotation/test").glob("*.json"):
            (root / "PairAnnotation" / split / f.name).write_text(f.read_text())
    common = ["--model", "tiny", "--one-step", "--load-resolution", "64", "--dataset", "spair", "--root", str(root),
              "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main(["hyperfeatures", "train", *common, "--out", str(tmp_path / "run"), "--steps", "2",
                 "--val-every", "1"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert [h["step"] for h in trained["history"]] == [1, 2] and (tmp_path / "run/best.safetensors").exists()
    assert main(["hyperfeatures", "eval", *common, "--weights", str(tmp_path / "run/best.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "PCK@0.1 (image)" in out and "over 2 keypoints" in out


def test_compiled_extraction_is_one_graph_and_equals_eager(tiny_pipe):
    """Which timestep keeps its features is decided outside the compiled UNet, so all 11
    saved and 39 unsaved steps share one graph (the old hook read its slot inside the
    graph: 12 variants, past the recompile limit of 8). Counted with a counting backend."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    cfg = ExtractConfig(load_resolution=64, num_timesteps=10, save_timestep=(0, 3, 9))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eager = FeatureExtractor(tiny_pipe, cfg).extract(x)
    compiled = FeatureExtractor(tiny_pipe, cfg, compile=True, compile_backend=counter).extract(x)
    assert counter.frame_count == 1
    for a, b in zip(compiled.maps, eager.maps):
        assert torch.allclose(a.float(), b.float(), atol=1e-2)
    torch._dynamo.reset()


def test_fp32_vae_under_a_bf16_unet():
    """The usual cure for VAE overflow (the VAE kept in float32 under a 16-bit UNet): the
    VAE's input goes in the VAE's dtype for extraction and generation, the UNet's in its."""
    from emerdiff_fast import load_pipeline

    pipe = load_pipeline("tiny")
    pipe.unet.to(torch.bfloat16)
    cfg = ExtractConfig(load_resolution=64, num_timesteps=5, save_timestep=(0, 4))
    ex = FeatureExtractor(pipe, cfg)
    assert ex.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    f = ex.extract(torch.rand(1, 3, 64, 64) * 2 - 1)
    g, images = ex.generate(1, seed=0)
    for feats in (f, g):
        assert all(torch.isfinite(m.float()).all() for m in feats.maps) and feats.latents.dtype == torch.float32
    assert images[0].size == (64, 64)


def test_layers_come_from_the_unets_structure(tiny_pipe, tmp_path, capsys):
    """SD's 12 decoder resnets; the mini model's 3 up blocks give 9, and `match` runs on it
    (it failed with 'index 3 is out of range' when the 12 were hard-coded)."""
    from emerdiff_fast import load_pipeline
    from emerdiff_fast.cli import main
    from emerdiff_fast.hyperfeatures.extract import decoder_layers

    assert decoder_layers(tiny_pipe.unet) == tuple((i, j) for i in range(4) for j in range(3))
    mini = load_pipeline("mini")
    layers = decoder_layers(mini.unet)
    assert len(layers) == sum(len(b.resnets) for b in mini.unet.up_blocks) < 12
    scene = "examples/scenes/scene-10000901.png"
    out = tmp_path / "m.png"
    assert main(["hyperfeatures", "match", scene, scene, "--points", "10,10;40,30", "--one-step",
                 "--out", str(out), "--quiet"]) == 0  # --model defaults to mini, at its 64 px
    assert Image.open(out).size == (2 * 64 * 4, 64 * 4)
    assert "(10, 10) -> (" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["match", "missing.png", "missing.png", "--points", "1,1"], "not found"),
    (["match", "s.png", "s.png", "--points", "1,1;2"], "--points '1,1;2': give source keypoints"),
    (["match", "s.png", "s.png", "--points", "500,1"], "--points 500,1 lies outside the 64x64 source image"),
    (["match", "s.png", "s.png", "--points", "1,1", "--out", "nowhere/m.png"], "folder nowhere does not exist"),
    (["extract", "s.png"], "extract needs --cache"),
    (["match", "s.png", "s.png", "--points", "1,1", "--weights", "none.safetensors"], "--weights none.safetensors not found"),
    (["eval", "--dataset", "spair", "--root", ".", "--baselines", "--one-step-weights", "no.safetensors"],
     "--one-step-weights no.safetensors not found"),
    (["eval", "--dataset", "spair", "--root", ".", "--json", "nowhere/rows.json"], "--json nowhere/rows.json"),
    (["eval", "--dataset", "spair", "--root", "."], "expected SPair-71k annotations"),
])
def test_cli_errors_before_the_model_loads(args, message, tmp_path, capsys, monkeypatch):
    import emerdiff_fast
    from emerdiff_fast.cli import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "s.png")
    monkeypatch.setattr(emerdiff_fast, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["hyperfeatures", *args]) == 2
    assert message in capsys.readouterr().err


def test_batched_bottlenecks_equal_one_call_per_timestep():
    torch.manual_seed(3)
    net = AggregationNetwork(AggregationConfig((8, 12), 3, projection_dim=16, num_norm_groups=8, output_resolution=6))
    with torch.no_grad():
        net.mixing_weights.normal_()
        feats = Features([torch.randn(2, 3, 8, 5, 5), torch.randn(2, 3, 12, 3, 3)], (0, 1, 2), torch.zeros(1))
        w = net.mixing()
        loop = sum(w[s, l] * net.single_layer(Features([m[:, :] for m in feats.maps], (), None), l, s)
                   for s in range(3) for l in range(2))
        torch.testing.assert_close(net(feats), loop, rtol=1e-5, atol=1e-5)


def test_batched_fill_equals_single_extraction_and_models_do_not_share_a_cache(tiny_pipe, tmp_path):
    from emerdiff_fast import load_pipeline
    from emerdiff_fast.hyperfeatures.train import FeatureCache

    cfg = ExtractConfig.one_step(load_resolution=64, storage_dtype=torch.float32)
    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    paths = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    batched = FeatureCache(FeatureExtractor(tiny_pipe, cfg), tmp_path / "cache")
    batched.fill(paths, batch_size=3)
    single = FeatureExtractor(tiny_pipe, cfg)
    for p in paths:
        one = single.extract([p])
        for a, b in zip(batched.get(p).maps, one.maps):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    other = FeatureCache(FeatureExtractor(load_pipeline("tiny", seed=1), cfg), tmp_path / "cache")
    assert other._key(paths[0]) != batched._key(paths[0])


def test_a_model_without_shipped_weights_says_so(tmp_path, capsys):
    from emerdiff_fast.cli import main

    Image.new("RGB", (64, 64), "red").save(tmp_path / "s.png")
    assert main(["hyperfeatures", "match", str(tmp_path / "s.png"), str(tmp_path / "s.png"), "--points", "3,3",
                 "--model", "tiny", "--one-step", "--load-resolution", "64", "--out", str(tmp_path / "m.png"),
                 "--quiet"]) == 0
    assert "ships no trained one-step aggregation network" in capsys.readouterr().err
