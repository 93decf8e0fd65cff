"""The one image path: bytes -> checked picture -> the model's 32x32 uint8 input.

Everything that turns an image into model input goes through `preprocess`
(web uploads, fetched URLs, training and evaluation), so the service sees
exactly what the model was trained on.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import InputRefused

INPUT_SIZE = 32  # the model's input is INPUT_SIZE x INPUT_SIZE x 3, uint8 RGB

# Formats we decode. Passing this list to Image.open keeps every other Pillow
# plugin (EPS runs Ghostscript, for one) away from untrusted bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

# Formats people upload that we recognise but cannot decode: refused by name.
_KNOWN_UNSUPPORTED = {
    b"ftypheic": "HEIC", b"ftypheix": "HEIC", b"ftyphevc": "HEIC", b"ftypmif1": "HEIF",
    b"ftypmsf1": "HEIF", b"ftypheim": "HEIC", b"ftypheis": "HEIC",
}


class ImageRejected(InputRefused):
    """Not an image we accept (415 unless the reason says otherwise)."""

    def __init__(self, code: str, message: str, status: int = 415):
        super().__init__(code, message, status)


@dataclass(frozen=True)
class CheckedImage:
    image: Image.Image  # fully decoded, upright, RGB
    format: str
    sha256: str
    width: int  # as stored, before orientation is applied
    height: int


def check_image(data: bytes, max_pixels: int = 40_000_000) -> CheckedImage:
    """Decode untrusted bytes completely, or raise ImageRejected with a clear reason."""
    if not data:
        raise ImageRejected("empty_file", "The file is empty.", 400)
    brand = data[4:12]
    if brand in _KNOWN_UNSUPPORTED:
        name = _KNOWN_UNSUPPORTED[brand]
        raise ImageRejected("unsupported_format", f"{name} images are not supported; "
                            "send JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF.")
    try:
        with warnings.catch_warnings():
            # Pillow only warns about a decompression bomb below 2x its limit: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected("too_many_pixels", f"The image is {width}x{height} pixels; "
                                    f"the limit is {max_pixels:,} pixels.", 413)
            if img.format == "JPEG":
                # Decode big JPEGs at a reduced DCT scale: far faster, and we only need 32 px.
                img.draft(img.mode, (INPUT_SIZE * 4, INPUT_SIZE * 4))
            img.load()  # truncated or corrupt data fails here, not later
            fmt = img.format
            img = _to_rgb(ImageOps.exif_transpose(img))
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("too_many_pixels", f"The image declares more than {max_pixels:,} "
                            "pixels.", 413) from None
    except UnidentifiedImageError:
        raise ImageRejected("unsupported_format", "The file is not an image in a format we accept "
                            "(JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF).") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
            KeyError, ZeroDivisionError, MemoryError) as exc:
        # Pillow reports broken files with a zoo of exception types.
        raise ImageRejected("corrupt_image", f"The image could not be decoded ({exc}).") from None
    return CheckedImage(img, fmt, hashlib.sha256(data).hexdigest(), width, height)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, without the classic colour bugs."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) greyscale: scale to 8 bits; .convert("L") would clip to white.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" and a.max() > 255 else 255.0
        if img.mode == "F" and a.max() <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparent pixels on white, as a browser shows them.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_model_input(img: Image.Image, resample=Image.Resampling.BOX) -> np.ndarray:
    """Centre-crop to a square, then an area-averaging downscale to 32x32: uint8 HxWx3.

    CIFAR-10 objects are centred and fill the frame, so the central square keeps
    the object's proportions (squashing a 4:3 photo would distort it).
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    if (w, h) != (side, side):
        img = img.crop(box)  # crop first: the filter must not pull in pixels from outside
    if side != INPUT_SIZE:
        # BOX averages each output pixel's footprint, as a sensor does: antialiased, without
        # bicubic's overshoot; more accurate than bicubic on rescaled test images (the model
        # card's preprocessing study) and the cheapest filter.
        img = img.resize((INPUT_SIZE, INPUT_SIZE), resample)
    return np.asarray(img, dtype=np.uint8).reshape(INPUT_SIZE, INPUT_SIZE, 3)


def preprocess(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Untrusted image bytes -> the model's uint8 32x32x3 input (or ImageRejected)."""
    return to_model_input(check_image(data, max_pixels).image)


def thumbnail_jpeg(img: Image.Image, size: int = 128) -> bytes:
    """A small JPEG for the results page."""
    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=85)
    return out.getvalue()
