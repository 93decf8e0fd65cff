"""Benchmark the service against the raw model and the usual synchronous Flask app, in one run.

    python -m benchmarks.run [--model DIR] [--quick]

Starts its own Redis, web server (gunicorn), worker processes and test HTTP servers, measures,
stops everything, and writes benchmarks/results/latest.json and latest.png. --quick runs the
same sections with fewer images (the smoke test uses it).
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

import numpy as np
import psutil
import redis as redis_lib
import requests
from PIL import Image

from shared.predictor import cpu_name, resolve_precision
from tools.imageserver import ImageServer
from tools.stack import REPO_ROOT, free_port, start_redis, start_web, start_worker, stop, wait_ready

SHARED_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS = REPO_ROOT / "benchmarks" / "results"


def test_images(n: int) -> list[bytes]:
    """Real CIFAR-10 test JPEGs when the shared copy is beside the repo, else random PNGs."""
    out = []
    if SHARED_ARCHIVE.exists():
        with tarfile.open(SHARED_ARCHIVE) as tar:
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
        return round(max(self.peak_rss.values(), default=0) / 2 ** 20, 1)

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
        b = requests.get(f"{url}/api/v1/batches/{batch_id}", params={"wait": 10, "since": version},
                         timeout=30).json()
        if b["finished"]:
            return b
        version = b["version"]
    raise TimeoutError(f"batch {batch_id} did not finish")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO_ROOT / "models" / "cifar10-airbench"))
    p.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", help="results file name (default: latest, or quick with --quick)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tta-level", type=int, default=-1,
                   help="the workers' test-time augmentation (-1: as the model ships it; 0 matches "
                        "the single forward pass of the usual Flask app)")
    p.add_argument("--precision", default="auto", help="the workers' PREDICT_PRECISION")
    p.add_argument("--worker-pool", default="prefork", choices=["prefork", "solo"])
    p.add_argument("--worker-concurrency", type=int, default=0,
                   help="model processes in the worker, each with its share of the cores (0: the worker's default)")
    args = p.parse_args(argv)
    n_batch = 50 if args.quick else 1000
    n_single = 40 if args.quick else 400
    n_flask = 24 if args.quick else 200
    n_urls = 50 if args.quick else 1000
    images = test_images(n_batch)
    results: dict = {"quick": args.quick, "model": args.model}
    procs, tmp = [], Path(tempfile.mkdtemp(prefix="bench-"))
    # The result cache stays off for the measured paths (the same test images recur); its own
    # effect is measured last, on a repeat of the batch.
    env = dict(os.environ, MODEL_DIR=args.model, STORAGE_DIR=str(tmp / "images"), TF_CPP_MIN_LOG_LEVEL="3",
               RATE_LIMIT="1000000/minute", PYTHONUNBUFFERED="1", RESULT_CACHE="0", LOG_JSON="0",
               PREDICT_TTA_LEVEL=str(args.tta_level), PREDICT_PRECISION=args.precision,
               WORKER_POOL=args.worker_pool)
    results.update(tta_level=args.tta_level, precision=resolve_precision(args.precision), worker_pool=args.worker_pool,
                   worker_concurrency=args.worker_concurrency)
    try:
        # 1. The raw model, in its own process.
        raw = subprocess.run([sys.executable, "-m", "benchmarks.raw", args.model, "--seconds",
                              "1" if args.quick else "3", "--tta-level", str(args.tta_level)],
                             cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True)
        results["raw"] = json.loads(raw.stdout.strip().splitlines()[-1])
        results["raw_best_img_s"] = results["raw"]["best"]["img_s"]
        print(f"raw model: best {results['raw_best_img_s']:.0f} img/s {results['raw']['best']}", flush=True)

        # 2. The usual synchronous Flask app, served the same way, hit by the same clients.
        port = free_port()
        flask_app = start_web(env, port, app="benchmarks.flask_baseline:app")
        procs.append(flask_app)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:  # gunicorn listens before the model is loaded in each worker
            try:
                if requests.post(url + "/predict", files={"image": images[0]}, timeout=60).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the Flask baseline did not start"
            time.sleep(0.2)
        secs, lat = run_clients(n_flask, args.concurrency, lambda s, i: s.post(
            url + "/predict", files={"image": images[i % len(images)]}, timeout=60).raise_for_status())
        results["flask_img_s"] = round(n_flask / secs, 1)
        results["flask"] = percentiles(lat)
        stop(flask_app)
        procs.remove(flask_app)
        print(f"usual Flask: {results['flask_img_s']} img/s {results['flask']}", flush=True)

        # 3. The service: Redis, web, one worker (predict + fetch).
        rport = free_port()
        procs.append(start_redis(rport, tmp / "redis"))
        redis_tree = ProcessTree(procs[-1])
        env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        slow = ImageServer(images, delay=0.1)  # a remote site that takes 100 ms per image
        env["FETCH_ALLOW_HOSTS"] = f"127.0.0.1:{slow.port}"
        wport = free_port()
        web = start_web(env, wport)
        procs.append(web)
        url = f"http://127.0.0.1:{wport}"
        t0 = time.perf_counter()
        worker = start_worker(env, concurrency=args.worker_concurrency or None, stdout=open(tmp / "worker.log", "wb"),
                              stderr=subprocess.STDOUT)
        procs.append(worker)
        wait_ready(url)
        results["worker_ready_s"] = round(time.perf_counter() - t0, 2)
        web_tree, worker_tree = ProcessTree(web), ProcessTree(worker)
        print(f"worker ready in {results['worker_ready_s']} s", flush=True)

        def cpu_snapshot():
            return {k: t.cpu_seconds() for k, t in (("web", web_tree), ("worker", worker_tree), ("redis", redis_tree))}

        def cpu_per_image(before, n):
            after = cpu_snapshot()
            return {k: round(1000 * (after[k] - before[k]) / n, 2) for k in after}

        # A client that submits one image and long-polls its job until done.
        def single(s, i):
            job = s.post(url + "/api/v1/jobs", files={"images": (f"{i}.jpg", images[i % len(images)])}, timeout=60).json()
            while job["status"] not in ("done", "failed"):
                job = s.get(f"{url}/api/v1/jobs/{job['job_id']}", params={"wait": 10}, timeout=30).json()
            assert job["status"] == "done", job

        # One image at a time, 50 times: submit, long-poll until done (the plain latency).
        session = requests.Session()
        lat = []
        for i in range(10 if args.quick else 50):
            t0 = time.perf_counter()
            single(session, i)
            lat.append(time.perf_counter() - t0)
        results["one_image_median_ms"] = round(1000 * statistics.median(lat), 1)
        print(f"one image at a time: median {results['one_image_median_ms']} ms", flush=True)

        # (a) one 1,000-image batch upload, submit to all done.
        before = cpu_snapshot()
        t0 = time.perf_counter()
        resp = requests.post(url + "/api/v1/batches", files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(images)],
                             timeout=300)
        submitted = time.perf_counter() - t0
        batch = wait_batch(url, resp.json()["batch_id"])
        secs = time.perf_counter() - t0
        assert batch["counts"]["done"] == n_batch, batch["counts"]
        results["batch_img_s"] = round(n_batch / secs, 1)
        results["batch"] = {"images": n_batch, "seconds": round(secs, 2), "submit_seconds": round(submitted, 2),
                            "cpu_ms_per_image": cpu_per_image(before, n_batch)}
        print(f"batch of {n_batch}: {secs:.2f} s ({results['batch_img_s']} img/s), submit {submitted:.2f} s", flush=True)

        # (b) concurrent clients, one image each, long-polling the job until done.
        before = cpu_snapshot()
        secs, lat = run_clients(n_single, args.concurrency, single)
        results["single_img_s"] = round(n_single / secs, 1)
        results["single"] = dict(percentiles(lat), requests=n_single, concurrency=args.concurrency,
                                 cpu_ms_per_image=cpu_per_image(before, n_single))
        results.update({k: results["single"][k] for k in ("p50_ms", "p95_ms", "p99_ms")})
        print(f"single images x{args.concurrency}: {results['single_img_s']} img/s {percentiles(lat)}", flush=True)

        # (c) a batch of URLs, each served after 100 ms.
        t0 = time.perf_counter()
        resp = requests.post(url + "/api/v1/batches", json={"urls": [slow.url(i) for i in range(n_urls)]}, timeout=120)
        batch = wait_batch(url, resp.json()["batch_id"])
        results["urls_s"] = round(time.perf_counter() - t0, 2)
        results[f"urls_{n_urls}_s"] = results["urls_s"]
        assert batch["counts"]["done"] == n_urls, batch["counts"]
        # The fetching alone: when the remote site had answered every URL (prediction follows).
        assert slow.served >= n_urls, slow.served
        results["urls_fetched_s"] = round(slow.last_served_at - t0, 2)
        slow.shutdown()
        print(f"{n_urls} slow URLs: {results['urls_s']} s to all done, all fetched after "
              f"{results['urls_fetched_s']} s", flush=True)

        results["web_rss_mb"] = web_tree.max_process_rss_mb()
        results["worker_rss_mb"] = worker_tree.max_process_rss_mb()

        # (d) the result cache: a worker with it on, the same batch twice.
        stop(worker)
        procs.remove(worker)
        cache_env = dict(env, RESULT_CACHE="1")
        worker = start_worker(cache_env, "predict", stdout=open(tmp / "worker-cache.log", "wb"),
                              stderr=subprocess.STDOUT)
        procs.append(worker)
        since = time.time()
        heartbeats = redis_lib.Redis.from_url(env["REDIS_URL"])
        while not heartbeats.zrangebyscore("workers:heartbeat", since, "+inf"):  # the new worker's
            time.sleep(0.1)
        cache = {}
        for attempt in ("first", "repeat"):
            t0 = time.perf_counter()
            resp = requests.post(url + "/api/v1/batches", files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(images)],
                                 timeout=300)
            wait_batch(url, resp.json()["batch_id"])
            cache[f"{attempt}_img_s"] = round(n_batch / (time.perf_counter() - t0), 1)
        results["result_cache"] = cache
        print(f"result cache: {cache}", flush=True)
        results["batch_vs_raw"] = round(results["batch_img_s"] / results["raw_best_img_s"], 3)
        results["single_vs_flask"] = round(results["single_img_s"] / results["flask_img_s"], 2)
    finally:
        for proc in reversed(procs):
            stop(proc)
    results["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    results["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                           capture_output=True, text=True).stdout.strip()
    results["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quick" if args.quick else "latest")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out / f"{name}.png")
    print_table(results)
    return results


def print_table(r: dict) -> None:
    rows = [("raw model, best", f"{r['raw_best_img_s']:.0f} img/s"),
            ("service, 1,000-image batch", f"{r['batch_img_s']:.0f} img/s ({r['batch_vs_raw']:.2f}x raw)"),
            ("usual Flask, 8 clients", f"{r['flask_img_s']:.1f} img/s"),
            ("service, single images, 8 clients", f"{r['single_img_s']:.0f} img/s ({r['single_vs_flask']:.1f}x Flask)"),
            ("latency p50 / p95 / p99", f"{r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} ms"),
            ("slow URLs: all done / all fetched", f"{r['urls_s']} / {r.get('urls_fetched_s')} s"),
            ("peak RSS web / worker process", f"{r['web_rss_mb']} / {r['worker_rss_mb']} MB"),
            ("worker ready after start", f"{r['worker_ready_s']} s")]
    for k, v in rows:
        print(f"{k:<36} {v}")


def chart(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    names = ["raw model\n(best)", "service\n1,000 batch", "service\nsingle x8", "usual Flask\nsingle x8"]
    vals = [r["raw_best_img_s"], r["batch_img_s"], r["single_img_s"], r["flask_img_s"]]
    ax[0].bar(names, vals, color=["#888", "#2f6fed", "#2f9e5b", "#c8382f"])
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
