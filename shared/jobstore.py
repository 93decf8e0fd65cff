"""Job and batch records in Redis: the service's own source of truth for status.

Every Redis key and command of the service is here (kombu's own keys are only read).
Every job belongs to a batch (a single-image submission is a batch of one).
  job:<id>             hash: the job record (shared/schemas.py turns it into the API's job;
                       while the job waits, `pixels` also holds its preprocessed image)
  batch:<id>           hash: batch_id, created_at, total, n_<status> counts, version
  batch:<id>:jobs      list: job ids in submission order
  batch:<id>:changes   sorted set: job ids by the batch version of their last change
  batch:<id>:events    pub/sub channel: a message per change (for long-polling)
  jobs:pending         sorted set: unfinished job ids, scored by their deadline (worker/janitor.py)
  workers:heartbeat    sorted set: model processes by their last heartbeat (readiness)
  consumers:heartbeat  sorted set: worker processes that take tasks, by their last heartbeat
  held:<node>          sorted set: task (job) ids a worker process received, by when
  lock:<name>          short-lived locks: one janitor, one image sweep at a time
  web:secret-key       the web tier's shared secret when SECRET_KEY is not set
  cache:<key>          cached prediction results (ResultCache)
  idem:<hash>          an idempotency key's claim, then the batch it created (per client and key)
  webhooks:due         sorted set: finished batches whose webhook is not delivered yet, by when due
All job and batch keys expire after the retention period. Status changes go through one Lua
script, so a record and its batch counts always change together, and a finished job never
changes again (a duplicate delivery cannot write a second result). The record is enough to
queue a job's task again: `queued_at` says when its latest message was sent, `requeues` how
often the janitor sent one again (worker/janitor.py, which enforces the deadlines).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.queue import QUEUED_AT_HEADER, job_ids_of
from shared.schemas import (
    FINAL_STATUSES,
    STATUSES,
    UNFINISHED_STATUSES,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    WEBHOOK_QUEUED,
)

PENDING = "jobs:pending"
WEBHOOKS_DUE = "webhooks:due"
HEARTBEATS = "workers:heartbeat"
CONSUMERS = "consumers:heartbeat"
SECRET_KEY = "web:secret-key"
BATCH_PREFIX = "batch:"
# kombu's Redis transport keeps the messages a worker holds, unacknowledged, in this hash, and
# when it handed each one over (delivery tag -> time) in this sorted set.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
# A job whose message was just queued is first looked at this long after: by then a worker has
# taken its message and recorded a deadline of its own, or it is still waiting in its queue, or
# its message was lost (worker/janitor.py tells which). Longer than a worker needs to record a
# message it took (milliseconds), short enough that a lost message is soon sent again.
QUEUE_CHECK_SECONDS = 10.0


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def held_key(node: str) -> str:
    return f"held:{node}"


def lock_key(name: str) -> str:
    return f"lock:{name}"


def claim_key(key: str) -> str:
    return f"idem:{key}"


def batch_key(batch_id: str, part: str = "") -> str:
    return f"{BATCH_PREFIX}{batch_id}{':' + part if part else ''}"


# (The script spells the webhook states 'pending' and 'queued' of shared.schemas.WEBHOOK_STATUSES.)
# KEYS: the job, the pending set, the due webhooks. ARGV: job id, batch key prefix, final statuses
# (comma-separated), new status, allowed current statuses (comma-separated), a counter field to
# increment ("" for none), the time, the write id ("" for none), the job's new deadline in the
# pending set ("" to keep it; a final status always leaves the set), then field/value pairs. Returns
# {result, counter, batch}: result 1 changed, 0 refused (wrong current status), -1 unknown job;
# batch is the batch's id if this change finished a batch whose webhook was waiting for that (it
# is then due), else "". A write id already on the record means this call is the retry of a
# write that was done but whose answer was lost: it answers 1 again and changes nothing.
_TRANSITION = """
local job_id, prefix, final, new = ARGV[1], ARGV[2], ',' .. ARGV[3] .. ',', ARGV[4]
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, 0, ''} end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'write_id') == ARGV[8] then
  local counter = 0
  if ARGV[6] ~= '' then counter = tonumber(redis.call('HGET', KEYS[1], ARGV[6]) or 0) end
  return {1, counter, ''}
