import json

import numpy as np
import pytest
from PIL import Image

from emerdiff_fast.datasets import DatasetError, SegmentationDataset

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)

RNG = np.random.default_rng(0)


def _img(path, w=48, h=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _lab(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def make_fixture(name, root):
    """Two validation images in the dataset's real layout, labels in its real id convention."""
    raw = np.zeros((40, 48), np.uint8)
    if name.startswith("cocostuff"):
        raw[:20], raw[20:], raw[0, 0] = 0, 156, 255    # person (fine 0), sky-other (fine 156), unlabeled
        (root / "curated/val2017").mkdir(parents=True)
        (root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000139\n000000000285\n")
        for i in ("000000000139", "000000000285"):
            _img(root / f"images/val2017/{i}.jpg")
            _lab(root / f"annotations/val2017/{i}.png", raw)
    elif name == "ade20k":
        raw[:20], raw[20:], raw[0, 0] = 1, 3, 0          # wall (1), sky (3), other (0)
        base = root / "ADEChallengeData2016"
        for i in ("ADE_val_00000001", "ADE_val_00000002"):
            _img(base / f"images/validation/{i}.jpg")
            _lab(base / f"annotations/validation/{i}.png", raw)
    elif name in ("cityscapes", "cityscapes19"):
        raw[:20], raw[20:], raw[0, 0] = 7, 26, 3         # road (7), car (26), out of roi (3)
        for i in ("frankfurt_000000_000294", "lindau_000000_000019"):
            city = i.split("_")[0]
            _img(root / f"leftImg8bit/val/{city}/{i}_leftImg8bit.png")
            _lab(root / f"gtFine/val/{city}/{i}_gtFine_labelIds.png", raw)
    elif name == "pascal_context59":
        raw[:20], raw[20:], raw[0, 0] = 1, 59, 0         # first class, last class, background
        voc = root / "VOCdevkit/VOC2010"
        (voc / "ImageSets/SegmentationContext").mkdir(parents=True)
        (voc / "ImageSets/SegmentationContext/val.txt").write_text("2008_000002\n2008_000003\n")
        for i in ("2008_000002", "2008_000003"):
            _img(voc / f"JPEGImages/{i}.jpg")
            _lab(voc / f"SegmentationClassContext/{i}.png", raw)
    elif name == "pascal_context459":
        # detectron2 layout of the open-vocabulary projects: 16-bit TIFFs, LabelMap - 1, so
        # 0-based ids 0..458 and the unlabelled 0 wrapped to 65535
        lab = np.zeros((40, 48), np.uint16)
        lab[:20], lab[20:], lab[0, 0] = 300, 458, 65535
        voc = root / "VOCdevkit/VOC2010"
        (voc / "annotations_detectron2/pc459_val").mkdir(parents=True)
        for i in ("2008_000002", "2008_000003"):
            _img(voc / f"JPEGImages/{i}.jpg")
            Image.fromarray(lab).save(voc / f"annotations_detectron2/pc459_val/{i}.tif", "TIFF")
    return root


EXPECTED = {  # (top class, bottom class) after the standard mapping; pixel (0, 0) ignored
    "cocostuff27": (9, 23), "cocostuff171": (0, 145), "ade20k": (0, 2), "cityscapes": (0, 19), "pascal_context59": (0, 58),
    "cityscapes19": (0, 13), "pascal_context459": (300, 458),
}
NUM = {"cocostuff27": 27, "cocostuff171": 171, "ade20k": 150, "cityscapes": 27, "pascal_context59": 59,
       "cityscapes19": 19, "pascal_context459": 459}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reader_on_real_layout(name, tmp_path):
    ds = SegmentationDataset(name, make_fixture(name, tmp_path))
    assert len(ds) == 2
    s = ds[0]
    top, bottom = EXPECTED[name]
    if name in ("cocostuff27", "cocostuff171", "cityscapes"):
        assert s.image.size == (320, 320) and s.label.shape == (320, 320)  # shorter side 320, centre crop
    else:
        assert s.image.size == (48, 40) and s.label.shape == (40, 48)
    h = s.label.shape[0]
    assert s.label[h // 4, 5] == top and s.label[3 * h // 4, 5] == bottom
    present = set(np.unique(s.label).tolist())
    assert present <= {top, bottom, ds.ignore_index} and {top, bottom} <= present
    if name not in ("cocostuff27", "cocostuff171", "cityscapes"):  # uncropped: the ignored pixel is kept
        assert s.label[0, 0] == ds.ignore_index
    assert ds.ignore_index == (65535 if name == "pascal_context459" else 255)
    assert ds.num_classes == NUM[name]


def test_cocostuff_ignores_unlabeled_and_unused_ids():
    from emerdiff_fast.datasets import LUTS

    assert LUTS["cocostuff27"][255] == 255 and LUTS["cocostuff171"][11] == 255 and LUTS["cocostuff171"][12] == 11


@pytest.mark.parametrize("name", list(EXPECTED))
def test_missing_or_malformed_root(name, tmp_path):
    with pytest.raises(DatasetError, match="expected"):
        SegmentationDataset(name, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="expected"):
        SegmentationDataset(name, tmp_path)  # exists but empty


def test_eval_end_to_end_with_interruption_and_resume(tmp_path, capsys, monkeypatch):
    from emerdiff_fast import evaluate
    from emerdiff_fast.cli import main

    root = make_fixture("ade20k", tmp_path / "ade")
    args = ["eval", "--dataset", "ade20k", "--root", str(root), "--model", "tiny", "--masks", "3",
            "--resolution", "64", "--backend", "fast", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "clean")]) == 0
    table = capsys.readouterr().out
    assert "| emerdiff |" in table and "| naive |" in table
    clean = json.loads((tmp_path / "clean/results.json").read_text())
    assert clean["images"] == 2 and 0 <= clean["emerdiff"]["traditional"]["miou"] <= 100

    calls = []
    real = evaluate._predict

    def flaky(seg, sample):
        if calls:
            raise KeyboardInterrupt  # interrupted while on the second image
        calls.append(sample.name)
        return real(seg, sample)

    monkeypatch.setattr(evaluate, "_predict", flaky)
    assert main(args + ["--out", str(tmp_path / "resumed")]) == 130  # Ctrl-C: one line, exit 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: 1 of 2 images cached in {tmp_path / 'resumed/cache'}; rerun the same command to resume")
    assert len(list((tmp_path / "resumed/cache").glob("*.npz"))) == 1
    assert not (tmp_path / "resumed/results.json").exists()

    recomputed = []
    monkeypatch.setattr(evaluate, "_predict", lambda seg, s: recomputed.append(s.name) or real(seg, s))
    assert main(args + ["--out", str(tmp_path / "resumed")]) == 0
    assert recomputed == ["ADE_val_00000002"]  # the finished image was not recomputed
    assert json.loads((tmp_path / "resumed/results.json").read_text()) == clean

    # other settings into the same folder are refused, not mixed
    assert main(args[:-1] + ["--masks", "4", "--quiet", "--out", str(tmp_path / "resumed")]) == 2
    assert "other settings (masks: 3 there, 4 now)" in capsys.readouterr().err
    assert main(args[:-1] + ["--masks", "4", "--quiet", "--overwrite", "--out", str(tmp_path / "resumed")]) == 0
    assert json.loads((tmp_path / "resumed/run.json").read_text())["masks"] == 4


def test_eval_bad_root_message(tmp_path, capsys):
    from emerdiff_fast.cli import main

    assert main(["eval", "--dataset", "cityscapes", "--root", str(tmp_path), "--model", "tiny"]) == 2
    assert "expected Cityscapes leftImg8bit/val" in capsys.readouterr().err


def test_cocostuff_full_set_by_default_curated_on_request(tmp_path):
    root = make_fixture("cocostuff27", tmp_path)
    _img(root / "images/val2017/000000000632.jpg")  # in val2017, not on STEGO's curated list
    _lab(root / "annotations/val2017/000000000632.png", np.zeros((40, 48)))
    assert [n for n, _, _ in SegmentationDataset("cocostuff27", root).items] == [
        "000000000139", "000000000285", "000000000632"]
    assert len(SegmentationDataset("cocostuff27", root, subset="curated")) == 2
    with pytest.raises(DatasetError, match="COCO-Stuff only"):
        SegmentationDataset("ade20k", root, subset="curated")


def test_cityscapes19_uses_the_standard_train_ids():
    from emerdiff_fast.datasets import LUTS

    lut = LUTS["cityscapes19"]
    assert [int(lut[i]) for i in (7, 8, 11, 21, 23, 24, 26, 33)] == [0, 1, 2, 8, 10, 11, 13, 18]
    assert all(lut[i] == 255 for i in (0, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34))
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))


