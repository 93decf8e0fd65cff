"""The OpenVINO runtime: the same net, converted at export time (training/export.py) to
OpenVINO's IR (model.xml + model.bin, float32 weights), compiled for this CPU.

precision float32 or bfloat16 is OpenVINO's INFERENCE_PRECISION_HINT (bfloat16 runs natively
on AVX512-BF16 and AMX CPUs); int8 runs the quantized IR (model-int8.xml). The files' checksums
are in model.json and checked at load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

from shared.digest import file_digest
from shared.modeldir import ModelLoadError

IR_FILES = ("model.xml", "model.bin")
INT8_FILES = ("model-int8.xml", "model-int8.bin")  # NNCF's post-training quantization of the same net
_HINT = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}  # int8: quantized layers, the rest in f32


class OpenVINONet:
    """uint8 images -> float32 logits (no test-time augmentation: shared.predictor does that)."""

    def __init__(self, model_dir: Path, meta: dict, precision: str, threads: int = 0):
        files = INT8_FILES if precision == "int8" else IR_FILES
        for name in files:
            path = model_dir / name
            if not path.is_file() or file_digest(path) != meta.get("files", {}).get(name):
                raise ModelLoadError(f"{path}: missing, or its checksum does not match model.json")
        # No CPU pinning: each model process pins its threads to the first cores it sees, so a
        # worker's two single-threaded processes shared one core (two processes at batch 64 on
        # 2 cores: 317 + 318 img/s pinned, 645 + 640 unpinned; one alone: 658 against 645).
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = ov.Core().compile_model(model_dir / files[0], "CPU", config)
        except RuntimeError as exc:
            raise ModelLoadError(f"{model_dir / files[0]}: cannot load ({exc})") from None
        self.tracing_count = 1  # compiled once, for every batch size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.compiled(images)[0]
