"""The real deployment for the tests marked `compose` (`make test-compose`).

One stack per session, set up by three fixtures in turn: `docker_prepared` (engine, base images
and wheelhouse: tools/docker_bases.py), `images_built` (docker-compose build) and `stack` (up,
under a project name of its own, on free host ports, with random secrets). The stack is torn
down with `down -v` whatever happens: a failed test, Ctrl-C or SIGTERM (pytest runs fixture
teardown on all three). Every container's log is saved to test-output/compose/ first.

FIGURES gathers the measured figures; the summary line prints them at the end of the run.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tarfile
import time

import pytest

from tests.deployment.compose import (
    BUILT_SERVICES,
    FIGURES,
    IMAGES,
    WORKER_CPUS,
    WORKERS,
    Compose,
    Stack,
    TestImage,
    docker,
    wait_ready,
)
from tests.helpers import CLASSES, OUTPUT_DIR, noise_png
from training.data import SHARED_JPEG_ARCHIVE


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    f = FIGURES
    parts = [
        f"prepare {f['prepare_s']:.0f} s (engine, base images, wheels)" if "prepare_s" in f else None,
        f"build {f['build_s']:.0f} s" if "build_s" in f else None,
        f"up to ready {f['ready_s']:.1f} s" if "ready_s" in f else None,
        f"{f['batch_images']} images in {f['batch_s']:.1f} s" if "batch_s" in f else None,
        "jobs per worker container " + "/".join(map(str, f["jobs_per_worker"])) if "jobs_per_worker" in f else None,
        f"killed worker's jobs done {f['recovery_s']:.1f} s after its SIGKILL (target 15 s)"
        if "recovery_s" in f
        else None,
        f"batch done {f['redis_recovery_s']:.1f} s after a Redis restart (target 20 s)"
        if "redis_recovery_s" in f
        else None,
        "images " + ", ".join(f"{k} {v} MB" for k, v in f["image_mb"].items()) if "image_mb" in f else None,
    ]
    line = "compose summary: " + ", ".join(p for p in parts if p)
    terminalreporter.write_line(line)
    OUTPUT_DIR.mkdir(exist_ok=True)
    (OUTPUT_DIR / "compose-summary.json").write_text(json.dumps(dict(FIGURES, line=line), indent=2) + "\n")


def progress(request, message: str) -> None:
    """A line on the terminal while a slow step runs (pytest captures everything else)."""
    with uncaptured(request):
        request.config.pluginmanager.get_plugin("terminalreporter").write_line(f"compose: {message}")


def uncaptured(request):
    return request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled()


@pytest.fixture(scope="session")
def docker_prepared(request):
    from tools.docker_bases import prepare

    progress(request, "Docker engine, base images and wheelhouse (minutes the first time)")
    # Its own progress lines (debootstrap, stand-ins) go to the terminal, not into pytest's capture.
    with uncaptured(request):
        result = prepare()
    FIGURES["prepare_s"] = result["seconds"]
    FIGURES["base_images"] = result["base_images"]
    return result


@pytest.fixture(scope="session")
def images_built(request, docker_prepared):
    # Building needs no secrets, but the compose file refuses to load without Flower's.
    env = dict(os.environ, FLOWER_BASIC_AUTH="build:unused")
    progress(request, f"docker-compose build {' '.join(BUILT_SERVICES)}")
    t0 = time.monotonic()
    Compose("cifarsvc-build", env)("build", *BUILT_SERVICES, timeout=1800)
    FIGURES["build_s"] = round(time.monotonic() - t0, 1)
    FIGURES["image_mb"] = {
        role: round(int(docker("image", "inspect", "-f", "{{.Size}}", tag)) / 1e6) for role, tag in IMAGES.items()
    }
    return IMAGES


@pytest.fixture(scope="session")
def stack(request, images_built):
    project = f"cifarsvctest{secrets.token_hex(4)}"
    progress(request, f"docker-compose -p {project} up (torn down with down -v at the end)")
    flower_auth = ("flower", secrets.token_hex(16))
    env = dict(
        os.environ,
        COMPOSE_PROJECT_NAME=project,
        SECRET_KEY=secrets.token_hex(32),
        METRICS_TOKEN=secrets.token_hex(16),
        FLOWER_BASIC_AUTH=":".join(flower_auth),
        # Free host ports, chosen by Docker (port 0), on loopback only.
        WEB_BIND="127.0.0.1",
        WEB_PORT="0",
        FLOWER_BIND="127.0.0.1",
        FLOWER_PORT="0",
        WORKERS=str(WORKERS),
        WORKER_CPUS=WORKER_CPUS,
        FETCH_ALLOW_HOSTS="imageserver:8000",
    )
    compose = Compose(project, env)
    # SIGTERM (a CI runner giving up) becomes a KeyboardInterrupt, so the teardown below still runs.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        t0 = time.monotonic()
        compose("up", "-d", "--no-build", timeout=600)
        url = f"http://127.0.0.1:{compose.host_port('nginx', 8080)}"
        s = Stack(compose, url, f"http://127.0.0.1:{compose.host_port('flower', 5555)}", flower_auth)
        wait_ready(s, timeout=180)
        FIGURES["ready_s"] = round(time.monotonic() - t0, 1)
        yield s
    finally:
        _save_logs(compose)
        down = compose("down", "-v", "--remove-orphans", "-t", "10", timeout=300, check=False)
        signal.signal(signal.SIGTERM, previous)
        left = (
            docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}")
            + docker("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}")
            + docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}")
        )
        assert down.returncode == 0 and not left.strip(), f"teardown left {left!r}:\n{down.stdout[-2000:]}"


def _save_logs(compose: Compose) -> None:
    out = OUTPUT_DIR / "compose"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.log"):
        old.unlink()
    names = docker(
        "ps",
        "-a",
        "--format",
        "{{.Names}}",
        "--filter",
        f"label=com.docker.compose.project={compose.project}",
        check=False,
    ).split()
    for name in names:
        (out / f"{name}.log").write_text(docker("logs", "-t", name, check=False))


@pytest.fixture(scope="session")
def test_images() -> list[TestImage]:
    """2,300 distinct images: real CIFAR-10 test JPEGs (230 per class, interleaved so that any
    slice has every class) when ../shared/data is beside the repo, else random PNGs. Distinct,
    because the result cache would answer a repeated image without the model."""
    per_class = 230
    if SHARED_JPEG_ARCHIVE.exists():
        found: dict[str, list[bytes]] = {c: [] for c in CLASSES}
        with tarfile.open(SHARED_JPEG_ARCHIVE) as tar:
            for m in tar:
                parts = m.name.split("/")
                if (
                    m.isfile()
                    and len(parts) >= 3
                    and parts[-3] == "test"
                    and parts[-2] in found
                    and len(found[parts[-2]]) < per_class
                ):
                    found[parts[-2]].append(tar.extractfile(m).read())
                if all(len(v) == per_class for v in found.values()):
                    break
        return [TestImage(f"{c}-{i}.jpg", found[c][i], c) for i in range(per_class) for c in CLASSES]
    return [TestImage(f"noise-{i}.png", noise_png(i), None) for i in range(per_class * len(CLASSES))]