end
if not string.find(',' .. ARGV[5] .. ',', ',' .. cur .. ',', 1, true) then return {0, 0, ''} end
if #ARGV > 9 then redis.call('HSET', KEYS[1], unpack(ARGV, 10)) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'write_id', ARGV[8]) end
local counter = 0
if ARGV[6] ~= '' then counter = redis.call('HINCRBY', KEYS[1], ARGV[6], 1) end
local batch_id = redis.call('HGET', KEYS[1], 'batch_id')
local bkey = prefix .. batch_id
if cur ~= new then
  redis.call('HSET', KEYS[1], 'status', new)
  redis.call('HINCRBY', bkey, 'n_' .. cur, -1)
  redis.call('HINCRBY', bkey, 'n_' .. new, 1)
end
local due = ''
if string.find(final, ',' .. new .. ',', 1, true) then
  redis.call('ZREM', KEYS[2], job_id)
  redis.call('HDEL', KEYS[1], 'pixels')
  if cur ~= new and redis.call('HGET', bkey, 'webhook_status') == 'pending' then
    local finished = 0
    for s in string.gmatch(ARGV[3], '[^,]+') do
      finished = finished + tonumber(redis.call('HGET', bkey, 'n_' .. s) or 0)
    end
    if finished >= tonumber(redis.call('HGET', bkey, 'total')) then
      redis.call('HSET', bkey, 'webhook_status', 'queued')
      redis.call('ZADD', KEYS[3], ARGV[7], batch_id)
      due = batch_id
    end
  end
