"""The real deployment for the tests marked `compose` (`make test-compose`).

One stack per session, set up by three fixtures in turn: `docker_prepared` (engine, base images
and wheelhouse: tools/docker_bases.py), `images_built` (docker-compose build) and `stack` (up,
under a project name of its own, on free host ports, with random secrets). The stack is torn
down with `down -v` whatever happens: a failed test, Ctrl-C or SIGTERM (pytest runs fixture
teardown on all three). Every container's log is saved to test-output/compose/ first.

FIGURES gathers the measured figures; the summary line prints them at the end of the run.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import CLASSES, OUTPUT_DIR, REPO_ROOT, noise_png

HERE = Path(__file__).resolve().parent
COMPOSE_FILES = [REPO_ROOT / "docker-compose.yml", HERE / "compose.test.yml"]
SHARED_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
WORKERS = 3            # worker containers
WORKER_CPUS = "1"      # each worker container's CPU limit (compose `cpus:`)
IMAGES = {"runtime": "cifar-svc:runtime", "worker": "cifar-svc:worker", "nginx": "cifar-svc:nginx"}
BUILT_SERVICES = ["web", "worker", "nginx"]  # one per image (fetcher and flower share web's)
FIGURES: dict = {}


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    f = FIGURES
    parts = [f"prepare {f['prepare_s']:.0f} s (engine, base images, wheels)" if "prepare_s" in f else None,
             f"build {f['build_s']:.0f} s" if "build_s" in f else None,
             f"up to ready {f['ready_s']:.1f} s" if "ready_s" in f else None,
             f"{f['batch_images']} images in {f['batch_s']:.1f} s" if "batch_s" in f else None,
             "jobs per worker container " + "/".join(map(str, f["jobs_per_worker"])) if "jobs_per_worker" in f
             else None,
             f"killed worker's jobs done {f['recovery_s']:.1f} s after its SIGKILL (target 20 s)"
             if "recovery_s" in f else None,
             f"batch done {f['redis_recovery_s']:.1f} s after a Redis restart" if "redis_recovery_s" in f else None,
             "images " + ", ".join(f"{k} {v} MB" for k, v in f["image_mb"].items()) if "image_mb" in f else None]
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


# --- docker-compose for one project ------------------------------------------------------------
class Compose:
    def __init__(self, project: str, env: dict):
        self.project, self.env = project, env
        self.base = ["docker-compose", "-p", project, *[a for f in COMPOSE_FILES for a in ("-f", str(f))]]

    def __call__(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([*self.base, *args], cwd=REPO_ROOT, env=self.env, text=True, timeout=timeout,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} exited with {out.returncode}:\n{out.stdout[-5000:]}")
        return out

    def containers(self, service: str) -> list[str]:
        """The names of the service's containers, stopped ones too, in a stable order."""
        out = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}",
                              "--filter", f"label=com.docker.compose.project={self.project}",
                              "--filter", f"label=com.docker.compose.service={service}"],
                             capture_output=True, text=True, check=True)
        return sorted(out.stdout.split())

    def host_port(self, service: str, port: int) -> int:
        return int(self("port", service, str(port)).stdout.strip().rsplit(":", 1)[1])


