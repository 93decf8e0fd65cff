"""Fixtures: a throwaway Redis per test session, a tiny model, the app, and whole running stacks.

Nothing here touches the machine's shared Redis on 6379: each session starts its own
redis-server on a free port and flushes only that one. The helpers these use are in
tests/helpers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import REPO_ROOT, Settings
from tests.helpers import CLASSES, OUTPUT_DIR, SKIP_PREFIX, RedisServer, Stack, image_bytes
from tools.imageserver import ImageServer
from web.app import create_app


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
        "import numpy as np, keras\n"
        "from pathlib import Path\n"
        "from training.model import build_net, init_whitening\n"
        "from training.export import save_inference_model\n"
        "keras.utils.set_random_seed(0)\n"
        "recipe = dict(widths=(8, 16, 16), bn_momentum=0.6, scaling_factor=1.0, tta_level=0)\n"
        "net = build_net(10, recipe['widths'], 0.6, 1.0)\n"
        "init_whitening(net, np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.uint8))\n"
        # Untrained, it is never sure: every answer comes back uncertain.
        f"save_inference_model(net, Path({str(out)!r}), {CLASSES!r}, recipe, uncertain_below=0.99)\n"
    )
    # A subprocess keeps TensorFlow out of the test runner (tests fork workers).
    subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    )
    return out


@pytest.fixture
def settings_factory(tmp_path, redis_url, tiny_model_dir):
    def make(**overrides) -> Settings:
        values = dict(
            redis_url=redis_url,
            storage_dir=tmp_path / "images",
            model_dir=tiny_model_dir,
            fetch_allow_hosts=frozenset(),
            log_json=False,
        )
        return Settings.from_env({}, **(values | overrides))

    return make


@pytest.fixture
def app(settings_factory):
    return create_app(settings_factory())


@pytest.fixture
def client(app):
    return app.test_client()


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


@pytest.fixture(scope="session", autouse=True)
def _output_dir():
    OUTPUT_DIR.mkdir(exist_ok=True)
    yield


def pytest_terminal_summary(terminalreporter):
    """One line at the end naming what was skipped for a missing tool, and how to install it."""
    needs = sorted(
        {
            r.longrepr[2].split(": ", 1)[-1].removeprefix("Skipped: ").removeprefix(SKIP_PREFIX)
            for r in terminalreporter.stats.get("skipped", [])
            if isinstance(r.longrepr, tuple) and SKIP_PREFIX in r.longrepr[2]
        }
    )
    if needs:
        terminalreporter.write_line("skipped for want of: " + "; ".join(needs), yellow=True)
