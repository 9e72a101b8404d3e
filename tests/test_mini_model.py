"""The shipped mini model: loads offline, brings its own settings, is the CLI's default, and
segments held-out generated scenes measurably (benchmarks/quality.py has the full numbers)."""
import numpy as np
import pytest

from emerdiff_fast import EmerDiff, load_pipeline
from emerdiff_fast.metrics import instance_scores
from emerdiff_fast.mini import MODEL_DIR
from emerdiff_fast.scenes import HELDOUT_SEEDS, make_scene

pytestmark = [pytest.mark.skipif(not (MODEL_DIR / "model_index.json").exists(), reason="mini model not shipped"),
              pytest.mark.usefixtures("triton_off")]  # the kernels are not the point here (conftest)
SEEDS = range(HELDOUT_SEEDS.start + 500, HELDOUT_SEEDS.start + 508)  # 8 fixed held-out scenes


@pytest.fixture(scope="module")
def mini(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")  # no network: the folder alone must do
    # conftest.triton_off for the module-scoped segmentations below (made before any function fixture)
    monkeypatch_module.setenv("EMERDIFF_DISABLE_TRITON", "1")
    return load_pipeline("mini")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_loads_offline_with_its_recommended_settings(mini):
    seg = EmerDiff(mini)
    assert (seg.config.resolution, seg.config.num_masks, seg.feature_grid) == (64, 6, (8, 8))
    assert mini.unet.config.cross_attention_dim == mini.text_encoder.config.hidden_size
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size < 25e6, size


@pytest.fixture(scope="module")
def held_out(mini):
    """The 8 scenes and their EmerDiff segmentations at the model's settings, made once for
    the tests below (a list call equals single calls: tests/test_fast.py)."""
    from PIL import Image

    scenes = [make_scene(s) for s in SEEDS]
    return scenes, EmerDiff(mini)([Image.fromarray(s.image) for s in scenes])


def test_segments_held_out_scenes(mini, held_out):
    """The issue's check: on 8 fixed held-out scenes, at the model's recommended settings,
    EmerDiff's many-to-one mIoU beats the naive baseline's (the same k-means masks,
    bilinearly upsampled) by MARGIN, and both follow the objects far better than one segment
    for the whole image. Bounds: THRESHOLDS, MARGIN."""
    from PIL import Image

    scenes, fast = held_out
    naive = EmerDiff(mini, backend="naive")([Image.fromarray(s.image) for s in scenes])
    scores = {backend: np.mean([instance_scores(r.labels, s.instances)["many_to_one_miou"]
                                for r, s in zip(results, scenes)])
              for backend, results in (("fast", fast), ("naive", naive))}
    trivial = np.mean([instance_scores(np.zeros_like(s.instances), s.instances)["many_to_one_miou"] for s in scenes])
    print(f"many-to-one mIoU on 8 held-out scenes: EmerDiff {scores['fast']:.3f}, naive {scores['naive']:.3f}, "
          f"one segment {trivial:.3f}")
    assert scores["fast"] > scores["naive"] + MARGIN
    assert scores["fast"] > THRESHOLDS["fast"] and scores["naive"] > THRESHOLDS["naive"]
    assert scores["naive"] > trivial + 0.1


# Measured on these 8 scenes with the shipped model (step 10000, lambda 300, t_modulate 881),
# CPU fp32: EmerDiff 0.619, naive 0.519 (a margin of 0.100), one segment 0.246. Bounds 0.05
# below each: CPU rounding moves a few pixels, not whole points, while a broken model or
# method loses far more. (At the method's own lambda 10, t_modulate 281 EmerDiff scored 0.445
# here: the margin fails, so a model shipped without its settings fails this test.)
THRESHOLDS = {"fast": 0.57, "naive": 0.47}
MARGIN = 0.05


def test_cli_defaults_to_mini_and_says_so(tmp_path, capsys):
    from emerdiff_fast.cli import main

    scene = make_scene(SEEDS[0])
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    assert main(["segment", str(tmp_path / "scene.png"), "--out", str(tmp_path / "out"), "--quiet",
                 "--backend", "naive"]) == 0
    assert "no --model given: using the built-in mini model" in capsys.readouterr().err
    labels = np.asarray(Image.open(tmp_path / "out" / "scene.labels.png"))
    assert labels.shape == (64, 64) and labels.max() < 6  # the model's K and the input's size


def test_named_segments_on_held_out_scenes(mini, held_out):
    """Issue 20's check: EmerDiff's segments named by the mini model's label heat maps
    (labels = the scenes' classes), class mIoU over these 8 scenes. Bound: NAMED_THRESHOLD."""
    from emerdiff_fast.metrics import ClassMIoU
    from emerdiff_fast.scenes import CLASSES
    from emerdiff_fast.vocabulary import Vocabulary, named_maps

    seg = EmerDiff(mini)
    vocab = Vocabulary(mini, list(CLASSES), resolution=seg.config.resolution)
    cfg, k = vocab.config, seg.config.num_masks
    named, heat_only = ClassMIoU(len(CLASSES)), ClassMIoU(len(CLASSES))
    used = set()
    for scene, r in zip(*held_out):
        heat = vocab.heat_maps(scene.image, size=r.labels.shape).numpy()
        maps = named_maps(heat, {"emerdiff": r.labels}, cfg.threshold, vocab.class_names.index(cfg.fallback), k)
        named.update(maps["emerdiff"], scene.classes)
        used |= set(np.unique(maps["emerdiff"]).tolist())
        heat_only.update(maps["heat"], scene.classes)
    score, heat_score = named.compute().miou, heat_only.compute().miou
    print(f"class mIoU on 8 held-out scenes: EmerDiff named {score:.1f}, heat argmax {heat_score:.1f}")
    assert score > NAMED_THRESHOLD
    # every label names some segment (measured: 8, 8, 22 and 10 of the 48): a naming that
    # collapses (identical maps, e.g. every label reading the same token) names them all alike
    assert used == set(range(len(CLASSES)))


# Measured on these 8 scenes (shipped model at its settings, CPU fp32, 2026-12-01): EmerDiff
# named 5.0, heat argmax 6.3 (percent; 5.4 with the earlier lambda 10, t_modulate 281). The
# bound sits 2.0 below: CPU rounding moves a few pixels (a rerun of
# the 200-scene benchmark matched its first run to 1e-5). It guards the naming path (prompt, layers, rule) against
# breaking, not a useful quality: the mini model's cross-attention does not localise its
# words (benchmarks/RESULTS.md), so the expected win over the heat maps is not asserted.
NAMED_THRESHOLD = 3.0
