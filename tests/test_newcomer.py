"""A newcomer's first hour: settings that compose, caveats that travel with a model,
messages in the option names typed, no empty folder left behind, overlays that can be read."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from emerdiff_fast import EmerDiff, EmerDiffConfig, load_pipeline
from emerdiff_fast.cli import main
from emerdiff_fast.output import _fitted_font, _place, boundaries, overlay, overlay_scale

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)

SCENE = "examples/scenes/scene-10000901.png"


@pytest.fixture(scope="module")
def mini():
    return load_pipeline("mini")


def test_keyword_overrides_keep_the_models_other_settings(mini):
    seg = EmerDiff(mini, num_masks=4, lam=50.0)
    assert (seg.config.num_masks, seg.config.lam, seg.config.resolution, seg.config.t_modulate) == (4, 50.0, 64, 881)
    explicit = EmerDiffConfig(num_masks=4, resolution=64, feature_samples=2)
    assert EmerDiff(mini, explicit, lam=20.0).config == explicit.replace(lam=20.0)
    with pytest.raises(TypeError, match="unknown setting.*masks"):
        EmerDiff(mini, masks=4)


def test_an_explicit_config_is_used_as_given_and_its_departures_are_said_once(mini, our_log):
    from emerdiff_fast import segmenter

    segmenter._SAID.clear()
    cfg = EmerDiffConfig(num_masks=4, resolution=64)  # the method's lambda 10 and t = 281
    for _ in range(2):
        assert EmerDiff(mini, cfg).config == cfg
    lines = [r.message for r in our_log.records if "departs from the model's recommended" in r.message]
    assert len(lines) == 1 and "lam 10.0 (recommended 300.0)" in lines[0] and "t_modulate 281 (recommended 881)" in lines[0]


def test_far_from_the_expected_resolution_warns_once(mini, tiny_pipe, our_log):
    from emerdiff_fast import segmenter

    segmenter._SAID.clear()
    EmerDiff(mini, resolution=512, num_masks=4)
    EmerDiff(mini, resolution=512, num_masks=4)
    EmerDiff(mini, resolution=128, num_masks=4)  # twice 64: not far
    far = [r.message for r in our_log.records if "far from the" in r.message]
    assert far == ["resolution 512 is far from the 64 px this model expects: its segments may be poor (and a "
                   "larger resolution costs time as its square)"]


def test_caveats_travel_with_the_model(mini, tiny_pipe, tmp_path, capsys):
    assert "class mIoU 0.071" in EmerDiff(mini).caveats["labels"]
    assert EmerDiff(tiny_pipe, num_masks=2, resolution=64).caveats == {}
    rc = main(["segment", SCENE, "--out", str(tmp_path / "o"), "--labels", "background,disc", "--quiet",
               "--backend", "naive"])  # the caveat is the naming's, whatever the segments
    err = capsys.readouterr().err
    assert rc == 0 and err.count("caveat: the mini model names segments poorly") == 1
    rc = main(["segment", SCENE, "--out", str(tmp_path / "p"), "--quiet", "--backend", "naive"])  # no names: no caveat
    assert rc == 0 and "caveat:" not in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--masks", "0"], "error: --masks must be at least 2, got 0"),
    (["--masks", "1000"], "error: --masks 1000 exceeds the 64 low-resolution positions at --resolution 64"),
    (["--resolution", "100"], "error: --resolution must be a positive multiple of 64, got 100"),
    (["--lam", "nan"], "error: --lam must be finite, got nan"),
    (["--preset", "quick"], "error: --preset: unknown preset 'quick'"),
    (["--feature-samples", "0"], "error: --feature-samples must be at least 1, got 0"),
])
def test_messages_name_the_option_before_the_model_loads(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", SCENE, "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err, err  # found from the configs, weights never loaded
    assert not out.exists()


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["segment", SCENE, "--out", str(out), "--model", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert not out.exists()  # created by the run's --out check, removed when the model failed
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["segment", SCENE, "--out", str(kept), "--model", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert kept.is_dir()  # a folder that existed before is never touched
    scenes = tmp_path / "scenes"
    assert main(["scenes", "--out", str(scenes), "-n", "1"]) == 0
    ev = tmp_path / "eval"
    assert main(["eval", "--dataset", "shapes", "--root", str(scenes), "--out", str(ev),
                 "--model", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert not ev.exists()  # its run.json was bookkeeping, not output
    assert "not found" in capsys.readouterr().err


def test_small_overlays_are_upscaled_and_names_fit():
    assert overlay_scale((64, 64)) == 4 and overlay_scale((64, 300)) == 4 and overlay_scale((300, 400)) == 1
    assert overlay_scale((64, 64), 2) == 2 and overlay_scale((33, 40)) == 8
    labels = np.zeros((64, 64), np.int32)
    labels[:, 32:] = 1
    labels[60:, 60:] = 2  # a corner segment: its name must be moved inside
    photo = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    im = overlay(photo, labels, names={0: "background", 1: "rectangle", 2: "triangle"})
    assert im.size == (256, 256)
    away = ~boundaries(labels)  # nearest-neighbour upscale: the same colours, finer boundary lines
    big, small = np.asarray(overlay(photo, labels))[::4, ::4], np.asarray(overlay(photo, labels, scale=1))
    assert np.array_equal(big[away], small[away])
    draw = ImageDraw.Draw(im)
    font = _fitted_font(draw, ["background"], 64, 64)
    box = draw.textbbox((0, 0), "background", font=font, stroke_width=1)
    assert box[2] - box[0] <= 62  # shrunk to fit a 64 px picture
    taken = []
    for at in ((250, 250), (250, 252), (5, 128)):
        b = draw.textbbox(at, "rectangle", font=_fitted_font(draw, ["rectangle"], 256, 256), anchor="mm")
        dx, dy = _place(b, 256, 256, taken)
        placed = (b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy)
        assert placed[0] >= 0 and placed[1] >= 0 and placed[2] <= 256 and placed[3] <= 256
        assert not any(placed[0] < t[2] and t[0] < placed[2] and placed[1] < t[3] and t[1] < placed[3] for t in taken)
        taken.append(placed)


def test_cli_overlay_scale(tmp_path):
    assert main(["segment", SCENE, "--out", str(tmp_path), "--quiet", "--overlay-scale", "2", "--backend", "naive"]) == 0
    name = "scene-10000901"
    assert Image.open(tmp_path / f"{name}.overlay.png").size == (128, 128)
    assert Image.open(tmp_path / f"{name}.labels.png").size == (64, 64)
