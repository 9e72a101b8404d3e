"""Label heat maps from cross-attention, the naming rule and the paper's combination rule
(issue 20): prompts, layers, batching, and the rules on cases known by hand."""
import numpy as np
import pytest
import torch

from emerdiff_fast.config import ConfigError
from emerdiff_fast.scenes import COLOUR_SHAPE_LABELS
from emerdiff_fast.vocabulary import (Vocabulary, VocabularyConfig, combine, heat_layers, name_segments,
                                      prompt_tokens, segment_scores)

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)


@pytest.fixture(scope="module")
def mini():
    from emerdiff_fast import load_pipeline

    return load_pipeline("mini")


def test_prompt_positions_are_the_label_tokens(mini):
    tok = mini.tokenizer
    ids, spans = prompt_tokens(tok, ["red disc", "background"], "a {}", " and ")
    words = tok.convert_ids_to_tokens(ids)
    assert [words[i] for s in spans for i in s] == ["red</w>", "disc</w>", "background</w>"]
    assert words[:7] == ["<|startoftext|>", "a</w>", "red</w>", "disc</w>", "and</w>", "a</w>", "background</w>"]
    assert len(ids) == tok.model_max_length
    with pytest.raises(ConfigError, match="tokens"):
        prompt_tokens(tok, ["red disc"] * 20, "a {}", " and ")


def test_layers_by_scale(tiny_pipe, mini):
    # tiny at f=8: down_blocks.1 and up_blocks.2 at 1/16, down_blocks.2 and up_blocks.1 at 1/32
    layers = heat_layers(tiny_pipe.unet, tiny_pipe.vae.config, (16, 32))
    assert layers and all(n.endswith("attn2") for n in layers)
    assert {n.split(".attentions")[0] for n in layers} == {"down_blocks.1", "down_blocks.2", "up_blocks.1",
                                                          "up_blocks.2"}
    assert heat_layers(mini.unet, mini.vae.config, (16, 32)) == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    # no layer at these scales: every cross-attention layer outside the mid block
    assert all(not n.startswith("mid") for n in heat_layers(mini.unet, mini.vae.config, (1024,)))


def test_heat_maps_shapes_and_normalisation(mini):
    v = Vocabulary(mini, ["disc", "triangle", "background"], resolution=64)
    heat = v.heat_maps(torch.rand(3, 50, 70))
    assert heat.shape == (3, 50, 70) and torch.isfinite(heat).all()
    assert torch.allclose(heat.flatten(1).amax(1), torch.ones(3), atol=0.05)  # max-normalised (then resized)
    assert v.class_names == ["disc", "triangle", "background"]
    assert Vocabulary(mini, ["disc"], resolution=64).class_names == ["disc", "background"]


def test_batched_draws_equal_one_by_one(mini):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = ["disc", "rectangle"]
    together = Vocabulary(mini, labels, VocabularyConfig(noise_draws=3), resolution=64).heat_maps(image)
    single = Vocabulary(mini, labels, VocabularyConfig(noise_draws=3, draw_batch=1), resolution=64).heat_maps(image)
    assert torch.allclose(together, single, rtol=1e-4, atol=1e-6)


def test_bad_labels_and_settings(mini):
    with pytest.raises(ConfigError, match="distinct"):
        Vocabulary(mini, ["disc", "disc"])
    with pytest.raises(ConfigError, match="template"):
        VocabularyConfig(template="a cat")


def test_naming_rule_by_hand():
    segments = np.array([[0, 0, 1, 1],
                         [0, 0, 1, 1],
                         [2, 2, 2, 2]])
    heat = np.zeros((2, 3, 4))
    heat[0, :2, :2] = 0.9          # label 0 over segment 0
    heat[1, :2, 2:] = [0.5, 0.1]   # label 1 over segment 1: mean 0.3
    heat[1, 2] = 0.05              # segment 2: nothing above the threshold
    assert np.allclose(segment_scores(segments, heat)[1], [0.0, 0.3])
    assert name_segments(segments, heat, threshold=0.2, fallback=7).tolist() == [0, 1, 7]
    assert name_segments(segments, heat, threshold=0.35, fallback=7).tolist() == [0, 7, 7]


def test_combination_rule_by_hand():
    segments = np.array([[0, 0, 1],
                         [0, 1, 1],
                         [2, 2, 2]])
    classes = np.array([[5, 5, 3],
                        [4, 3, 5],
                        [9, 9, 9]])
    assert combine(segments, classes).tolist() == [5, 3, 9]
    assert combine(segments, classes, num_segments=4).tolist() == [5, 3, 9, -1]  # segment 3 is empty
    assert combine(segments, classes, ignore=9).tolist() == [5, 3, -1]
    with pytest.raises(ValueError, match="differ"):
        combine(segments, classes[:2])


def test_cli_labels_outputs(tmp_path):
    import json

    from PIL import Image

    from emerdiff_fast.cli import main
    from emerdiff_fast.scenes import HELDOUT_SEEDS, make_scene

    scene = make_scene(HELDOUT_SEEDS.start + 600)
    Image.fromarray(scene.image).save(tmp_path / "s.png")
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "s.png"), "--out", str(out), "--labels", "disc,rectangle,triangle",
               "--quiet", "--feature-samples", "2"])
    assert rc == 0
    legend = json.loads((out / "s.legend.json").read_text())
    assert [c["name"] for c in legend["classes"]] == ["disc", "rectangle", "triangle", "background"]
    assert all(r["label"] in {"disc", "rectangle", "triangle", "background"} for r in legend["segments"])
    npz = np.load(out / "s.npz")
    classes = np.asarray(Image.open(out / "s.classes.png"))
    assert list(npz["class_names"]) == ["disc", "rectangle", "triangle", "background"]
    assert np.array_equal(classes, npz["segment_labels"][npz["labels"]])
    by_id = {r["id"]: r["label"] for r in legend["segments"]}
    assert all(by_id[i] == npz["class_names"][npz["segment_labels"][i]] for i in by_id)
    assert main(["segment", str(tmp_path / "s.png"), "--out", str(tmp_path / "o2"), "--labels", "a,a"]) == 2
    assert main(["segment", str(tmp_path / "s.png"), "--out", str(tmp_path / "o3"), "--labels-file",
                 str(tmp_path / "none.txt")]) == 2


