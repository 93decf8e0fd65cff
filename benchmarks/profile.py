"""Where each millisecond of CPU per image goes on the slow paths: single images and URL lists.

    python -m benchmarks.profile [--singles 400] [--urls 1000] [--name profile]

Starts the service as benchmarks.run does (Redis, gunicorn, one `python -m worker`), samples
the web and worker process trees with py-spy while 8 single-image clients run, then while a
list of slow URLs is fetched and predicted, and writes benchmarks/results/<name>.json: per
path, the CPU ms per image of each tier (web, worker, Redis, and the clients: this process),
and the functions that take the most of the web and worker tiers' CPU (py-spy samples of
the thread holding the GIL, as ms per image, by the function on top and by the functions of
our own code on the stack).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from benchmarks.run import RESULTS, Service, run_clients, single_image_client, test_images, wait_batch
from shared.machine import cpu_name
from shared.settings import REPO_ROOT, Settings
from tools.imageserver import ImageServer
from training.provenance import git_commit

# py-spy samples per second. --gil: only the thread holding the GIL is sampled, so a sample is
# Python code running (gevent's hub waiting in epoll, or a socket blocked, is not; native code
# that lets go of the GIL, OpenVINO's inference, is not either: benchmarks.raw measures that).
RATE = 100
OURS = ("web/", "worker/", "shared/")  # our own modules, as py-spy names their files


class Sampler:
    """py-spy on one process tree, for the length of a `with` block."""

    def __init__(self, pid: int, out: Path):
        self.pid, self.out = pid, out

    def __enter__(self):
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(self.pid), "--subprocesses"]
            + ["--rate", str(RATE), "--gil", "--format", "raw", "--nonblocking", "--output", str(self.out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)  # py-spy attaches to every process of the tree
        return self

    def __exit__(self, *_):
        self.proc.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        self.proc.wait(timeout=60)


def top_functions(raw: Path, n_images: int, most: int = 15) -> dict:
    """From py-spy's collapsed stacks: ms of CPU per image by the function on top of the stack
    (self), and by each of our own functions anywhere on it (inclusive)."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[1:]  # the first frame names the process and thread
        count = int(count)
        total += count
        if frames:
            own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames if any(o in f for o in OURS)}:
            inclusive[frame] += count
    per_image = 1000 / RATE / n_images
    return {
        "sampled_ms_per_image": round(total * per_image, 2),
        "self": {f: round(c * per_image, 3) for f, c in own.most_common(most)},
        "ours_inclusive": {f: round(c * per_image, 3) for f, c in inclusive.most_common(most)},
    }


def _short(frame: str) -> str:
    """'function (path/to/module.py:line)' -> 'function (module.py)': lines vary, functions don't."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    for root in (str(REPO_ROOT) + "/", "site-packages/"):
        path = path.split(root, 1)[-1]
    return f"{name} ({path})"


def profile(service: Service, name: str, tmp: Path, n: int, run) -> dict:
    """Run `run()` (n images) with both tiers sampled; the CPU of every tier per image."""
    clients0 = time.process_time()
    before = service.cpu_snapshot()
    with Sampler(service.web.pid, tmp / f"{name}-web.txt"), Sampler(service.worker.pid, tmp / f"{name}-worker.txt"):
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
    cpu = service.cpu_ms_per_image(before, n)
    cpu["clients"] = round(1000 * (time.process_time() - clients0) / n, 2)
    out = {
        "images": n,
        "seconds": round(seconds, 2),
        "img_s": round(n / seconds, 1),
        "cpu_ms_per_image": cpu,
        "web": top_functions(tmp / f"{name}-web.txt", n),
        "worker": top_functions(tmp / f"{name}-worker.txt", n),
    }
    print(f"{name}: {out['img_s']} img/s, CPU ms per image {cpu}", flush=True)
    for tier in ("web", "worker"):
        print(f"  {tier} (sampled {out[tier]['sampled_ms_per_image']} ms/image), top by self:")
        for f, ms in list(out[tier]["self"].items())[:8]:
            print(f"    {ms:7.3f} ms  {f}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--singles", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--urls", type=int, default=1000)
    p.add_argument("--name", default="profile")
    args = p.parse_args(argv)
    images = test_images(max(args.singles, 100))
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    slow = ImageServer(images, delay=0.1)  # as benchmarks.run: a remote site that takes 100 ms per image
    settings = Settings.from_env().replace(
        storage_dir=tmp / "images",
        rate_limit="1000000/minute",
        result_cache=False,
        log_json=False,
        fetch_allow_hosts=frozenset({f"127.0.0.1:{slow.port}"}),
    )
    service = Service(settings, tmp)
    results: dict = {}
    try:
        singles = single_image_client(service.url, images)
        results["single"] = profile(
            service, "single", tmp, args.singles, lambda: run_clients(args.singles, args.concurrency, singles)
        )

        def urls():
            body = {"urls": [slow.url(i) for i in range(args.urls)]}
            resp = requests.post(service.url + "/api/v1/batches", json=body, timeout=120)
            assert wait_batch(service.url, resp.json()["batch_id"])["counts"]["done"] == args.urls

        results["urls"] = profile(service, "urls", tmp, args.urls, urls)
    finally:
        service.close()
        slow.shutdown()
    results["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count()}
    results["git_commit"] = git_commit()
    results["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
