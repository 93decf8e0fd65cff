"""Fixtures: a throwaway Redis per test session, a tiny model, the app, and whole running stacks.

Nothing here touches the machine's shared Redis on 6379: each session starts its own
redis-server on a free port and flushes only that one.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

from shared.settings import Settings
from tools.imageserver import ImageServer
from tools.stack import free_port, start_redis, start_web, start_worker, stop

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO_ROOT / "models" / "cifar10-airbench"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OUTPUT_DIR = REPO_ROOT / "test-output"


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    if redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.client().flushall()  # only ever our own server
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small untrained model in the shipped format: fast to load, deterministic outputs."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    script = (
        "import numpy as np, keras, sys\n"
        "from pathlib import Path\n"
        "from training.model import build_net, init_whitening\n"
        "from training.export import save_inference_model\n"
        "keras.utils.set_random_seed(0)\n"
        "recipe = dict(widths=(8, 16, 16), bn_momentum=0.6, scaling_factor=1.0, tta_level=0)\n"
        "net = build_net(10, recipe['widths'], 0.6, 1.0)\n"
        "init_whitening(net, np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.uint8))\n"
        f"save_inference_model(net, Path({str(out)!r}), {CLASSES!r}, recipe)\n"
    )
    # A subprocess keeps TensorFlow out of the test runner (tests fork workers).
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return out


@pytest.fixture
def settings_factory(tmp_path, redis_url, tiny_model_dir):
    def make(**overrides) -> Settings:
        values = dict(redis_url=redis_url, storage_dir=tmp_path / "images", model_dir=tiny_model_dir,
                      fetch_allow_hosts=frozenset(), visibility_timeout=5, log_json=False)
        values.update(overrides)
        return Settings.from_env({}, **values)
    return make


@pytest.fixture
def app(settings_factory):
    from web import create_app
    return create_app(settings_factory())


@pytest.fixture
def client(app):
    return app.test_client()


def env_for(settings: Settings, **extra) -> dict:
    """Environment variables that make a child process use these settings."""
    env = dict(os.environ, REDIS_URL=settings.redis_url, STORAGE_DIR=str(settings.storage_dir),
               MODEL_DIR=str(settings.model_dir), VISIBILITY_TIMEOUT=str(settings.visibility_timeout),
               FETCH_ALLOW_HOSTS=",".join(settings.fetch_allow_hosts), TF_CPP_MIN_LOG_LEVEL="3",
               PREDICT_BATCH_WAIT_MS=str(settings.predict_batch_wait_ms),
               TASK_MAX_ATTEMPTS=str(settings.task_max_attempts),
               TASK_SOFT_TIME_LIMIT=str(settings.task_soft_time_limit),
               WORKER_HEARTBEAT_SECONDS=str(settings.worker_heartbeat_seconds),
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Stack:
    """A running system: web (gunicorn, real HTTP), workers (real Celery processes), Redis."""

    def __init__(self, settings: Settings, redis_server: RedisServer, log_dir: Path):
        self.settings, self.redis, self.log_dir = settings, redis_server, log_dir
        self.env = env_for(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.web = start_web(self.env, self.port)
        self.workers: list[subprocess.Popen] = []

    def add_worker(self, queues: str = "predict,fetch", **env) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.workers)}.log", "wb")
        # One model process per worker: the fault tests aim at "the" process holding the model.
        proc = start_worker(dict(self.env, **{k: str(v) for k, v in env.items()}), queues, concurrency=1,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        return proc

    def wait_ready(self, timeout: float = 90.0, workers: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = requests.get(self.url + "/readyz", timeout=5)
            if r.status_code == 200 and r.json()["checks"]["workers"] >= workers:
                return
            time.sleep(0.2)
        raise TimeoutError(f"not ready: {r.json()}\n" + self.worker_logs())

    def worker_logs(self, full: bool = False) -> str:
        return "\n".join(p.read_text(errors="replace")[0 if full else -3000:]
                         for p in sorted(self.log_dir.glob("worker-*.log")))

    def wait_batch(self, batch_id: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = requests.get(f"{self.url}/api/v1/batches/{batch_id}", params={"wait": 5}, timeout=30)
            if r.status_code == 200 and r.json()["finished"]:
                return r.json()
        raise TimeoutError(f"batch {batch_id} unfinished: {r.json()['counts']}\n" + self.worker_logs())

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


@pytest.fixture
def stack_factory(settings_factory, redis_server, tmp_path):
    stacks = []

    def make(**overrides) -> Stack:
        s = Stack(settings_factory(**overrides), redis_server, tmp_path)
        stacks.append(s)
        return s
    yield make
    for s in stacks:
        s.close()


@pytest.fixture
def image_server():
    """A remote site on loopback (allowed only where a test says so)."""
    server = ImageServer([image_bytes("JPEG", size=(64, 48), color=(20, 90, 200 - i)) for i in range(10)])
    yield server
    server.shutdown()


@pytest.fixture
def url_stack(stack_factory, image_server):
    """A running stack (web + one worker) allowed to fetch from image_server."""
    stack = stack_factory(fetch_allow_hosts=frozenset({f"127.0.0.1:{image_server.port}"}))
    stack.add_worker()
    stack.wait_ready()
    return stack, image_server


# --- image factories -------------------------------------------------------------------------
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


@pytest.fixture(scope="session", autouse=True)
def _output_dir():
    OUTPUT_DIR.mkdir(exist_ok=True)
    yield

