"""Which runtime should a worker serve with? Keras (TensorFlow) and OpenVINO, side by side in one run.

    python -m benchmarks.runtimes [MODEL_DIR] [--data PATH] [--seconds S]

For each runtime and precision (keras float32/bfloat16, openvino float32/bfloat16/int8), in the
model's served configuration (its TTA level or cascade, from model.json):
- answers: accuracy on every CIFAR test image, and top-1 agreement with keras float32;
- speed: images/second at the batch sizes workers form, and the median latency of one image,
  the configurations taking turns in short rounds so that machine noise falls on all alike;
- start: a fresh process's time to import the runtime, load the model and answer one image,
  its peak RSS, and whether TensorFlow was loaded at all.
Prints one JSON object, with the CPU (family and model): compare figures within one run only.
The adoption rule (issue 14): agreement >= 99.9 %, accuracy within 0.1 point, and faster end
to end (benchmarks.run with PREDICT_RUNTIME set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from shared.machine import cpu_name  # noqa: E402
from shared.predictor import load_predictor  # noqa: E402
from shared.settings import DEFAULT_MODEL_DIR, REPO_ROOT  # noqa: E402
from training.data import load_dataset  # noqa: E402

CONFIGS = [
    ("keras", "float32"),
    ("keras", "bfloat16"),
    ("openvino", "float32"),
    ("openvino", "bfloat16"),
    ("openvino", "int8"),
]
BATCH_SIZES = (8, 64, 256)
ROUNDS = 5

START_PROBE = r"""
import json, re, sys, time
t0 = time.perf_counter()
import numpy as np
from shared.predictor import load_predictor
p = load_predictor(sys.argv[1], runtime=sys.argv[2], precision=sys.argv[3])
p.predict_proba(np.zeros((1, 32, 32, 3), np.uint8))
ready_s = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (it read 4.4 GB, the
# benchmark's own peak, for every runtime)
rss_mb = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps(dict(ready_s=ready_s, peak_rss_mb=rss_mb, tensorflow_loaded="tensorflow" in sys.modules)))
"""


def start_figures(model: str, runtime: str, precision: str) -> dict:
    """A fresh process: import, load, answer one image (what a worker's model process does)."""
    out = subprocess.run(
        [sys.executable, "-c", START_PROBE, model, runtime, precision],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--data")
    p.add_argument("--seconds", type=float, default=1.0, help="per configuration, batch size and round")
    args = p.parse_args(argv)

    ds = load_dataset(args.data)
    predictors = {f"{r}/{prec}": load_predictor(args.model, runtime=r, precision=prec) for r, prec in CONFIGS}
    first = next(iter(predictors.values()))
    served = f"cascade {first.cascade}" if first.cascade else f"TTA level {first.tta_level}"
    result = dict(cpu=cpu_name(), cores=os.cpu_count(), model=first.info.version, served=served, configs={})

    reference = None
    for name, predictor in predictors.items():
        top1 = predictor.predict_proba(ds.test_x).argmax(1)
        reference = top1 if reference is None else reference
        result["configs"][name] = dict(
            accuracy=round(float(np.mean(top1 == ds.test_y)), 4),
            top1_agreement_with_keras_float32=round(float(np.mean(top1 == reference)), 5),
        )
        print(f"{name}: answers measured", file=sys.stderr, flush=True)

    rng = np.random.default_rng(0)
    speed = {name: {b: [] for b in BATCH_SIZES} for name in predictors}
    latency = {name: [] for name in predictors}
    for _ in range(ROUNDS):
        for name, predictor in predictors.items():
            for b in BATCH_SIZES:
                x = ds.test_x[rng.integers(0, len(ds.test_x), b)]
                predictor.predict_proba(x)  # warm
                n, t0 = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - t0) < args.seconds or n < 2:
                    predictor.predict_proba(x)
                    n += 1
                speed[name][b].append(n * b / elapsed)
            for i in rng.integers(0, len(ds.test_x), 20):
                t0 = time.perf_counter()
                predictor.predict_proba(ds.test_x[i : i + 1])
                latency[name].append(1000 * (time.perf_counter() - t0))
    for name in predictors:
        figures = result["configs"][name]
        figures["img_s"] = {str(b): round(statistics.median(v), 1) for b, v in speed[name].items()}
        figures["one_image_median_ms"] = round(statistics.median(latency[name]), 2)
        figures["start"] = start_figures(args.model, *name.split("/"))
        print(f"{name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
