import numpy as np
import pytest
from PIL import Image

from emerdiff_fast.cli import main

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)

ARGS = ["--model", "tiny", "--masks", "4", "--resolution", "64", "--quiet"]


def test_segment_photo_end_to_end(photo_path, tmp_path):
    out = tmp_path / "out"
    rc = main(["segment", str(photo_path), "--out", str(out), "--save-difference-maps", *ARGS])
    assert rc == 0
    labels = Image.open(out / "astronaut.labels.png")
    assert labels.mode == "P" and labels.size == (96, 80)
    arr = np.asarray(labels)
    npz = np.load(out / "astronaut.npz")
    assert np.array_equal(npz["labels"], arr) and arr.max() < 4
    assert npz["difference_maps"].shape == (4, 64, 64) and npz["low_res_labels"].shape == (2, 2)
    assert Image.open(out / "astronaut.overlay.png").size == (96 * 4, 80 * 4)  # short side 80 -> 320 >= 256
    assert not list(out.glob(".*tmp"))


def test_keep_aspect(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(tmp_path / "w.png")
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "w.png"), "--out", str(out), "--save-difference-maps", "--keep-aspect",
               "--format", "npz", *ARGS[:2], "--masks", "3", *ARGS[4:]])
    assert rc == 0
    npz = np.load(out / "w.npz")  # 90x40 at 64: the notebook's size 128x64, grid 4x2
    assert npz["labels"].shape == (40, 90) and npz["difference_maps"].shape == (3, 64, 128)
    assert npz["low_res_labels"].shape == (2, 4)


def test_bad_inputs_are_reported_and_others_processed(photo_path, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a_photo.png").write_bytes(photo_path.read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (d / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    rc = main(["segment", str(d), "--out", str(out), "--backend", "naive", *ARGS])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.jpg" in err and "not an image or corrupt" in err and "1 of 2 images failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_photo.labels.png", "a_photo.legend.json", "a_photo.npz",
                                                    "a_photo.overlay.png"]
    # a missing input is found before any work
    assert main(["segment", str(d), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o2"), *ARGS]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.png' not found")
    assert not (tmp_path / "o2").exists()


def test_bad_model_and_config_exit_2(photo_path, tmp_path, capsys):
    assert main(["segment", str(photo_path), "--out", str(tmp_path), "--model", "/no/such/dir"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["segment", str(photo_path), "--out", str(tmp_path), "--model", "tiny", "--masks", "99",
                 "--resolution", "64"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
