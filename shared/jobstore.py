"""Job and batch records in Redis: the service's own source of truth for status.

Every job belongs to a batch (a single-image submission is a batch of one).
  job:<id>          hash: the job record (see public_job for the fields the API shows; while
                    the job waits, `pixels` also holds its preprocessed image)
  batch:<id>        hash: created_at, total, n_<status> counts, version
  batch:<id>:jobs   list: job ids in submission order
  batch:<id>:changes sorted set: job ids by the batch version of their last change
  batch:<id>:events pub/sub channel: a message per change (for long-polling)
  jobs:pending      sorted set: unfinished job ids, scored by when their task was queued
All keys expire after the retention period. Status changes go through one Lua script, so a
record and its batch counts always change together, and a finished job never changes again
(a duplicate delivery cannot write a second result). The record is enough to queue a job's
task again (worker/janitor.py does, when a task message was lost).
"""
from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

STATUSES = ("queued", "fetching", "running", "done", "failed")
FINAL = ("done", "failed")
PENDING = "jobs:pending"

# KEYS[1] job key. ARGV: new status, comma-separated allowed current statuses, a counter field to
# increment ("" for none), then field/value pairs. Returns {result, counter}: result 1 changed,
# 0 refused (wrong current status), -1 unknown job.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, 0} end
if not string.find(',' .. ARGV[2] .. ',', ',' .. cur .. ',', 1, true) then return {0, 0} end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
local counter = 0
if ARGV[3] ~= '' then counter = redis.call('HINCRBY', KEYS[1], ARGV[3], 1) end
local bkey = 'batch:' .. redis.call('HGET', KEYS[1], 'batch_id')
if cur ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
  redis.call('HINCRBY', bkey, 'n_' .. cur, -1)
  redis.call('HINCRBY', bkey, 'n_' .. ARGV[1], 1)
end
if ARGV[1] == 'done' or ARGV[1] == 'failed' then
  redis.call('ZREM', 'jobs:pending', string.sub(KEYS[1], 5))
  redis.call('HDEL', KEYS[1], 'pixels')
