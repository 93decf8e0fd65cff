"""The figures the model card and the benchmarks report, against values worked out by hand."""

import numpy as np
import pytest

from shared.modeldir import softmax
from training.metrics import expected_calibration_error, fit_temperature, metrics
from training.photos import class_balanced_weights

# Four images, four classes. Right: 1st (0.92) and 3rd (0.71); wrong: 2nd (0.83 on class 0, truly
# 3, which is not even in its top 3) and 4th (0.56 on class 0, truly 2, its third choice).
PROBS = np.array(
    [[0.92, 0.04, 0.03, 0.01], [0.83, 0.10, 0.05, 0.02], [0.10, 0.71, 0.12, 0.07], [0.56, 0.24, 0.15, 0.05]]
)
LABELS = np.array([0, 3, 1, 2])
CLASSES = ["a", "b", "c", "d"]


def test_accuracy_top3_nll_and_per_class():
    m = metrics(PROBS, LABELS, CLASSES)
    assert m["n"] == 4 and m["accuracy"] == 0.5 and m["top3_accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.92, 0.02, 0.71, 0.15])))
    assert m["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0}
    assert m["confusion"] == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]


def test_ece_by_hand():
    # 10 bins: each image alone in its bin: (|1-.92| + |0-.83| + |1-.71| + |0-.56|) / 4 = 0.44
    assert metrics(PROBS, LABELS, CLASSES)["ece"] == pytest.approx(0.44)
    # 2 bins: all in [0.5, 1]: |accuracy 0.5 - mean confidence 0.755| = 0.255
    assert expected_calibration_error(PROBS.max(1), PROBS.argmax(1) == LABELS, bins=2) == pytest.approx(0.255)
    # Perfectly calibrated: confidence 0.75 and three right out of four.
    assert expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0], bool)) == pytest.approx(0.0)


def test_weights_count_images_unequally():
    w = np.array([3.0, 1, 1, 1])  # the first image counts three times
    m = metrics(PROBS, LABELS, CLASSES, weights=w)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["top3_accuracy"] == pytest.approx(5 / 6)
    # 10 bins, weighted: (3 * .08 + .83 + .29 + .56) / 6
    assert m["ece"] == pytest.approx((3 * 0.08 + 0.83 + 0.29 + 0.56) / 6)


def test_class_balanced_weights_give_each_class_the_same_weight():
    w = class_balanced_weights(np.array([0, 0, 0, 1]))
    assert w.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 5))
    p = softmax(logits / 2.0)
    labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)  # one draw from each row's distribution
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)
