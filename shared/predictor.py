"""Predict calibrated class probabilities with a shipped model: the one inference path
(`training.evaluate` measures exactly what the worker serves).

A Predictor owns what is the same on every runtime: test-time augmentation (the views,
computed here in NumPy and sent to the net as one batch), the temperature, and the answer's
identity (cache_namespace). A runtime only maps a batch of uint8 images to logits:
shared/keras_runtime.py (TensorFlow) or shared/openvino_runtime.py. load_predictor picks one.
No model framework is imported here; a runtime imports its own when it is loaded, which the
worker does only in its forked pool processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.images import PIXELS_SHAPE
from shared.modeldir import ModelInfo, ModelLoadError, read_model_info, resolve_precision, softmax

log = logging.getLogger(__name__)

RUNTIMES = ("keras", "openvino")


def tta_views(images: np.ndarray, level: int) -> tuple[list[np.ndarray], list[float]]:
    """Test-time augmentation: (views, weights). Level 0: as is; 1: + mirror; 2: + 1-px shifts."""
    views, weights = [images], [1.0]
    if level >= 1:
        views, weights = [images, images[:, :, ::-1]], [0.5, 0.5]
    if level >= 2:
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        for shifted in (padded[:, :32, :32], padded[:, 2:, 2:]):
            views += [shifted, shifted[:, :, ::-1]]
        weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    return views, weights


@dataclass(frozen=True)
class Cascade:
    """Test-time augmentation where it may pay: every image at level `first`; those whose top
    probability is then below `below` again at level `then`, together, in one more call (a
    batch stays a batch)."""

    first: int
    then: int
    below: float


class Predictor:
    """uint8 (N, 32, 32, 3) RGB images -> (N, classes) calibrated probabilities."""

    def __init__(
        self, info: ModelInfo, net, runtime: str, precision: str, tta_level: int, cascade: Cascade | None = None
    ):
        self.info, self.net, self.runtime, self.precision, self.tta_level = info, net, runtime, precision, tta_level
        self.cascade = cascade
        self.views_computed = 0  # forward passes so far (images x views): what the compute buys

    @property
    def cache_namespace(self) -> str:
        """Everything besides the image that decides an answer: the result cache's namespace."""
        c = self.cascade
        tta = f"cascade{c.first}-{c.then}-{c.below:g}" if c else f"tta{self.tta_level}"
        return f"{self.info.version}/{tta}/{self.precision}/{self.runtime}"

    @property
    def tracing_count(self) -> int:
        return self.net.tracing_count

    def logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != PIXELS_SHAPE:
            raise ValueError(f"expected (N, {', '.join(map(str, PIXELS_SHAPE))}) uint8 images, got {images.shape}")
        parts = [self._logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.info.classes)), np.float32)

    def _logits(self, images: np.ndarray) -> np.ndarray:
        if self.cascade is None:
            return self._views_logits(images, self.tta_level)
        logits = self._views_logits(images, self.cascade.first)
        unsure = softmax(logits / self.info.temperature).max(1) < self.cascade.below
        if unsure.any():
            logits[unsure] = self._views_logits(images[unsure], self.cascade.then)
        return logits

    def _views_logits(self, images: np.ndarray, level: int) -> np.ndarray:
        views, weights = tta_views(images, level)
        # All views in one call: one big batch is faster than six small ones.
        out = self.net(np.ascontiguousarray(np.concatenate(views)))
        self.views_computed += len(out)
        out = out.reshape(len(views), len(images), -1)
        return np.tensordot(np.asarray(weights, np.float32), out, axes=1)

    def predict_proba(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return softmax(self.logits(images, batch_size) / self.info.temperature)


def load_predictor(
    model_dir: str | Path,
    tta_level: int | None = None,
    precision: str = "float32",
    threads: int = 0,
    runtime: str = "keras",
) -> Predictor:
    """The model in model_dir on a runtime: keras, openvino, or auto (what model.json serves
    with, where that runtime is installed and its files are there; else keras). tta_level None:
    as model.json serves it."""
    info, meta = read_model_info(model_dir)
    serving = meta.get("serving", {})
    cascade = Cascade(**serving["cascade"]) if tta_level is None and serving.get("cascade") else None
    if runtime == "auto":
        runtime = serving.get("runtime", "keras")
        if runtime == "openvino" and not _openvino_available(Path(model_dir), meta):
            log.warning("%s: serving with Keras: OpenVINO or the model's IR files are missing", model_dir)
            runtime = "keras"
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be auto, {' or '.join(RUNTIMES)}, not {runtime!r}")
    precision = resolve_precision(precision)
    if precision == "int8" and runtime != "openvino":
        raise ValueError("int8 (the quantized net) runs on the openvino runtime only")
    if runtime == "openvino":
        from shared.openvino_runtime import OpenVINONet  # imports OpenVINO

        net = OpenVINONet(Path(model_dir), meta, precision, threads)
    else:
        try:
            from shared.keras_runtime import KerasNet  # imports TensorFlow
        except ImportError as exc:  # a CPU worker image has OpenVINO only
            raise ModelLoadError(
                f"{model_dir}: serving it with Keras needs TensorFlow and Keras (requirements/model.txt), "
                f"which are not installed here ({exc}); serve its OpenVINO IR (model.xml) instead"
            ) from None
        net = KerasNet(Path(model_dir), precision, threads)
    level = info.tta_level if tta_level is None else tta_level
    return Predictor(info, net, runtime, precision, level, cascade)


def _openvino_available(model_dir: Path, meta: dict) -> bool:
    from shared.openvino_runtime import IR_FILES

    try:
        import openvino  # noqa: F401 - is the runtime installed here?
    except ImportError:
        return False
    return all((model_dir / f).is_file() and f in meta.get("files", {}) for f in IR_FILES)
