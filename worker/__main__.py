"""Start a worker: `python -m worker [--queues predict,fetch] [--concurrency N]`.

Prediction and fetching want different pools (processes that each hold the model, versus
many threads waiting on the network), so this starts Celery workers per queue (fetching:
FETCH_PROCESSES of them, each with its share of FETCH_CONCURRENCY threads), forwards
signals to them, stops them together, and serves their metrics on one port. Start it any number of times, on any machine that reaches REDIS_URL.
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

from shared.predictor import ModelLoadError, read_model_info
from shared.queue import FETCH_QUEUE, PREDICT_QUEUE
from shared.settings import Settings


def celery_command(queue: str, concurrency: int, loglevel: str, pool: str = "prefork") -> list[str]:
    pool = pool if queue == PREDICT_QUEUE else "threads"
    name = f"{queue}-{uuid.uuid4().hex[:6]}@%h"
    return [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queue,
            "-P", pool, "-c", str(concurrency), "-n", name, "-l", loglevel, "--without-gossip", "--without-mingle"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queues", default=f"{PREDICT_QUEUE},{FETCH_QUEUE}")
    p.add_argument("--concurrency", type=int,
                   help="model processes (default: PREDICT_PROCESSES, else one per core, at most 4)")
    p.add_argument("--pool", default=os.environ.get("WORKER_POOL", "prefork"), choices=["prefork", "solo"],
                   help="predict queue: prefork (the model in a child process, restarted if it dies) "
                        "or solo (the model in the worker process itself)")
    p.add_argument("--fetch-concurrency", type=int, help="fetch threads in all (default: FETCH_CONCURRENCY)")
    p.add_argument("--fetch-processes", type=int, help="fetch worker processes (default: FETCH_PROCESSES)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("WORKER_METRICS_PORT", "0")),
                   help="serve Prometheus metrics of all this worker's processes (0: off)")
    args = p.parse_args(argv)
    settings = Settings.from_env()
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = set(queues) - {PREDICT_QUEUE, FETCH_QUEUE}
    if unknown or not queues:
        p.error(f"--queues takes {PREDICT_QUEUE} and/or {FETCH_QUEUE}")
    if PREDICT_QUEUE in queues:
        try:  # fail now, with a clear message, rather than in a pool child that Celery restarts
            info, _ = read_model_info(settings.model_dir)
        except ModelLoadError as exc:
            print(f"worker: cannot start: {exc}", file=sys.stderr)
            return 2
        print(f"worker: model {info.name} {info.version} from {settings.model_dir}", flush=True)

    # Every process of this worker writes its metrics here; this process serves their sum.
    metrics_dir = tempfile.mkdtemp(prefix="metrics-worker-")
    if args.metrics_port:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        start_http_server(args.metrics_port, registry=registry)
    cores = os.cpu_count() or 1
    # Small batches keep one process's threads half idle: one single-threaded model process
    # per core predicts more (1,000-image batch on 2 cores: 0.58x vs 0.48x the raw model; README).
    model_processes = 1 if args.pool == "solo" else (args.concurrency or settings.predict_processes or min(cores, 4))
    children = []
    for queue in queues:
        env = dict(os.environ, WORKER_ROLE=queue, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
        if queue == PREDICT_QUEUE:
            conc, processes = model_processes, 1
            if not settings.predict_threads:
                env["PREDICT_THREADS"] = str(max(1, cores // model_processes))
        else:  # threads wait on the network; the Python work between waits needs more than one GIL
            processes = max(1, args.fetch_processes or settings.fetch_processes)
            conc = max(1, (args.fetch_concurrency or settings.fetch_concurrency) // processes)
        for _ in range(processes):
            children.append(subprocess.Popen(celery_command(queue, conc, args.loglevel, args.pool), env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, forward)
    # When one worker exits, stop the other: a half-running worker would only mislead.
    code = None
    while code is None:
        for child in children:
            try:
                rc = child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            code = rc
            break
    forward(signal.SIGTERM, None)
    for child in children:
        child.wait()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
