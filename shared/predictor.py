"""Predict calibrated class probabilities with a shipped model, on Keras.

The one inference path: `training.evaluate` measures exactly what the worker serves.
Imports Keras (TensorFlow) at the top: a worker imports this module only in its forked pool
processes (worker/app.py), never before the fork, and the web tier never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from shared.modeldir import MODEL_FILE, ModelLoadError, read_model_info, resolve_precision, softmax  # noqa: E402


def tta_views(images, level: int):
    """Test-time augmentation: (views, weights). Level 0: as is; 1: + mirror; 2: + 1-px shifts."""
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

    def __init__(
        self, model_dir: str | Path, tta_level: int | None = None, precision: str = "float32", threads: int = 0
    ):
        self.info, _ = read_model_info(model_dir)
        if threads and keras.backend.backend() == "tensorflow":
            import tensorflow as tf  # only on this backend (a JAX worker has no TensorFlow)

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
        def logits(images):
            views, weights = tta_views(images, self.tta_level)
            n = ops.shape(images)[0]
            # All views in one model call: one big batch is faster than six small ones.
            out = self.net(ops.concatenate(views, axis=0), training=False)
            out = ops.reshape(ops.cast(out, "float32"), (len(views), n, -1))
            return ops.sum(out * ops.reshape(ops.array(weights, "float32"), (-1, 1, 1)), axis=0)

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf  # only on this backend

            # One fixed signature: any batch size runs the same traced graph (no retracing).
            return tf.function(
                logits, input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8)], reduce_retracing=True
            )
        if keras.backend.backend() == "jax":  # e.g. a GPU worker without TensorFlow
            import jax  # only on this backend

            return jax.jit(logits)
        return logits

    @property
    def cache_namespace(self) -> str:
        """Everything besides the image that decides an answer: the result cache's namespace."""
        return f"{self.info.version}/tta{self.tta_level}/{self.precision}/keras"

    @property
    def tracing_count(self) -> int:
        return (
            self._logits.experimental_get_tracing_count()
            if hasattr(self._logits, "experimental_get_tracing_count")
            else 0
        )

    def logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"expected (N, 32, 32, 3) uint8 images, got {images.shape}")
        parts = [np.asarray(self._logits(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.info.classes)), np.float32)

    def predict_proba(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return softmax(self.logits(images, batch_size) / self.info.temperature)


def _with_policy(net, policy: str):
    """The same net and weights, computing in another dtype policy (the logits stay float32)."""

    def clone(layer):
        config = layer.get_config()
        if layer.name != "logits":
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(net, clone_function=clone)
    copy.set_weights(net.get_weights())
    return copy
