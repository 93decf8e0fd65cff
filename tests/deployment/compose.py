"""Helpers for the deployment tests: docker-compose for one project, the running stack, and
the test images. The fixtures that build and run the stack are in conftest.py."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from shared.settings import REPO_ROOT

HERE = Path(__file__).resolve().parent
COMPOSE_FILES = [REPO_ROOT / "docker-compose.yml", HERE / "compose.test.yml"]
WORKERS = 3  # worker containers
WORKER_CPUS = "1"  # each worker container's CPU limit (compose `cpus:`)
IMAGES = {"runtime": "cifar-svc:runtime", "worker": "cifar-svc:worker", "nginx": "cifar-svc:nginx"}
BUILT_SERVICES = ["web", "worker", "nginx"]  # one per image (fetcher and flower share web's)
FIGURES: dict = {}


# --- docker-compose for one project ------------------------------------------------------------
class Compose:
    def __init__(self, project: str, env: dict):
        self.project, self.env = project, env
        self.base = ["docker-compose", "-p", project, *[a for f in COMPOSE_FILES for a in ("-f", str(f))]]

    def __call__(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [*self.base, *args],
            cwd=REPO_ROOT,
            env=self.env,
            text=True,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} exited with {out.returncode}:\n{out.stdout[-5000:]}")
        return out

    def containers(self, service: str) -> list[str]:
        """The names of the service's containers, stopped ones too, in a stable order."""
        out = subprocess.run(
            [
                "docker",
                "ps",
                "-a",
                "--format",
                "{{.Names}}",
                "--filter",
                f"label=com.docker.compose.project={self.project}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return sorted(out.stdout.split())

    def host_port(self, service: str, port: int) -> int:
        return int(self("port", service, str(port)).stdout.strip().rsplit(":", 1)[1])


def docker(*args: str, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout + out.stderr


# --- the running stack -------------------------------------------------------------------------
@dataclass
class Stack:
    compose: Compose
    url: str  # nginx, the published web port
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
            resp = self.http.post(
                self.url + "/api/v1/batches",
                files=[("images", f) for f in files],
                data={"urls": "\n".join(urls)} if urls else None,
                timeout=120,
            )
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
        raise AssertionError(f"batch {batch_id} unfinished after {timeout:.0f} s: {last and last['counts']}")


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
    raise AssertionError(
        f"the stack was not ready after {timeout:.0f} s: {why}\n" + s.compose("ps", check=False).stdout
    )


# --- test images -----------------------------------------------------------------------------
@dataclass
class TestImage:
    name: str
    data: bytes
    label: str | None  # the true class, for real CIFAR-10 images


def as_files(images: list[TestImage]) -> list[tuple[str, bytes]]:
    return [(im.name, im.data) for im in images]


def accuracy(images: list[TestImage], batch: dict) -> float | None:
    truth = {im.name: im.label for im in images}
    jobs = [j for j in batch["jobs"] if truth.get(j["source"]["value"])]
    if not jobs:
        return None
    return sum(j["predictions"][0]["label"] == truth[j["source"]["value"]] for j in jobs) / len(jobs)
