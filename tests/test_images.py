"""Inputs become the picture people see: EXIF orientation, high bit depths, animation,
size limits, folder listing."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from emerdiff_fast import images
from emerdiff_fast.images import ImageError, list_images, load_image, set_max_pixels


def png_bytes(width, height, bit_depth, colour_type, rows: bytes = b"") -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


@pytest.fixture
def restore_max_pixels():
    old = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = old


def exif_rotated_jpeg(path):
    """Stored 60 wide x 40 tall, left half red, right half blue, EXIF orientation 6 (the
    viewer turns it 90 degrees clockwise): displayed 40 x 60, red on top."""
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30, 0] = 255
    arr[:, 30:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_applied(tmp_path):
    im = load_image(exif_rotated_jpeg(tmp_path / "phone.jpg"))
    assert im.size == (40, 60)
    arr = np.asarray(im).astype(int)
    top, bottom = arr[:25], arr[35:]
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 50
    assert bottom[..., 2].mean() > 200 and bottom[..., 0].mean() < 50
    with Image.open(tmp_path / "phone.jpg") as raw:  # a PIL image passed in is turned too
        assert load_image(raw).size == (40, 60)


def test_16_bit_grayscale_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # really stored as 16 bit
    out = np.asarray(load_image(tmp_path / "g16.png"))[..., 0].astype(int)
    assert np.abs(out - np.round(ramp / 257)).max() <= 1
    assert (out == 255).mean() < 0.02  # convert("RGB") alone would make ~all of it 255
    # a 12-bit sensor image in a 16-bit file stays as dark as a viewer shows it (dtype range)
    Image.fromarray((ramp >> 4).astype(np.uint16)).save(tmp_path / "g12.png")
    assert np.asarray(load_image(tmp_path / "g12.png")).max() <= 17
    assert np.abs(np.asarray(load_image(ramp))[..., 0] - np.round(ramp / 257)).max() <= 1  # uint16 arrays


def test_float_and_wide_int_images_use_their_range():
    f = np.linspace(-3.0, 5.0, 40 * 30, dtype=np.float32).reshape(30, 40)
    out = np.asarray(load_image(Image.fromarray(f, "F")))[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    assert np.abs(out - np.round((f + 3) / 8 * 255)).max() <= 1
    wide = (np.arange(30 * 40).reshape(30, 40) * 100_000).astype(np.int32)
    out = np.asarray(load_image(Image.fromarray(wide, "I")))[..., 0]
    assert out.min() == 0 and out.max() == 255


def test_16_bit_rgb_png(tmp_path):
    h, w = 6, 7
    rgb = (np.arange(h * w * 3).reshape(h, w, 3) * 1500 % 65536).astype(">u2")
    rows = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))
    (tmp_path / "rgb16.png").write_bytes(png_bytes(w, h, 16, 2, rows))
    out = np.asarray(load_image(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(out - rgb.astype(int) / 257).max() <= 1  # the high byte: no clipping


def test_animated_first_frame_said_once(tmp_path, our_log, monkeypatch):
    monkeypatch.setattr(images, "_said_animated", False)
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    for name in ("a.gif", "b.gif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100)
    first = load_image(tmp_path / "a.gif")
    load_image(tmp_path / "b.gif")
    assert np.asarray(first)[..., 0].mean() > 200  # red: the first frame
    said = [r for r in our_log.records if "animated" in r.getMessage()]
    assert len(said) == 1 and "a.gif" in said[0].getMessage()


def test_decompression_bomb_is_an_image_error(tmp_path, restore_max_pixels):
    (tmp_path / "bomb.png").write_bytes(png_bytes(20000, 10000, 8, 2))
    with pytest.raises(ImageError, match=r"bomb.png.* is too large .*200000000 pixels.*the limit is 89 M pixels, raise it with --max-pixels"):
        load_image(tmp_path / "bomb.png")
    set_max_pixels(300_000_000)  # raised on purpose: now it is opened (and found truncated)
    with pytest.raises(ImageError, match="not an image or corrupt"):
        load_image(tmp_path / "bomb.png")
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    set_max_pixels(199)  # Pillow alone would only refuse above 2x its limit
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "small.png")
    with pytest.raises(ValueError):
        set_max_pixels(0)


def test_list_images_recursive_hidden_and_duplicates(tmp_path):
    for rel in ("a.png", "sub/b.jpg", "sub/deeper/c.png", ".hidden/d.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.name for p in list_images([tmp_path])] == ["a.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path], recursive=True)] == [
        "a.png", "sub/b.jpg", "sub/deeper/c.png"]
    assert len(list_images([tmp_path, tmp_path / "a.png"])) == 1
