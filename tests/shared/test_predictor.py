"""The predictor's small helpers: precision choice, the machine's name, top-k."""

import numpy as np
import pytest

from shared import machine
from shared.machine import cpu_name
from shared.modeldir import resolve_precision, top_k


def test_an_explicit_precision_is_kept_and_a_wrong_one_refused():
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_precision("fp16")


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
