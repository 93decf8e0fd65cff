"""`python -m client submit`: many URLs or image files in, one result line per input out.

Resumable: results already in the output file are not asked for again, and inputs that were
submitted but not yet written (the state file beside the output remembers their job ids)
are polled, not resubmitted.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from client.api import ApiError, Client

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
FINAL = ("done", "failed")


def read_inputs(source: Path) -> tuple[str, list[str]]:
    """("files", paths) for a folder or an image; ("urls", urls) for a text file of URLs."""
    if source.is_dir():
        return "files", sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return "files", [str(source)]
    lines = (line.strip() for line in source.read_text().splitlines())
    return "urls", list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


class ResultWriter:
    """Appends one row per input, as JSON lines or CSV (by the file's extension)."""

    def __init__(self, path: Path, top_k: int):
        self.path, self.top_k = path, top_k
        self.csv = path.suffix.lower() == ".csv"
        self.fields = ["input", "status"] + [f for i in range(1, top_k + 1) for f in (f"label_{i}", f"probability_{i}")] \
            + ["error_code", "error_message", "job_id"]

    def done_inputs(self) -> set[str]:
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
                for r in rows:
                    flat = {"input": r["input"], "status": r["status"], "job_id": r.get("job_id", ""),
                            "error_code": (r.get("error") or {}).get("code", ""),
                            "error_message": (r.get("error") or {}).get("message", "")}
                    for i, p in enumerate(r.get("predictions") or [], start=1):
                        flat[f"label_{i}"], flat[f"probability_{i}"] = p["label"], p["probability"]
                    w.writerow(flat)
            else:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


class State:
    """input -> (batch_id, job_id) for submitted inputs whose results are not written yet."""

    def __init__(self, path: Path):
        self.path = path
        self.jobs: dict[str, list[str]] = json.loads(path.read_text())["jobs"] if path.exists() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"jobs": self.jobs}))
        tmp.replace(self.path)


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def submit(client: Client, source: Path, out: Path, top_k: int = 3, batch_size: int = 500,
           progress=None) -> dict:
    kind, inputs = read_inputs(source)
    writer = ResultWriter(out, top_k)
    state = State(out.with_name(out.name + ".state.json"))
    done = writer.done_inputs()
    todo = [i for i in inputs if i not in done]
    waiting = {i: state.jobs[i] for i in todo if i in state.jobs}  # submitted by an earlier run
    fresh = [i for i in todo if i not in waiting]
    counts = {"inputs": len(inputs), "already_done": len(done), "resumed": len(waiting), "submitted": 0}
    if progress:
        progress.start(total=len(inputs), done=len(done))

    active: dict[str, dict] = {}  # batch_id -> {job_id: input}
    for inp, (batch_id, job_id) in waiting.items():
        active.setdefault(batch_id, {})[job_id] = inp

    def send(group: list[str]) -> None:
        body = client.submit_urls(group, top_k) if kind == "urls" else client.submit_files([Path(p) for p in group], top_k)
        active[body["batch_id"]] = {}
        for inp, job in zip(group, body["jobs"]):
            state.jobs[inp] = [body["batch_id"], job["job_id"]]
            active[body["batch_id"]][job["job_id"]] = inp
        state.save()
        counts["submitted"] += len(group)

    pending = list(chunks(fresh, batch_size))
    versions: dict[str, int] = {}
    while pending or active:
        if pending and len(active) < 4:  # keep a few batches in flight, not the whole list
            try:
                send(pending[0])
                pending.pop(0)
                continue
            except ApiError as exc:
                if exc.status < 500 and exc.code not in ("rate_limited",):
                    # The server refused the whole request: every input in it gets that error.
                    rows = [{"input": i, "status": "failed", "predictions": None,
                             "error": {"code": exc.code, "message": exc.message}} for i in pending.pop(0)]
                    writer.write(rows)
                    if progress:
                        progress.advance(len(rows), failed=len(rows))
                    continue
                raise
        for batch_id in list(active):
            try:
                batch = client.batch(batch_id, wait=2 if len(active) == 1 else 0.5,
                                     since=versions.get(batch_id))
            except ApiError as exc:
                if exc.status != 404:
                    raise
                # Expired or lost (Redis wiped): submit those inputs again.
                pending.append([inp for inp in active.pop(batch_id).values()])
                continue
            versions[batch_id] = batch["version"]
            rows = []
            for job in batch["jobs"]:
                inp = active[batch_id].get(job["job_id"])
                if inp is not None and job["status"] in FINAL:
                    rows.append({"input": inp, "status": job["status"], "predictions": job["predictions"],
                                 "error": job["error"], "job_id": job["job_id"]})
                    del active[batch_id][job["job_id"]]
            if rows:
                writer.write(rows)
                for r in rows:
                    state.jobs.pop(r["input"], None)
                state.save()
                if progress:
                    progress.advance(len(rows), failed=sum(r["status"] == "failed" for r in rows))
            if not active[batch_id]:
                del active[batch_id]
    state.path.unlink(missing_ok=True)
    if progress:
        progress.stop()
    return counts
