"""Generated correspondence pairs (scene_pairs.py), their SPair-71k layout, the `scenes
--pairs` command, and Diffusion Hyperfeatures learning on the mini model's features."""
import json

import numpy as np
import pytest
import torch

from emerdiff_fast.hyperfeatures.datasets import spair_pairs
from emerdiff_fast.scene_pairs import KEYPOINT_INSET, MAX_ROTATION, SCALE_RANGE, make_pair, write_pairs
from emerdiff_fast.scenes import HELDOUT_SEEDS, TRAIN_SEEDS, VALIDATION_SEEDS

SEEDS = [*range(HELDOUT_SEEDS.start, HELDOUT_SEEDS.start + 40), *range(TRAIN_SEEDS.start, TRAIN_SEEDS.start + 20)]


@pytest.mark.parametrize("seed", SEEDS)
def test_keypoints_lie_on_their_object_and_follow_the_transform(seed):
    p = make_pair(seed)
    for side in (p.src, p.trg):
        px = np.floor(side.keypoints).astype(int)
        assert side.mask[px[:, 1], px[:, 0]].all(), "a keypoint is off its object"
        x1, y1, x2, y2 = side.bbox
        assert (side.keypoints >= [x1, y1]).all() and (side.keypoints <= [x2, y2]).all()
        # the object is drawn last: every mask pixel has the object's one colour
        assert len(np.unique(side.image[side.mask], axis=0)) == 1
    t = p.transform()
    c, s = np.cos(np.radians(t["rotation_deg"])), np.sin(np.radians(t["rotation_deg"]))
    mapped = t["scale"] * p.src.keypoints @ np.array([[c, -s], [s, c]]).T + t["translation"]
    np.testing.assert_allclose(mapped, p.trg.keypoints, atol=1e-9)
    assert SCALE_RANGE[0] - 0.25 <= t["scale"] <= SCALE_RANGE[1] + 0.25  # clipped to keep the object in frame
    assert abs(t["rotation_deg"]) <= MAX_ROTATION + 1e-9
    if p.category == "disc":
        assert t["rotation_deg"] == 0 and len(p.src.keypoints) == 5
    else:
        assert len(p.src.keypoints) == {"rectangle": 4, "triangle": 3}[p.category]
    # colour and background change: the object's colour differs between the two images
    assert not np.array_equal(p.src.image[p.src.mask][0], p.trg.image[p.trg.mask][0])


def test_pairs_vary_and_are_deterministic():
    a, b = make_pair(7), make_pair(7)
    assert np.array_equal(a.src.image, b.src.image) and np.array_equal(a.trg.keypoints, b.trg.keypoints)
    cats = {make_pair(s).category for s in range(30)}
    assert cats == {"disc", "rectangle", "triangle"}
    assert 0 < KEYPOINT_INSET < 0.5


def test_layout_round_trips_through_the_spair_reader(tmp_path):
    ann, split = write_pairs(tmp_path, 4, VALIDATION_SEEDS.start)
    assert split == "val" and len(list(ann.glob("*.json"))) == 4
    pairs = spair_pairs(tmp_path, "val")
    for pair in pairs:
        seed = int(pair.name.split("-")[0])
        p = make_pair(seed)
        assert pair.category == p.category and pair.src.exists() and pair.trg.exists()
        np.testing.assert_allclose(pair.src_kps, p.src.keypoints, atol=1e-4)
        np.testing.assert_allclose(pair.trg_kps, p.trg.keypoints, atol=1e-4)
        assert pair.trg_bbox == tuple(p.trg.bbox) and pair.trg_size == (64, 64)
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(pair.src)), p.src.image)  # PNG: exact pixels


def test_scenes_pairs_command(tmp_path, capsys):
    from emerdiff_fast.cli import main

    out = tmp_path / "pairs"
    assert main(["scenes", "--pairs", "--out", str(out), "-n", "3", "--quiet"]) == 0  # held-out seeds: test
    assert main(["scenes", "--pairs", "--out", str(out), "-n", "2", "--seed", "0", "--quiet"]) == 0
    assert len(spair_pairs(out, "test")) == 3 and len(spair_pairs(out, "trn")) == 2
    assert main(["scenes", "--pairs", "--out", str(out), "-n", "3", "--quiet"]) == 2
    assert "already holds pairs; use --overwrite" in capsys.readouterr().err
    assert main(["scenes", "--pairs", "--out", str(out), "-n", "5", "--seed", str(TRAIN_SEEDS.stop - 2)]) == 2
    assert "do not lie in one split's range" in capsys.readouterr().err
    assert main(["scenes", "--pairs", "--out", str(out), "-n", "2", "--overwrite", "--quiet"]) == 0
    assert len(spair_pairs(out, "test")) == 2


def test_training_on_mini_features_beats_its_untrained_start(tmp_path):
    """The one-step variant on the mini model's cached features: 200 steps on 30 training
    pairs raise PCK@0.1 (image) on 12 held-out pairs above the untrained network's."""
    from emerdiff_fast import load_pipeline
    from emerdiff_fast.hyperfeatures import ExtractConfig, Hyperfeatures, TrainConfig
    from emerdiff_fast.hyperfeatures.correspondence import pair_images

    root = tmp_path / "pairs"
    write_pairs(root, 30, TRAIN_SEEDS.start)
    write_pairs(root, 12, HELDOUT_SEEDS.start)
    trn, test = spair_pairs(root, "trn"), spair_pairs(root, "test")
    torch.manual_seed(0)
    hf = Hyperfeatures(load_pipeline("mini"), ExtractConfig.one_step(load_resolution=64), projection_dim=32)
    hf.cache.fill(pair_images(trn + test), batch_size=42)
    before = hf.evaluate(test)["pck_img"]
    hf.train(trn, [], TrainConfig(steps=200, val_every=200), progress=False)
    after = hf.evaluate(test)["pck_img"]
    assert after > before + 10, (before, after)


def test_eval_baselines_json_with_the_shipped_weights(tmp_path, capsys):
    from emerdiff_fast.cli import main
    from emerdiff_fast.hyperfeatures import shipped_weights

    assert shipped_weights("mini") and shipped_weights("mini", one_step=True)
    root = tmp_path / "pairs"
    write_pairs(root, 3, VALIDATION_SEEDS.start)
    write_pairs(root, 3, HELDOUT_SEEDS.start)
    out = tmp_path / "rows.json"
    assert main(["hyperfeatures", "eval", "--dataset", "spair", "--root", str(root), "--baselines",
                 "--json", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["aggregated", "one-step", "best-layer", "pixels", "latent"]
    assert all(r["keypoints"] > 0 and 0 <= r["pck_bbox"] <= 100 for r in rows)
    printed = capsys.readouterr().out
    assert "best-layer" in printed and "up_blocks." in printed
