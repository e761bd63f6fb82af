"""Hostile image files and folders (issue 16): every mode, frame and metadata a camera or
an editor writes decodes as it shows; a broken, lying or giant file stops the sweep with
exit 2 naming it, or is left out with --skip-bad-images; odd shapes and folder loops
neither exhaust memory nor hang the scan."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from sweeps.cli import build_parser
from sweeps.errors import UsageError
from sweeps.plan.prepare import prepare
from trainables.data import DataError, DataHandle, decode_image, scan, to_rgb

from conftest import write_image_folder

SIZE = 16  # decode_image's output side in these tests


def decoded(path: Path) -> np.ndarray:
    out = decode_image(str(path), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    return out


# --- image files: modes, metadata, frames, names ---------------------------------------

def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    out = decoded(tmp_path / "deep.png")
    assert out[..., 0].min() < 10 and out[..., 0].max() > 245  # a gradient, not near-white
    assert abs(out.mean() - 127.5) < 10
    assert (np.diff(out[SIZE // 2, :, 0].astype(int)) >= 0).all()  # still rising left to right


def test_a_32_bit_integer_image_is_scaled_like_16_bits(tmp_path):
    Image.fromarray(np.full((20, 20), 32768, np.int32), "I").save(tmp_path / "i.tif")
    assert abs(int(decoded(tmp_path / "i.tif")[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize(("values", "expected"), [(0.5, 128), (200.0, 200), (np.nan, 0)])
def test_a_float_image_is_read_as_0_to_1_or_clipped_to_0_to_255(tmp_path, values, expected):
    Image.fromarray(np.full((20, 20), values, np.float32), "F").save(tmp_path / "f.tif")
    assert abs(int(decoded(tmp_path / "f.tif")[0, 0, 0]) - expected) <= 1


def upright_and_tagged(tmp_path: Path) -> tuple[Path, Path]:
    """The same photo twice: stored upright, and stored sideways with EXIF orientation 6
    ("rotate 90 degrees clockwise to show"), as a phone writes a portrait photo."""
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:, 20:] = 255  # dark left half, bright right half
    upright = Image.fromarray(pixels)
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    return tmp_path / "upright.jpg", tmp_path / "tagged.jpg"


def test_exif_orientation_is_applied(tmp_path):
    upright, tagged = upright_and_tagged(tmp_path)
    a, b = decoded(upright).astype(int), decoded(tagged).astype(int)
    assert np.abs(a - b).mean() < 8
    assert b[:, : SIZE // 3].mean() < 40 and b[:, -SIZE // 3:].mean() > 215


def test_a_palette_image_with_alpha_keeps_its_colours():
    """PA has no file format of its own (PIL makes it in memory); it goes through RGBA."""
    pa = Image.new("RGB", (30, 20), (0, 200, 0)).convert("P").convert("PA")
    r, g, b = to_rgb(pa).getpixel((5, 5))  # the web palette's nearest green
    assert r == b == 0 and g > 190


@pytest.mark.parametrize("mode", ["CMYK", "LA", "1", "I;16", "YCbCr"])
def test_other_modes_keep_their_colour(tmp_path, mode):
    """A saturated green in each mode comes out green (mode 1 and grey ones: bright)."""
    ext = "tif" if mode in ("CMYK", "YCbCr") else "png"
    if mode == "I;16":
        img = Image.fromarray(np.full((20, 30), 60000, np.uint16))
    else:
        img = Image.new("RGB", (30, 20), (0, 200, 0)).convert(mode if mode != "1" else "L").convert(mode)
    img.save(tmp_path / f"x.{ext}")
    r, g, b = decoded(tmp_path / f"x.{ext}")[SIZE // 2, SIZE // 2].tolist()
    if mode in ("LA", "1", "I;16"):  # grey: green's luminance, or white after 1-bit thresholding
        assert r == g == b and g > 100
    else:
        assert g > 150 and r < 60 and b < 60, (r, g, b)


def test_an_animated_gif_and_a_multi_page_tiff_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "a.tiff", save_all=True, append_images=frames[1:])
    for name in ("a.gif", "a.tiff"):
        r, _, b = decoded(tmp_path / name)[0, 0].tolist()
        assert r > 200 and b < 50, name


def test_png_bytes_named_jpg_decode(tmp_path):
    Image.new("RGB", (20, 20), (0, 0, 250)).save(tmp_path / "misnamed.jpg", format="PNG")
    assert decoded(tmp_path / "misnamed.jpg")[0, 0].tolist() == [0, 0, 250]


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG of a few bytes whose header claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


BAD_FILES = {
    "empty.jpg": (lambda p: p.write_bytes(b""), "cannot identify image file"),
    "notes.jpg": (lambda p: p.write_text("not a picture\n"), "cannot identify image file"),
    "bomb.png": (lambda p: png_claiming(p, 100_000, 100_000), "DecompressionBombError"),
    "cut.png": (lambda p: p.write_bytes((Image.new("RGB", (64, 64), 9).save(p) or p.read_bytes())[:80]),
                "unreadable image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_image_file_stops_the_sweep_naming_it(tmp_path, name):
    """Exit 2 (a UsageError) at plan time with the file listed, Ray not started, nothing logged."""
    data = write_image_folder(tmp_path / "images")
    make, reason = BAD_FILES[name]
    make(data / "cat" / name)
    with pytest.raises(UsageError) as e:
        prepare(args("--data", str(data), "--weights", "none", "--image-size", "16",
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "r")),
                log=lambda _: None)
    message = str(e.value)
    assert f"{data / 'cat' / name}: " in message and reason in message, message
    assert "--skip-bad-images" in message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "r").exists()
    assert not ray.is_initialized()


def test_skip_bad_images_leaves_a_decompression_bomb_out(tmp_path):
    data = write_image_folder(tmp_path / "images")
    png_claiming(data / "dog" / "bomb.png", 100_000, 100_000)
    handle = DataHandle(scan(data, val_fraction=0.5), 12, str(tmp_path / "cache"))
    kept = handle.prepare(skip_bad=True, log=lambda _: None)
    assert len(kept.dataset) == 12 and "bomb.png" in kept.dataset.skipped[0]
    with pytest.raises(DataError, match="bomb.png"):
        DataHandle(scan(data, val_fraction=0.5), 12, str(tmp_path / "cache2")).prepare(skip_bad=False)


def args(*argv: str):
    return build_parser().parse_args(["--space", "smoke", *argv])


# --- sizes and folder shapes ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 60_000), (60_000, 1), (1, 1)])
def test_an_extreme_aspect_ratio_decodes_without_a_giant_intermediate(tmp_path, shape):
    """Resizing a 1 x 60000 strip's short side to 256 before cropping would need 11 GB."""
    import resource

    width, height = shape
    Image.new("L", (width, height), 77).save(tmp_path / "strip.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = decode_image(str(tmp_path / "strip.png"), 256)
    assert out.shape == (256, 256, 3) and (out == 77).all()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_a_symlink_loop_in_a_class_folder_does_not_hang_the_scan(tmp_path):
    data = write_image_folder(tmp_path / "images", per_class=3)
    (data / "cat" / "up").symlink_to("..")
    assert len(scan(data)) == 6


def test_a_file_named_as_the_data_folder_is_refused_naming_it(tmp_path):
    (tmp_path / "images").write_text("x")
    with pytest.raises(DataError, match=f"data folder not found: {tmp_path / 'images'}"):
        scan(tmp_path / "images")
