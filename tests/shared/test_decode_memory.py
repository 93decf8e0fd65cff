"""What the decode budget charges an image covers what decoding it really takes in memory.

Issue 21, defect 8: the budget counted pixels, so a 168 KB 4000x4000 16-bit PNG (which peaked at
451 MB on its float64 path, 28 bytes a pixel) cost what an 8-bit one did. Each case decodes one
4000x4000 image in a fresh process and compares the rise of its peak RSS with open_image's cost."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shared.images import open_image

SIDE = 4000

# In a fresh process: the peak RSS during check_image (VmHWM, reset first: ru_maxrss would
# carry pytest's own peak across fork and exec), less the RSS just before it.
MEASURE = """
import sys
from shared.images import check_image
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS:")
check_image(data)
print(status("VmHWM:") - before)
"""


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _sixteen_bit_ramp() -> Image.Image:
    ramp = np.linspace(0, 65535, SIDE * SIDE).astype(np.uint16)
    return Image.frombytes("I;16", (SIDE, SIDE), ramp.tobytes())


CASES = {
    "16-bit greyscale PNG": lambda: _saved(_sixteen_bit_ramp(), "PNG"),
    "16-bit big-endian TIFF": lambda: _saved(Image.new("I;16B", (SIDE, SIDE), 60000), "TIFF"),
    "8-bit RGB PNG": lambda: _saved(Image.new("RGB", (SIDE, SIDE), (10, 20, 30)), "PNG"),
    "RGBA PNG": lambda: _saved(Image.new("RGBA", (SIDE, SIDE), (10, 20, 30, 100)), "PNG"),
    "palette PNG with transparency": lambda: _saved(Image.new("P", (SIDE, SIDE), 3), "PNG", transparency=3),
    "32-bit float TIFF": lambda: _saved(Image.new("F", (SIDE, SIDE), 0.5), "TIFF"),
    "RGBA WebP": lambda: _saved(Image.new("RGBA", (SIDE, SIDE), (10, 20, 30, 100)), "WEBP"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_budget_charges_at_least_what_the_decode_takes(case, tmp_path):
    data = CASES[case]()
    path = tmp_path / "image"
    path.write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120, check=True
    )
    peak = int(out.stdout)
    charged = open_image(data).cost.bytes
    assert peak <= charged, f"{case}: decoding took {peak / 1e6:.0f} MB, the budget charged {charged / 1e6:.0f} MB"


def test_a_16_bit_png_decodes_in_a_few_bytes_a_pixel(tmp_path):
    data = CASES["16-bit greyscale PNG"]()
    assert len(data) < 400_000  # it compresses to almost nothing: the cost is in the decode
    charged = open_image(data).cost
    assert charged.pixels == SIDE * SIDE and charged.bytes <= 8 * SIDE * SIDE
