"""Load a shipped model directory and predict calibrated class probabilities.

The one inference path: `training.evaluate` measures exactly what the worker serves.
Imports Keras, so only the worker and training import this module (never the web tier).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def read_model_info(model_dir: str | Path) -> tuple[ModelInfo, dict]:
    model_dir = Path(model_dir)
    meta_path, weights = model_dir / META_FILE, model_dir / MODEL_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise ModelLoadError(f"{model_dir}: expected {META_FILE} and {MODEL_FILE} there "
                             "(train one with `python -m training.train`)")
    try:
        meta = json.loads(meta_path.read_text())
        info = ModelInfo(meta["name"], meta["version"], list(meta["classes"]),
                         float(meta["temperature"]), int(meta["tta_level"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{meta_path}: unreadable model metadata ({exc!r})") from None
    expected = meta.get("files", {}).get(MODEL_FILE)
    if expected and file_digest(weights) != expected:
        raise ModelLoadError(f"{weights}: checksum does not match {META_FILE}; the file is "
                             "corrupt or was replaced")
    return info, meta


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def tta_views(images, level: int):
    """Test-time augmentation: (views, weights). Level 0: as is; 1: + mirror; 2: + 1-px shifts."""
    from keras import ops
    views, weights = [images], [1.0]
    if level >= 1:
        views, weights = [images, ops.flip(images, axis=2)], [0.5, 0.5]
    if level >= 2:
        padded = ops.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="reflect")
        for shifted in (padded[:, :32, :32, :], padded[:, 2:, 2:, :]):
            views += [shifted, ops.flip(shifted, axis=2)]
        weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    return views, weights


class Predictor:
    """uint8 (N, 32, 32, 3) RGB images -> (N, classes) calibrated probabilities."""

    def __init__(self, model_dir: str | Path, tta_level: int | None = None, precision: str = "float32",
                 threads: int = 0):
        self.info, self.meta = read_model_info(model_dir)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        if threads and keras.backend.backend() == "tensorflow":
            import tensorflow as tf
            # Several model processes on one machine: give each its share of the cores.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        try:
            net = keras.saving.load_model(Path(model_dir) / MODEL_FILE, compile=False)
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad file
            raise ModelLoadError(f"{Path(model_dir) / MODEL_FILE}: cannot load ({exc})") from None
        self.precision = resolve_precision(precision)
        self.net = net if self.precision == "float32" else _with_policy(net, "mixed_bfloat16")
        self.tta_level = self.info.tta_level if tta_level is None else tta_level
        self._logits = self._compile()

    def _compile(self):
        import keras
        from keras import ops

        def logits(images):
            views, weights = tta_views(images, self.tta_level)
            n = ops.shape(images)[0]
            # All views in one model call: one big batch is faster than six small ones.
            out = self.net(ops.concatenate(views, axis=0), training=False)
            out = ops.reshape(ops.cast(out, "float32"), (len(views), n, -1))
            return ops.sum(out * ops.reshape(ops.array(weights, "float32"), (-1, 1, 1)), axis=0)

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf
            # One fixed signature: any batch size runs the same traced graph (no retracing).
            return tf.function(logits, input_signature=[
                tf.TensorSpec([None, 32, 32, 3], tf.uint8)], reduce_retracing=True)
        if keras.backend.backend() == "jax":  # e.g. a GPU worker without TensorFlow
            import jax
            return jax.jit(logits)
        return logits

    @property
    def tracing_count(self) -> int:
        return self._logits.experimental_get_tracing_count() if hasattr(
            self._logits, "experimental_get_tracing_count") else 0

    def logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"expected (N, 32, 32, 3) uint8 images, got {images.shape}")
        parts = [np.asarray(self._logits(images[i:i + batch_size]))
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.info.classes)), np.float32)

    def predict_proba(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return softmax(self.logits(images, batch_size) / self.info.temperature)


def resolve_precision(precision: str) -> str:
    """"auto": bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, not {precision!r}")
    if precision != "auto":
        return precision
    flags = _first_cpu().get("flags", "").split()
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with family and model: "AMD EPYC" alone hides the
    generation, and speeds differ by almost 2x between the ones these figures came from."""
    info = _first_cpu()
    if not info:
        return "unknown"
    return f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def _first_cpu() -> dict:
    """The first processor's fields in /proc/cpuinfo ({} where there is none, as off Linux)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in first.splitlines()) if sep}


def _with_policy(net, policy: str):
    """The same net and weights, computing in another dtype policy (the logits stay float32)."""
    import keras

    def clone(layer):
        config = layer.get_config()
        if layer.name != "logits":
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(net, clone_function=clone)
    copy.set_weights(net.get_weights())
    return copy


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, classes: list[str], k: int = 3) -> list[list[dict]]:
    """Per image, the k most likely classes, most likely first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"label": classes[j], "probability": round(float(p[j]), 6)} for j in row]
            for p, row in zip(probs, order)]
