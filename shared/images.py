"""The one image path: bytes -> checked picture -> the model's 32x32 uint8 input.

Both serving tiers ingest an image with `prepare` (web uploads, and URLs the fetch workers
download): check and decode it, make its thumbnail and its model input. Training and
evaluation use `preprocess`, the same check and the same `to_model_input`, so the service
sees exactly what the model was trained on.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import io
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared import formats
from shared.errors import InputRefused
from shared.settings import Settings

INPUT_SIZE = 32  # the model's input is INPUT_SIZE x INPUT_SIZE x 3, uint8 RGB
PIXELS_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)
TRIM_AFTER_BYTES = 16_000_000  # a decode this large gives its memory back at once (malloc_trim)

# Formats people upload that we recognise but cannot decode: refused by name.
_KNOWN_UNSUPPORTED = {
    b"ftypheic": "HEIC",
    b"ftypheix": "HEIC",
    b"ftyphevc": "HEIC",
    b"ftypmif1": "HEIF",
    b"ftypmsf1": "HEIF",
    b"ftypheim": "HEIC",
    b"ftypheis": "HEIC",
}


class ImageRefused(InputRefused):
    """Not an image we accept (415 unless the reason says otherwise)."""

    def __init__(self, code: str, message: str, status: int = 415):
        super().__init__(code, message, status)


@dataclass(frozen=True)
class CheckedImage:
    image: Image.Image  # fully decoded, upright, RGB
    format: str
    sha256: str


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to be stored and predicted."""

    sha256: str  # of the bytes as sent: the stored original's name
    pixels: np.ndarray  # the model's input
    thumbnail: bytes  # a small JPEG for the page

    @property
    def pixels_b64(self) -> str:
        return encode_pixels(self.pixels)


# The least data any real JPEG spends per pixel: a flat, Huffman-optimised 4:2:0 image needs 0.047
# bits, a flat greyscale one 0.031. A file below this declares more pixels than its data holds
# (a 64x64 JPEG whose header claims 6000x6000): libjpeg would grey-fill the rest, without an error.
JPEG_MIN_BITS_PER_PIXEL = 0.02
# A full-size decode larger than this is reduced at once (integer box reduce): a thumbnail and a
# 32 px input need no more, and the full-size copy is freed before the colour conversions.
SHRINK_ABOVE_SIDE = 1024


# What decoding an image peaks at, in bytes per pixel of the decode, by the mode it decodes to:
# the decode itself plus the copies made before it is shrunk (measured at 4000x4000 and rounded
# up; tests/shared/test_decode_memory.py checks each against a real decode). 16-bit greyscale
# costs 6 through its lookup path (the float64 path it replaced peaked at 28).
DECODE_BYTES_PER_PIXEL = {"1": 2, "L": 2, "I;16": 6, "RGB": 5, "YCbCr": 5, "CMYK": 5, "I": 5, "F": 5}
DECODE_BYTES_PER_PIXEL |= dict.fromkeys(("P", "PA", "LA", "La", "RGBA", "RGBa"), 10)  # made RGBA first
OTHER_DECODE_BYTES_PER_PIXEL = 12  # 16-bit byte orders Pillow converts through 32 bits, and the rest
# WebP and AVIF decode into their library's own buffer, which Pillow then copies.
FORMAT_DECODE_BYTES_PER_PIXEL = {"WEBP": 17, "AVIF": 12}


@dataclass(frozen=True)
class DecodeCost:
    pixels: int  # how long the decode takes grows with these (MAX_REQUEST_DECODE_PIXELS)
    bytes: int  # the memory it peaks at (the process's DecodeBudget)


