"""The real-photo benchmark (benchmarks/photos/): photos of the ten classes and of other things,
read through exactly the service's own input path."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.images import prepare
from shared.settings import REPO_ROOT

PHOTOS_DIR = REPO_ROOT / "benchmarks" / "photos"
OTHER = "other"  # photos of none of the classes


@dataclass
class Photos:
    x: np.ndarray  # (N, 32, 32, 3) uint8: what the service feeds the model
    labels: list[str]  # a class name, or OTHER
    files: list[str]  # relative to folder
    folder: Path

    def in_class(self, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(images, class indices) of the photos of the model's classes."""
        keep = [i for i, label in enumerate(self.labels) if label != OTHER]
        return self.x[keep], np.array([classes.index(self.labels[i]) for i in keep])

    def other(self) -> np.ndarray:
        return self.x[[i for i, label in enumerate(self.labels) if label == OTHER]]


def load_photos(split: str = "test", folder: Path = PHOTOS_DIR) -> Photos:
    """split: val (for choosing and calibrating), test (reported, never tuned on) or all."""
    rows = list(csv.DictReader(open(folder / "manifest.csv", newline="")))
    rows = [r for r in rows if split == "all" or r["split"] == split]
    if not rows:
        raise ValueError(f"no photos in split {split!r} of {folder}")
    x = np.stack([prepare((folder / r["file"]).read_bytes()).pixels for r in rows])
    return Photos(x, [r["label"] for r in rows], [r["file"] for r in rows], folder)


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights that give every class the same total weight (summing to 1)."""
    counts = np.bincount(labels)
    w = 1.0 / counts[labels]
    return w / w.sum()
