"""The ceiling: the worker's own predictor (runtime, precision, TTA or cascade as served),
in-process, no service around it.

    python -m benchmarks.raw [MODEL_DIR] [--seconds S] [--runtime R] [--precisions P,...] [--tta-level L]

Prints one JSON object: images/second per precision and batch size, the median latency of one
image, and how many times each function was traced (1: any batch size ran one compiled graph).
The images are real: the CIFAR-10 test images the service benchmark sends (when ../shared/data
is beside the repo), else the photo benchmark's. A cascade's cost depends on them: random noise
is unsure everywhere and took all seven views (117 img/s, against 400 on CIFAR images).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from shared.modeldir import resolve_precision  # noqa: E402
from shared.predictor import Predictor, load_predictor  # noqa: E402
from shared.settings import DEFAULT_MODEL_DIR  # noqa: E402
from training.data import SHARED_JPEG_ARCHIVE, load_dataset  # noqa: E402
from training.photos import load_photos  # noqa: E402

BATCH_SIZES = (1, 8, 64, 256, 1024)


def real_images() -> np.ndarray:
    if SHARED_JPEG_ARCHIVE.exists():
        return load_dataset(SHARED_JPEG_ARCHIVE).test_x
    return load_photos("all").x


def images_per_second(predictor: Predictor, images: np.ndarray, batch: int, seconds: float) -> float:
    """Consecutive batches of different images, as a worker sees them."""
    if len(images) < batch:  # the photo benchmark has 587: repeat them to fill a batch
        images = np.concatenate([images] * -(-batch // len(images)))
    starts = range(0, len(images) - batch + 1, batch)
    predictor.predict_proba(images[:batch])  # warm
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 3:
        i = starts[n % len(starts)]
        predictor.predict_proba(images[i : i + batch], batch_size=batch)
        n += 1
    return n * batch / elapsed


def one_image_ms(predictor: Predictor, images: np.ndarray, n: int = 50) -> float:
    predictor.predict_proba(images[:1])  # warm
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        predictor.predict_proba(images[i : i + 1])
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--runtime", default="auto", help="keras, openvino or auto (as the worker's PREDICT_RUNTIME)")
    p.add_argument("--precisions", default="auto", help="comma-separated; auto: what the worker would pick here")
    p.add_argument("--tta-level", type=int, default=-1, help="-1: as the model ships it (its TTA level or cascade)")
    args = p.parse_args(argv)
    out = {"img_s": {}, "one_image_ms": {}, "tracing_count": {}}
    images = real_images()
    check = images[:256]
    reference = None
    for precision in dict.fromkeys(resolve_precision(p) for p in args.precisions.split(",")):
        predictor = load_predictor(
            args.model,
            precision=precision,
            tta_level=None if args.tta_level < 0 else args.tta_level,
            runtime=args.runtime,
        )
        c = predictor.cascade
        out |= dict(runtime=predictor.runtime, tta_level=predictor.tta_level, cascade=c and vars(c))
        out["img_s"][precision] = {
            str(b): round(images_per_second(predictor, images, b, args.seconds), 1) for b in BATCH_SIZES
        }
        out["one_image_ms"][precision] = round(one_image_ms(predictor, images), 2)
        out["tracing_count"][precision] = predictor.tracing_count
        top1 = predictor.predict_proba(check).argmax(1)
        if reference is None:
            reference = top1
        else:
            out[f"top1_agreement_{precision}_vs_{next(iter(out['img_s']))}"] = float(np.mean(top1 == reference))
    best = max((v, prec, b) for prec, d in out["img_s"].items() for b, v in d.items())
    out["best"] = {"img_s": best[0], "precision": best[1], "batch": int(best[2])}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
