"""Start a worker: `python -m worker [--queues predict,fetch] [--concurrency N]`.

Prediction and fetching want different pools (processes that each hold the model, versus
many threads waiting on the network), so this starts Celery workers per queue (fetching:
FETCH_PROCESSES of them, each with its share of FETCH_CONCURRENCY threads), forwards signals
to them, stops them together, and serves their metrics on one port. Start it any number of
times, on any machine that reaches REDIS_URL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from shared.machine import available_cpus
from shared.modeldir import ModelLoadError, read_model_info
from shared.queue import FETCH_QUEUE, PREDICT_QUEUE
from shared.settings import Settings, SettingsError


def celery_command(settings: Settings, queue: str, concurrency: int, loglevel: str) -> list[str]:
    pool = settings.worker_pool if queue == PREDICT_QUEUE else "threads"
    name = f"{queue}-{uuid.uuid4().hex[:6]}@%h"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        settings.worker_app,
        "worker",
        "-Q",
        queue,
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        name,
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def parse_args(argv, settings: Settings):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queues", default=f"{PREDICT_QUEUE},{FETCH_QUEUE}")
    p.add_argument(
        "--concurrency", type=int, help="model processes (default: PREDICT_PROCESSES, else one per CPU, at most 4)"
    )
    p.add_argument(
        "--pool",
        default=settings.worker_pool,
        choices=["prefork", "solo"],
        help="predict queue: prefork (the model in a child process, restarted if it dies) "
        "or solo (the model in the worker process itself)",
    )
    p.add_argument("--fetch-concurrency", type=int, help="fetch threads in all (default: FETCH_CONCURRENCY)")
    p.add_argument("--fetch-processes", type=int, help="fetch worker processes (default: FETCH_PROCESSES)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=settings.worker_metrics_port,
        help="serve Prometheus metrics of all this worker's processes (0: off)",
    )
    args = p.parse_args(argv)
    args.queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not args.queues or set(args.queues) - {PREDICT_QUEUE, FETCH_QUEUE}:
        p.error(f"--queues takes {PREDICT_QUEUE} and/or {FETCH_QUEUE}")
    return args


def plan(settings: Settings, args, cpus: int) -> list[tuple[Settings, int]]:
    """(the settings a Celery worker runs with, its concurrency) for each Celery worker to start."""
    # Small batches keep one process's threads half idle: one single-threaded model process
    # per CPU predicts more (1,000-image batch on 2 cores: 0.58x vs 0.48x the raw model; README).
    workers = []
    for queue in args.queues:
        if queue == PREDICT_QUEUE:
            processes = 1 if args.pool == "solo" else (args.concurrency or settings.predict_processes or min(cpus, 4))
            threads = settings.predict_threads or max(1, cpus // processes)
            workers.append(
                (settings.replace(worker_role=queue, worker_pool=args.pool, predict_threads=threads), processes)
            )
        else:  # threads wait on the network; the Python work between waits needs more than one GIL
            processes = max(1, args.fetch_processes or settings.fetch_processes)
            threads = max(1, (args.fetch_concurrency or settings.fetch_concurrency) // processes)
            workers += [(settings.replace(worker_role=queue), threads)] * processes
    return workers


def main(argv=None) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"worker: cannot start: {exc}", file=sys.stderr)
        return 2
    args = parse_args(argv, settings)
    if PREDICT_QUEUE in args.queues:
        try:  # fail now, with a clear message, rather than in a pool child that Celery restarts
            info, _ = read_model_info(settings.model_dir)
        except ModelLoadError as exc:
            print(f"worker: cannot start: {exc}", file=sys.stderr)
            return 2
        print(f"worker: model {info.name} {info.version} from {settings.model_dir}", flush=True)

    # Every process of this worker writes its metrics here; this process serves their sum.
    metrics_dir = tempfile.mkdtemp(prefix="metrics-worker-")
    if args.metrics_port:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        start_http_server(args.metrics_port, registry=registry)
    children = []
    for child_settings, concurrency in plan(settings, args, available_cpus()):
        env = child_settings.replace(prometheus_multiproc_dir=metrics_dir).to_env()
        cmd = celery_command(child_settings, child_settings.worker_role, concurrency, args.loglevel)
        # The child inherits this environment (PATH, TF_* and the like) with its settings on top.
        children.append(subprocess.Popen(cmd, env=dict(os.environ, **env)))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, forward)
    code = _wait_for_first_exit(children)
    forward(signal.SIGTERM, None)  # when one worker exits, stop the others: half a worker only misleads
    for child in children:
        child.wait()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _wait_for_first_exit(children: list[subprocess.Popen]) -> int:
    while True:
        for child in children:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue


if __name__ == "__main__":
    sys.exit(main())
