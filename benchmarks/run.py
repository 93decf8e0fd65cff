"""Benchmark the service against what it serves, the old default and the usual Flask app, in one run.

    python -m benchmarks.run [--model DIR] [--quick]

Rows, all measured in this one run on this machine:
- the raw ceiling of the served configuration (benchmarks.raw: the model's runtime, precision
  and TTA or cascade as the worker serves them, in-process);
- the old default end to end: the model shipped before the performance work, on TensorFlow, 6
  views per image, today's other settings (a 1,000-image batch);
- the usual synchronous Flask app;
- the service end to end: a 1,000-image batch, 8 single-image clients, 1,000 slow URLs.
Starts its own Redis, web server (gunicorn), worker processes and test HTTP servers, stops
everything, and writes benchmarks/results/latest.json and latest.png. --quick runs the same
sections with fewer images (the smoke test uses it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import psutil
import requests
from PIL import Image

from shared.jobstore import JobStore
from shared.machine import cpu_name
from shared.modeldir import resolve_precision
from shared.schemas import FINAL_STATUSES
from shared.settings import DEFAULT_MODEL_DIR, REPO_ROOT, Settings
from tools.imageserver import ImageServer
from tools.stack import free_port, start_redis, start_web, start_worker, stop, wait_ready
from training.data import SHARED_JPEG_ARCHIVE
from training.provenance import git_commit

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
# The model as shipped before the performance work (one net, TTA level 2: 6 views per image).
OLD_MODEL_COMMIT, OLD_MODEL_PATH = "ec401e4", "models/cifar10-airbench"


def old_default_model(tmp: Path) -> Path:
    """The old default's model directory, read out of git."""
    out = tmp / "old-model" / "cifar10-airbench"
    out.mkdir(parents=True)
    for name in ("model.json", "model.keras"):
        blob = subprocess.run(
            ["git", "show", f"{OLD_MODEL_COMMIT}:{OLD_MODEL_PATH}/{name}"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        )
        (out / name).write_bytes(blob.stdout)
    return out


def test_images(n: int) -> list[bytes]:
    """Real CIFAR-10 test JPEGs when the shared copy is beside the repo, else random PNGs."""
    out = []
    if SHARED_JPEG_ARCHIVE.exists():
        with tarfile.open(SHARED_JPEG_ARCHIVE) as tar:
            for m in tar:
                if m.isfile() and "/test/" in m.name:
                    out.append(tar.extractfile(m).read())
                    if len(out) == n:
                        return out
    rng = np.random.default_rng(0)
    while len(out) < n:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def percentiles(latencies_s: list[float]) -> dict:
    ms = np.array(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}


class ProcessTree:
    """CPU seconds and peak RSS of a process and its children, sampled in the background."""

    def __init__(self, proc: subprocess.Popen | int):
        self.root = psutil.Process(proc if isinstance(proc, int) else proc.pid)
        self.peak_rss = {}  # pid -> bytes
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def procs(self):
        try:
            return [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def _sample(self):
        while not self._stop.wait(0.2):
            for p in self.procs():
                try:
                    self.peak_rss[p.pid] = max(self.peak_rss.get(p.pid, 0), p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
        return total

    def max_process_rss_mb(self) -> float:
        return round(max(self.peak_rss.values(), default=0) / 2**20, 1)

    def stop(self):
        self._stop.set()


def run_clients(n_requests: int, concurrency: int, one) -> tuple[float, list[float]]:
    """Call one(i) n_requests times from `concurrency` threads; returns (seconds, latencies)."""
    latencies, lock, counter = [], threading.Lock(), iter(range(n_requests))

    def client():
        s = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            one(s, i)
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return time.perf_counter() - t0, latencies


def wait_batch(url: str, batch_id: str, timeout: float = 600) -> dict:
    deadline, version = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        b = requests.get(f"{url}/api/v1/batches/{batch_id}", params={"wait": 10, "since": version}, timeout=30).json()
        if b["finished"]:
            return b
        version = b["version"]
    raise TimeoutError(f"batch {batch_id} did not finish")


class Service:
    """The service as deployed on one machine: Redis, web (gunicorn) and one `python -m worker`,
    with the CPU each part spends, sampled."""

    def __init__(self, settings: Settings, tmp: Path, worker_concurrency: int = 0):
        self.settings, self.tmp, self.worker_concurrency = settings, tmp, worker_concurrency
        tmp.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        port = free_port()
        self.procs.append(start_redis(port, tmp / "redis"))
        self.redis_tree = ProcessTree(self.procs[-1])
        self.settings = settings = settings.replace(redis_url=f"redis://127.0.0.1:{port}/0")
        self.store = JobStore.from_url(settings.redis_url, settings.retention_seconds)
        web_port = free_port()
        self.web = start_web(self.env(), web_port)
        self.procs.append(self.web)
        self.url = f"http://127.0.0.1:{web_port}"
        self.web_tree = ProcessTree(self.web)
        t0 = time.perf_counter()
        self.worker = self.start_worker(settings)
        wait_ready(self.url)
        self.worker_ready_s = round(time.perf_counter() - t0, 2)
        self.worker_tree = ProcessTree(self.worker)

    def env(self, settings: Settings | None = None) -> dict:
        return dict(os.environ, **(settings or self.settings).to_env(), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")

    def start_worker(self, settings: Settings, queues: str = "predict,fetch") -> subprocess.Popen:
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "wb")
        proc = start_worker(
            self.env(settings),
            queues,
            concurrency=self.worker_concurrency or None,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def replace_worker(self, settings: Settings) -> None:
        """Stop the worker, start one with these settings, and wait for its first heartbeat."""
        stop(self.worker)
        self.procs.remove(self.worker)
        since = time.time()
        self.worker = self.start_worker(settings, "predict")
        while not self.store.live_workers(since):
            time.sleep(0.1)

    def cpu_snapshot(self) -> dict:
        trees = (("web", self.web_tree), ("worker", self.worker_tree), ("redis", self.redis_tree))
        return {k: t.cpu_seconds() for k, t in trees}

    def cpu_ms_per_image(self, before: dict, n: int) -> dict:
        after = self.cpu_snapshot()
        return {k: round(1000 * (after[k] - before[k]) / n, 2) for k in after}

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def single_image_client(url: str, images: list[bytes]):
    """A client that submits one image and long-polls its job until done."""

    def one(s: requests.Session, i: int) -> None:
        job = s.post(url + "/api/v1/jobs", files={"images": (f"{i}.jpg", images[i % len(images)])}, timeout=60).json()
        while job["status"] not in FINAL_STATUSES:
            job = s.get(f"{url}/api/v1/jobs/{job['job_id']}", params={"wait": 10}, timeout=30).json()
        assert job["status"] == "done", job

    return one


def measure_raw(args, env: dict) -> dict:
    """The raw served configuration, in its own process."""
    raw = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.raw",
            args.model,
            "--seconds",
            "1" if args.quick else "3",
            "--tta-level",
            str(args.tta_level),
            "--runtime",
            args.runtime,
            "--precisions",
            args.precision,
        ],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    out = json.loads(raw.stdout.strip().splitlines()[-1])
    best = out["best"]
    b1_ms = out["one_image_ms"][best["precision"]]
    print(f"raw served: best {best['img_s']:.0f} img/s {best}, one image {b1_ms} ms", flush=True)
    return {"raw": out, "raw_best_img_s": best["img_s"], "raw_served_img_s": best["img_s"], "raw_served_b1_ms": b1_ms}


def batch_on_a_service_of_its_own(settings: Settings, tmp: Path, images: list[bytes], concurrency: int = 0) -> dict:
    """measure_batch on a service started with these settings, stopped afterwards."""
    service = Service(settings, tmp, concurrency)
    try:
        return measure_batch(service, images)
    finally:
        service.close()


def measure_old_default(settings: Settings, tmp: Path, images: list[bytes], old_model: Path) -> dict:
    """The old default end to end: its model on TensorFlow at TTA level 2 (6 views per image),
    one job per message."""
    old = settings.replace(model_dir=old_model, predict_tta_level=2, predict_runtime="keras", predict_chunk=1)
    batch = batch_on_a_service_of_its_own(old, tmp / "old-default", images)
    print(f"old default: {batch['batch_img_s']} img/s", flush=True)
    return {"old_default_batch_img_s": batch["batch_img_s"], "old_default": {"model": str(old_model), **batch["batch"]}}


def measure_unchunked(settings: Settings, tmp: Path, images: list[bytes], concurrency: int) -> dict:
    """The service as served, but one job per prediction message (as before PREDICT_CHUNK): what
    carrying several jobs per message buys, side by side."""
    batch = batch_on_a_service_of_its_own(settings.replace(predict_chunk=1), tmp / "unchunked", images, concurrency)
    print(f"one job per message: {batch['batch_img_s']} img/s", flush=True)
    return {"unchunked_batch_img_s": batch["batch_img_s"], "unchunked": batch["batch"]}


def measure_flask(args, env: dict, images: list[bytes], n: int) -> dict:
    """The usual synchronous Flask app, served the same way, hit by the same clients."""
    port = free_port()
    app = start_web(env, port, app="benchmarks.flask_baseline:app", worker_class="gthread")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # gunicorn listens before the model is loaded in each worker
            try:
                if requests.post(url + "/predict", files={"image": images[0]}, timeout=60).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the Flask baseline did not start"
            time.sleep(0.2)
        secs, lat = run_clients(
            n,
            args.concurrency,
            lambda s, i: s.post(
                url + "/predict", files={"image": images[i % len(images)]}, timeout=60
            ).raise_for_status(),
        )
    finally:
        stop(app)
    out = {"flask_img_s": round(n / secs, 1), "flask": percentiles(lat)}
    print(f"usual Flask: {out['flask_img_s']} img/s {out['flask']}", flush=True)
    return out


def measure_one_image(service: Service, images: list[bytes], n: int) -> dict:
    """One image at a time: submit, long-poll until done (the plain latency)."""
    one, session, lat = single_image_client(service.url, images), requests.Session(), []
    for i in range(n):
        t0 = time.perf_counter()
        one(session, i)
        lat.append(time.perf_counter() - t0)
    out = {"one_image_median_ms": round(1000 * statistics.median(lat), 1)}
    print(f"one image at a time: median {out['one_image_median_ms']} ms", flush=True)
    return out


def measure_batch(service: Service, images: list[bytes]) -> dict:
    """One upload of every image, submit to all done."""
    before, t0 = service.cpu_snapshot(), time.perf_counter()
    files = [("images", (f"{i}.jpg", b)) for i, b in enumerate(images)]
    resp = requests.post(service.url + "/api/v1/batches", files=files, timeout=300)
    submitted = time.perf_counter() - t0
    batch = wait_batch(service.url, resp.json()["batch_id"])
    secs = time.perf_counter() - t0
    assert batch["counts"]["done"] == len(images), batch["counts"]
    print(
        f"batch of {len(images)}: {secs:.2f} s ({len(images) / secs:.1f} img/s), submit {submitted:.2f} s", flush=True
    )
    return {
        "batch_img_s": round(len(images) / secs, 1),
        "batch": {
            "images": len(images),
            "seconds": round(secs, 2),
            "submit_seconds": round(submitted, 2),
            "cpu_ms_per_image": service.cpu_ms_per_image(before, len(images)),
        },
    }


def measure_singles(service: Service, images: list[bytes], n: int, concurrency: int) -> dict:
    """Concurrent clients, one image each, long-polling the job until done."""
    before = service.cpu_snapshot()
    secs, lat = run_clients(n, concurrency, single_image_client(service.url, images))
    single = dict(
        percentiles(lat), requests=n, concurrency=concurrency, cpu_ms_per_image=service.cpu_ms_per_image(before, n)
    )
    print(f"single images x{concurrency}: {n / secs:.1f} img/s {percentiles(lat)}", flush=True)
    return {
        "single_img_s": round(n / secs, 1),
        "single": single,
        **{k: single[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
    }


def measure_urls(service: Service, slow: ImageServer, n: int) -> dict:
    """A batch of URLs, each served after the image server's delay."""
    t0 = time.perf_counter()
    resp = requests.post(service.url + "/api/v1/batches", json={"urls": [slow.url(i) for i in range(n)]}, timeout=120)
    batch = wait_batch(service.url, resp.json()["batch_id"])
    out = {"urls_s": round(time.perf_counter() - t0, 2)}
    assert batch["counts"]["done"] == n, batch["counts"]
    # The fetching alone: when the remote site had answered every URL (prediction follows).
    assert slow.served >= n, slow.served
    out.update({f"urls_{n}_s": out["urls_s"], "urls_fetched_s": round(slow.last_served_at - t0, 2)})
    print(f"{n} slow URLs: {out['urls_s']} s to all done, all fetched after {out['urls_fetched_s']} s", flush=True)
    return out


def measure_cache(service: Service, images: list[bytes]) -> dict:
    """A worker with the result cache on, the same batch twice."""
    service.replace_worker(service.settings.replace(result_cache=True))
    cache = {}
    for attempt in ("first", "repeat"):
        t0 = time.perf_counter()
        files = [("images", (f"{i}.jpg", b)) for i, b in enumerate(images)]
        resp = requests.post(service.url + "/api/v1/batches", files=files, timeout=300)
        wait_batch(service.url, resp.json()["batch_id"])
        cache[f"{attempt}_img_s"] = round(len(images) / (time.perf_counter() - t0), 1)
    print(f"result cache: {cache}", flush=True)
    return {"result_cache": cache}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", help="results file name (default: latest, or quick with --quick)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--tta-level",
        type=int,
        default=-1,
        help="the workers' test-time augmentation (-1: as the model ships it; 0 matches "
        "the single forward pass of the usual Flask app)",
    )
    p.add_argument("--precision", default="auto", help="the workers' PREDICT_PRECISION")
    p.add_argument("--runtime", default="auto", help="the workers' PREDICT_RUNTIME")
    p.add_argument(
        "--old-model",
        help=f"the old default's model (default: {OLD_MODEL_PATH} at commit {OLD_MODEL_COMMIT}; with --quick: --model)",
    )
    p.add_argument("--worker-pool", default="prefork", choices=["prefork", "solo"])
    p.add_argument(
        "--worker-concurrency",
        type=int,
        default=0,
        help="model processes in the worker, each with its share of the cores (0: the worker's default)",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    n_batch, n_single, n_flask, n_urls, n_one = (50, 40, 24, 50, 10) if args.quick else (1000, 400, 200, 1000, 50)
    images = test_images(n_batch)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    slow = ImageServer(images, delay=0.1)  # a remote site that takes 100 ms per image
    # The result cache stays off for the measured paths (the same test images recur); its own
    # effect is measured last, on a repeat of the batch.
    settings = Settings.from_env().replace(
        model_dir=Path(args.model),
        storage_dir=tmp / "images",
        rate_limit="1000000/minute",
        result_cache=False,
        log_json=False,
        predict_tta_level=args.tta_level,
        predict_precision=args.precision,
        predict_runtime=args.runtime,
        worker_pool=args.worker_pool,
        fetch_allow_hosts=frozenset({f"127.0.0.1:{slow.port}"}),
    )
    env = dict(os.environ, **settings.to_env(), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    results: dict = {
        "quick": args.quick,
        "model": args.model,
        "tta_level": args.tta_level,
        "precision": resolve_precision(args.precision),
        "runtime": args.runtime,
        "served_accuracy": served_accuracy(Path(args.model)),
        "worker_pool": args.worker_pool,
        "worker_concurrency": args.worker_concurrency,
        "predict_chunk": settings.predict_chunk,
    }
    results |= measure_raw(args, env)
    old_model = Path(args.old_model) if args.old_model else Path(args.model) if args.quick else old_default_model(tmp)
    results |= measure_old_default(settings, tmp, images, old_model)
    results |= measure_unchunked(settings, tmp, images, args.worker_concurrency)
    results |= measure_flask(args, env, images, n_flask)
    service = Service(settings, tmp, args.worker_concurrency)
    try:
        results["worker_ready_s"] = service.worker_ready_s
        print(f"worker ready in {service.worker_ready_s} s", flush=True)
        results |= measure_one_image(service, images, n_one)
        results |= measure_batch(service, images)
        results |= measure_singles(service, images, n_single, args.concurrency)
        results |= measure_urls(service, slow, n_urls)
        results["web_rss_mb"] = service.web_tree.max_process_rss_mb()
        results["worker_rss_mb"] = service.worker_tree.max_process_rss_mb()
        results |= measure_cache(service, images)
    finally:
        service.close()
        slow.shutdown()
    results["batch_vs_raw"] = round(results["batch_img_s"] / results["raw_served_img_s"], 3)
    results["single_vs_raw"] = round(results["single_img_s"] / results["raw_served_img_s"], 3)
    results["single_vs_flask"] = round(results["single_img_s"] / results["flask_img_s"], 2)
    results["speedup_vs_old_default"] = round(results["batch_img_s"] / results["old_default_batch_img_s"], 2)
    results["cpu_ms_per_image"] = results["batch"]["cpu_ms_per_image"]  # web, worker and Redis, 1,000-image batch
    results["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    results["git_commit"] = git_commit()
    results["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quick" if args.quick else "latest")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out / f"{name}.png")
    print_table(results)
    return results


def served_accuracy(model_dir: Path) -> float | None:
    """The served configuration's CIFAR test accuracy, as training.ensemble measured it into model.json."""
    meta = json.loads((model_dir / "model.json").read_text())
    return (meta.get("test") or {}).get("accuracy")


def print_table(r: dict) -> None:
    cpu = r["cpu_ms_per_image"]
    rows = [
        ("raw served configuration, best", f"{r['raw_served_img_s']:.0f} img/s, one image {r['raw_served_b1_ms']} ms"),
        ("old default, 1,000-image batch", f"{r['old_default_batch_img_s']:.0f} img/s"),
        (
            "service, 1,000-image batch",
            f"{r['batch_img_s']:.0f} img/s ({r['batch_vs_raw']:.2f}x raw, "
            f"{r['speedup_vs_old_default']:.2f}x old default)",
        ),
        ("service, one job per message", f"{r['unchunked_batch_img_s']:.0f} img/s"),
        ("CPU ms per image web / worker / redis", f"{cpu['web']} / {cpu['worker']} / {cpu['redis']}"),
        ("usual Flask, 8 clients", f"{r['flask_img_s']:.1f} img/s"),
        (
            "service, single images, 8 clients",
            f"{r['single_img_s']:.0f} img/s ({r['single_vs_flask']:.1f}x Flask, {r['single_vs_raw']:.2f}x raw)",
        ),
        ("one image alone, median", f"{r['one_image_median_ms']} ms"),
        ("latency p50 / p95 / p99", f"{r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} ms"),
        ("slow URLs: all done / all fetched", f"{r['urls_s']} / {r.get('urls_fetched_s')} s"),
        ("peak RSS web / worker process", f"{r['web_rss_mb']} / {r['worker_rss_mb']} MB"),
        ("worker ready after start", f"{r['worker_ready_s']} s"),
    ]
    for k, v in rows:
        print(f"{k:<36} {v}")


def chart(r: dict, path: Path) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [
        "raw served\n(best)",
        "old default\n1,000 batch",
        "service\n1,000 batch",
        "service\nsingle x8",
        "usual Flask\nsingle x8",
    ]
    vals = [r["raw_served_img_s"], r["old_default_batch_img_s"], r["batch_img_s"], r["single_img_s"], r["flask_img_s"]]
    ax[0].bar(names, vals, color=["#888", "#bbb", "#2f6fed", "#2f9e5b", "#c8382f"])
    ax[0].set(title="throughput (images/second)")
    for i, v in enumerate(vals):
        ax[0].text(i, v, f"{v:.0f}", ha="center", va="bottom")
    lat = [r["p50_ms"], r["p95_ms"], r["p99_ms"]]
    flask = [r["flask"]["p50_ms"], r["flask"]["p95_ms"], r["flask"]["p99_ms"]]
    x = np.arange(3)
    ax[1].bar(x - 0.2, lat, 0.4, label="service (submit to result)", color="#2f9e5b")
    ax[1].bar(x + 0.2, flask, 0.4, label="usual Flask (request)", color="#c8382f")
    ax[1].set_xticks(x, ["p50", "p95", "p99"])
    ax[1].set(title="latency, 8 concurrent clients (ms)")
    ax[1].legend()
    fig.suptitle(f"{r['machine']['cpu']}, {r['machine']['cores']} cores - commit {r['git_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
