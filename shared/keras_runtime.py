"""The Keras (TensorFlow) runtime: a shipped model.keras, compiled once for every batch size.

Imports TensorFlow at the top: a worker imports this module only in its forked pool processes.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from shared.images import PIXELS_SHAPE  # noqa: E402
from shared.modeldir import MODEL_FILE, ModelLoadError  # noqa: E402

# Layers that stay float32 in a bfloat16 net: the logits and the ensemble's average of them.
FLOAT32_LAYERS = ("logits", "ensemble")


class KerasNet:
    """uint8 images -> float32 logits (no test-time augmentation: shared.predictor does that)."""

    def __init__(self, model_dir: Path, precision: str, threads: int = 0):
        if threads and keras.backend.backend() == "tensorflow":
            import tensorflow as tf  # only on this backend (a JAX worker has no TensorFlow)

            # Several model processes on one machine: give each its share of the cores.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        try:
            net = keras.saving.load_model(model_dir / MODEL_FILE, compile=False)
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad file
            raise ModelLoadError(f"{model_dir / MODEL_FILE}: cannot load ({exc})") from None
        self.net = net if precision == "float32" else with_policy(net, "mixed_bfloat16")
        self._call = self._compile()

    def _compile(self):
        def logits(images):
            return keras.ops.cast(self.net(images, training=False), "float32")

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf  # only on this backend

            # One fixed signature: any batch size runs the same traced graph (no retracing).
            return tf.function(
                logits, input_signature=[tf.TensorSpec([None, *PIXELS_SHAPE], tf.uint8)], reduce_retracing=True
            )
        if keras.backend.backend() == "jax":  # e.g. a GPU worker without TensorFlow
            import jax  # only on this backend

            return jax.jit(logits)
        return logits

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(images))

    @property
    def tracing_count(self) -> int:
        counter = getattr(self._call, "experimental_get_tracing_count", None)
        return counter() if counter else 0


def with_policy(net, policy: str):
    """The same net and weights, computing in another dtype policy (the logits stay float32);
    nested models (an ensemble's members) are cloned the same way."""

    def clone(layer):
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=clone)
        config = layer.get_config()
        if layer.name not in FLOAT32_LAYERS:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(net, clone_function=clone)
    copy.set_weights(net.get_weights())
    return copy
