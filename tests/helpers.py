"""What the tests share, in one place: a private Redis, a running stack, image makers, HTTP
helpers, metric parsing and wait loops. Fixtures that use these live in conftest.py."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

from shared.queue import predict_jobs_of
from shared.schemas import FINAL_STATUSES, Batch, Job, Links
from shared.settings import DEFAULT_MODEL_DIR, REPO_ROOT, Settings
from tools.stack import free_port, start_redis, start_web, start_worker, stop

SHIPPED_MODEL = DEFAULT_MODEL_DIR
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OUTPUT_DIR = REPO_ROOT / "test-output"
FAULT_WORKER_APP = "tests.fault_worker"  # worker.app with faults injected (tests/fault_worker.py)


# --- what a test needs from the machine ---------------------------------------------------------
SKIP_PREFIX = "needs "


def require(available: bool, what: str, install: str) -> None:
    """Skip a test whose tool is missing, with the command that installs it; under CI (which
    installs everything: .ci/run) fail instead, so that nothing is skipped unseen."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must have {what} ({install})")
    pytest.skip(f"{SKIP_PREFIX}{what} (install: {install})")


# --- images ----------------------------------------------------------------------------------
def image_bytes(fmt: str = "PNG", size=(40, 30), color=(200, 30, 30), mode: str = "RGB", **save) -> bytes:
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def noise_png(seed: int, size=(32, 32)) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def black_png() -> bytes:
    """The image the fault worker's model dies on."""
    return image_bytes("PNG", size=(32, 32), color=(0, 0, 0))


def assert_thumbnail(resp, largest: int = 128) -> None:
    """A thumbnail response: 200, a JPEG by type and by content, no side over `largest` px."""
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "image/jpeg"
    img = Image.open(io.BytesIO(resp.content if hasattr(resp, "content") else resp.data))
    assert img.format == "JPEG" and max(img.size) <= largest and img.size[0] > 0


