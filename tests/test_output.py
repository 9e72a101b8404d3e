"""Output formats: COCO RLE (against pycocotools), segment records, masks, overlay edges."""
import json

import numpy as np
import pytest
from PIL import Image

from emerdiff_fast.output import boundaries, output_files, overlay, rle_encode, save_result, segments
from emerdiff_fast.result import SegmentationResult

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)


def test_rle_by_hand():
    # column-major [0, 1, 1, 1] -> runs [1 zero, 3 ones] -> "1", "3" offset by 48
    assert rle_encode(np.array([[0, 1], [1, 1]])) == {"size": [2, 2], "counts": "13"}
    # starts with ones -> a leading zero-length run
    assert rle_encode(np.ones((1, 3)))["counts"] == "03"


def test_rle_matches_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for trial in range(100):
        h, w = rng.integers(1, 70, 2)
        m = rng.random((h, w)) < rng.random()
        if trial % 2:  # long runs exercise the multi-group and delta encodings
            m = np.cumsum(rng.random((h, w)) < 0.02, 1) % 2 == 1
        ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = rle_encode(m)
        assert ours["counts"] == ref["counts"].decode() and ours["size"] == list(ref["size"])
        assert np.array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), m)


def test_segments_and_boundaries():
    labels = np.zeros((6, 8), np.int32)
    labels[1:4, 2:7] = 3
    recs = {r["id"]: r for r in segments(labels)}
    assert recs[3]["area"] == 15 and recs[3]["bbox"] == [2, 1, 5, 3]
    assert recs[0]["area"] == 48 - 15 and recs[0]["bbox"] == [0, 0, 8, 6]
    edge = boundaries(labels)
    assert edge[1, 1] and edge[0, 2] and not edge[2, 4] and not edge[5, 0]
    photo = Image.new("RGB", (8, 6), (10, 20, 30))
    ov = np.asarray(overlay(photo, labels, scale=1))
    assert (ov[edge] == 255).all() and (ov[~edge] != 255).any()
    big = np.asarray(overlay(photo, labels))  # 6 px high: upscaled 43x to reach 256 px, edges 1 px wide there
    assert big.shape == (6 * 43, 8 * 43, 3) and (big[boundaries(labels.repeat(43, 0).repeat(43, 1))] == 255).all()


def test_save_result_all_formats(tmp_path):
    labels = np.array([[0, 0, 2], [2, 2, 5]], np.int32)
    r = SegmentationResult(labels=labels, low_res_labels=np.zeros((1, 1), np.int32),
                           difference_maps=None, mask_embeddings=np.zeros((6, 4), np.float32),
                           config=None, backend="fast", timings={})
    fmts = ("labels", "overlay", "npz", "legend", "rle", "masks")
    written = save_result(r, Image.new("RGB", (3, 2)), tmp_path, "sub/img", formats=fmts)
    expect = sorted(tmp_path / f for f in output_files("sub/img", fmts, labels))
    assert sorted(written) == expect and all(p.exists() for p in expect)
    masks = [np.asarray(Image.open(tmp_path / f"sub/img.masks/{i}.png")) > 0 for i in (0, 2, 5)]
    assert np.array_equal(sum(m.astype(int) for m in masks), np.ones_like(labels))  # a partition
    rle = json.loads((tmp_path / "sub/img.rle.json").read_text())
    assert [(d["id"], d["area"]) for d in rle] == [(0, 2), (2, 3), (5, 1)]
    legend = json.loads((tmp_path / "sub/img.legend.json").read_text())["segments"]
    assert [d["id"] for d in legend] == [0, 2, 5] and all(d["color"].startswith("#") for d in legend)
    with pytest.raises(ValueError, match="unknown output formats"):
        save_result(r, Image.new("RGB", (3, 2)), tmp_path, "x", formats=("labels", "gif"))
