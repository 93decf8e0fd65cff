"""Structured logs: one JSON object per line, with the job id in every line about a job.

Code logs with the standard library (`log.info("fetched", extra={"job_id": ...})`); while a
job is being handled, `job_context(job_id=...)` adds the id to every line without passing it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from types import MappingProxyType

# Read-only default: job_context always sets a new dict.
_context: contextvars.ContextVar[Mapping] = contextvars.ContextVar("log_context", default=MappingProxyType({}))
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def finished_event(status: str) -> str:
    """The event a worker logs when its write of a job's final status (done, failed) was the one
    that counted (worker/state.py)."""
    return f"job {status}"


FINISHED_EVENTS = frozenset(finished_event(s) for s in ("done", "failed"))


def final_writes(text: str) -> Counter:
    """Job id -> how many times these JSON log lines say a worker wrote that job's final status.
    More than one is a result written twice; a missing line proves nothing (a SIGKILL between
    the Redis write and the log line drops it), so the lines only ever find duplicates."""
    written = Counter()
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if rec.get("event") in FINISHED_EVENTS and rec.get("job_id"):
            written[rec["job_id"]] += 1
    return written


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(_context.get())
        if isinstance(record.args, dict) and "id" in record.args:
            # Celery's own lines ("Task fetch[<id>] received") pass the task id; ours are job ids.
            out["job_id"] = record.args["id"]
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


@contextmanager
def job_context(**fields):
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def setup_logging(role: str, json_lines: bool = True, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(role)
        if json_lines
        else logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
