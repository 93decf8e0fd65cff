"""What a model's probabilities are worth against the true labels: accuracy, top-3,
calibration; and the softmax temperature that calibrates them."""

from __future__ import annotations

import numpy as np

from shared.modeldir import softmax


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15, weights: np.ndarray | None = None
) -> float:
    """|accuracy - mean confidence| in each of `bins` equal-width confidence bins, weighted by
    the share of predictions in the bin (a confidence of exactly 1 falls in the last bin).
    `weights` weigh the predictions (e.g. class-balanced); equal by default."""
    return float(sum(share * abs(acc - conf) for _, conf, acc, share in _bins(confidence, correct, bins, weights)))


def reliability(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, bins: int = 15) -> list:
    """The reliability diagram's data: per confidence bin with predictions in it, [bin's lower
    edge, mean confidence, accuracy, share of predictions] (with `weights`, as in the ECE)."""
    return _bins(probs.max(1), probs.argmax(1) == labels, bins, weights)


def _bins(confidence, correct, bins, weights) -> list:
    w = np.full(len(confidence), 1 / len(confidence)) if weights is None else weights / weights.sum()
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        if m.any():
            conf, acc = np.average(confidence[m], weights=w[m]), np.average(correct[m], weights=w[m])
            rows.append([b / bins, float(conf), float(acc), float(w[m].sum())])
    return rows


def metrics(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], bins: int = 15, weights: np.ndarray | None = None
) -> dict:
    """Accuracy, top-3, ECE and NLL (averaged with `weights`, equal by default), per-class
    accuracy and the confusion matrix."""
    w = np.full(len(labels), 1 / len(labels)) if weights is None else weights / weights.sum()
    pred = probs.argmax(1)
    top3 = np.argsort(-probs, axis=1)[:, :3]
    correct = pred == labels
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    return dict(
        n=int(len(labels)),
        accuracy=float(np.sum(w * correct)),
        top3_accuracy=float(np.sum(w * (top3 == labels[:, None]).any(1))),
        ece=expected_calibration_error(probs.max(1), correct, bins, w),
        nll=float(-np.sum(w * np.log(probs[np.arange(len(labels)), labels] + 1e-12))),
        per_class={c: float(confusion[i, i] / max(1, confusion[i].sum())) for i, c in enumerate(classes)},
        confusion=confusion.tolist(),
    )


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature that minimises validation NLL (a 1-D search over log T)."""

    def nll(t):
        p = softmax(logits / t)
        return -np.mean(np.log(p[np.arange(len(labels)), labels] + 1e-12))

    grid = np.exp(np.linspace(np.log(0.25), np.log(4.0), 161))
    best = grid[np.argmin([nll(t) for t in grid])]
    fine = best * np.exp(np.linspace(-0.02, 0.02, 41))
    return float(fine[np.argmin([nll(t) for t in fine])])
