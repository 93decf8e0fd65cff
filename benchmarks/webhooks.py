"""How soon after a batch's last result does its webhook arrive?

    python -m benchmarks.webhooks [--batches N] [--images K] [--model DIR]

Starts the service (benchmarks.run's Service: its own Redis, gunicorn and `python -m worker`)
and a receiver on loopback, submits N batches of K images one after another, each with a
webhook_url, and prints the delivery latency: the receiver's arrival time minus the latest
finished_at among the batch's jobs (both clocks are this machine's). One JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import json
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchmarks.run import Service, test_images, wait_batch
from shared.machine import cpu_name
from shared.settings import DEFAULT_MODEL_DIR, Settings


class Receiver(http.server.ThreadingHTTPServer):
    """Answers every POST with 204 and keeps (arrival time, body) per webhook-id."""

    def __init__(self):
        self.arrivals: dict[str, tuple[float, dict]] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                at = time.time()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.arrivals.setdefault(self.headers["webhook-id"], (at, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait_for(self, batch_id: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, body in list(self.arrivals.values()):
                if body.get("batch_id") == batch_id:
                    return at
            time.sleep(0.005)
        raise TimeoutError(f"no webhook for batch {batch_id}")


def finished_epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    args = p.parse_args(argv)
    receiver = Receiver()
    tmp = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    settings = Settings.from_env().replace(
        model_dir=Path(args.model),
        storage_dir=tmp / "images",
        rate_limit="1000000/minute",
        log_json=False,
        webhook_secret=secrets.token_urlsafe(24),
        fetch_allow_hosts=frozenset({f"127.0.0.1:{receiver.server_port}"}),
    )
    service = Service(settings, tmp)
    images = test_images(args.images * args.batches)
    latencies = []
    try:
        for b in range(args.batches):
            chunk = images[b * args.images : (b + 1) * args.images]
            resp = requests.post(
                service.url + "/api/v1/batches",
                files=[("images", (f"{i}.jpg", x)) for i, x in enumerate(chunk)],
                data={"webhook_url": f"http://127.0.0.1:{receiver.server_port}/hook"},
                timeout=60,
            )
            resp.raise_for_status()
            batch_id = resp.json()["batch_id"]
            arrived = receiver.wait_for(batch_id)
            batch = wait_batch(service.url, batch_id)
            last = max(finished_epoch(j["finished_at"]) for j in batch["jobs"])
            latencies.append(1000 * (arrived - last))
    finally:
        service.close()
        receiver.shutdown()
    ms = sorted(latencies)
    out = dict(
        cpu=cpu_name(),
        cores=os.cpu_count(),
        batches=args.batches,
        images_per_batch=args.images,
        webhook_latency_median_ms=round(statistics.median(ms), 1),
        webhook_latency_max_ms=round(ms[-1], 1),
        webhook_latency_min_ms=round(ms[0], 1),
    )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