class DecodeBudget:
    """At most `limit` bytes of decoding at once in this process: many threads decoding large
    images at the same time would otherwise add up to gigabytes. One image larger than the whole
    budget still runs, alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self._cond = limit, 0, threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int):
        nbytes = min(nbytes, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


@dataclass(frozen=True)
class OpenedImage:
    """Untrusted bytes whose header has been read and checked: the image, opened and not yet
    decoded, and what decoding it will cost (a request's budget is charged before it decodes)."""

    data: bytes
    image: Image.Image
    cost: DecodeCost


def open_image(
    data: bytes, max_pixels: int = Settings.max_image_pixels, max_full_pixels: int = Settings.max_full_decode_pixels
) -> OpenedImage:
    """Read the header alone (JPEG: set to decode at a reduced scale); raises ImageRefused for
    what check_image would refuse on sight."""
    return OpenedImage(data, *_open_checked(data, max_pixels, max_full_pixels))


def check_image(
    data: bytes | OpenedImage,
    max_pixels: int = Settings.max_image_pixels,
    max_full_pixels: int = Settings.max_full_decode_pixels,
    budget: DecodeBudget | None = None,
) -> CheckedImage:
    """Decode untrusted bytes completely, or raise ImageRefused with a clear reason.

    max_pixels bounds the declared size of any image; max_full_pixels that of the formats
    decoded at full size (all but JPEG, which is decoded at a reduced scale, so a 50 MP phone
    photo costs what a 1 MP one does). An OpenedImage was checked against them when opened."""
    with _pillow_errors_refused(max_pixels):
        opened = data if isinstance(data, OpenedImage) else open_image(data, max_pixels, max_full_pixels)
        img, cost = opened.image, opened.cost
        with budget.reserve(cost.bytes) if budget else nullcontext():
            img.load()  # truncated or corrupt data fails here, not later
            fmt = img.format
            img = _to_rgb(ImageOps.exif_transpose(_shrink(_reducible(img))))
    if cost.bytes > TRIM_AFTER_BYTES:
        release_freed_memory()
    return CheckedImage(img, fmt, hashlib.sha256(opened.data).hexdigest())


# Pillow reports broken files with a zoo of exception types.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
    MemoryError,
)


