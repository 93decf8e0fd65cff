"""The command-line client against the real running service."""

import csv
import http.server
import json
import socket
import threading

import pytest

from client.__main__ import main
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


class StopAfterFirstResults:
    """A progress display that stops the run (as Ctrl-C would) when the first results arrive."""

    def start(self, total, done):
        pass

    def advance(self, n, failed=0):
        raise KeyboardInterrupt

    def stop(self):
        pass


def interrupted_run(url_stack, tmp_path, out_name: str):
    """Six URLs submitted in batches of two, the run stopped by Ctrl-C after its first results:
    (the URL list, the output, a client of the stack)."""
    stack, images = url_stack
    src = tmp_path / "urls.txt"
    src.write_text("\n".join(images.url(i) for i in range(6)))
    out = tmp_path / out_name
    with pytest.raises(KeyboardInterrupt):
        submit(Client(stack.url), src, out, batch_size=2, progress=StopAfterFirstResults())
    return src, out, Client(stack.url)


def test_an_interrupted_run_resumes_without_resubmitting(url_stack, tmp_path):
    src, out, client = interrupted_run(url_stack, tmp_path, "results.jsonl")
    first = read_jsonl(out)
    assert 0 < len(first) < 6
    counts = submit(client, src, out, batch_size=2)
    rows = read_jsonl(out)
    assert sorted(r["input"] for r in rows) == sorted(src.read_text().split())  # each exactly once
    assert counts["already_done"] == len(first)
    assert counts["submitted"] + counts["resumed"] == 6 - len(first)
    assert counts["resumed"] > 0  # what was in flight was polled, not sent again


def test_get_prints_a_batch_or_a_job(url_stack, tmp_path, capsys):
    stack, _ = url_stack
    body = Client(stack.url).submit_files([_write(tmp_path / "a.png", noise_png(1))])
    assert main(["--server", stack.url, "get", body["batch_id"]]) == 0
    assert json.loads(capsys.readouterr().out)["batch_id"] == body["batch_id"]
    assert main(["--server", stack.url, "get", body["jobs"][0]["job_id"]]) == 0
    assert json.loads(capsys.readouterr().out)["job_id"] == body["jobs"][0]["job_id"]


def _write(path, data):
    path.write_bytes(data)
    return path


class Scripted:
    """An HTTP server on loopback that answers POSTs from a script: each step is (status,
    headers) or "drop" (close the connection without answering). It keeps every body it read."""

    def __init__(self, steps):
        self.steps, self.bodies = list(steps), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                step = outer.steps.pop(0) if outer.steps else (202, {})
                if step == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, headers = step
                body = (
                    {"batch_id": "b" * 32, "jobs": []}
                    if status == 202
                    else {
                        "error": {
                            "code": "service_unavailable" if status == 503 else "rate_limited",
                            "message": "later",
                        }
                    }
                )
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def scripted():
    servers = []

    def make(*steps):
        servers.append(Scripted(steps))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_the_client_retries_429_and_503_as_told_by_retry_after(scripted):
    server = scripted((429, {"Retry-After": "0"}), (429, {"Retry-After": "0"}), (503, {"Retry-After": "0"}))
    slept = []
    body = Client(server.url, sleep=slept.append).submit_urls(["https://x/a.jpg"])
    assert body["batch_id"] == "b" * 32 and len(server.bodies) == 4 and slept == [0.0, 0.0, 0.0]


def test_without_retry_after_the_client_backs_off_exponentially(scripted):
    server = scripted((503, {}), (503, {}), (503, {}))
    slept = []
    Client(server.url, sleep=slept.append).submit_urls(["https://x/a.jpg"])
    assert slept == [1.0, 2.0, 4.0] and len(server.bodies) == 4


def test_a_dropped_connection_is_retried(scripted):
    server = scripted("drop")
    slept = []
    body = Client(server.url, sleep=slept.append).submit_urls(["https://x/a.jpg"])
    assert body["batch_id"] == "b" * 32 and slept == [1.0] and len(server.bodies) == 2


@pytest.mark.parametrize("first", [(503, {}), "drop"])
def test_every_retry_sends_the_files_whole(scripted, tmp_path, first):
    photo = _write(tmp_path / "a.png", noise_png(5, size=(64, 64)))
    server = scripted(first)
    Client(server.url, sleep=lambda s: None).submit_files([photo])
    assert len(server.bodies) == 2
    assert all(photo.read_bytes() in body for body in server.bodies)  # not an empty rest of the file


def test_a_run_killed_in_the_middle_of_a_write_resumes(url_stack, tmp_path):
    """A kill during a write leaves half a line at the end of the output: resume used to fail
    on it with a JSONDecodeError (and would have glued the next line to it)."""
    src, out, client = interrupted_run(url_stack, tmp_path, "results.jsonl")
    pending = json.loads((tmp_path / "results.jsonl.state.json").read_text())["jobs"]
    assert pending  # some inputs were in flight
    with open(out, "a") as f:
        f.write('{"input": "' + next(iter(pending))[:20])  # the write the kill cut short
    counts = submit(client, src, out, batch_size=2)
    rows = read_jsonl(out)  # every line parses
    assert sorted(r["input"] for r in rows) == sorted(src.read_text().split())  # each exactly once
    assert counts["resumed"] == len(pending)  # in flight: polled, not sent again


def test_a_resumed_csv_has_one_header_and_each_input_once(url_stack, tmp_path):
    src, out, client = interrupted_run(url_stack, tmp_path, "results.csv")
    submit(client, src, out, batch_size=2)
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["input"] for r in rows) == sorted(src.read_text().split())
    assert out.read_text().count("input,status") == 1 and all(r["status"] == "done" for r in rows)


def test_inputs_of_a_batch_the_server_lost_are_submitted_again(url_stack, tmp_path):
    """The state file names a batch the server does not know (expired, or Redis wiped): 404."""
    stack, images = url_stack
    src = tmp_path / "urls.txt"
    urls = [images.url(i) for i in range(3)]
    src.write_text("\n".join(urls))
    out = tmp_path / "results.jsonl"
    lost = {u: ["f" * 32, f"{i:032x}"] for i, u in enumerate(urls)}
    (tmp_path / "results.jsonl.state.json").write_text(json.dumps({"jobs": lost}))
    counts = submit(Client(stack.url), src, out, batch_size=2)
    rows = read_jsonl(out)
    assert counts["resumed"] == 3 and sorted(r["input"] for r in rows) == sorted(urls)
    assert all(r["status"] == "done" and r["job_id"] not in {j for _, j in lost.values()} for r in rows)


def test_cancel_stops_a_batch_and_a_job(stack_factory, tmp_path, capsys):
    stack = stack_factory()  # no worker: what is queued stays unfinished
    client = Client(stack.url)
    batch = client.submit_files([_write(tmp_path / f"{i}.png", noise_png(i)) for i in range(3)])
    assert main(["--server", stack.url, "cancel", batch["batch_id"]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["batch_id"] == batch["batch_id"] and printed["counts"]["cancelled"] == 3
    job = client.submit_files([_write(tmp_path / "j.png", noise_png(9))])["jobs"][0]["job_id"]
    assert main(["--server", stack.url, "cancel", job]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
