"""The web tier under abuse, against the real gunicorn (and a real worker where one is needed),
on loopback: waiting and slow clients cannot stall it, images cannot bloat it, and limits hold."""

import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests
from PIL import Image

from shared.settings import REPO_ROOT
from tests.helpers import image_bytes, noise_png, post_images, wait_until
from tools.slowclients import slowloris
from tools.stack import free_port


def latencies(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        fn()
        out.append(time.monotonic() - t0)
    return out


def healthz(stack) -> None:
    assert requests.get(stack.url + "/healthz", timeout=30).status_code == 200


class TreeRss:
    """Peak and current RSS of a process tree (gunicorn's master and its workers), sampled."""

    def __init__(self, pid: int):
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> int:
        procs = [self.root] + self.root.children(recursive=True)
        return max(p.memory_info().rss for p in procs)  # the largest single process

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self):
        self._stop.set()


# --- 1. waiting never starves serving --------------------------------------------------------------
def test_200_held_long_polls_leave_health_checks_and_submissions_fast(stack_factory):
    stack = stack_factory(long_poll_max_waiters=60)  # 2 processes x 60 held; the other 80 are answered at once
    batch = post_images(stack, [("a.png", noise_png(1))]).json()  # no worker: it stays unfinished
    version = stack.get_batch(batch["batch_id"])["version"]
    url = f"{stack.url}/api/v1/batches/{batch['batch_id']}"

    def poll(_):
        t0 = time.monotonic()
        r = requests.get(url, params={"wait": 20, "since": version}, timeout=60)
        return r.status_code, r.headers.get("Retry-After"), time.monotonic() - t0

    with ThreadPoolExecutor(200) as pool:
        polls = [pool.submit(poll, i) for i in range(200)]
        time.sleep(2)  # all of them sent and held
        health = latencies(lambda: healthz(stack), 20)
        submits = latencies(lambda: post_images(stack, [("b.png", noise_png(2))]).raise_for_status(), 5)
        answers = [p.result() for p in polls]
    assert statistics.median(health) < 1 and max(health) < 2, health
    assert statistics.median(submits) < 1 and max(submits) < 2, submits
    busy = [a for a in answers if a[1] is not None]
    held = [a for a in answers if a[1] is None]
    assert all(code == 200 for code, _, _ in answers)
    assert len(held) <= 120 and busy  # the cap held, and the polls past it were not queued:
    assert all(took < 5 and after == "2" for _, after, took in busy)  # answered at once, with Retry-After


# --- 2. slow clients cannot hold the server --------------------------------------------------------
def test_100_slowloris_connections_neither_stall_the_server_nor_stay_open(stack_factory):
    stack = stack_factory()
    with slowloris(stack.port, 100) as conns:
        health = latencies(lambda: healthz(stack), 20)
        assert statistics.median(health) < 1 and max(health) < 2, health
        time.sleep(6)  # past the 5 s deadline for a request's head
        closed = 0
        for s in conns:
            s.settimeout(2)
            try:
                closed += s.recv(100) == b""
            except OSError:
                closed += 1
        assert closed == 100  # the server let go of every one of them


# --- 3. decoding has a memory and CPU budget ----------------------------------------------------------
def big_png(side: int) -> bytes:
    """A large RGBA PNG that compresses to almost nothing (a 6300 px one: about 150 KB)."""
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (40, 90, 160, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_large_pngs_are_refused_at_once_and_cost_the_web_tier_little(stack_factory):
    stack = stack_factory()
    huge = big_png(6300)  # 39.7 MP: under MAX_IMAGE_PIXELS, over what a full-size decode may be
    rss = TreeRss(stack.web.pid)
    try:
        start = rss.now()
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post_images(stack, [("huge.png", huge)]), range(3)))
        assert all(a.status_code == 413 and a.json()["error"]["code"] == "too_many_pixels" for a in answers)
        assert "decoded at full size" in answers[0].json()["error"]["message"]
        # The largest PNG that may be decoded, three at once: bounded, and given back.
        allowed = big_png(4000)  # 16 MP
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post_images(stack, [("ok.png", allowed)]), range(3)))
        assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
        time.sleep(0.5)
        assert rss.peak < 600 * 2**20, f"peak RSS {rss.peak / 2**20:.0f} MB"
        assert rss.now() - start < 100 * 2**20, f"RSS {rss.now() / 2**20:.0f} MB after, {start / 2**20:.0f} before"
    finally:
        rss.stop()


def test_a_request_may_decode_only_so_many_pixels_in_all(stack_factory):
    stack = stack_factory(max_request_decode_pixels=40_000_000)
    allowed = big_png(4000)  # 16 MP each: two fit in 40 MP, the third does not
    t0 = time.monotonic()
    resp = post_images(stack, [(f"{i}.png", allowed) for i in range(5)])
    assert resp.status_code == 202 and time.monotonic() - t0 < 30
    jobs = resp.json()["jobs"]
    assert [j["status"] for j in jobs] == ["queued", "queued", "failed", "failed", "failed"]
    assert jobs[2]["error"]["code"] == "too_many_pixels" and "another request" in jobs[2]["error"]["message"]


