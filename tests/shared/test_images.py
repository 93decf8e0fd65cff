"""The one image path: what is accepted, how it becomes the model's input, what is refused."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from shared.images import ImageRefused, check_image, preprocess, to_model_input
from tests.helpers import image_bytes, require


def test_a_32px_image_passes_through_unchanged():
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    assert np.array_equal(preprocess(buf.getvalue()), a)


def test_output_is_uint8_32x32_rgb_for_any_size():
    for size in [(1, 1), (8000, 200), (200, 8000), (640, 480)]:
        out = preprocess(image_bytes("PNG", size=size, color=(10, 200, 30)))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert tuple(out[16, 16]) == (10, 200, 30)


def test_centre_square_is_kept_not_squashed():
    # A wide image: red centre square, blue side bands. Cropping keeps only red.
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = preprocess(buf.getvalue())
    assert out[:, :, 0].min() > 240 and out[:, :, 2].max() < 15


def test_downscale_is_antialiased():
    # A 1-px checkerboard averages to grey; nearest-neighbour would keep black/white pixels.
    board = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(board).save(buf, "PNG")
    out = preprocess(buf.getvalue())
    assert 100 < out.mean() < 155 and out.std() < 20


def test_exif_orientation_is_applied():
    # Stored landscape with orientation 6 (rotate 90° clockwise to view): viewed as portrait.
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # left half white when stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    checked = check_image(buf.getvalue())
    assert checked.image.size == (30, 60)
    a = np.asarray(checked.image)
    assert a[:20].mean() > 200 and a[40:].mean() < 50  # white ends up on top


def test_transparency_is_composited_on_white():
    for mode, color in (("RGBA", (255, 0, 0, 0)), ("LA", (0, 0))):
        out = preprocess(image_bytes("PNG", mode=mode, color=color))
        assert out.min() == 255
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0] * 256)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    assert preprocess(buf.getvalue()).min() == 255


def test_cmyk_jpeg_gives_the_right_colour():
    out = preprocess(image_bytes("JPEG", mode="CMYK", color=(0, 255, 255, 0), quality=95))  # pure red
    r, g, b = out[16, 16].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16bit_greyscale_is_scaled_not_clipped_to_white():
    a = np.full((20, 20), 32768, dtype=np.uint16)  # mid grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    out = preprocess(buf.getvalue())
    assert 120 <= out.mean() <= 135


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = preprocess(buf.getvalue())[10, 10].astype(int)
    assert r > 200 and b < 50


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF", "JPEG", "PNG"])
def test_common_formats_are_accepted(fmt):
    assert check_image(image_bytes(fmt)).format == fmt


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty_file"),
        (b"hello, I am text renamed to cat.jpg", "unsupported_format"),
        (b"<html><body>not an image</body></html>", "unsupported_format"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "unsupported_format"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "unsupported_format"),  # EPS would run Ghostscript
    ],
)
def test_non_images_are_refused(data, code):
    with pytest.raises(ImageRefused) as e:
        check_image(data)
    assert e.value.code == code and e.value.status in (400, 415)


def test_truncated_jpeg_is_refused():
    data = image_bytes("JPEG", size=(300, 300), quality=95)
    with pytest.raises(ImageRefused) as e:
        check_image(data[: len(data) // 2])
    assert e.value.code == "corrupt_image"


def test_heic_is_refused_by_name():
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\0" * 12
    with pytest.raises(ImageRefused) as e:
        check_image(heic)
    assert e.value.status == 415 and "HEIC" in e.value.message


def test_decompression_bomb_is_refused_before_decoding():
    # A tiny PNG header claiming 50000 x 50000 pixels.
    data = image_bytes("PNG", size=(1, 1))
    i = data.index(b"IHDR")
    body = b"IHDR" + struct.pack(">II", 50000, 50000) + data[i + 12 : i + 17]
    bomb = data[:i] + body + struct.pack(">I", zlib.crc32(body)) + data[i + 21 :]
    with pytest.raises(ImageRefused) as e:
        check_image(bomb, max_pixels=40_000_000)
    assert e.value.code == "too_many_pixels" and e.value.status == 413


def test_pixel_limit_is_a_parameter():
    with pytest.raises(ImageRefused):
        check_image(image_bytes("PNG", size=(100, 100)), max_pixels=5000)
    assert check_image(image_bytes("PNG", size=(100, 100)), max_pixels=10000)


def test_to_model_input_of_a_tall_image():
    img = Image.new("RGB", (50, 500), (0, 0, 0))
    img.paste((255, 255, 255), (0, 225, 50, 275))
    out = to_model_input(img)
    assert out[16, 16].min() > 200  # the white band in the middle survives


def test_avif_is_decoded():
    require(
        features.check("avif"),
        "Pillow with AVIF support",
        "pip install -r requirements/dev.txt (Pillow's wheels carry it)",
    )
    assert check_image(image_bytes("AVIF")).format == "AVIF"
