"""The deployment, really run: docker-compose.yml built, scaled out and put under faults.

    make test-compose        (marked `compose`, so not part of `make test`)

The stack (tests/deployment/conftest.py): Redis (AOF on), web behind nginx, three worker
containers of one CPU each, the fetcher, Flower, and an image server on the compose network.
In order: 300 images, a URL batch, thumbnails, health, metrics, Flower; nginx against slow and
oversized requests; what runs as whom and which host ports are bound; then one worker
container SIGKILLed in the middle of a 1,000-image batch, and Redis restarted in the middle of
another 1,000-image batch, each followed by the proof that no job was lost or duplicated.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import threading
import time
from collections import Counter

import pytest
import requests

from shared.logs import final_writes
from shared.settings import Settings
from tests.deployment.compose import (
    FIGURES,
    WORKER_CPUS,
    WORKERS,
    Stack,
    accuracy,
    as_files,
    docker,
    wait_ready,
)
from tests.helpers import parse_time

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

RECOVERY_TARGET_S = 15.0  # a killed worker container's jobs all done (issue 21)
REDIS_RECOVERY_TARGET_S = 20.0  # a Redis restart's batch done


def _written(stack: Stack) -> Counter:
    """Job id -> how many times a worker container wrote its final status, all containers."""
    total = Counter()
    for log in stack.worker_logs().values():
        total.update(final_writes(log))
    return total


def _assert_none_lost_or_duplicated(stack: Stack, submitted: dict, batch: dict) -> None:
    ids = [j["job_id"] for j in submitted["jobs"]]
    assert len(set(ids)) == len(ids) == batch["total"] == len(batch["jobs"])
    assert {j["job_id"] for j in batch["jobs"]} == set(ids)
    assert batch["counts"]["done"] == batch["total"], batch["counts"]  # none lost
    assert all(j["status"] == "done" and len(j["predictions"]) == 3 for j in batch["jobs"])
    written = _written(stack)
    twice = {j: n for j in ids if (n := written[j]) != 1}
    assert not twice, f"{len(twice)} jobs' results not written exactly once: {list(twice.items())[:5]}"


def _wait_done(stack: Stack, batch_id: str, at_least: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = stack.batch(batch_id, since=10**9)  # the counts only: no job has changed since then
        if b and b["counts"]["done"] >= at_least:
            return b
        time.sleep(0.1)
    raise AssertionError(f"fewer than {at_least} jobs of {batch_id} done after {timeout} s")


# --- the service works -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_batch(stack, test_images):
    images = test_images[:300]
    t0 = time.monotonic()
    submitted = stack.submit(as_files(images))
    batch = stack.wait_batch(submitted["batch_id"], timeout=180)
    FIGURES["batch_images"], FIGURES["batch_s"] = len(images), round(time.monotonic() - t0, 1)
    return images, submitted, batch


def test_300_images_are_classified(stack, first_batch):
    images, submitted, batch = first_batch
    _assert_none_lost_or_duplicated(stack, submitted, batch)
    acc = accuracy(images, batch)
    if acc is not None:  # real CIFAR-10 test images: the shipped model scores 91.6 % on them
        FIGURES["accuracy"] = round(acc, 3)
        assert acc >= 0.8, f"top-1 accuracy {acc:.1%} on {len(images)} CIFAR-10 test images"


def test_at_least_two_worker_containers_did_the_work(stack, first_batch):
    _, submitted, _ = first_batch
    ids = {j["job_id"] for j in submitted["jobs"]}
    per_container = {
        name: sum(n for j, n in final_writes(log).items() if j in ids) for name, log in stack.worker_logs().items()
    }
    FIGURES["jobs_per_worker"] = sorted(per_container.values(), reverse=True)
    assert len(per_container) == WORKERS
    assert sum(1 for n in per_container.values() if n) >= 2, per_container


@pytest.fixture(scope="module")
def url_batch(stack):
    urls = [f"http://imageserver:8000/{n}.jpg" for n in range(20)]
    refused = "http://web:80/secret.jpg"  # a private address not in FETCH_ALLOW_HOSTS
    submitted = stack.submit(urls=urls + [refused])
    return urls, refused, stack.wait_batch(submitted["batch_id"], timeout=120)


def test_urls_are_fetched_from_a_site_on_the_compose_network(url_batch):
    urls, refused, batch = url_batch
    by_url = {j["source"]["value"]: j for j in batch["jobs"]}
    assert [by_url[u]["status"] for u in urls] == ["done"] * len(urls), [by_url[u] for u in urls][:3]
    assert all(by_url[u]["image"] and len(by_url[u]["predictions"]) == 3 for u in urls)
    # Allowing imageserver:8000 opened exactly that: other private addresses stay refused.
    assert by_url[refused]["status"] == "failed" and by_url[refused]["error"]["code"] == "url_not_allowed"


def test_thumbnails_are_served_for_uploads_and_fetched_urls(stack, first_batch, url_batch):
    # An upload is stored by web, a fetched URL by the fetcher: both on the shared volume.
    shas = [first_batch[2]["jobs"][0]["image"], next(j["image"] for j in url_batch[2]["jobs"] if j["image"])]
    for sha in shas:
        r = stack.http.get(f"{stack.url}/images/{sha}.jpg", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg", (sha, r.status_code)
        assert r.content[:2] == b"\xff\xd8"


def test_readyz_and_metrics_through_nginx(stack, first_batch):
    r = stack.http.get(stack.url + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["checks"]["workers"] >= WORKERS, r.text
    assert stack.http.get(stack.url + "/metrics", timeout=10).status_code == 403  # never open to the world
    token = stack.compose.env["METRICS_TOKEN"]
    m = stack.http.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert m.status_code == 200
    # Summed over both gunicorn workers (multiprocess mode): every upload of the first batch.
    submitted = sum(float(v) for v in re.findall(r'^jobs_submitted_total\{source="upload"\} (\S+)$', m.text, re.M))
    assert submitted >= 300, m.text[:2000]


def test_flower_answers_with_basic_auth_only_and_shows_how_predictions_ended(stack, first_batch):
    api = stack.flower_url + "/api/workers"
    assert requests.get(api, timeout=10).status_code == 401
    assert requests.get(api, auth=(stack.flower_auth[0], "wrong"), timeout=10).status_code == 401
    assert requests.get(stack.flower_url + "/", timeout=10).status_code == 401  # the dashboard too
    deadline, workers = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        r = requests.get(api, params={"refresh": "1"}, auth=stack.flower_auth, timeout=30)
        assert r.status_code == 200, r.text[:300]
        workers = r.json()
        if sum(name.startswith("predict-") for name in workers) >= WORKERS:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"Flower lists {sorted(workers)}")
    # Each prediction message of the first batch: SUCCESS (celery-batches sends no events of its
    # own for the tasks of a batch; the workers send them: worker.factory.send_task_events). A
    # message holds up to PREDICT_CHUNK jobs, and its task id is its first job's.
    ids = {j["job_id"] for j in first_batch[1]["jobs"]}
    tasks = requests.get(
        stack.flower_url + "/api/tasks", params={"limit": 5000}, auth=stack.flower_auth, timeout=30
    ).json()
    states = Counter(tasks[i]["state"] for i in ids if i in tasks)
    FIGURES["flower_states"] = dict(states)
    assert states == {"SUCCESS": math.ceil(len(ids) / Settings().predict_chunk)}, states


# --- nginx in front of gunicorn ----------------------------------------------------------------
def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_nginx_names_no_version_and_refuses_oversized_requests_before_reading_them(stack):
    r = stack.http.get(stack.url + "/healthz", timeout=10)
    assert r.headers["Server"] == "nginx"
    with socket.create_connection(_host_port(stack.url), timeout=10) as s:
        # 300 MiB announced, nothing sent: refused at once, on the header (MAX_REQUEST_BYTES is 256 MiB).
        s.sendall(
            b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: %d\r\n\r\n" % (300 << 20)
        )
        assert s.recv(200).split(b"\r\n")[0] == b"HTTP/1.1 413 Request Entity Too Large"


def test_slow_clients_hold_no_gunicorn_thread(stack):
    # gunicorn has 2 x 16 threads; 100 clients stuck mid-header or mid-body would hold them all.
    slow = []
    try:
        for i in range(100):
            s = socket.create_connection(_host_port(stack.url), timeout=10)
            s.sendall(
                b"GET /readyz HTTP/1.1\r\nHost: x\r\n"
                if i % 2
                else b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n--b"
            )
            slow.append(s)
        t0 = time.monotonic()
        for _ in range(20):
            assert stack.http.get(stack.url + "/api/v1/openapi.json", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 5
    finally:
        for s in slow:
            s.close()


# --- security by default -----------------------------------------------------------------------
def test_nothing_runs_as_root_and_only_nginx_and_flower_bind_host_ports(stack):
    names = docker(
        "ps", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={stack.compose.project}"
    ).split()
    assert len(names) == 6 + WORKERS  # redis, nginx, web, fetcher, flower, imageserver and the workers
    for name in names:
        uids = [line.split()[1] for line in docker("top", name, "-eo", "pid,uid").splitlines()[1:]]
        assert uids and "0" not in uids, f"{name} runs processes as root: {uids}"
    published = {}
    for name in names:
        ports = docker("port", name, check=False).split("\n")
        published[name] = [p.split(" -> ")[1] for p in ports if " -> " in p]
    bound = {n: p for n, p in published.items() if p}
    assert sorted(n.split("_")[1] for n in bound) == ["flower", "nginx"], bound
    assert all(p.startswith("127.0.0.1:") for ps in bound.values() for p in ps), bound


# --- faults ------------------------------------------------------------------------------------
class LongPoll(threading.Thread):
    """GET a job with ?wait=25 through nginx, in the background (a 25 s long poll must pass)."""

    def __init__(self, stack: Stack, job_id: str):
        super().__init__(daemon=True)
        self.stack, self.job_id, self.result = stack, job_id, None

    def run(self):
        t0 = time.monotonic()
        try:
            r = requests.get(f"{self.stack.url}/api/v1/jobs/{self.job_id}", params={"wait": 25}, timeout=60)
            self.result = (r.status_code, time.monotonic() - t0, r.json().get("status"))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.result = (repr(exc), time.monotonic() - t0, None)


@contextlib.contextmanager
def slowed_workers(stack: Stack, cpus: str):
    """The worker containers with fewer CPUs for a while (`docker update`, kept across a
    restart): at full speed a 1,000-image batch was done before the fault landed."""
    workers = stack.compose.containers("worker")
    docker("update", "--cpus", cpus, *workers)
    try:
        yield
    finally:
        docker("update", "--cpus", WORKER_CPUS, *workers, check=False)


@pytest.fixture(scope="module")
def worker_kill(stack, test_images):
    """A 1,000-image batch; when a tenth is done, SIGKILL a worker container (it holds
    prefetched and running jobs). Meanwhile, a URL job waits for the paused
    fetcher under a 25 s long poll (the kill's wait is long enough to test that too). Until
    the kill the worker containers have a fifth of a CPU each: at full speed the batch was done
    before the upload's answer came back."""
    images = test_images[300:1300]
    [fetcher] = stack.compose.containers("fetcher")
    docker("pause", fetcher)
    try:
        [url_job] = stack.submit(urls=["http://imageserver:8000/42.jpg"])["jobs"]
        poll = LongPoll(stack, url_job["job_id"])
        poll.start()
        # Every worker container holds a prefetch window of the batch; reading their logs to
        # choose one took long enough for the batch to finish first.
        victim = stack.compose.containers("worker")[0]
        with slowed_workers(stack, "0.2"):  # until the kill: the recovery runs at full speed
            submitted = stack.submit(as_files(images))
            ids = {j["job_id"] for j in submitted["jobs"]}
            at_kill = _wait_done(stack, submitted["batch_id"], len(images) // 10)
            held = int(stack.redis("HLEN", "unacked"))
            pid = int(docker("inspect", "-f", "{{.State.Pid}}", victim))
            # From the host, to the container's init: the kernel kills everything in it at once,
            # and Docker sees a crash (exit 137), so the restart policy brings the container back.
            os.kill(pid, signal.SIGKILL)
            killed_at = time.time()
        batch = stack.wait_batch(submitted["batch_id"], timeout=300)
        poll.join(60)
    finally:
        docker("unpause", fetcher, check=False)
    recovery = max(parse_time(j["finished_at"]) for j in batch["jobs"]) - killed_at
    FIGURES["recovery_s"] = round(recovery, 1)
    per_container = {name: sum(1 for j in final_writes(log) if j in ids) for name, log in stack.worker_logs().items()}
    FIGURES["kill"] = dict(
        victim=victim,
        done_at_kill=at_kill["counts"]["done"],
        unacked_at_kill=held,
        done_by_container=per_container,
    )
    return dict(
        submitted=submitted,
        batch=batch,
        victim=victim,
        recovery=recovery,
        held=held,
        long_poll=poll.result,
        url_job=url_job["job_id"],
    )


def test_no_job_is_lost_or_duplicated_when_a_worker_container_is_killed(stack, worker_kill):
    assert worker_kill["held"] > 0  # the kill did catch jobs in flight
    _assert_none_lost_or_duplicated(stack, worker_kill["submitted"], worker_kill["batch"])
    # Its restart policy brought the killed container back.
    assert int(docker("inspect", "-f", "{{.RestartCount}}", worker_kill["victim"])) >= 1


def test_killed_workers_jobs_finish_within_15_s_of_the_kill(worker_kill):
    """It failed in about half the runs, at 61-63 s: the visibility timeout. The killed worker
    had been handed one or two messages it had not yet recorded (it records what it receives
    some milliseconds later), so the janitor never re-queued those jobs; the janitor now queues
    any unacknowledged message that no live worker recorded (rescue_unrecorded_tasks)."""
    recovery = worker_kill["recovery"]
    assert recovery <= RECOVERY_TARGET_S, (
        f"the killed worker's jobs finished {recovery:.1f} s after the SIGKILL (target {RECOVERY_TARGET_S:.0f} s)"
    )


def test_a_25_s_long_poll_passes_through_nginx(stack, worker_kill):
    code, seconds, status = worker_kill["long_poll"]
    assert code == 200 and seconds >= 24 and status != "done", worker_kill["long_poll"]
    # ...and the job, its fetcher running again, finishes.
    deadline = time.monotonic() + 60
    while (
        stack.http.get(f"{stack.url}/api/v1/jobs/{worker_kill['url_job']}", params={"wait": 10}, timeout=30).json()[
            "status"
        ]
        != "done"
    ):
        assert time.monotonic() < deadline


@pytest.fixture(scope="module")
def redis_restart(stack, test_images, worker_kill):
    """A 1,000-image batch; when nine tenths are done, restart the Redis container (SIGTERM:
    Redis writes its AOF and exits; the same volume comes back). The worker containers have a
    quarter of a CPU each meanwhile (see worker_kill). Nine tenths, not one: restarted at a
    tenth, the figure was mostly the 900 images left, predicted at a quarter CPU: 8 s with the
    CIFAR JPEGs, 21.6 s on a clone without ../shared, whose random PNGs take the cascade's every
    pass (a fresh-clone CI failed on it)."""
    wait_ready(stack, timeout=120)  # the killed worker container is back
    images = test_images[1300:2300]
    assert stack.redis("CONFIG", "GET", "appendonly").split() == ["appendonly", "yes"]
    with slowed_workers(stack, "0.25"):
        t0 = time.monotonic()
        submitted = stack.submit(as_files(images))
        _wait_done(stack, submitted["batch_id"], 9 * len(images) // 10)
        [redis] = stack.compose.containers("redis")
        restarted_at = time.time()
        docker("restart", "-t", "10", redis)
        back_at = time.time()
        batch = stack.wait_batch(submitted["batch_id"], timeout=300)
    FIGURES["redis_batch_s"] = round(time.monotonic() - t0, 1)
    last = max(parse_time(j["finished_at"]) for j in batch["jobs"])
    FIGURES["redis_recovery_s"] = round(last - restarted_at, 1)
    return dict(submitted=submitted, batch=batch, caught_in_flight=last > back_at, recovery=last - restarted_at)


def test_a_redis_restarts_batch_is_done_within_20_s(redis_restart):
    recovery = redis_restart["recovery"]
    assert recovery <= REDIS_RECOVERY_TARGET_S, (
        f"the batch finished {recovery:.1f} s after the Redis restart (target {REDIS_RECOVERY_TARGET_S:.0f} s)"
    )


def test_no_job_is_lost_or_duplicated_across_a_redis_restart(stack, redis_restart):
    assert redis_restart["caught_in_flight"]  # jobs finished after Redis was back: it was mid-batch
    _assert_none_lost_or_duplicated(stack, redis_restart["submitted"], redis_restart["batch"])
    assert stack.http.get(stack.url + "/readyz", timeout=10).status_code == 200