elseif ARGV[9] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[9], job_id)
end
local version = redis.call('HINCRBY', bkey, 'version', 1)
redis.call('ZADD', bkey .. ':changes', version, job_id)
redis.call('PUBLISH', bkey .. ':events', version)
return {1, counter, due}
"""

# KEYS: the job, the pending set. ARGV: the job id, the time its task was queued again, its next
# deadline, 1 if the janitor did it (counted in `requeues`). Only a job still pending changes (an
# HSET on a finished or expired record would change it, or leave a stub that never expires).
_REQUEUED = """
if redis.call('EXISTS', KEYS[1]) == 0 or not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'queued_at', ARGV[2])
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'requeues', 1) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: the claim. ARGV: the request's fingerprint, the claim's lifetime (s). Returns the stored
# claim ("" if this call made it): {fingerprint, batch answer or "" while being answered}.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return '' end
return redis.call('GET', KEYS[1])
"""


def _unacked_jobs(raw: str | None) -> list[str]:
    """The job ids of one entry of kombu's unacknowledged hash ([message, exchange, routing key]);
    none if it was acknowledged meanwhile (None) or is not one of ours."""
    try:
        return job_ids_of(json.loads(raw)[0]["headers"])
    except (ValueError, KeyError, TypeError, IndexError):
        return []


@dataclass(frozen=True)
class Claim:
    """One request's claim on an idempotency key: `owner` tells it from a retry's claim."""

    key: str
    fingerprint: str
    owner: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def pending(self) -> str:
        return json.dumps({"fp": self.fingerprint, "owner": self.owner})


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class NewJob:
    source_type: str  # "upload" | "url"
    source: str  # the file name as sent, or the URL
    image: str = ""  # sha256 of the stored image (uploads)
    status: str = "queued"  # "fetching" for URLs; "failed" for input refused on arrival
    error_code: str = ""
    error_message: str = ""
    pixels: str = ""  # the preprocessed image, base64 (shared.images.PreparedImage.pixels_b64)


class BatchChanges:
    """Every batch's change events (batch:<id>:events), on one subscription per process.

    A long-poll waits on an Event that this process's listener sets, not on a subscription of
    its own: redis-py closes a PubSub's connection when it is done with it, so each poll opened
    a new TCP connection to Redis and subscribed and unsubscribed on it. Whenever the listener
    is not subscribed (starting, or Redis away) an event can be missed, so every waiter also
    checks the version once a second. The listener stops after IDLE_SECONDS without waiters."""

    IDLE_SECONDS = 30.0

    def __init__(self, client: redis.Redis):
        self._redis, self._lock = client, threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._listening, self._subscribed = False, threading.Event()

    def wait(self, batch_id: str, changed, timeout: float) -> None:
        """Return when changed() is true (checked first, then at each event of the batch and
        at least once a second), or after timeout."""
        deadline, event = time.monotonic() + timeout, threading.Event()
        with self._lock:
            self._waiters.setdefault(batch_id, set()).add(event)
            if not self._listening:
                self._listening = True
                threading.Thread(target=self._listen, daemon=True, name="batch-changes").start()
        self._subscribed.wait(min(timeout, 0.5))  # a listener just started: until Redis confirms it
        try:
            # Registered first, then checked: a change between the two sets the event.
            while not changed():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                event.wait(min(left, 1.0))
                event.clear()
        finally:
            with self._lock:
                waiting = self._waiters.get(batch_id, set())
                waiting.discard(event)
                if not waiting:
                    self._waiters.pop(batch_id, None)

    def _listen(self) -> None:
        idle_since = time.monotonic()
        pubsub = None
        while True:
            with self._lock:
                if self._waiters:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.IDLE_SECONDS:
                    self._listening = False
                    self._subscribed.clear()
                    break
            try:
                if pubsub is None:
                    pubsub = self._redis.pubsub()
                    pubsub.psubscribe(batch_key("*", "events"))
                message = pubsub.get_message(timeout=1.0)
            except redis.RedisError:  # Redis away: the waiters check once a second meanwhile
                self._subscribed.clear()
                pubsub = self._close(pubsub)
                time.sleep(0.5)
                continue
            if message and message.get("type") == "psubscribe":  # from now on no event is missed
                self._subscribed.set()
            elif message and message.get("type") == "pmessage":
                batch_id = str(message["channel"])[len(BATCH_PREFIX) : -len(":events")]
                with self._lock:
                    for event in self._waiters.get(batch_id, ()):
                        event.set()
        self._close(pubsub)

    @staticmethod
    def _close(pubsub) -> None:
        if pubsub is not None:
            try:
                pubsub.close()
            except redis.RedisError:
                pass


class JobStore:
    def __init__(self, client: redis.Redis, retention_seconds: int):
        self.redis = client
        self.ttl = retention_seconds
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._requeued = client.register_script(_REQUEUED)
        self._release = client.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
        )
        self._changes = BatchChanges(client)
        # Called with the ids of batches whose last job a transition just finished and whose
        # webhook is due (worker and web set it to queue the delivery; see webhooks:due).
        self.on_webhooks_due = lambda batch_ids: None

    @classmethod
    def from_url(cls, url: str, retention_seconds: int, **kw) -> JobStore:
        # A Redis restart breaks pooled connections: retry a command once on a fresh one.
        # (Every write here is safe to repeat: transitions are guarded, creation is idempotent.)
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), 2)
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=10,
            socket_connect_timeout=2,
            socket_timeout=10,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **kw,
        )
        return cls(client, retention_seconds)

    # --- writing ---------------------------------------------------------------------------
    def create_batch(
        self, jobs: list[NewJob], top_k: int, webhook_url: str = "", claim: Claim | None = None
    ) -> tuple[str, list[dict]]:
        """Write a batch and its jobs in one transaction: all of it is stored, or none. With an
        idempotency claim, the claim is answered with the batch in the same transaction, so that
        whatever fails after it, a retry finds this batch. Returns the batch id and the job
        records (without their pixels)."""
        batch_id, created, queued_at = new_id(), now_iso(), time.time()
        records = [self._record(j, batch_id, created, top_k, queued_at) for j in jobs]
        counts = {f"n_{s}": 0 for s in STATUSES}
        for rec in records:
            counts[f"n_{rec['status']}"] += 1
        ids = [r["job_id"] for r in records]
        with self.redis.pipeline(transaction=True) as p:
            for rec in records:
                p.hset(job_key(rec["job_id"]), mapping=rec)
                p.expire(job_key(rec["job_id"]), self.ttl)
            webhook = {}
            if webhook_url:
                webhook = dict(webhook_url=webhook_url, webhook_status=WEBHOOK_PENDING, webhook_attempts=0)
            p.hset(
                batch_key(batch_id),
                mapping=dict(batch_id=batch_id, created_at=created, total=len(records), version=0, **counts, **webhook),
            )
            p.expire(batch_key(batch_id), self.ttl)
            if records:
                p.delete(batch_key(batch_id, "jobs"))  # idempotent if the transaction is retried
                p.rpush(batch_key(batch_id, "jobs"), *ids)
                p.expire(batch_key(batch_id, "jobs"), self.ttl)
                # Each job's last change, by batch version: lets a poller fetch only what changed.
                p.zadd(batch_key(batch_id, "changes"), dict.fromkeys(ids, 0))
                p.expire(batch_key(batch_id, "changes"), self.ttl)
            waiting = {
                r["job_id"]: queued_at + QUEUE_CHECK_SECONDS for r in records if r["status"] not in FINAL_STATUSES
            }
            if waiting:
                p.zadd(PENDING, waiting)
            if claim is not None:
                p.set(claim_key(claim.key), json.dumps({"fp": claim.fingerprint, "batch_id": batch_id}), ex=self.ttl)
            p.execute()
        return batch_id, [{k: v for k, v in r.items() if k != "pixels"} for r in records]

    @staticmethod
    def _record(job: NewJob, batch_id: str, created: str, top_k: int, queued_at: float) -> dict:
        rec = dict(
            job_id=new_id(),
            batch_id=batch_id,
            status=job.status,
            source_type=job.source_type,
            source=job.source,
            image=job.image,
            top_k=str(top_k),
            created_at=created,
            attempts="0",
            queued_at=repr(queued_at),
        )
        if job.status == "failed":
            rec.update(error_code=job.error_code, error_message=job.error_message, finished_at=created)
        if job.pixels:
            rec["pixels"] = job.pixels
        return rec

    def delete_batch(self, batch_id: str, job_ids: list[str], claim: Claim | None = None) -> None:
        """Undo create_batch (its claim goes with it: a retry may create the batch again)."""
        keys = [batch_key(batch_id), batch_key(batch_id, "jobs"), batch_key(batch_id, "changes")]
        keys += [job_key(j) for j in job_ids] + ([claim_key(claim.key)] if claim is not None else [])
        with self.redis.pipeline(transaction=True) as p:
            p.delete(*keys)
            if job_ids:
                p.zrem(PENDING, *job_ids)
            p.execute()
        self.forget_pending(job_ids)

    def transition(
        self,
        job_ids: list[str],
        status: str,
        allowed_from: tuple[str, ...],
        fields: list[dict] | dict | None = None,
        count: str = "",
        write_id: str = "",
        deadline: float | None = None,
    ) -> list[tuple[int, int]]:
        """Move jobs to `status` if their current status is in `allowed_from`, in one round trip,
        incrementing the field `count` if given, and (a status that is not final) setting their
        deadline if given. Returns (result, counter) per job: result 1 changed, 0 refused, -1
        unknown job.

        A caller that retries when Redis does not answer passes the same `write_id` each time
        (new_id(), made once): a write that was done but whose answer was lost then answers 1
        again instead of "refused", so that the job is counted and logged as done once.

        A job named twice in one call changes once: its later copies are refused (0), as a
        duplicate delivery is. (With a write id the Lua script alone would answer 1 for each
        copy, as for a retry, and the job would be logged as done twice.)"""
        if not job_ids:
            return []
        per_job = fields if isinstance(fields, list) else [fields or {}] * len(job_ids)
        first = {job_id: i for i, job_id in reversed(list(enumerate(job_ids)))}  # job id -> its first index
        now = time.time()
        with self.redis.pipeline(transaction=False) as p:
            for i, (job_id, f) in enumerate(zip(job_ids, per_job, strict=True)):
                if first[job_id] != i:
                    continue
                args = [job_id, BATCH_PREFIX, ",".join(FINAL_STATUSES), status, ",".join(allowed_from), count, now]
                args += [write_id, "" if deadline is None else repr(deadline)]
                for k, v in f.items():
                    args += [k, v if isinstance(v, str) else json.dumps(v)]
                self._transition(keys=[job_key(job_id), PENDING, WEBHOOKS_DUE], args=args, client=p)
            answers = iter(p.execute())
        results = [next(answers) if first[job_id] == i else [0, 0, ""] for i, job_id in enumerate(job_ids)]
        due = [batch for _, _, batch in results if batch]
        if due:
            self.on_webhooks_due(due)
        return [(result, counter) for result, counter, _ in results]

    def mark_fetching(self, job_id: str, write_id: str = "", deadline: float | None = None) -> tuple[int, int]:
        """A fetch attempt starts, to end by `deadline`; the counter is this job's fetch attempts so far."""
        fields = {"started_at": now_iso()}
        return self.transition([job_id], "fetching", ("fetching",), fields, "fetch_attempts", write_id, deadline)[0]

    def mark_fetched(self, job_id: str, image_sha: str, pixels_b64: str) -> tuple[int, int]:
        """The fetch is done, and its prediction is about to be queued (worker/fetching.py)."""
        queued_at = time.time()
        fields = {"image": image_sha, "pixels": pixels_b64, "queued_at": repr(queued_at)}
        return self.transition([job_id], "queued", ("fetching",), fields, deadline=queued_at + QUEUE_CHECK_SECONDS)[0]

    def mark_running(
        self, job_ids: list[str], write_id: str = "", deadline: float | None = None
    ) -> list[tuple[int, int]]:
        """Prediction starts, to end by `deadline`; the counter is each job's prediction attempts
        so far. Not from `fetching`: a URL job's prediction is queued only once its fetch is
        recorded, so that its record always holds what to run again."""
        fields = {"started_at": now_iso()}
        allowed = ("queued", "running")
        return self.transition(job_ids, "running", allowed, fields, "attempts", write_id, deadline)

    def count_solo_attempt(self, job_id: str) -> int:
        """A suspect job is about to run alone: how many times has it now (see worker.prediction)."""
        return int(self.redis.hincrby(job_key(job_id), "solo_attempts", 1))

    def complete(
        self,
        job_ids: list[str],
        predictions: list[list[dict]],
        model: dict,
        uncertain: list[bool] | None = None,
        write_id: str = "",
    ) -> list[tuple[int, int]]:
        finished = now_iso()
        uncertain = uncertain or [False] * len(job_ids)
        fields = [
            dict(
                predictions=json.dumps(p),
                uncertain="1" if u else "0",
                model_name=model["name"],
                model_version=model["version"],
                finished_at=finished,
            )
            for p, u in zip(predictions, uncertain, strict=True)
        ]
        return self.transition(job_ids, "done", UNFINISHED_STATUSES, fields, write_id=write_id)

    def cancel(self, job_ids: list[str]) -> list[tuple[int, int]]:
        """Unfinished jobs become cancelled (final): a worker's later write is refused."""
        return self.transition(job_ids, "cancelled", UNFINISHED_STATUSES, dict(finished_at=now_iso()))

    def batch_job_ids(self, batch_id: str) -> list[str]:
        return self.redis.lrange(batch_key(batch_id, "jobs"), 0, -1)

    def fail(
        self,
        job_ids: list[str],
        code: str,
        message: str,
        write_id: str = "",
        allowed_from: tuple[str, ...] = UNFINISHED_STATUSES,
    ) -> list[tuple[int, int]]:
        """The jobs fail. A fetch failure passes allowed_from=("fetching",): another copy of the
        fetch may have fetched the image already, and the job is then queued, not failed."""
        fields = dict(error_code=code, error_message=message, finished_at=now_iso())
        return self.transition(job_ids, "failed", allowed_from, fields, write_id=write_id)

    # --- deadlines (worker/janitor.py) ---------------------------------------------------------
    def overdue(self, now: float, limit: int = 500) -> list[str]:
        """Unfinished jobs whose deadline has passed, earliest first."""
        return self.redis.zrangebyscore(PENDING, "-inf", now, start=0, num=limit)

    def deadlines(self, job_ids: list[str]) -> list[float | None]:
        return self.redis.zmscore(PENDING, job_ids) if job_ids else []

    def postpone(self, deadlines: dict[str, float]) -> None:
        """New deadlines for jobs still pending (a finished one stays out of the set)."""
        if deadlines:
            self.redis.zadd(PENDING, deadlines, xx=True)

    def requeue_fields(self, job_ids: list[str]) -> list[dict]:
        keys = ("status", "pixels", "source", "top_k", "queued_at", "requeues")
        with self.redis.pipeline(transaction=False) as p:
            for job_id in job_ids:
                p.hmget(job_key(job_id), *keys)
            return [dict(zip(keys, row, strict=True)) for row in p.execute()]

    def requeued(self, job_ids: list[str], now: float, rescued: bool = False) -> None:
        """These jobs' tasks were queued again just now (counted in `requeues` if `rescued`, that
        is, by the janitor); the record says so, and they are looked at again in a while."""
        if not job_ids:
            return
        with self.redis.pipeline(transaction=False) as p:
            for job_id in job_ids:
                args = [job_id, repr(now), repr(now + QUEUE_CHECK_SECONDS), "1" if rescued else "0"]
                self._requeued(keys=[job_key(job_id), PENDING], args=args, client=p)
            p.execute()

    def forget_pending(self, job_ids: list[str]) -> None:
        if job_ids:
            self.redis.zrem(PENDING, *job_ids)

    def queue_head_queued_at(self, queue: str) -> float | None:
        """When the oldest message still waiting in a Celery queue was queued: inf if the queue is
        empty, None if that message does not say (not one of ours)."""
        raw = self.redis.lindex(queue, -1)  # kombu LPUSHes and BRPOPs: the right end is the oldest
        if raw is None:
            return math.inf
        try:
            return float(json.loads(raw)["headers"][QUEUED_AT_HEADER])
        except (ValueError, KeyError, TypeError):
            return None

    def unacknowledged_before(self, before: float, limit: int = 2000) -> list[tuple[str, float]]:
        """(job id, when kombu handed its message to a worker) of the unacknowledged messages
        handed over before `before`, oldest first (kombu's Redis transport only)."""
        tags = self.redis.zrangebyscore(KOMBU_UNACKED_INDEX, "-inf", before, start=0, num=limit, withscores=True)
        if not tags:
            return []
        raws = self.redis.hmget(KOMBU_UNACKED, [t for t, _ in tags])
        return [(job_id, at) for (_, at), raw in zip(tags, raws, strict=True) for job_id in _unacked_jobs(raw)]

    def queue_length(self, queue: str) -> int:
        return self.redis.llen(queue)

    # --- workers and coordination ---------------------------------------------------------
    def record_heartbeat(self, node: str, now: float) -> None:
        with self.redis.pipeline() as p:
            p.zadd(HEARTBEATS, {node: now})
            p.zremrangebyscore(HEARTBEATS, "-inf", now - 3600)
            p.execute()

    def live_workers(self, since: float) -> list[str]:
        return self.redis.zrangebyscore(HEARTBEATS, since, "+inf")

    def record_consumer(self, node: str, now: float, received: list[str], keep_seconds: float, deadline: float) -> None:
        """A worker process that takes tasks is alive and has received these task ids, whose
        jobs are due by `deadline`. Ids older than keep_seconds are dropped: their tasks are
        finished or past their deadline by then."""
        key = held_key(node)
        with self.redis.pipeline() as p:
            p.zadd(CONSUMERS, {node: now})
            if received:
                p.zadd(key, dict.fromkeys(received, now))
                p.zadd(PENDING, dict.fromkeys(received, deadline), xx=True)
            p.zremrangebyscore(key, "-inf", now - keep_seconds)
            p.expire(key, int(keep_seconds) + 60)
            p.execute()

    def silent_consumers(self, since: float) -> list[str]:
        """Worker processes whose last heartbeat is older than `since`: dead, or cut off."""
        return self.redis.zrangebyscore(CONSUMERS, "-inf", since)

    def held_by(self, node: str) -> list[tuple[str, float]]:
        """(job id, when this worker received it) of what a worker process recorded."""
        return self.redis.zrange(held_key(node), 0, -1, withscores=True)

    def held_by_live_consumers(self, since: float) -> set[str]:
        """Job ids recorded by the worker processes that have beaten since `since`."""
        nodes = self.redis.zrangebyscore(CONSUMERS, since, "+inf")
        with self.redis.pipeline(transaction=False) as p:
            for node in nodes:
                p.zrange(held_key(node), 0, -1)
            return {task_id for ids in p.execute() for task_id in ids}

    def forget_consumer(self, node: str) -> None:
        with self.redis.pipeline() as p:
            p.zrem(CONSUMERS, node)
            p.delete(held_key(node))
            p.execute()

    def take_lock(self, name: str, owner: str, seconds: float) -> bool:
        """True if this owner now holds the lock for `seconds` (nobody else held it)."""
        return bool(self.redis.set(lock_key(name), owner, nx=True, px=int(seconds * 1000)))

    def release_lock(self, name: str, owner: str) -> None:
        """Let go of a lock this owner holds (and only then: it may have expired and been taken)."""
        self._release(keys=[lock_key(name)], args=[owner])

    def shared_secret_key(self) -> str:
        """One random key for every web process (a form rendered by one gunicorn worker is
        posted to another), made by whichever process asks first."""
        self.redis.set(SECRET_KEY, secrets.token_hex(32), nx=True)
        return self.redis.get(SECRET_KEY)

    # --- reading ---------------------------------------------------------------------------
    def get_job(self, job_id: str) -> dict | None:
        """The job's record, or None (unknown or expired)."""
        return self.redis.hgetall(job_key(job_id)) or None

    def get_batch(self, batch_id: str, since: int | None = None) -> tuple[dict, list[dict]] | None:
        """The batch's record and its jobs' records: all of them in submission order, or with
        `since` only the jobs changed after that version. None if unknown or expired."""
        with self.redis.pipeline(transaction=True) as p:
            p.hgetall(batch_key(batch_id))
            if since is None:
                p.lrange(batch_key(batch_id, "jobs"), 0, -1)
            else:
                p.zrangebyscore(batch_key(batch_id, "changes"), f"({since}", "+inf")
            batch, ids = p.execute()
        if not batch:
            return None
        with self.redis.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hgetall(job_key(job_id))
            return batch, [rec for rec in p.execute() if rec]

    def batch_version(self, batch_id: str) -> int | None:
        v = self.redis.hget(batch_key(batch_id), "version")
        return None if v is None else int(v)

    def batch_finished(self, batch_id: str) -> bool:
        total, *finished = self.redis.hmget(batch_key(batch_id), "total", *[f"n_{s}" for s in FINAL_STATUSES])
        return total is not None and sum(int(n or 0) for n in finished) >= int(total)

    def wait_for_change(self, batch_id: str, since_version: int, timeout: float) -> None:
        """Block until the batch's version passes since_version, or timeout (long-polling)."""
        self._changes.wait(batch_id, lambda: (v := self.batch_version(batch_id)) is None or v > since_version, timeout)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # --- idempotency keys -----------------------------------------------------------------------
    def claim(self, claim: Claim, seconds: int) -> dict | None:
        """Claim an idempotency key for one request. None: the claim is ours for `seconds` (create
        the batch with it, or release it). Otherwise what the key holds: {"fp", "owner"} while
        another request holds it, {"fp", "batch_id"} once its batch exists."""
        found = self._claim(keys=[claim_key(claim.key)], args=[claim.pending, seconds])
        return json.loads(found) if found else None

    def claimed(self, key: str) -> dict | None:
        found = self.redis.get(claim_key(key))
        return json.loads(found) if found else None

    def release_claim(self, claim: Claim) -> None:
        """Let go of a claim that is still ours and unanswered (a claim that expired and went to
        another request stays theirs)."""
        self._release(keys=[claim_key(claim.key)], args=[claim.pending])

    # --- webhooks -------------------------------------------------------------------------------
    def webhook_target(self, batch_id: str) -> tuple[dict, str] | None:
        """(the batch's record, its webhook URL) while its webhook waits to be delivered."""
        rec = self.redis.hgetall(batch_key(batch_id))
        if not rec or rec.get("webhook_status") != WEBHOOK_QUEUED:
            return None
        return rec, rec["webhook_url"]

    def webhook_attempt(self, batch_id: str, error: str, retry_at: float | None) -> None:
        """An attempt failed: try again at retry_at, or (None) give up."""
        with self.redis.pipeline() as p:
            p.hincrby(batch_key(batch_id), "webhook_attempts", 1)
            p.hset(batch_key(batch_id), "webhook_error", error)
            if retry_at is None:
                p.hset(batch_key(batch_id), "webhook_status", WEBHOOK_FAILED)
                p.zrem(WEBHOOKS_DUE, batch_id)
            else:
                p.zadd(WEBHOOKS_DUE, {batch_id: retry_at})
            p.execute()

    def webhook_delivered(self, batch_id: str) -> None:
        with self.redis.pipeline() as p:
            p.hincrby(batch_key(batch_id), "webhook_attempts", 1)
            p.hset(
                batch_key(batch_id),
                mapping={"webhook_status": WEBHOOK_DELIVERED, "webhook_delivered_at": now_iso(), "webhook_error": ""},
            )
            p.zrem(WEBHOOKS_DUE, batch_id)
            p.execute()

    def webhook_lost(self, batch_id: str, error: str, now: float, max_attempts: int) -> int | None:
        """A due delivery that nobody made (its task was lost): count it as an attempt. Returns
        the attempts so far if it should be tried again now (its due time is now), else None:
        given up (failed), or nothing to deliver (delivered, or the batch expired)."""
        rec = self.redis.hgetall(batch_key(batch_id))
        if rec.get("webhook_status") != WEBHOOK_QUEUED:
            self.forget_webhook(batch_id)
            return None
        attempts = int(rec.get("webhook_attempts") or 0) + 1
        self.webhook_attempt(batch_id, error, None if attempts >= max_attempts else now)
        return attempts if attempts < max_attempts else None

    def forget_webhook(self, batch_id: str) -> None:
        """Nothing to deliver for this batch (delivered, given up or expired): not due any more."""
        self.redis.zrem(WEBHOOKS_DUE, batch_id)

    def webhooks_overdue(self, before: float) -> list[str]:
        """Due webhooks nobody is delivering (their task was lost), due before `before`."""
        return self.redis.zrangebyscore(WEBHOOKS_DUE, "-inf", before, start=0, num=100)

    def result_cache(self, namespace: str) -> ResultCache:
        return ResultCache(self.redis, namespace, self.ttl)


class ResultCache:
    """Class probabilities by image and everything else that decides them (the namespace):
    the same image again, within the retention period, is answered without the model."""

    def __init__(self, client: redis.Redis, namespace: str, ttl: int):
        self.redis, self.prefix, self.ttl = client, f"cache:{namespace}:", ttl

    def get_many(self, keys: list[str]) -> list[list[float] | None]:
        found = self.redis.mget([self.prefix + k for k in keys]) if keys else []
        return [json.loads(v) if v else None for v in found]

    def put_many(self, values: dict[str, list[float]]) -> None:
        with self.redis.pipeline(transaction=False) as p:
            for k, probs in values.items():
                p.set(self.prefix + k, json.dumps([round(float(x), 7) for x in probs]), ex=self.ttl)
            p.execute()
