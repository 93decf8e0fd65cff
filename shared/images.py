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

INPUT_SIZE = 32  # the model's input is INPUT_SIZE x INPUT_SIZE x 3, uint8 RGB
PIXELS_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)

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


class DecodeBudget:
    """At most `limit` pixels being decoded at once in this process: many threads decoding large
    images at the same time would otherwise add up to gigabytes. One image larger than the whole
    budget still runs, alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self._cond = limit, 0, threading.Condition()

    @contextmanager
    def reserve(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def decode_cost(data: bytes, max_pixels: int = 50_000_000, max_full_pixels: int = 16_000_000) -> int:
    """The pixels decoding this image takes (JPEG: at the reduced scale it is decoded at), read
    from its header alone; raises ImageRefused for what check_image would refuse on sight."""
    return _open_checked(data, max_pixels, max_full_pixels)[1]


def check_image(
    data: bytes, max_pixels: int = 50_000_000, max_full_pixels: int = 16_000_000, budget: DecodeBudget | None = None
) -> CheckedImage:
    """Decode untrusted bytes completely, or raise ImageRefused with a clear reason.

    max_pixels bounds the declared size of any image; max_full_pixels that of the formats
    decoded at full size (all but JPEG, which is decoded at a reduced scale, so a 50 MP phone
    photo costs what a 1 MP one does)."""
    with _pillow_errors_refused(max_pixels):
        img, cost = _open_checked(data, max_pixels, max_full_pixels)
        with budget.reserve(cost) if budget else nullcontext():
            img.load()  # truncated or corrupt data fails here, not later
            fmt = img.format
            img = _to_rgb(ImageOps.exif_transpose(_shrink(img)))
    if cost > 4_000_000:
        release_freed_memory()
    return CheckedImage(img, fmt, hashlib.sha256(data).hexdigest())


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


def _open_checked(data: bytes, max_pixels: int, max_full_pixels: int) -> tuple[Image.Image, int]:
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
    return img, img.size[0] * img.size[1]


def _shrink(img: Image.Image) -> Image.Image:
    """An integer box reduce of a large full-size decode, keeping the short side >= 512 px."""
    factor = min(img.size) // (SHRINK_ABOVE_SIDE // 2)
    if max(img.size) <= SHRINK_ABOVE_SIDE or factor < 2 or img.mode not in ("L", "LA", "RGB", "RGBA", "RGBa", "CMYK"):
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
    return np.asarray(img, dtype=np.uint8).reshape(PIXELS_SHAPE)


def preprocess(data: bytes, **limits) -> np.ndarray:
    """Untrusted image bytes -> the model's uint8 32x32x3 input (or ImageRefused)."""
    return to_model_input(check_image(data, **limits).image)


def prepare(data: bytes, **limits) -> PreparedImage:
    """Untrusted image bytes -> what both serving tiers keep of an image (or ImageRefused).
    `limits`: check_image's max_pixels, max_full_pixels and budget."""
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
