"""The command-line client against the real running service."""

import http.server
import json
import threading

import pytest

from client.api import Client
from client.submit import submit
from tests.helpers import image_bytes, noise_png


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_url_list_gives_one_line_per_input(url_stack, tmp_path):
    stack, images = url_stack
    urls = [images.url(i) for i in range(7)] + ["ftp://example.com/x.jpg"]
    src = tmp_path / "urls.txt"
    src.write_text("# my photos\n" + "\n".join(urls) + "\n\n")
    out = tmp_path / "results.jsonl"
    counts = submit(Client(stack.url), src, out, top_k=2, batch_size=3)
    rows = read_jsonl(out)
    assert sorted(r["input"] for r in rows) == sorted(urls) and counts["submitted"] == 8
    by_input = {r["input"]: r for r in rows}
    assert all(by_input[u]["status"] == "done" and len(by_input[u]["predictions"]) == 2 for u in urls[:7])
    assert by_input[urls[7]]["error"]["code"] == "url_not_allowed"
    assert not (tmp_path / "results.jsonl.state.json").exists()


def test_a_folder_of_images_to_csv(url_stack, tmp_path):
    stack, _ = url_stack
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(noise_png(i))
    (folder / "sub" / "x.jpg").write_bytes(image_bytes("JPEG"))
    (folder / "notes.txt").write_text("not an image, not picked up")
    out = tmp_path / "r.csv"
    submit(Client(stack.url), folder, out)
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(r["status"] == "done" and r["label_1"] and r["label_3"] for r in rows)


def test_an_interrupted_run_resumes_without_resubmitting(url_stack, tmp_path):
    stack, images = url_stack
    src = tmp_path / "urls.txt"
    src.write_text("\n".join(images.url(i) for i in range(6)))
    out = tmp_path / "results.jsonl"

    class StopAfterFirstResults:
        def start(self, total, done):
            pass

        def advance(self, n, failed=0):
            raise KeyboardInterrupt

        def stop(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        submit(Client(stack.url), src, out, batch_size=2, progress=StopAfterFirstResults())
    first = read_jsonl(out)
    assert 0 < len(first) < 6
    counts = submit(Client(stack.url), src, out, batch_size=2)
    rows = read_jsonl(out)
    assert sorted(r["input"] for r in rows) == sorted(src.read_text().split())  # each exactly once
    assert counts["already_done"] == len(first)
    assert counts["submitted"] + counts["resumed"] == 6 - len(first)
    assert counts["resumed"] > 0  # what was in flight was polled, not sent again


def test_get_prints_a_batch_or_a_job(url_stack, tmp_path, capsys):
    stack, _ = url_stack
    from client.__main__ import main

    body = Client(stack.url).submit_files([_write(tmp_path / "a.png", noise_png(1))])
    assert main(["--server", stack.url, "get", body["batch_id"]]) == 0
    assert json.loads(capsys.readouterr().out)["batch_id"] == body["batch_id"]
    assert main(["--server", stack.url, "get", body["jobs"][0]["job_id"]]) == 0
    assert json.loads(capsys.readouterr().out)["job_id"] == body["jobs"][0]["job_id"]


def _write(path, data):
    path.write_bytes(data)
    return path


class _Flaky(http.server.BaseHTTPRequestHandler):
    """429 twice (Retry-After 0), then 503 once, then a batch."""

    calls = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        _Flaky.calls.append(1)
        n = len(_Flaky.calls)
        status, body = (
            (429, {"error": {"code": "rate_limited", "message": "slow down"}})
            if n <= 2
            else (503, {"error": {"code": "service_unavailable", "message": "later"}})
            if n == 3
            else (202, {"batch_id": "b" * 32, "jobs": []})
        )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_the_client_retries_429_and_503():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    slept = []
    try:
        body = Client(f"http://127.0.0.1:{server.server_address[1]}", sleep=slept.append).submit_urls(
            ["https://x/a.jpg"]
        )
    finally:
        server.shutdown()
    assert body["batch_id"] == "b" * 32 and len(_Flaky.calls) == 4 and slept == [0.0, 0.0, 0.0]