@contextmanager
def _pillow_errors_refused(max_pixels: int):
    """What Pillow raises while opening or decoding untrusted bytes, as ImageRefused."""
    try:
        yield
    except ImageRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused("too_many_pixels", f"The image declares more than {max_pixels:,} pixels.", 413) from None
    except UnidentifiedImageError:
        raise ImageRefused(
            "unsupported_format", f"The file is not an image in a format we accept ({formats.NAMES})."
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageRefused("corrupt_image", f"The image could not be decoded ({exc}).") from None


def _open_checked(data: bytes, max_pixels: int, max_full_pixels: int) -> tuple[Image.Image, DecodeCost]:
    """The image opened (header only, nothing decoded yet) and what decoding it will cost."""
    if not data:
        raise ImageRefused("empty_file", "The file is empty.", 400)
    brand = data[4:12]
    if brand in _KNOWN_UNSUPPORTED:
        name = _KNOWN_UNSUPPORTED[brand]
        raise ImageRefused("unsupported_format", f"{name} images are not supported; send {formats.NAMES}.")
    with _pillow_errors_refused(max_pixels), warnings.catch_warnings():
        # Pillow only warns about a decompression bomb below 2x its limit: make it an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Only the formats we accept: every other Pillow plugin (EPS runs Ghostscript, for
        # one) stays away from untrusted bytes.
        img = Image.open(io.BytesIO(data), formats=formats.PILLOW_FORMATS)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRefused(
            "too_many_pixels", f"The image is {width}x{height} pixels; the limit is {max_pixels:,} pixels.", 413
        )
    if img.format == "JPEG":
        if 8 * len(data) < JPEG_MIN_BITS_PER_PIXEL * width * height:
            raise ImageRefused(
                "corrupt_image",
                f"The JPEG declares {width}x{height} pixels but holds far less data "
                "than that many pixels need: its data ends early.",
            )
        # Decode at a reduced DCT scale (1/2 to 1/8): far faster and smaller, and we need 128 px at most.
        img.draft(img.mode, (INPUT_SIZE * 4, INPUT_SIZE * 4))
    elif width * height > max_full_pixels:
        name = formats.ACCEPTED.get(img.format, (img.format,))[0]
        raise ImageRefused(
            "too_many_pixels",
            f"{name} images are decoded at full size; this one is {width}x{height}"
            f" pixels and the limit for them is {max_full_pixels:,} (JPEG photos may be larger).",
            413,
        )
    pixels = img.size[0] * img.size[1]
    per_pixel = max(
        DECODE_BYTES_PER_PIXEL.get(img.mode, OTHER_DECODE_BYTES_PER_PIXEL),
        FORMAT_DECODE_BYTES_PER_PIXEL.get(img.format, 0),
    )
    return img, DecodeCost(pixels, pixels * per_pixel)


_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBa", "CMYK", "I", "F")


def _reducible(img: Image.Image) -> Image.Image:
    """The full-size decode in a mode that reduce() takes, made before anything else copies it:
    16-bit greyscale through a lookup table to 8 bits (1 byte a pixel, where the float64 path
    took 28), a palette expanded (keeping its transparency), 1-bit to greyscale."""
    if img.mode.startswith("I;16"):
        if img.mode != "I;16":  # Pillow scales only native-order 16 bits; the rest go through 32
            img = img.convert("I")
        top = 65535.0 if img.getextrema()[1] > 255 else 255.0  # 8-bit data stored in 16 bits stays
        return img.point(lambda v: v * (255.0 / top) + 0.5).convert("L")  # convert clips to 0..255
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    return img


def _shrink(img: Image.Image) -> Image.Image:
    """An integer box reduce of a large full-size decode, keeping the short side >= 512 px."""
    factor = min(img.size) // (SHRINK_ABOVE_SIDE // 2)
    if max(img.size) <= SHRINK_ABOVE_SIDE or factor < 2 or img.mode not in _REDUCIBLE_MODES:
        return img
    return img.reduce(factor)


def release_freed_memory() -> None:
    """Give the memory of a large decode back to the system: glibc keeps freed heap memory for
    reuse, so one large image left a web worker at 900 MB for good. (No-op off glibc.)"""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, without the classic colour bugs."""
    if img.mode in ("I", "F"):
        # 32-bit greyscale (already shrunk): scale to 8 bits; .convert("L") alone would clip to white.
        high = img.getextrema()[1]
        top = (1.0 if high <= 1.0 else 255.0) if img.mode == "F" else (65535.0 if high > 255 else 255.0)
        img = img.point(lambda v: v * (255.0 / top) + 0.5).convert("L")  # convert clips to 0..255
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
    return np.asarray(img, dtype=np.uint8).reshape(PIXELS_SHAPE)


def preprocess(data: bytes, **limits) -> np.ndarray:
    """Untrusted image bytes -> the model's uint8 32x32x3 input (or ImageRefused)."""
    return to_model_input(check_image(data, **limits).image)


def prepare(data: bytes | OpenedImage, **limits) -> PreparedImage:
    """Untrusted image bytes (or an image opened from them) -> what both serving tiers keep of
    an image (or ImageRefused). `limits`: check_image's max_pixels, max_full_pixels and budget."""
    checked = check_image(data, **limits)
    return PreparedImage(checked.sha256, to_model_input(checked.image), thumbnail_jpeg(checked.image))


def encode_pixels(pixels: np.ndarray) -> str:
    """The model's input as text, for a JSON task message and the job record (4 KB)."""
    assert pixels.shape == PIXELS_SHAPE and pixels.dtype == np.uint8
    return base64.b64encode(pixels.tobytes()).decode("ascii")


def decode_pixels(text: str) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != int(np.prod(PIXELS_SHAPE)):
        raise ValueError(f"expected {np.prod(PIXELS_SHAPE)} bytes of pixels, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(PIXELS_SHAPE)


def thumbnail_jpeg(img: Image.Image, size: int = 128) -> bytes:
    """A small JPEG for the results page."""
    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=85)
    return out.getvalue()