def test_pascal_context459_rejects_out_of_range_ids(tmp_path):
    root = make_fixture("pascal_context459", tmp_path)
    bad = np.full((40, 48), 459, np.uint16)
    Image.fromarray(bad).save(root / "VOCdevkit/VOC2010/annotations_detectron2/pc459_val/2008_000002.tif", "TIFF")
    with pytest.raises(DatasetError, match="holds id 459, outside 0..458 and not the ignore value 65535"):
        SegmentationDataset("pascal_context459", root)[0]


def test_eval_open_vocab_on_ade20k_layout(tmp_path, capsys):
    """`eval --open-vocab` on ADE20K's layout: the 150 shipped names, over several prompts of
    the text encoder, one IoU per class; "background" (the fallback) is no ADE20K class."""
    from emerdiff_fast.cli import main
    from emerdiff_fast.datasets import class_names

    root = make_fixture("ade20k", tmp_path / "ade")
    args = ["eval", "--dataset", "ade20k", "--root", str(root), "--model", "tiny", "--masks", "3",
            "--resolution", "64", "--feature-samples", "1", "--quiet", "--open-vocab", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    assert "heat maps' per-pixel argmax" in capsys.readouterr().out
    res = json.loads((tmp_path / "e/results.json").read_text())["open_vocab"]
    assert res["images"] == 2 and res["class_names"] == class_names("ade20k")
    for m in ("emerdiff", "naive", "heat", "heat_threshold"):
        iou = res[m]["per_class_iou"]
        assert len(iou) == 150 and 0 <= res[m]["pixel_accuracy"] <= 100
        # the truth holds wall and sky only: every other class is absent or predicted (IoU 0)
        assert all(v is None or v == 0 for i, v in enumerate(iou) if i not in (0, 2))
    vocab = json.loads((tmp_path / "e/vocab.json").read_text())
    assert vocab["class_names"] == class_names("ade20k") and vocab["vocabulary"]["fallback"] == "background"
