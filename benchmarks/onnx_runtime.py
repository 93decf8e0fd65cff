"""Would ONNX Runtime serve the model better than TensorFlow? (issue 6's exported-runtime lever)

    pip install onnxruntime==1.32.0 tf2onnx==1.17.0 onnx==1.23.2   # not in requirements: not shipped
    python -m benchmarks.onnx_runtime [MODEL_DIR] [--data PATH]

Exports the worker's own compiled function (test-time augmentation included) to ONNX, checks
that it gives the same top-3 as TensorFlow on every test image, then times both, alternating,
at the batch sizes of benchmarks.raw. Result on 2026-11-26 (2-core AMD EPYC): same top-3 on all
10,000 images; ONNX Runtime faster at batch 1, slower from batch 64 up (README, issue notes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from benchmarks.raw import BATCH_SIZES  # noqa: E402
from shared.settings import DEFAULT_MODEL_DIR  # noqa: E402


def export(model_dir: str, out: Path):
    """Writes the ONNX file; returns the TensorFlow predictor it came from."""
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    from shared.predictor import Predictor

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 - registered by the decorator
        """erfc(x) = 1 - erf(x): TensorFlow's exact GELU uses Erfc, which tf2onnx does not map."""

        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            node.type = "Erf"
            one = ctx.make_const(utils.make_name("one"), np.array(1, dtype=np.float32))
            sub = ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(node.name))
            ctx.replace_inputs(sub, [one.output[0], node.output[0]])

    predictor = Predictor(model_dir)
    fn = predictor._logits.get_concrete_function()
    frozen = convert_variables_to_constants_v2(fn)  # the normalisation constants are captured tensors
    tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=[t.name for t in frozen.inputs],
        output_names=[t.name for t in frozen.outputs],
        opset=17,
        output_path=str(out),
    )
    return predictor


def runner(runtime: str, model_dir: str, onnx_path: Path):
    if runtime == "tensorflow":
        from shared.predictor import Predictor

        p = Predictor(model_dir)
        return lambda x: p.logits(x, batch_size=len(x))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = os.cpu_count() or 2, 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def time_one(runtime: str, model_dir: str, onnx_path: Path, seconds: float) -> dict:
    """In a fresh process (run with --time), so start-up time and peak memory are its own."""
    t0 = time.perf_counter()
    run = runner(runtime, model_dir, onnx_path)
    run(np.zeros((1, 32, 32, 3), np.uint8))
    out = {"ready_s": round(time.perf_counter() - t0, 2), "img_s": {}}
    for b in BATCH_SIZES:
        x = np.random.default_rng(b).integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
        run(x)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds or n < 3:
            run(x)
            n += 1
        out["img_s"][str(b)] = round(n * b / (time.perf_counter() - t), 1)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    out["peak_rss_mb"] = round(int(hwm.split()[1]) / 1024)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--data")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--time", nargs=2, metavar=("RUNTIME", "ONNX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.time:
        print(json.dumps(time_one(args.time[0], args.model, Path(args.time[1]), args.seconds)))
        return {}
    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    predictor = export(args.model, onnx_path)  # a second Predictor in this process crashes TF here
    from training.data import load_dataset

    ds = load_dataset(args.data)
    tf_top3 = np.argsort(-predictor.logits(ds.test_x), 1)[:, :3]
    run_onnx = runner("onnx", args.model, onnx_path)
    ort_top3 = np.argsort(
        -np.concatenate([run_onnx(ds.test_x[i : i + 1000]) for i in range(0, len(ds.test_x), 1000)]), 1
    )[:, :3]
    report = {
        "images": len(ds.test_x),
        "same_top3": int((tf_top3 == ort_top3).all(1).sum()),
        "same_top1": int((tf_top3[:, 0] == ort_top3[:, 0]).sum()),
        "timings": [],
    }
    print(
        f"same top-3 on {report['same_top3']} of {report['images']} test images (top-1: {report['same_top1']})",
        flush=True,
    )
    for _ in range(args.rounds):  # alternating, each in a fresh process
        for runtime in ("tensorflow", "onnx"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.onnx_runtime",
                    args.model,
                    "--seconds",
                    str(args.seconds),
                    "--time",
                    runtime,
                    str(onnx_path),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            timing = dict(json.loads(out.stdout.strip().splitlines()[-1]), runtime=runtime)
            report["timings"].append(timing)
            print(json.dumps(timing), flush=True)
    return report


if __name__ == "__main__":
    main()