def test_read_class_map_and_combine_result(tmp_path):
    from PIL import Image

    from emerdiff_fast.config import EmerDiffConfig
    from emerdiff_fast.result import SegmentationResult
    from emerdiff_fast.vocabulary import combine_result, read_class_map

    ids = np.zeros((4, 6), np.uint8)
    ids[:, 3:] = 2
    np.savez(tmp_path / "m.npz", class_map=ids, class_names=np.array(["sky", "cat", "grass"]))
    Image.fromarray(ids, "L").save(tmp_path / "m.png")
    (tmp_path / "names.txt").write_text("sky\ncat\ngrass\n")
    for args in ((tmp_path / "m.npz",), (tmp_path / "m.png", tmp_path / "names.txt")):
        cmap, names = read_class_map(*args)
        assert np.array_equal(cmap, ids) and names == ["sky", "cat", "grass"]
    assert read_class_map(tmp_path / "m.png")[1] == ["class 0", "class 1", "class 2"]
    (tmp_path / "short.txt").write_text("sky\n")
    with pytest.raises(ValueError, match="only 1 class names"):
        read_class_map(tmp_path / "m.png", tmp_path / "short.txt")
    labels = np.repeat(np.array([[0, 0, 1, 1, 1, 1]], np.int32), 8, 0)  # at 8x6: the map is resized
    r = SegmentationResult(labels=labels, low_res_labels=np.zeros((1, 1), np.int32), difference_maps=None,
                           mask_embeddings=np.zeros((3, 1), np.float32), config=EmerDiffConfig(num_masks=3),
                           backend="naive")
    named = combine_result(r, ids.astype(np.int64), ["sky", "cat", "grass"])
    assert named.segment_labels.tolist() == [0, 2, -1]  # segment 1 covers 1 sky column, 3 grass; 2 is empty
    assert named.class_map.shape == (8, 6)


def test_cli_class_map(tmp_path):
    import json

    from PIL import Image

    from emerdiff_fast.cli import main

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "s.png")
    ids = np.zeros((64, 64), np.uint8)
    ids[32:] = 1
    maps = tmp_path / "maps"
    maps.mkdir()
    np.savez(maps / "s.npz", class_map=ids, class_names=np.array(["sky", "sea"]))
    args = ["--model", "tiny", "--masks", "3", "--resolution", "64", "--quiet", "--feature-samples", "1"]
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "s.png"), "--out", str(out), "--class-map", str(maps), *args]) == 0
    legend = json.loads((out / "s.legend.json").read_text())
    npz = np.load(out / "s.npz")
    assert [c["name"] for c in legend["classes"]] == ["sky", "sea"]
    for r in legend["segments"]:  # each segment: the class covering most of its pixels
        inside = ids[npz["labels"] == r["id"]]
        assert r["label"] == ["sky", "sea"][np.bincount(inside, minlength=2).argmax()]
    bad = [str(tmp_path / "s.png"), "--out", str(tmp_path / "o2")]
    assert main(["segment", *bad, "--class-map", str(tmp_path / "none"), *args]) == 2
    assert main(["segment", *bad, "--class-map", str(maps), "--labels", "a", *args]) == 2
    (maps / "s.npz").unlink()
    assert main(["segment", *bad, "--class-map", str(maps), *args]) == 1  # that image fails, said in one line


COLOUR_SHAPES = list(COLOUR_SHAPE_LABELS)


def test_prompt_groups_fit_in_order_and_are_greedy(mini):
    from emerdiff_fast.vocabulary import _prompt_ids, prompt_groups

    tok = mini.tokenizer
    groups = prompt_groups(tok, COLOUR_SHAPES, "a {}", " and ")
    assert len(groups) > 1 and sum(groups, []) == list(range(len(COLOUR_SHAPES)))
    for a, b in zip(groups, groups[1:]):
        fits = [COLOUR_SHAPES[i] for i in a]
        assert len(_prompt_ids(tok, fits, "a {}", " and ")[0]) <= tok.model_max_length
        # greedy: the next group's first label would not have fitted
        assert len(_prompt_ids(tok, fits + [COLOUR_SHAPES[b[0]]], "a {}", " and ")[0]) > tok.model_max_length
    assert prompt_groups(tok, ["disc", "triangle"], "a {}", " and ") == [[0, 1]]


def test_labels_over_several_prompts_equal_each_prompt_alone(mini):
    """31 colour+shape labels overflow the mini text encoder's 24 tokens: the prompts run in
    one UNet call, and each label's map equals that of a Vocabulary holding its prompt only."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
    cfg = VocabularyConfig(noise_draws=2, normalize="none")
    together = Vocabulary(mini, COLOUR_SHAPES, cfg, resolution=64)
    assert len(together.groups) > 1 and together.context.shape[0] == len(together.groups)
    heat = together.heat_maps(image)
    assert heat.shape == (len(COLOUR_SHAPES), 64, 64)
    for g in (together.groups[0], together.groups[-1]):
        alone = Vocabulary(mini, [COLOUR_SHAPES[i] for i in g], cfg, resolution=64).heat_maps(image)
        assert torch.allclose(heat[g], alone, rtol=1e-4, atol=1e-7)