def docker(*args: str, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout + out.stderr


def finished_in_log(log: str) -> Counter:
    """Job id -> how many times this log says its final status was written ("job done" or
    "job failed": the worker logs that only when its write was the one that counted)."""
    written = Counter()
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") in ("job done", "job failed") and rec.get("job_id"):
                written[rec["job_id"]] += 1
    return written


def parse_time(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --- the running stack -------------------------------------------------------------------------
@dataclass
class Stack:
    compose: Compose
    url: str                          # nginx, the published web port
    flower_url: str
    flower_auth: tuple[str, str]
    http: requests.Session = field(default_factory=requests.Session)

    def worker_logs(self) -> dict[str, str]:
        return {name: docker("logs", name) for name in self.compose.containers("worker")}

    def redis(self, *args: str) -> str:
        [name] = self.compose.containers("redis")
        return docker("exec", name, "redis-cli", *args).strip()

    def worker_hosts_beating(self, window_s: float = 15) -> set[str]:
        """Worker containers (hostnames) with a model process that sent a heartbeat lately."""
        out = self.redis("ZRANGEBYSCORE", "workers:heartbeat", str(time.time() - window_s), "+inf")
        return {node.rsplit(":", 1)[0] for node in out.split()}

    def submit(self, files: list[tuple[str, bytes]] = (), urls: list[str] = ()) -> dict:
        if urls and not files:
            resp = self.http.post(self.url + "/api/v1/batches", json={"urls": list(urls)}, timeout=60)
        else:
            resp = self.http.post(self.url + "/api/v1/batches", files=[("images", f) for f in files],
                                  data={"urls": "\n".join(urls)} if urls else None, timeout=120)
        assert resp.status_code == 202, resp.text[:500]
        return resp.json()

    def batch(self, batch_id: str, **params) -> dict | None:
        """The batch, or None while the service cannot answer (Redis restarting: 503)."""
        try:
            resp = self.http.get(f"{self.url}/api/v1/batches/{batch_id}", params=params, timeout=40)
        except requests.RequestException:
            return None
        return resp.json() if resp.status_code == 200 else None

    def wait_batch(self, batch_id: str, timeout: float) -> dict:
        """Long-polls until the batch is finished; the full batch, every job in it."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            b = self.batch(batch_id, wait=10)
            if b is None:
                time.sleep(0.5)
                continue
            last = b
            if b["finished"]:
                return b
        raise AssertionError(f"batch {batch_id} unfinished after {timeout:.0f} s: "
                             f"{last and last['counts']}")


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
    FIGURES["image_mb"] = {role: round(int(docker("image", "inspect", "-f", "{{.Size}}", tag)) / 1e6)
                           for role, tag in IMAGES.items()}
    return IMAGES


@pytest.fixture(scope="session")
def stack(request, images_built):
    project = f"cifarsvctest{secrets.token_hex(4)}"
    progress(request, f"docker-compose -p {project} up (torn down with down -v at the end)")
    flower_auth = ("flower", secrets.token_hex(16))
    env = dict(os.environ, COMPOSE_PROJECT_NAME=project,
               SECRET_KEY=secrets.token_hex(32), FLOWER_BASIC_AUTH=":".join(flower_auth),
               # Free host ports, chosen by Docker (port 0), on loopback only.
               WEB_BIND="127.0.0.1", WEB_PORT="0", FLOWER_BIND="127.0.0.1", FLOWER_PORT="0",
               WORKERS=str(WORKERS), WORKER_CPUS=WORKER_CPUS, FETCH_ALLOW_HOSTS="imageserver:8000")
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
        left = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}") + \
            docker("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}") + \
            docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}")
        assert down.returncode == 0 and not left.strip(), f"teardown left {left!r}:\n{down.stdout[-2000:]}"


def wait_ready(s: Stack, timeout: float) -> None:
    """/readyz through nginx says ready, and every worker container has a model loaded."""
    deadline, why = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            r = s.http.get(s.url + "/readyz", timeout=5)
            beating = s.worker_hosts_beating()
            if r.status_code == 200 and len(beating) >= WORKERS:
                return
            why = f"/readyz {r.status_code} {r.text[:200]}; worker containers ready: {len(beating)}"
        except (requests.RequestException, RuntimeError) as exc:
            why = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"the stack was not ready after {timeout:.0f} s: {why}\n"
                         + s.compose("ps", check=False).stdout)


def _save_logs(compose: Compose) -> None:
    out = OUTPUT_DIR / "compose"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.log"):
        old.unlink()
    names = docker("ps", "-a", "--format", "{{.Names}}", "--filter",
                   f"label=com.docker.compose.project={compose.project}", check=False).split()
    for name in names:
        (out / f"{name}.log").write_text(docker("logs", "-t", name, check=False))


# --- test images -----------------------------------------------------------------------------
@dataclass
class TestImage:
    name: str
    data: bytes
    label: str | None  # the true class, for real CIFAR-10 images


@pytest.fixture(scope="session")
def test_images() -> list[TestImage]:
    """1,200 distinct images: real CIFAR-10 test JPEGs (120 per class, interleaved so that any
    slice has every class) when ../shared/data is beside the repo, else random PNGs. Distinct,
    because the result cache would answer a repeated image without the model."""
    per_class = 120
    if SHARED_ARCHIVE.exists():
        found: dict[str, list[bytes]] = {c: [] for c in CLASSES}
        with tarfile.open(SHARED_ARCHIVE) as tar:
            for m in tar:
                parts = m.name.split("/")
                if m.isfile() and len(parts) >= 3 and parts[-3] == "test" and parts[-2] in found \
                        and len(found[parts[-2]]) < per_class:
                    found[parts[-2]].append(tar.extractfile(m).read())
                if all(len(v) == per_class for v in found.values()):
                    break
        return [TestImage(f"{c}-{i}.jpg", found[c][i], c) for i in range(per_class) for c in CLASSES]
    return [TestImage(f"noise-{i}.png", noise_png(i), None) for i in range(per_class * len(CLASSES))]


def as_files(images: list[TestImage]) -> list[tuple[str, bytes]]:
    return [(im.name, im.data) for im in images]


def accuracy(images: list[TestImage], batch: dict) -> float | None:
    truth = {im.name: im.label for im in images}
    jobs = [j for j in batch["jobs"] if truth.get(j["source"]["value"])]
    if not jobs:
        return None
    return sum(j["predictions"][0]["label"] == truth[j["source"]["value"]] for j in jobs) / len(jobs)