end
local version = redis.call('HINCRBY', bkey, 'version', 1)
redis.call('ZADD', bkey .. ':changes', version, string.sub(KEYS[1], 5))
redis.call('PUBLISH', bkey .. ':events', version)
return {1, counter}
"""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class NewJob:
    source_type: str  # "upload" | "url"
    source: str       # the file name as sent, or the URL
    image: str = ""   # sha256 of the stored image (uploads)
    status: str = "queued"  # "fetching" for URLs; "failed" for input refused on arrival
    error_code: str = ""
    error_message: str = ""
    pixels: str = ""  # the preprocessed image (shared.queue.encode_pixels), for uploads


class JobStore:
    def __init__(self, client: redis.Redis, retention_seconds: int):
        self.r = client
        self.ttl = retention_seconds
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str, retention_seconds: int, **kw) -> "JobStore":
        # A Redis restart breaks pooled connections: retry a command once on a fresh one.
        # (Every write here is safe to repeat: transitions are guarded, creation is idempotent.)
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=10,
                                        socket_connect_timeout=2, socket_timeout=10, retry=retry,
                                        retry_on_error=[redis.ConnectionError, redis.TimeoutError], **kw),
                   retention_seconds)

    # --- writing ---------------------------------------------------------------------------
    def create_batch(self, jobs: list[NewJob], top_k: int) -> tuple[str, list[dict]]:
        """Write a batch and its jobs in one transaction: all of it is stored, or none."""
        batch_id, created = new_id(), now_iso()
        records = [dict(job_id=new_id(), batch_id=batch_id, status=j.status, source_type=j.source_type,
                        source=j.source, image=j.image, top_k=str(top_k), created_at=created,
                        attempts="0", **({"error_code": j.error_code, "error_message": j.error_message,
                                          "finished_at": created} if j.status == "failed" else {}),
                        **({"pixels": j.pixels} if j.pixels else {}))
                   for j in jobs]
        now = time.time()
        counts = {f"n_{s}": 0 for s in STATUSES}
        for rec in records:
            counts[f"n_{rec['status']}"] += 1
        with self.r.pipeline(transaction=True) as p:
            for rec in records:
                p.hset(f"job:{rec['job_id']}", mapping=rec)
                p.expire(f"job:{rec['job_id']}", self.ttl)
            p.hset(f"batch:{batch_id}", mapping=dict(batch_id=batch_id, created_at=created,
                                                     total=len(records), version=0, **counts))
            p.expire(f"batch:{batch_id}", self.ttl)
            if records:
                p.delete(f"batch:{batch_id}:jobs")  # idempotent if the transaction is retried
                p.rpush(f"batch:{batch_id}:jobs", *[r["job_id"] for r in records])
                p.expire(f"batch:{batch_id}:jobs", self.ttl)
                # Each job's last change, by batch version: lets a poller fetch only what changed.
                p.zadd(f"batch:{batch_id}:changes", {r["job_id"]: 0 for r in records})
                p.expire(f"batch:{batch_id}:changes", self.ttl)
            waiting = {r["job_id"]: now for r in records if r["status"] not in FINAL}
            if waiting:
                p.zadd(PENDING, waiting)
            p.execute()
        return batch_id, [{k: v for k, v in r.items() if k != "pixels"} for r in records]

    def delete_batch(self, batch_id: str, job_ids: list[str]) -> None:
        self.r.delete(f"batch:{batch_id}", f"batch:{batch_id}:jobs", f"batch:{batch_id}:changes",
                      *[f"job:{j}" for j in job_ids])
        self.forget_pending(job_ids)

    def transition(self, job_ids: list[str], status: str, allowed_from: tuple[str, ...],
                   fields: list[dict] | dict | None = None, count: str = "") -> list[tuple[int, int]]:
        """Move jobs to `status` if their current status is in `allowed_from`, in one round trip,
        incrementing the field `count` if given. Returns (result, counter) per job:
        result 1 changed, 0 refused, -1 unknown job."""
        if not job_ids:
            return []
        per_job = fields if isinstance(fields, list) else [fields or {}] * len(job_ids)
        with self.r.pipeline(transaction=False) as p:
            for job_id, f in zip(job_ids, per_job):
                args = [status, ",".join(allowed_from), count]
                for k, v in f.items():
                    args += [k, v if isinstance(v, str) else json.dumps(v)]
                self._transition(keys=[f"job:{job_id}"], args=args, client=p)
            return [tuple(r) for r in p.execute()]

    def mark_fetching(self, job_id: str) -> tuple[int, int]:
        """A fetch attempt starts; the counter is this job's fetch attempts so far."""
        return self.transition([job_id], "fetching", ("fetching",), {"started_at": now_iso()},
                               count="fetch_attempts")[0]

    def mark_fetched(self, job_id: str, image_sha: str, pixels: str) -> tuple[int, int]:
        """The fetch is done and the prediction task queued (its time is the job's new score)."""
        result = self.transition([job_id], "queued", ("fetching",), {"image": image_sha, "pixels": pixels})[0]
        if result[0] == 0:  # prediction already began: still record which image it was
            self.r.hset(f"job:{job_id}", "image", image_sha)
        else:
            self.r.zadd(PENDING, {job_id: time.time()}, xx=True)
        return result

    # --- finding jobs whose task message was lost (worker/janitor.py) ------------------------
    def pending_before(self, cutoff: float, limit: int = 500) -> list[tuple[str, float]]:
        return self.r.zrangebyscore(PENDING, "-inf", cutoff, start=0, num=limit, withscores=True)

    def pending_score(self, job_id: str) -> float | None:
        return self.r.zscore(PENDING, job_id)

    def requeue_fields(self, job_ids: list[str]) -> list[dict]:
        with self.r.pipeline(transaction=False) as p:
            for job_id in job_ids:
                p.hmget(f"job:{job_id}", "status", "pixels", "source", "top_k", "fetch_attempts")
            rows = p.execute()
        keys = ("status", "pixels", "source", "top_k", "fetch_attempts")
        return [dict(zip(keys, row)) for row in rows]

    def touch_pending(self, job_ids: list[str], when: float) -> None:
        if job_ids:
            self.r.zadd(PENDING, {j: when for j in job_ids}, xx=True)

    def forget_pending(self, job_ids: list[str]) -> None:
        if job_ids:
            self.r.zrem(PENDING, *job_ids)

    def mark_running(self, job_ids: list[str]) -> list[tuple[int, int]]:
        """Prediction starts; the counter is each job's prediction attempts so far. A URL job can
        be predicted before its fetcher records the fetch, hence "fetching" is allowed."""
        return self.transition(job_ids, "running", ("queued", "fetching", "running"),
                               {"started_at": now_iso()}, count="attempts")

    def count_solo_attempt(self, job_id: str) -> int:
        """A suspect job is about to run alone: how many times has it now (see worker.jobs)."""
        return int(self.r.hincrby(f"job:{job_id}", "solo_attempts", 1))

    def complete(self, job_ids: list[str], predictions: list[list[dict]], model: dict) -> list[tuple[int, int]]:
        finished = now_iso()
        fields = [dict(predictions=json.dumps(p), model_name=model["name"],
                       model_version=model["version"], finished_at=finished) for p in predictions]
        return self.transition(job_ids, "done", ("queued", "fetching", "running"), fields)

    def fail(self, job_ids: list[str], code: str, message: str) -> list[tuple[int, int]]:
        return self.transition(job_ids, "failed", ("queued", "fetching", "running"),
                               dict(error_code=code, error_message=message, finished_at=now_iso()))

    # --- reading ---------------------------------------------------------------------------
    def get_job(self, job_id: str) -> dict | None:
        rec = self.r.hgetall(f"job:{job_id}")
        return public_job(rec) if rec else None

    def get_batch(self, batch_id: str, since: int | None = None) -> dict | None:
        """The batch with every job, or with `since` only the jobs changed after that version."""
        with self.r.pipeline(transaction=True) as p:
            p.hgetall(f"batch:{batch_id}")
            if since is None:
                p.lrange(f"batch:{batch_id}:jobs", 0, -1)
            else:
                p.zrangebyscore(f"batch:{batch_id}:changes", f"({since}", "+inf")
            batch, ids = p.execute()
        if not batch:
            return None
        with self.r.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hgetall(f"job:{job_id}")
            jobs = [public_job(rec) for rec in p.execute() if rec]
        counts = {s: int(batch.get(f"n_{s}", 0)) for s in STATUSES}
        total = int(batch["total"])
        return dict(batch_id=batch_id, created_at=batch["created_at"], total=total, counts=counts,
                    finished=counts["done"] + counts["failed"] == total,
                    version=int(batch.get("version", 0)), jobs=jobs)

    def batch_version(self, batch_id: str) -> int | None:
        v = self.r.hget(f"batch:{batch_id}", "version")
        return None if v is None else int(v)

    def wait_for_change(self, batch_id: str, since_version: int, timeout: float) -> None:
        """Block until the batch's version passes since_version, or timeout (long-polling)."""
        deadline = time.monotonic() + timeout
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(f"batch:{batch_id}:events")
            # Subscribed first, then checked: a change between the two cannot be missed.
            while (v := self.batch_version(batch_id)) is not None and v <= since_version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                pubsub.get_message(timeout=min(left, 1.0))
        finally:
            pubsub.close()

    def ping(self) -> bool:
        return bool(self.r.ping())


def public_job(rec: dict) -> dict:
    """A stored record -> the API's job object."""
    out = dict(job_id=rec["job_id"], batch_id=rec.get("batch_id"), status=rec["status"],
               source={"type": rec.get("source_type"), "value": rec.get("source")},
               image=rec.get("image") or None, top_k=int(rec.get("top_k") or 3),
               predictions=json.loads(rec["predictions"]) if rec.get("predictions") else None,
               model={"name": rec["model_name"], "version": rec["model_version"]}
               if rec.get("model_name") else None,
               error={"code": rec["error_code"], "message": rec.get("error_message", "")}
               if rec.get("error_code") else None,
               created_at=rec.get("created_at"), started_at=rec.get("started_at") or None,
               finished_at=rec.get("finished_at") or None, attempts=int(rec.get("attempts") or 0))
    return out
