import json

import numpy as np
import pytest
from PIL import Image

from emerdiff_fast.cli import main
from emerdiff_fast.datasets import SegmentationDataset
from emerdiff_fast.scenes import (BACKGROUNDS, CLASSES, COLOURS, HELDOUT_SEEDS, MAX_SHAPES, SIZE_RANGE, TRAIN_SEEDS,
                                  make_scene, write_dataset)

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)

SEEDS = range(HELDOUT_SEEDS.start, HELDOUT_SEEDS.start + 60)


def test_same_seed_same_scene_and_seeds_differ():
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    assert not set(TRAIN_SEEDS) & set(SEEDS)


@pytest.mark.parametrize("seed", SEEDS[:30])
def test_ground_truth_agrees_with_the_drawn_pixels(seed):
    s = make_scene(seed)
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert 1 <= len(s.shapes) <= MAX_SHAPES
    ids = set(np.unique(s.instances).tolist()) - {0}
    assert ids == set(range(1, len(s.shapes) + 1))  # every shape stays visible
    for i, shape in enumerate(s.shapes, start=1):
        on = s.instances == i
        assert (s.image[on] == COLOURS[shape.colour]).all()        # instance pixels hold the shape's colour
        assert (s.classes[on] == CLASSES.index(shape.kind)).all()  # and its class
        ys, xs = np.nonzero(on)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert extent <= SIZE_RANGE[1] * 64 + 2
    assert (s.classes[s.instances == 0] == 0).all()
    assert s.caption.endswith(f"on a {BACKGROUNDS[s.background]} background")
    for shape in s.shapes:
        assert f"{shape.colour} {shape.kind}" in s.caption


def test_the_family_is_covered():
    scenes = [make_scene(s) for s in SEEDS]
    assert {sh.kind for s in scenes for sh in s.shapes} == set(CLASSES[1:])
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert len({sh.colour for s in scenes for sh in s.shapes}) >= 9
    assert {len(s.shapes) for s in scenes} == set(range(1, MAX_SHAPES + 1))


def test_dataset_on_disk_read_by_eval_reader(tmp_path):
    write_dataset(tmp_path, 3, seed=HELDOUT_SEEDS.start)
    records = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == list(range(HELDOUT_SEEDS.start, HELDOUT_SEEDS.start + 3))
    ds = SegmentationDataset("shapes", tmp_path)
    assert len(ds) == 3 and ds.num_classes == 4
    sample = ds[1]
    scene = make_scene(HELDOUT_SEEDS.start + 1)
    assert np.array_equal(np.asarray(sample.image), scene.image)
    assert np.array_equal(sample.label, scene.classes)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "instances" / f"{scene.id}.png")), scene.instances)


def test_scenes_command(tmp_path, capsys):
    assert main(["scenes", "--out", str(tmp_path), "-n", "2", "--quiet"]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    assert main(["scenes", "--out", str(tmp_path), "-n", "2", "--quiet"]) == 2  # never replaced silently
    assert "--overwrite" in capsys.readouterr().err


def test_eval_on_shapes_survives_a_failing_image(tmp_path, monkeypatch, capsys):
    """`eval --dataset shapes` reads a scene set; an image whose segmentation overflows is
    logged, skipped and listed, and the run still scores the others."""
    import emerdiff_fast.evaluate as evaluate

    write_dataset(tmp_path / "scenes", 3, seed=HELDOUT_SEEDS.start)
    real = evaluate._predict
    calls = []

    def flaky(seg, sample):
        calls.append(sample.name)
        if len(calls) == 2:
            raise FloatingPointError("difference maps contain NaN/inf")
        return real(seg, sample)

    monkeypatch.setattr(evaluate, "_predict", flaky)
    args = ["eval", "--dataset", "shapes", "--root", str(tmp_path / "scenes"), "--model", "tiny", "--masks", "2",
            "--resolution", "64", "--feature-samples", "1", "--quiet", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["images"] == 2 and res["skipped_failed"] == [calls[1]] and res["skipped_unreadable"] == []
    assert res["dataset"] == "shapes" and len(res["emerdiff"]["traditional"]["per_class_iou"]) == 4
    assert "NaN/inf; skipped" in capsys.readouterr().err