def make_tar(folder: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


# --- the API as the web tier answers it ---------------------------------------------------------
def upload(client, files, path="/api/v1/batches", headers=None, **form):
    """POST images through Flask's test client."""
    data = {"images": [(io.BytesIO(b), name) for name, b in files], **form}
    return client.post(path, data=data, content_type="multipart/form-data", headers=headers)


def post_images(stack, files, path="/api/v1/batches", **form):
    """POST images to a running stack over HTTP."""
    return requests.post(
        stack.url + path, files=[("images", (name, data)) for name, data in files], data=form, timeout=60
    )


def queued_jobs(client: redis.Redis, queue: str = "predict") -> list[dict]:
    """The jobs the messages waiting in a Celery queue hold, oldest first: a prediction message
    holds several ({"job_id", "pixels", "top_k"} each), a fetch message one ({"job_id", "url", ...})."""
    jobs = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu LPUSHes: the right end is the oldest
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        jobs += predict_jobs_of(kwargs) if queue == "predict" else [kwargs]
    return jobs


def public_batch(store, batch_id: str, since: int | None = None) -> dict | None:
    """The batch as the API shows it, read straight from the job store."""
    found = store.get_batch(batch_id, since)
    return None if found is None else Batch.from_record(*found, Links(self="")).model_dump()


def public_job(store, job_id: str) -> dict | None:
    rec = store.get_job(job_id)
    return None if rec is None else Job.from_record(rec).model_dump()


def metric(text: str, name: str) -> float:
    """The sum of the samples called `name` (with its labels, if given) in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name or (sample.startswith(name + "{") and "{" not in name):
            total += float(value)
    return total


def scrape_until(url: str, name: str, at_least: float, timeout: float = 10) -> str:
    """The metrics page at url, once the sample `name` reaches at_least (a job is done in Redis
    a moment before its counters move)."""

    def page():
        text = requests.get(url, timeout=10).text
        return text if metric(text, name) >= at_least else None

    return wait_until(page, timeout, f"{name} to reach {at_least}")


# --- waiting --------------------------------------------------------------------------------------
def wait_until(condition, timeout: float, what: str = "the condition", interval: float = 0.05):
    """Poll until condition() returns something truthy (and return it), or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_status(stack, batch_id: str, status: str, timeout: float = 30) -> dict:
    """The batch, once at least one of its jobs has this status."""

    def seen():
        batch = requests.get(f"{stack.url}/api/v1/batches/{batch_id}", timeout=10).json()
        return batch if batch["counts"][status] > 0 else None

    return wait_until(seen, timeout, f"a {status} job in batch {batch_id}")


# --- processes ------------------------------------------------------------------------------------
class RedisServer:
    """A private redis-server that tests may stop, restart and flush."""

    def __init__(self, data_dir: Path, appendonly: bool = False):
        self.port, self.data_dir, self.appendonly = free_port(), data_dir, appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self):
        self.proc = start_redis(self.port, self.data_dir, self.appendonly)

    def stop(self):
        stop(self.proc)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def child_env(settings: Settings, **extra) -> dict:
    """The environment of a child process that runs with these settings."""
    env = dict(os.environ, **settings.to_env(), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return env | {k: str(v) for k, v in extra.items()}


class Stack:
    """A running system: web (gunicorn, real HTTP), workers (real Celery processes), Redis."""

    def __init__(self, settings: Settings, redis_server: RedisServer, log_dir: Path):
        metrics_dir = log_dir / f"web-metrics-{free_port()}"  # the web processes' metric files
        metrics_dir.mkdir(parents=True)
        settings = settings.replace(prometheus_multiproc_dir=str(metrics_dir))
        self.settings, self.redis, self.log_dir = settings, redis_server, log_dir
        self.env = child_env(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.web = start_web(self.env, self.port)
        self.workers: list[subprocess.Popen] = []

    def add_worker(self, queues: str = "predict,fetch", faults: dict | None = None, **settings) -> subprocess.Popen:
        """A `python -m worker` with these settings changed; `faults` runs the fault worker app
        (tests/fault_worker.py) with these FAULT_* variables."""
        log = open(self.log_dir / f"worker-{len(self.workers)}.log", "wb")
        s = self.settings.replace(**settings)
        extra = {}
        if faults is not None:
            s = s.replace(worker_app=FAULT_WORKER_APP)
            extra = {f"FAULT_{k.upper()}": v for k, v in faults.items()}
        # One model process per worker: the fault tests aim at "the" process holding the model.
        proc = start_worker(
            child_env(s, **extra), queues, concurrency=1, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.workers.append(proc)
        return proc

    def wait_ready(self, timeout: float = 90.0, workers: int = 1) -> None:
        def ready():
            r = requests.get(self.url + "/readyz", timeout=5)
            return r.status_code == 200 and r.json()["checks"]["workers"] >= workers

        try:
            wait_until(ready, timeout, "the stack to be ready", interval=0.2)
        except AssertionError:
            raise AssertionError("not ready\n" + self.worker_logs()) from None

    def worker_logs(self, full: bool = False) -> str:
        return "\n".join(
            p.read_text(errors="replace")[0 if full else -3000 :] for p in sorted(self.log_dir.glob("worker-*.log"))
        )

    def get_batch(self, batch_id: str, **params) -> dict:
        return requests.get(f"{self.url}/api/v1/batches/{batch_id}", params=params, timeout=30).json()

    def wait_batch(self, batch_id: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.get_batch(batch_id, wait=5)
            if batch.get("finished"):
                return batch
        raise AssertionError(f"batch {batch_id} unfinished: {batch.get('counts')}\n" + self.worker_logs())

    def wait_job(self, job_id: str, timeout: float = 30.0) -> dict:
        def finished():
            job = requests.get(f"{self.url}/api/v1/jobs/{job_id}", params={"wait": 5}, timeout=30).json()
            return job if job["status"] in FINAL_STATUSES else None

        return wait_until(finished, timeout, f"job {job_id}")

    def close(self):
        for p in self.workers:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 15)
                except ProcessLookupError:
                    pass
        for p in self.workers:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        stop(self.web)


TRAIN_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40), "yellow": (230, 220, 40)}


def make_learnable_dataset(root, per_class=60):
    """Four classes told apart by colour (COLOURS), with noise: a net learns it in a few steps."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 3)):
        for name, c in COLOURS.items():
            folder = root / "colours" / split / name
            folder.mkdir(parents=True)
            for j in range(n):
                a = np.clip(np.array(c) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(folder / f"{j}.png")
    return make_tar(root / "colours", root / "colours.tar.gz")


def train_tiny(root, *options: str):
    """`python -m training.train` on the colour dataset, 3 short epochs; (archive, out, stdout)."""
    archive = make_learnable_dataset(root)
    out = root / "model"
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        *options,
        "--data",
        str(archive),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--set",
        "widths=[16,32,32]",
        "batch_size=48",
        "val_size=40",
        "tta_level=1",
    ]
    run = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=dict(TRAIN_ENV, CIFAR_SVC_CACHE=str(root / "cache")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return archive, out, run.stdout


def parse_time(iso: str) -> float:
    """A record's ISO 8601 time (finished_at, ...) as a Unix time."""
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
