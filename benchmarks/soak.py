"""Soak: many jobs while workers and model processes are SIGKILLed, Redis restarts and some image
servers break mid-answer; count lost, duplicated and wrongly ended jobs.

    python -m benchmarks.soak [--jobs 10000] [--kills 2] [--child-kills 2] [--redis-restarts 1]
                              [--url-share 0.05] [--max-seconds 1800]

Starts its own Redis (AOF on), web server, two prediction workers, a fetch worker, an image
server and three servers that reset, stall or cut short their answers (tools/badservers.py).
Several clients submit single images, batches and (a `--url-share` of submissions) URL lists, a
tenth of whose URLs point at the breaking servers. It injects the faults, waits for every job,
and reports: submitted, done, failed by error code (read from the job records), lost (never
finished), wrongly ended (a good URL or image failed, or a broken one did not), duplicated (a
result written more than once: two result lines for one job in the workers' JSON logs), faults
injected and wall time. Exit status 1 if anything was lost, duplicated or wrongly ended. The
short version runs in the tests (tests/integration/test_soak.py).
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

import redis as redis_py
import requests

from benchmarks.run import test_images
from shared.jobstore import PENDING
from shared.logs import final_writes
from shared.schemas import FINAL_STATUSES
from shared.settings import DEFAULT_MODEL_DIR
from tools.badservers import BEHAVIOURS, BreakingServer
from tools.imageserver import ImageServer
from tools.stack import free_port, model_processes, start_redis, start_web, start_worker, stop, wait_ready


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs of a whole worker (its process group)")
    p.add_argument("--child-kills", type=int, default=2, help="SIGKILLs of one worker's model process")
    p.add_argument("--url-share", type=float, default=0.05, help="share of submissions that are URL lists")
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
    good = ImageServer(images, delay=0.02)
    broken = [BreakingServer(b, stall_s=60) for b in BEHAVIOURS]  # stall: past FETCH_TIMEOUT
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
        FETCH_ALLOW_HOSTS=",".join(f"127.0.0.1:{srv.port}" for srv in [good, *broken]),
    )  # the soak reuses 500 images: every job must reach the model
    redis = start_redis(rport, tmp / "redis", appendonly=True)
    web = start_web(env, wport)
    url = f"http://127.0.0.1:{wport}"
    workers: list[subprocess.Popen] = []

    def add_worker(queues="predict"):
        log = open(tmp / f"worker-{len(workers)}.log", "wb")
        workers.append(
            start_worker(env, queues, concurrency=1, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    add_worker()
    add_worker()
    add_worker("fetch")
    predict_workers = workers[:2]  # the ones the kills choose from (the fetch worker keeps running)
    wait_ready(url)
    job_ids: list[str] = []
    broken_jobs: set[str] = set()  # URL jobs whose server breaks: they must end failed
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + args.max_seconds
    faults: list[str] = []

    def client(n_jobs: int, seed: int):
        r, s = random.Random(seed), requests.Session()
        sent = 0
        while sent < n_jobs and time.monotonic() < deadline:
            if r.random() < args.url_share:
                n = min(n_jobs - sent, r.randint(10, 50))
                urls = [
                    broken[r.randrange(len(broken))].url(f"/{sent + i}.jpg")
                    if r.random() < 0.1
                    else good.url(r.randrange(len(images)))
                    for i in range(n)
                ]
                request = dict(url=url + "/api/v1/batches", json={"urls": urls})
            else:
                n = 1 if r.random() < 0.5 else min(n_jobs - sent, r.randint(20, 300))
                files = [("images", (f"{sent + i}.jpg", images[r.randrange(len(images))])) for i in range(n)]
                urls = []
                request = dict(url=url + ("/api/v1/jobs" if n == 1 else "/api/v1/batches"), files=files)
            try:
                resp = s.post(**request, timeout=120)
            except requests.RequestException:
                time.sleep(0.5)
                continue
            if resp.status_code == 202:  # 503 while Redis restarts: nothing stored, send again
                body = resp.json()
                ids = [body["job_id"]] if "job_id" in body else [j["job_id"] for j in body["jobs"]]
                with lock:
                    job_ids.extend(ids)
                    if urls:
                        broken_jobs.update(j for j, u in zip(ids, urls, strict=True) if f":{good.port}/" not in u)
                sent += n
            else:
                time.sleep(0.5)

    per_client = [args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)]
    clients = [threading.Thread(target=client, args=(n, i)) for i, n in enumerate(per_client)]
    for t in clients:
        t.start()

    records = redis_py.Redis(port=rport, socket_timeout=5)
    last_progress = 0.0

    def progress() -> float:
        """Share of the requested jobs that have finished: submitting takes seconds, the work
        minutes, so faults timed by what was submitted would all land in the first seconds."""
        nonlocal last_progress
        with lock:
            submitted = len(job_ids)
        try:
            last_progress = (submitted - records.zcard(PENDING)) / args.jobs
        except redis_py.RedisError:
            pass  # Redis is restarting: the last reading stands
        return last_progress

    plan = sorted(
        [("kill", (i + 1) / (args.kills + 1)) for i in range(args.kills)]
        + [("child", (i + 0.7) / (args.child_kills + 0.7)) for i in range(args.child_kills)]
        + [("redis", (i + 0.5) / (args.redis_restarts + 0.5) * 0.8) for i in range(args.redis_restarts)],
        key=lambda f: f[1],
    )
    for kind, at in plan:
        while progress() < at and time.monotonic() < deadline:
            time.sleep(0.2)
        live = [w for w in predict_workers if w.poll() is None]
        if kind == "kill":
            victim = rng.choice(live)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            predict_workers.remove(victim)
            add_worker()
            predict_workers.append(workers[-1])
            faults.append(f"SIGKILL worker at {progress():.0%} finished")
        elif kind == "child":
            children = [c for w in live for c in model_processes(w)]
            if not children:
                continue
            rng.choice(children).kill()  # the model process: its worker lives on and forks another
            faults.append(f"SIGKILL model process at {progress():.0%} finished")
        else:
            stop(redis)
            time.sleep(2)
            redis = start_redis(rport, tmp / "redis", appendonly=True)
            faults.append(f"Redis restarted at {progress():.0%} finished")
        print(faults[-1], flush=True)
    for t in clients:
        t.join()
    submitted_s = time.monotonic() - started

    # Wait for every job to finish (or the deadline).
    s = requests.Session()
    statuses: dict[str, str] = {}
    error_codes: Counter = Counter()
    wrongly_ended: list[str] = []
    while time.monotonic() < deadline:
        for job_id in [j for j in job_ids if statuses.get(j) not in FINAL_STATUSES]:
            try:
                r = s.get(f"{url}/api/v1/jobs/{job_id}", timeout=10)
                job = r.json() if r.status_code == 200 else {"status": "missing"}
                statuses[job_id] = job["status"]
                if job["status"] == "failed":
                    error_codes[job["error"]["code"]] += 1
                if job["status"] in FINAL_STATUSES and (job["status"] == "failed") != (job_id in broken_jobs):
                    wrongly_ended.append(f"{job_id} {job['status']} {job.get('error')}")
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
    good.shutdown()
    for srv in broken:
        srv.close()

    written = Counter()  # a job's final status written twice shows as two lines
    for log in tmp.glob("worker-*.log"):
        written += final_writes(log.read_text(errors="replace"))
    counts = Counter(statuses.get(j, "missing") for j in job_ids)
    report = {
        "jobs_requested": args.jobs,
        "jobs_submitted": len(job_ids),
        "unique_job_ids": len(set(job_ids)),
        "done": counts["done"],
        "failed": counts["failed"],
        "failed_by_code": dict(error_codes),
        "url_jobs_to_breaking_servers": len(broken_jobs),
        "wrongly_ended": len(wrongly_ended),
        "wrongly_ended_examples": wrongly_ended[:5],
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
    ok = r["lost"] == 0 and r["duplicated"] == 0 and r["wrongly_ended"] == 0
    sys.exit(0 if ok and r["jobs_submitted"] == r["jobs_requested"] else 1)
