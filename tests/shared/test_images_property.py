"""Property-based: whatever bytes arrive, the checker accepts them or refuses them cleanly."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.images import CheckedImage, ImageRefused, check_image, preprocess

FORMATS = {
    "PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"],
    "JPEG": ["RGB", "L", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["P", "L"],
    "BMP": ["RGB", "L", "P"],
    "TIFF": ["RGB", "RGBA", "L", "CMYK", "I;16"],
}


@st.composite
def images(draw):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def accepted_or_refused(data: bytes):
    try:
        result = check_image(data, max_pixels=1_000_000)
    except ImageRefused as e:
        assert e.code and e.message and e.status in (400, 413, 415)
        return None
    assert isinstance(result, CheckedImage) and result.image.mode == "RGB"
    return result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_are_accepted_or_refused_cleanly(data):
    accepted_or_refused(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images())
def test_valid_images_of_every_format_and_mode_are_accepted(data):
    out = preprocess(data)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images(), st.data())
def test_damaged_images_are_accepted_or_refused_cleanly(data, draw):
    mode = draw.draw(st.sampled_from(["truncate", "flip", "splice"]))
    b = bytearray(data)
    if mode == "truncate":
        b = b[: draw.draw(st.integers(0, len(b)))]
    elif mode == "flip":
        for _ in range(draw.draw(st.integers(1, 20))):
            i = draw.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw.draw(st.integers(0, 7))
    else:
        i = draw.draw(st.integers(0, len(b)))
        b[i:i] = draw.draw(st.binary(max_size=64))
    accepted_or_refused(bytes(b))
