"""`eval --open-vocab` (issue 20, item 5): the naming pass, its scores, the combination with
an external class map, resuming, and refusing a cache named with other settings."""
import json

import numpy as np
import pytest
from PIL import Image

from emerdiff_fast.cli import main
from emerdiff_fast.datasets import NAMED_DATASETS, NUM_CLASSES, DatasetError, class_names
from emerdiff_fast.metrics import ClassMIoU
from emerdiff_fast.scenes import HELDOUT_SEEDS, write_dataset

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)


def test_shipped_class_names():
    for name in NAMED_DATASETS:
        names = class_names(name)
        assert len(names) == NUM_CLASSES[name] and all(n == n.strip() and n for n in names)
    assert class_names("ade20k")[:3] == ["wall", "building", "sky"] and class_names("ade20k")[-1] == "flag"
    assert class_names("cocostuff171")[0] == "person" and class_names("cocostuff171")[-1] == "wood"
    assert class_names("pascal_context59")[0] == "aeroplane" and "background" not in class_names("pascal_context59")
    assert class_names("pascal_context459")[0] == "accordion"
    with pytest.raises(DatasetError, match="--class-names"):
        class_names("cityscapes19")


def test_class_miou_by_hand():
    m = ClassMIoU(2)
    gt = np.array([[0, 0, 1, 1]])
    m.update(np.array([[0, 1, 1, 5]]), gt)  # id 5: no class of the data set -> a miss
    r = m.compute()
    assert np.allclose(r.per_class_iou, [50.0, 100 / 3]) and r.pixel_accuracy == 50.0
    m.update(np.array([[-1, -1, -1, -1]]), np.array([[255, 0, 0, 0]]))  # -1: no votes -> misses; 255 ignored
    assert m.compute().per_class_iou[0] == pytest.approx(20.0)  # tp 1 / (pred 1 + gt 5 - tp 1)


def _args(root, out, *extra):
    return ["eval", "--dataset", "shapes", "--root", str(root), "--model", "mini", "--masks", "3",
            "--feature-samples", "1", "--quiet", "--out", str(out), "--open-vocab", *extra]


def test_eval_open_vocab_on_shapes(tmp_path, capsys):
    root = tmp_path / "scenes"
    write_dataset(root, 3, seed=HELDOUT_SEEDS.start + 900_000)
    # an external "segmenter" that is the ground truth itself: alone it scores 100, and the
    # overlap rule then names each segment by its majority class
    ext = tmp_path / "ext"
    ext.mkdir()
    for f in (root / "classes").glob("*.png"):
        Image.open(f).save(ext / f.name)
    assert main(_args(root, tmp_path / "e", "--class-map-dir", str(ext))) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "e" / "results.json").read_text())["open_vocab"]
    assert res["images"] == 3 and res["class_names"] == ["background", "disc", "rectangle", "triangle"]
    assert res["class_map"]["miou"] == pytest.approx(100.0)
    for m in ("emerdiff", "naive", "heat", "heat_threshold", "emerdiff+class_map", "naive+class_map"):
        assert 0 <= res[m]["pixel_accuracy"] <= 100 and len(res[m]["per_class_iou"]) == 4
    # segments named by the truth's majority beat segments named by the heat maps
    assert res["emerdiff+class_map"]["pixel_accuracy"] > res["emerdiff"]["pixel_accuracy"]
    assert "EmerDiff + class map (overlap rule)" in printed
    named = sorted((tmp_path / "e" / "cache").glob("*.vocab.npz"))
    assert len(named) == 3
    stamps = [f.stat().st_mtime_ns for f in named]

    # a rerun resumes: nothing named again, the same scores (--draw-batch changes memory only)
    assert main(_args(root, tmp_path / "e", "--class-map-dir", str(ext), "--draw-batch", "1")) == 0
    assert [f.stat().st_mtime_ns for f in named] == stamps
    again = json.loads((tmp_path / "e" / "results.json").read_text())["open_vocab"]
    assert again["emerdiff"] == res["emerdiff"]

    # other class names: refused, the segmentations kept
    names = tmp_path / "names.txt"
    names.write_text("ground\ncircle\nbox\nwedge\n")
    assert main(_args(root, tmp_path / "e", "--class-names", str(names))) == 2
    assert "named segments made with other settings" in capsys.readouterr().err
    assert main(_args(root, tmp_path / "e", "--class-names", str(names), "--overwrite")) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())["open_vocab"]
    assert res["class_names"] == ["ground", "circle", "box", "wedge"] and "class_map" not in res


def test_eval_open_vocab_bad_input(tmp_path, capsys):
    root = tmp_path / "scenes"
    write_dataset(root, 2, seed=HELDOUT_SEEDS.start + 900_000)
    ext = tmp_path / "ext"
    ext.mkdir()
    assert main(_args(root, tmp_path / "e", "--class-map-dir", str(ext))) == 2
    assert "2 of 2 images have no class map" in capsys.readouterr().err
    assert main(_args(root, tmp_path / "e", "--class-map-dir", str(tmp_path / "nope"))) == 2
    assert "is not a folder" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    assert main(_args(root, tmp_path / "e", "--class-names", str(short))) == 2
    assert "4 classes, the names list 2" in capsys.readouterr().err
    base = [a for a in _args(root, tmp_path / "e") if a != "--open-vocab"]
    assert main(base + ["--class-names", str(short)]) == 2
    assert "with --open-vocab only" in capsys.readouterr().err
    assert main(base + ["--draw-batch", "2"]) == 2
    assert "with --open-vocab only" in capsys.readouterr().err
    assert not (tmp_path / "e" / "cache").exists() or not list((tmp_path / "e" / "cache").glob("*.npz"))
