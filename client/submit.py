"""`cifar-svc submit`: many URLs or image files in, one result line per input out.

Resumable: results already in the output file are not asked for again, and inputs that were
submitted but not yet written (the state file beside the output remembers their job ids)
are polled, not resubmitted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import uuid
from pathlib import Path

from client.api import Client, ServiceError
from shared.formats import SUFFIXES
from shared.schemas import FINAL_STATUSES, TOP_K_DEFAULT

IN_FLIGHT = 4  # batches submitted and not yet finished: a few, not the whole list


def read_inputs(source: Path) -> tuple[str, list[str]]:
    """("files", paths) for a folder or an image; ("urls", urls) for a text file of URLs."""
    if source.is_dir():
        return "files", sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in SUFFIXES)
    if source.suffix.lower() in SUFFIXES:
        return "files", [str(source)]
    lines = (line.strip() for line in source.read_text().splitlines())
    return "urls", list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


class ResultWriter:
    """Appends one row per input, as JSON lines or CSV (by the file's extension)."""

    def __init__(self, path: Path, top_k: int):
        self.path, self.top_k = path, top_k
        self.csv = path.suffix.lower() == ".csv"
        self.fields = (
            ["input", "status"]
            + [f for i in range(1, top_k + 1) for f in (f"label_{i}", f"probability_{i}")]
            + ["uncertain", "error_code", "error_message", "job_id"]
        )

    def repair(self) -> None:
        """A run killed in the middle of a write leaves half a line at the end: cut it off (its
        input is then simply done again), so that the next line starts on a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def done_inputs(self) -> set[str]:
        self.repair()
        if not self.path.exists():
            return set()
        with open(self.path, newline="") as f:
            if self.csv:
                return {row["input"] for row in csv.DictReader(f)}
            return {json.loads(line)["input"] for line in f if line.strip()}

    def write(self, rows: list[dict]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            if self.csv:
                w = csv.DictWriter(f, self.fields)
                if new:
                    w.writeheader()
                w.writerows(self._flat(r) for r in rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _flat(r: dict) -> dict:
        flat = {
            "input": r["input"],
            "status": r["status"],
            "job_id": r.get("job_id", ""),
            "uncertain": {True: "yes", False: "no"}.get(r.get("uncertain"), ""),
            "error_code": (r.get("error") or {}).get("code", ""),
            "error_message": (r.get("error") or {}).get("message", ""),
        }
        for i, p in enumerate(r.get("predictions") or [], start=1):
            flat[f"label_{i}"], flat[f"probability_{i}"] = p["label"], p["probability"]
        return flat


class State:
    """input -> (batch_id, job_id) for submitted inputs whose results are not written yet, and
    the run's id, from which each chunk's Idempotency-Key is derived: a resumed run sends the
    same keys, so a chunk whose answer was lost is answered, not predicted, again."""

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.jobs: dict[str, list[str]] = saved.get("jobs", {})
        self.run_id: str = saved.get("run_id") or uuid.uuid4().hex

    def key(self, inputs: list[str]) -> str:
        return hashlib.sha256("\n".join([self.run_id, *inputs]).encode()).hexdigest()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "jobs": self.jobs}))
        tmp.replace(self.path)


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Run:
    """One `submit`: what is still to send, what is in flight, and where results go."""

    def __init__(self, client: Client, kind: str, writer: ResultWriter, state: State, top_k: int, progress=None):
        self.client, self.kind, self.writer, self.state, self.top_k = client, kind, writer, state, top_k
        self.progress = progress
        self.pending: list[list[str]] = []  # chunks of inputs to send
        self.active: dict[str, dict[str, str]] = {}  # batch_id -> {job_id: input}
        self.versions: dict[str, int] = {}  # batch_id -> the version already read
        self.submitted = 0

    def resume(self, waiting: dict[str, list[str]]) -> None:
        """Poll what an earlier run submitted instead of sending it again."""
        for inp, (batch_id, job_id) in waiting.items():
            self.active.setdefault(batch_id, {})[job_id] = inp

    def until_done(self) -> None:
        while self.pending or self.active:
            if self.pending and len(self.active) < IN_FLIGHT:
                self.send_next()
                continue
            for batch_id in list(self.active):
                self.poll(batch_id)

    def send_next(self) -> None:
        group = self.pending[0]
        self.state.save()  # the run id (hence the key) is on disk before the request goes out
        key = self.state.key(group)
        try:
            if self.kind == "urls":
                body = self.client.submit_urls(group, self.top_k, key)
            else:
                body = self.client.submit_files([Path(p) for p in group], self.top_k, key)
        except ServiceError as exc:
            if exc.status >= 500 or exc.code == "rate_limited":
                raise  # the client retried already; give up for now (a rerun resumes)
            # The server refused the whole request: every input in it gets that error.
            self.pending.pop(0)
            self.finish(
                [
                    {
                        "input": i,
                        "status": "failed",
                        "predictions": None,
                        "error": {"code": exc.code, "message": exc.message},
                    }
                    for i in group
                ]
            )
            return
        self.pending.pop(0)
        self.active[body["batch_id"]] = {}
        for inp, job in zip(group, body["jobs"], strict=True):
            self.state.jobs[inp] = [body["batch_id"], job["job_id"]]
            self.active[body["batch_id"]][job["job_id"]] = inp
        self.state.save()
        self.submitted += len(group)

    def poll(self, batch_id: str) -> None:
        try:
            batch = self.client.batch(
                batch_id, wait=2 if len(self.active) == 1 else 0.5, since=self.versions.get(batch_id)
            )
        except ServiceError as exc:
            if exc.status != 404:
                raise
            self.resubmit(batch_id)
            return
        self.versions[batch_id] = batch["version"]
        jobs = self.active[batch_id]
        rows = [
            {
                "input": jobs.pop(job["job_id"]),
                "status": job["status"],
                "predictions": job["predictions"],
                "uncertain": job.get("uncertain"),
                "error": job["error"],
                "job_id": job["job_id"],
            }
            for job in batch["jobs"]
            if job["job_id"] in jobs and job["status"] in FINAL_STATUSES
        ]
        self.finish(rows)
        if not jobs:
            del self.active[batch_id]

    def resubmit(self, batch_id: str) -> None:
        """The batch expired or was lost (Redis wiped): submit its unfinished inputs again."""
        self.pending.append(list(self.active.pop(batch_id).values()))

    def finish(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.writer.write(rows)
        for r in rows:
            self.state.jobs.pop(r["input"], None)
        self.state.save()
        if self.progress:
            self.progress.advance(len(rows), failed=sum(r["status"] == "failed" for r in rows))


def submit(
    client: Client, source: Path, out: Path, top_k: int = TOP_K_DEFAULT, batch_size: int = 500, progress=None
) -> dict:
    kind, inputs = read_inputs(source)
    writer = ResultWriter(out, top_k)
    state = State(out.with_name(out.name + ".state.json"))
    done = writer.done_inputs()
    todo = [i for i in inputs if i not in done]
    waiting = {i: state.jobs[i] for i in todo if i in state.jobs}  # submitted by an earlier run
    run = Run(client, kind, writer, state, top_k, progress)
    run.resume(waiting)
    run.pending = list(chunks([i for i in todo if i not in waiting], batch_size))
    if progress:
        progress.start(total=len(inputs), done=len(done))
    run.until_done()
    state.path.unlink(missing_ok=True)
    if progress:
        progress.stop()
    return {"inputs": len(inputs), "already_done": len(done), "resumed": len(waiting), "submitted": run.submitted}
