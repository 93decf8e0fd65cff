"""The predictor's small helpers: precision choice, the machine's name, top-k."""
from pathlib import Path

import numpy as np
import pytest

from shared.predictor import cpu_name, resolve_precision, top_k


def test_an_explicit_precision_is_kept_and_a_wrong_one_refused():
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_precision("fp16")


def test_auto_precision_follows_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text()
    native = " avx512_bf16" in flags or " amx_bf16" in flags
    assert resolve_precision("auto") == ("bfloat16" if native else "float32")


def test_the_cpu_name_carries_family_and_model():
    # "AMD EPYC" alone names two generations whose speeds differ by almost 2x.
    name = cpu_name()
    assert "family" in name and "model" in name and not name.startswith("unknown")


def test_top_k_orders_by_probability_and_names_the_classes():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert top_k(probs, ["a", "b", "c"], k=2) == [
        [{"label": "b", "probability": 0.6}, {"label": "c", "probability": 0.3}],
        [{"label": "a", "probability": 0.5}, {"label": "c", "probability": 0.3}]]
