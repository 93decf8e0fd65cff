"""The web tier under abuse, measured: gunicorn's gthread workers (as before) against the gevent
workers it runs now, side by side in one run, on loopback.

    python -m benchmarks.abuse [--out benchmarks/results/abuse.json]

For each worker class: /healthz latency while 200 long-polls are held on an unfinished batch,
and while 100 slowloris clients send their headers a byte a second; then, with the web tier as
configured, the peak and after-RSS of a web process for three concurrent 6300x6300 RGBA PNG
uploads and for three 4000x4000 ones (the largest a full-size decode may be), and of a fetch
process for four such URLs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from PIL import Image

from shared.machine import cpu_name
from shared.settings import REPO_ROOT, Settings
from tools.imageserver import ImageServer
from tools.slowclients import slowloris
from tools.stack import free_port, start_redis, start_web, start_worker, stop

RESULTS = REPO_ROOT / "benchmarks" / "results"


def png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (40, 90, 160, 200)).save(buf, "PNG")
    return buf.getvalue()


def ms(values: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(values), 1), "max_ms": round(1000 * max(values), 1)}


def healthz_latencies(url: str, n: int = 20, timeout: float = 120) -> list[float]:
    """n health checks one after another (a check that times out counts as the timeout)."""
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        try:
            requests.get(url + "/healthz", timeout=timeout)
        except requests.RequestException:
            pass
        out.append(time.monotonic() - t0)
    return out


def under_long_polls(url: str, checks: int, n: int = 200) -> dict:
    batch = requests.post(url + "/api/v1/batches", files=[("images", ("a.png", png(32)))], timeout=60).json()
    poll = f"{url}/api/v1/batches/{batch['batch_id']}"
    version = requests.get(poll, timeout=30).json()["version"]
    with ThreadPoolExecutor(n) as pool:
        # 200 polls of 20 s through gthread's 32 threads take seven waves (140 s): the timeout
        # lets the old worker class finish being measured instead of crashing the benchmark.
        polls = [pool.submit(requests.get, poll, params={"wait": 20, "since": version}, timeout=200) for _ in range(n)]
        time.sleep(2)
        health = healthz_latencies(url, checks)
        answers = [p.exception() or p.result() for p in polls]
    busy = sum(isinstance(a, requests.Response) and a.headers.get("Retry-After") is not None for a in answers)
    failed = sum(not isinstance(a, requests.Response) for a in answers)
    return {**ms(health), "answered_at_once_past_the_cap": busy, "polls_failed": failed}


def under_slowloris(url: str, port: int, checks: int, n: int = 100) -> dict:
    with slowloris(port, n):
        return ms(healthz_latencies(url, checks, timeout=60))


class PeakRss:
    def __init__(self, pid: int):
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        return max(p.memory_info().rss for p in [self.root, *self.root.children(recursive=True)])

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def result(self, start: int) -> dict:
        time.sleep(0.5)
        self._stop.set()
        mb = lambda b: round(b / 2**20)
        return {"before_mb": mb(start), "peak_mb": mb(self.peak), "after_mb": mb(self.now())}


def upload_memory(url: str, web_pid: int, side: int) -> dict:
    data, rss = png(side), PeakRss(web_pid)
    start = rss.now()
    with ThreadPoolExecutor(3) as pool:
        codes = [
            r.status_code
            for r in pool.map(
                lambda _: requests.post(url + "/api/v1/batches", files=[("images", ("big.png", data))], timeout=120),
                range(3),
            )
        ]
    return {"statuses": codes, **rss.result(start)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS / "abuse.json"))
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    rport = free_port()
    redis = start_redis(rport, tmp / "redis")
    settings = Settings.from_env().replace(
        redis_url=f"redis://127.0.0.1:{rport}/0",
        storage_dir=tmp / "images",
        rate_limit="1000000/minute",
        log_json=False,
    )
    env = dict(os.environ, **settings.to_env(), PYTHONUNBUFFERED="1")
    results: dict = {"machine": cpu_name()}
    try:
        for worker_class in ("gthread", "gevent"):
            port = free_port()
            web = start_web(env, port, worker_class="gthread" if worker_class == "gthread" else None)
            url = f"http://127.0.0.1:{port}"
            # Under gthread every check waits tens of seconds (the defect): five of them tell.
            checks = 5 if worker_class == "gthread" else 20
            try:
                results[worker_class] = {
                    "idle": ms(healthz_latencies(url)),
                    "long_polls_200": under_long_polls(url, checks),
                    "slowloris_100": under_slowloris(url, port, checks),
                }
                if worker_class == "gevent":
                    results[worker_class]["png_6300_x3"] = upload_memory(url, web.pid, 6300)
                    results[worker_class]["png_4000_x3"] = upload_memory(url, web.pid, 4000)
            finally:
                stop(web)
            print(worker_class, json.dumps(results[worker_class]), flush=True)
        server = ImageServer([png(4000)])
        fetch_env = dict(env, FETCH_ALLOW_HOSTS=f"127.0.0.1:{server.port}")
        port = free_port()
        web = start_web(fetch_env, port)
        worker = start_worker(fetch_env, "fetch", stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            time.sleep(8)  # the fetch workers start
            rss = PeakRss(worker.pid)
            start = rss.now()
            body = requests.post(
                f"http://127.0.0.1:{port}/api/v1/batches", json={"urls": [server.url(i) for i in range(4)]}, timeout=30
            ).json()
            deadline = time.monotonic() + 120
            while (
                requests.get(f"http://127.0.0.1:{port}/api/v1/batches/{body['batch_id']}", timeout=30).json()["counts"][
                    "fetching"
                ]
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)
            results["fetch_png_4000_x4"] = rss.result(start)
        finally:
            stop(worker)
            stop(web)
            server.shutdown()
    finally:
        stop(redis)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
