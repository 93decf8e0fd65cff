"""A shipped model directory: its files and metadata, which precision to serve it in, and what
its outputs mean. No model framework here: `python -m worker` checks a model before forking
its pool, and only the forked processes load Keras (shared/predictor.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.digest import file_digest
from shared.machine import cpu_flags
from shared.schemas import TOP_K_DEFAULT

MODEL_FILE = "model.keras"
META_FILE = "model.json"


class ModelLoadError(RuntimeError):
    """The model directory is missing, incomplete or corrupt: never serve in that state."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    classes: list[str]
    temperature: float
    tta_level: int
    uncertain_below: float = 0.0  # answers whose top probability is below this are flagged uncertain


def read_model_info(model_dir: str | Path) -> tuple[ModelInfo, dict]:
    model_dir = Path(model_dir)
    meta_path, weights = model_dir / META_FILE, model_dir / MODEL_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise ModelLoadError(
            f"{model_dir}: expected {META_FILE} and {MODEL_FILE} there (train one with `python -m training.train`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
        info = ModelInfo(
            meta["name"],
            meta["version"],
            list(meta["classes"]),
            float(meta["temperature"]),
            int(meta["tta_level"]),
            float(meta.get("uncertain_below", 0.0)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{meta_path}: unreadable model metadata ({exc!r})") from None
    expected = meta.get("files", {}).get(MODEL_FILE)
    if expected and file_digest(weights) != expected:
        raise ModelLoadError(f"{weights}: checksum does not match {META_FILE}; the file is corrupt or was replaced")
    return info, meta


def resolve_precision(precision: str) -> str:
    """ "auto": bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32.
    int8 is the quantized net, which only the openvino runtime has (shared.predictor)."""
    if precision not in ("auto", "float32", "bfloat16", "int8"):
        raise ValueError(f"precision must be auto, float32, bfloat16 or int8, not {precision!r}")
    if precision != "auto":
        return precision
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, classes: list[str], k: int = TOP_K_DEFAULT) -> list[list[dict]]:
    """Per image, the k most likely classes, most likely first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"label": classes[j], "probability": round(float(p[j]), 6)} for j in row]
        for p, row in zip(probs, order, strict=True)
    ]
