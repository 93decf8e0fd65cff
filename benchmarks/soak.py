"""Soak: many jobs while workers are SIGKILLed and Redis restarts; count lost and duplicated jobs.

    python -m benchmarks.soak [--jobs 10000] [--kills 2] [--redis-restarts 1] [--max-seconds 1800]

Starts its own Redis (AOF on), web server and two workers, submits single images and batches
from several clients, injects the faults, waits for every job, and reports: submitted,
done, failed (both read from the job records in Redis), lost (never finished), duplicated (a
result written more than once: two result lines for one job in the workers' JSON logs), faults
injected and wall time. Exit status 1 if anything was
lost or duplicated. The short version runs in the tests (tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from benchmarks.run import test_images
from shared.schemas import FINAL_STATUSES
from shared.settings import DEFAULT_MODEL_DIR
from tools.stack import free_port, start_redis, start_web, start_worker, stop, wait_ready


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--kills", type=int, default=2)
    p.add_argument("--redis-restarts", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=1800)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--out", help="write the report here as JSON")
    args = p.parse_args(argv)
    rng = random.Random(0)
    images = test_images(500)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    rport, wport = free_port(), free_port()
    env = dict(
        os.environ,
        REDIS_URL=f"redis://127.0.0.1:{rport}/0",
        MODEL_DIR=args.model,
        STORAGE_DIR=str(tmp / "images"),
        RATE_LIMIT="10000000/minute",
        TF_CPP_MIN_LOG_LEVEL="3",
        LOG_JSON="1",
        PYTHONUNBUFFERED="1",
        RESULT_CACHE="0",
    )  # the soak reuses 500 images: every job must reach the model
    redis = start_redis(rport, tmp / "redis", appendonly=True)
    web = start_web(env, wport)
    url = f"http://127.0.0.1:{wport}"
    workers: list[subprocess.Popen] = []

    def add_worker():
        log = open(tmp / f"worker-{len(workers)}.log", "wb")
        workers.append(
            start_worker(env, "predict", concurrency=1, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    add_worker()
    add_worker()
    wait_ready(url)
    job_ids: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + args.max_seconds
    faults: list[str] = []

    def client(n_jobs: int, seed: int):
        r, s = random.Random(seed), requests.Session()
        sent = 0
        while sent < n_jobs and time.monotonic() < deadline:
            n = 1 if r.random() < 0.5 else min(n_jobs - sent, r.randint(20, 300))
            files = [("images", (f"{sent + i}.jpg", images[r.randrange(len(images))])) for i in range(n)]
            try:
                resp = s.post(url + ("/api/v1/jobs" if n == 1 else "/api/v1/batches"), files=files, timeout=120)
            except requests.RequestException:
                time.sleep(0.5)
                continue
            if resp.status_code == 202:  # 503 while Redis restarts: nothing stored, send again
                body = resp.json()
                with lock:
                    job_ids.extend([body["job_id"]] if n == 1 else [j["job_id"] for j in body["jobs"]])
                sent += n
            else:
                time.sleep(0.5)

    per_client = [args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)]
    clients = [threading.Thread(target=client, args=(n, i)) for i, n in enumerate(per_client)]
    for t in clients:
        t.start()

    def progress() -> float:
        with lock:
            return len(job_ids) / args.jobs

    plan = sorted(
        [("kill", (i + 1) / (args.kills + 1)) for i in range(args.kills)]
        + [("redis", (i + 0.5) / (args.redis_restarts + 0.5) * 0.8) for i in range(args.redis_restarts)],
        key=lambda f: f[1],
    )
    for kind, at in plan:
        while progress() < at and time.monotonic() < deadline and any(t.is_alive() for t in clients):
            time.sleep(0.2)
        if kind == "kill":
            victim = rng.choice([w for w in workers if w.poll() is None])
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            add_worker()
            faults.append(f"SIGKILL worker at {progress():.0%} submitted")
        else:
            stop(redis)
            time.sleep(2)
            redis = start_redis(rport, tmp / "redis", appendonly=True)
            faults.append(f"Redis restarted at {progress():.0%} submitted")
        print(faults[-1], flush=True)
    for t in clients:
        t.join()
    submitted_s = time.monotonic() - started

    # Wait for every job to finish (or the deadline).
    s = requests.Session()
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        for job_id in [j for j in job_ids if statuses.get(j) not in FINAL_STATUSES]:
            try:
                r = s.get(f"{url}/api/v1/jobs/{job_id}", timeout=10)
                statuses[job_id] = r.json()["status"] if r.status_code == 200 else "missing"
            except requests.RequestException:
                break
        if all(statuses.get(j) in FINAL_STATUSES for j in job_ids):
            break
        time.sleep(1)
    wall = time.monotonic() - started
    unfinished = []  # for the report: what a lost job looked like
    for job_id in [j for j in job_ids if statuses.get(j) not in FINAL_STATUSES][:5]:
        try:
            unfinished.append(s.get(f"{url}/api/v1/jobs/{job_id}", timeout=10).json())
        except (requests.RequestException, ValueError):
            unfinished.append({"job_id": job_id, "status": statuses.get(job_id)})
    for w in workers:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGTERM)
    for w in workers:
        w.wait(30)
    stop(web)
    stop(redis)

    # Each worker logs a line when it writes a job's final status. A second line for one job would
    # be a second write; a missing line proves nothing (a SIGKILL between the Redis write and the
    # log line drops it), so lines are only ever used to find duplicates.
    written = Counter()
    for log in tmp.glob("worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") in ("job done", "job failed") and rec.get("job_id"):
                    written[rec["job_id"]] += 1
    counts = Counter(statuses.get(j, "missing") for j in job_ids)
    report = {
        "jobs_requested": args.jobs,
        "jobs_submitted": len(job_ids),
        "unique_job_ids": len(set(job_ids)),
        "done": counts["done"],
        "failed": counts["failed"],
        "lost": sum(v for k, v in counts.items() if k not in FINAL_STATUSES),
        "duplicated": sum(1 for j in job_ids if written[j] > 1),
        "result_log_lines": sum(written[j] for j in job_ids),
        "faults": faults,
        "submit_seconds": round(submitted_s, 1),
        "wall_seconds": round(wall, 1),
        "unfinished_examples": unfinished,
        "logs": str(tmp),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    r = main()
    sys.exit(0 if r["lost"] == 0 and r["duplicated"] == 0 and r["jobs_submitted"] == r["jobs_requested"] else 1)
