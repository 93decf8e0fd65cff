"""Write a trained net as a shipped model directory: model.keras, model.json, MODEL_CARD.md, plots."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from shared.digest import file_digest
from shared.modeldir import META_FILE, MODEL_FILE, softmax
from shared.predictor import load_predictor
from training.card import write_model_card
from training.metrics import fit_temperature, metrics
from training.model import net_for
from training.provenance import git_commit, machine

PREPROCESSING = (
    "shared.images (prepare when serving, preprocess in training): decode (format allowlist), EXIF orientation, RGB "
    "(alpha on white, CMYK/16-bit/palette converted), centre square crop, area-"
    "averaging (box) downscale to 32x32, uint8; normalisation is inside the model"
)


def save_inference_model(model: keras.Model, out: Path, classes: list[str], recipe: dict, **extra) -> dict:
    """Save the net (float32 layers) with its model.json: all the worker needs to serve it."""
    # Ship float32 layers: the serving precision is the worker's choice, not baked into the file.
    keras.mixed_precision.set_global_policy("float32")
    shipped = net_for(recipe, len(classes), name=model.name)
    shipped.set_weights(model.get_weights())
    out.mkdir(parents=True, exist_ok=True)
    shipped.save(out / MODEL_FILE)
    digest = file_digest(out / MODEL_FILE)
    meta = dict(
        name=out.name,
        version=f"{dt.date.today():%Y%m%d}-{digest[:8]}",
        classes=list(classes),
        input=dict(shape=[32, 32, 3], dtype="uint8", color="RGB", preprocessing=PREPROCESSING),
        temperature=1.0,
        tta_level=int(recipe["tta_level"]),
        files={MODEL_FILE: digest},
        recipe={k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
        **extra,
    )
    write_meta(out, meta)
    return meta


def save_model_dir(
    model: keras.Model,
    out: Path,
    *,
    recipe: dict,
    dataset,
    seed: int,
    history: list[dict],
    val,
    train_seconds: float,
    started: float,
) -> dict:
    """The shipped directory: the model, its temperature, test figures and the model card."""
    meta = save_inference_model(
        model,
        out,
        dataset.classes,
        recipe,
        seed=seed,
        data=dict(
            source=Path(dataset.source).name,
            sha256=dataset.checksum,
            train=int(len(dataset.train_x)),
            test=int(len(dataset.test_x)),
        ),
        git_commit=git_commit(),
        machine=machine(tensorflow=tf.__version__, keras=keras.__version__),
        train_seconds=round(train_seconds, 1),
        history=history,
    )
    predictor = load_predictor(out)
    val_x, val_y = val
    if len(val_x):
        meta["temperature"] = fit_temperature(predictor.logits(val_x), val_y)
    logits = predictor.logits(dataset.test_x)
    if len(dataset.test_x):
        m = metrics(softmax(logits / meta["temperature"]), dataset.test_y, dataset.classes)
        m["accuracy_no_tta"] = float(
            np.mean(load_predictor(out, tta_level=0).logits(dataset.test_x).argmax(1) == dataset.test_y)
        )
        m["ece_before_temperature"] = metrics(softmax(logits), dataset.test_y, dataset.classes)["ece"]
        meta["test"] = m
        print(
            f"test accuracy {m['accuracy']:.4f} (TTA level {meta['tta_level']}), "
            f"{m['accuracy_no_tta']:.4f} without; top-3 {m['top3_accuracy']:.4f}; "
            f"ECE {m['ece']:.4f} (before temperature {m['ece_before_temperature']:.4f})",
            flush=True,
        )
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)  # data, training, calibration, test
    write_meta(out, meta)
    write_model_card(out, meta)
    return meta


def export_openvino(out: Path, calibration: np.ndarray | None = None) -> dict[str, str]:
    """The shipped net converted to OpenVINO's IR beside model.keras (model.xml and .bin,
    float32 weights), and with calibration images (uint8, a few hundred training images) also
    its int8 quantization (NNCF's post-training quantization: model-int8.xml and .bin). Returns
    the files' checksums, for model.json."""
    import openvino as ov  # training and export need it; a worker only where it serves with it

    from shared.openvino_runtime import INT8_FILES, IR_FILES

    _decline_openvino_telemetry()

    net = keras.saving.load_model(out / MODEL_FILE, compile=False)
    fn = tf.function(lambda x: net(x, training=False), input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8)])
    model = ov.convert_model(fn)
    ov.save_model(model, out / IR_FILES[0], compress_to_fp16=False)
    files = list(IR_FILES)
    if calibration is not None:
        import nncf  # quantization only happens here, at export

        quantized = nncf.quantize(model, nncf.Dataset([x[None] for x in calibration]), subset_size=len(calibration))
        ov.save_model(quantized, out / INT8_FILES[0], compress_to_fp16=False)
        files += INT8_FILES
    return {f: file_digest(out / f) for f in files}


def _decline_openvino_telemetry() -> None:
    """OpenVINO's converter and NNCF send usage data to Google Analytics unless the user has said
    no (openvino-telemetry treats "never asked" as yes when it cannot ask). Exporting a model
    must not report on anyone: where no choice is recorded, record "no", as `opt_in_out
    --opt_out` does. An explicit opt-in is left as it is."""
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    checker = OptInChecker()
    if checker.consent_file_base_dir() and not Path(checker.consent_file()).exists():
        checker.update_result(ConsentCheckResult.DECLINED)


def write_meta(out: Path, meta: dict) -> None:
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
