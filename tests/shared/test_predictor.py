"""The predictor's small helpers: precision choice, the machine's name, top-k."""

import numpy as np
import pytest

from shared import machine
from shared.machine import cpu_name
from shared.modeldir import resolve_precision, top_k
from shared.predictor import load_predictor
from tests.helpers import SHIPPED_MODEL
from training.photos import load_photos


def test_an_explicit_precision_is_kept_and_a_wrong_one_refused():
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32, bfloat16 or int8"):
        resolve_precision("fp16")


def test_int8_is_refused_on_the_keras_runtime(tiny_model_dir):
    with pytest.raises(ValueError, match="openvino runtime only"):
        load_predictor(tiny_model_dir, precision="int8", runtime="keras")


ZEN5 = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "fpu avx512f avx512_bf16"}


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu avx512f avx512_bf16 avx512_vnni", "bfloat16"),
        ("fpu avx amx_bf16 amx_tile", "bfloat16"),
        ("fpu avx2 avx512f", "float32"),
        (None, "float32"),  # no /proc/cpuinfo
    ],
)
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, flags, expected):
    info = {} if flags is None else dict(ZEN5, flags=flags)
    monkeypatch.setattr(machine, "_first_cpu", lambda: info)
    assert resolve_precision("auto") == expected


def test_the_cpu_name_carries_family_and_model(monkeypatch):
    # "AMD EPYC" alone names two generations whose speeds differ by almost 2x.
    monkeypatch.setattr(machine, "_first_cpu", lambda: ZEN5)
    assert cpu_name() == "AMD EPYC (family 26, model 2)"
    monkeypatch.setattr(machine, "_first_cpu", lambda: {})
    assert cpu_name() == "unknown"


def test_this_machines_cpu_is_read():
    assert cpu_name() != "unknown" and "family" in cpu_name()


def test_top_k_orders_by_probability_and_names_the_classes():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert top_k(probs, ["a", "b", "c"], k=2) == [
        [{"label": "b", "probability": 0.6}, {"label": "c", "probability": 0.3}],
        [{"label": "a", "probability": 0.5}, {"label": "c", "probability": 0.3}],
    ]


@pytest.fixture(scope="module")
def photos():
    return load_photos("all").x  # real photos, through the service's own input path


def test_tta_levels_average_exactly_the_views_they_name(photos):
    x = photos[:24]
    plain = load_predictor(SHIPPED_MODEL, tta_level=0).logits
    flip = lambda a: a[:, :, ::-1]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :32, :32], padded[:, 2:, 2:]  # the image shifted by one pixel
    mirror = (plain(x) + plain(flip(x))) / 2
    assert np.allclose(load_predictor(SHIPPED_MODEL, tta_level=1).logits(x), mirror, atol=1e-3)
    shifts = sum(plain(v) for v in (up_left, flip(up_left), down_right, flip(down_right))) / 8
    assert np.allclose(load_predictor(SHIPPED_MODEL, tta_level=2).logits(x), mirror / 2 + shifts, atol=1e-3)


def test_bfloat16_gives_the_same_answers_as_float32(photos):
    f32 = load_predictor(SHIPPED_MODEL, precision="float32").predict_proba(photos)
    bf16 = load_predictor(SHIPPED_MODEL, precision="bfloat16").predict_proba(photos)
    assert np.mean(f32.argmax(1) == bf16.argmax(1)) >= 0.98
    assert np.abs(f32 - bf16).max() < 0.1