def test_a_fetch_process_decodes_large_images_within_its_budget(stack_factory, tmp_path):
    from tools.imageserver import ImageServer

    server = ImageServer([big_png(4000)], delay=0.0)
    try:
        stack = stack_factory(
            fetch_allow_hosts=frozenset({f"127.0.0.1:{server.port}"}), decode_budget_bytes=160_000_000
        )
        worker = stack.add_worker("fetch")
        wait_until(lambda: len(psutil.Process(worker.pid).children()) >= 2, 30, "the fetch workers")
        time.sleep(3)  # the fetch workers are up
        rss = TreeRss(worker.pid)
        start = rss.now()
        body = requests.post(
            stack.url + "/api/v1/batches", json={"urls": [server.url(i) for i in range(4)]}, timeout=30
        ).json()
        fetched = lambda: stack.get_batch(body["batch_id"])["counts"]["queued"] == 4
        wait_until(fetched, 60, "the four images to be fetched")  # no predict worker: they stay queued
        time.sleep(0.5)
        rss.stop()
        assert rss.peak < 600 * 2**20, f"fetch process peak RSS {rss.peak / 2**20:.0f} MB"
        assert rss.now() - start < 100 * 2**20
    finally:
        server.shutdown()


# --- 4. one rate-limit budget per client ---------------------------------------------------------------
def test_one_budget_per_client_for_every_way_of_submitting(stack_factory):
    stack = stack_factory(rate_limit="2/minute")
    first = post_images(stack, [("a.png", noise_png(1))])
    bad = requests.post(stack.url + "/api/v1/batches", json={"urls": ["ftp://x/a.jpg"]}, timeout=10)
    assert first.status_code == 202 and bad.status_code == 400
    assert "Retry-After" not in first.headers and "Retry-After" not in bad.headers  # only on 429 and 503
    refused = post_images(stack, [("b.png", noise_png(2))], path="/api/v1/jobs")  # another route, same budget
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 60


# --- 5. every malformed body gets a specific 4xx --------------------------------------------------------
def test_deeply_nested_json_is_a_400(stack_factory):
    stack = stack_factory()
    resp = requests.post(
        stack.url + "/api/v1/batches", data="[" * 100000, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_a_file_name_that_is_not_utf8_fails_that_file_alone(stack_factory):
    stack = stack_factory()
    png = noise_png(1)
    body = (
        b'--B\r\nContent-Disposition: form-data; name="images"; filename="\xe9t\xe9.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png + b'\r\n--B\r\nContent-Disposition: form-data; name="images"; '
        b'filename="ok.png"\r\nContent-Type: image/png\r\n\r\n' + png + b"\r\n--B--\r\n"
    )
    resp = requests.post(
        stack.url + "/api/v1/batches",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=B"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    bad, ok = resp.json()["jobs"]
    assert bad["status"] == "failed" and bad["error"]["code"] == "bad_filename"
    assert ok["status"] == "queued" and ok["source"]["value"] == "ok.png"


def test_a_full_batch_of_urls_in_a_form_field_is_accepted_and_more_is_a_413_naming_the_form(stack_factory):
    stack = stack_factory()
    urls = "\n".join(f"https://example.com/{i:04d}/" + "a" * 1090 + ".jpg" for i in range(1000))  # 1.1 KB each
    # Multipart, as the page sends its form (Werkzeug bounds a multipart text field in memory).
    resp = requests.post(stack.url + "/api/v1/batches", files={"urls": (None, urls)}, timeout=60)
    assert resp.status_code == 202 and len(resp.json()["jobs"]) == 1000
    too_long = "\n".join("https://example.com/" + "b" * 2300 for _ in range(1000))  # 2.3 MB in one field
    resp = requests.post(stack.url + "/api/v1/batches", files={"urls": (None, too_long)}, timeout=60)
    assert resp.status_code == 413 and "form field" in resp.json()["error"]["message"], resp.text


def test_a_jpeg_whose_data_ends_before_its_declared_size_is_refused(stack_factory):
    stack = stack_factory()
    data = bytearray(image_bytes("JPEG", size=(64, 64)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (6000).to_bytes(2, "big") * 2  # the header now claims 6000x6000
    resp = post_images(stack, [("liar.jpg", bytes(data))])
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "corrupt_image"


# --- 7. small items --------------------------------------------------------------------------------------
def test_cookies_banner_and_metrics(stack_factory):
    stack = stack_factory(metrics_token="s3cret")
    page = requests.get(stack.url + "/", timeout=10)
    assert "SameSite=Lax" in page.headers["Set-Cookie"] and "HttpOnly" in page.headers["Set-Cookie"]
    assert "Server" not in page.headers  # no "gunicorn" banner
    assert requests.get(stack.url + "/metrics", timeout=10).status_code == 403
    bearer = {"Authorization": "Bearer s3cret"}
    assert requests.get(stack.url + "/metrics", headers=bearer, timeout=10).status_code == 200


def test_make_run_restarts_a_crashed_embedded_redis_and_leaves_no_temp_folder(tmp_path):
    port = free_port()
    before = set(os.listdir("/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {
        "PORT": str(port),
        "LOG_JSON": "0",
        "STORAGE_DIR": str(tmp_path / "images"),
    }
    stack = subprocess.Popen(
        [sys.executable, "-m", "tools.stack"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: (
                requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
                if _listening(port)
                else False
            ),
            120,
            "make run to be ready",
            interval=0.5,
        )
        [redis] = redis_servers(stack.pid)
        redis.kill()
        wait_until(lambda: [p for p in redis_servers(stack.pid) if p.pid != redis.pid], 30, "a new redis-server")
        wait_until(
            lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200, 60, "ready again"
        )
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        _, err = stack.communicate(timeout=60)
    assert "restarting it (1 of 3)" in err, err[-2000:]
    left = {n for n in set(os.listdir("/tmp")) - before if n.startswith(("cifar-svc-", "metrics-web-"))}
    assert not left, left


def redis_servers(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children():
        try:
            if "redis-server" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:  # a killed one, not yet reaped
            pass
    return out


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
