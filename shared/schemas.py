"""The job API's shapes and vocabulary, defined once.

Requests are validated with these models, responses are built from them (`from_record` turns
a stored record into the API object), and the OpenAPI document (web/openapi.py) is generated
from them. The statuses and the top-k bounds live here too; the job store and the workers use
the same constants.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from shared.fetch import MAX_URL_LENGTH

STATUSES = ("queued", "fetching", "running", "done", "failed", "cancelled")
FINAL_STATUSES = ("done", "failed", "cancelled")
UNFINISHED_STATUSES = tuple(s for s in STATUSES if s not in FINAL_STATUSES)
WEBHOOK_STATUSES = ("pending", "queued", "delivered", "failed")  # pending: the batch is not finished yet
WEBHOOK_PENDING, WEBHOOK_QUEUED, WEBHOOK_DELIVERED, WEBHOOK_FAILED = WEBHOOK_STATUSES
TOP_K_MIN, TOP_K_MAX, TOP_K_DEFAULT = 1, 10, 3
ID_PATTERN = "^[0-9a-f]{32}$"  # job and batch ids (shared.jobstore.new_id: a uuid4's hex)

TopK = Annotated[int, Field(ge=TOP_K_MIN, le=TOP_K_MAX, description="How many classes to return per image.")]
Status = Literal[STATUSES]
top_k_adapter = TypeAdapter(TopK)
Url = Annotated[str, Field(max_length=MAX_URL_LENGTH)]


class UrlSubmission(BaseModel):
    """JSON body of POST /api/v1/batches and /api/v1/jobs."""

    model_config = ConfigDict(extra="forbid")
    urls: list[Url] = Field(default_factory=list, description="http(s) URLs of images; at most MAX_BATCH_ITEMS.")
    url: Url | None = Field(None, description="One URL (same as urls: [url]).")
    top_k: TopK = TOP_K_DEFAULT
    webhook_url: Url | None = Field(
        None,
        description="POSTed the batch summary, signed, once the batch is finished "
        "(the same address rules as image URLs).",
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable reason, e.g. unsupported_format.")
    message: str = Field(description="What went wrong, for people.")

    @classmethod
    def from_record(cls, rec: dict) -> ErrorDetail | None:
        return cls(code=rec["error_code"], message=rec.get("error_message", "")) if rec.get("error_code") else None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Prediction(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1)


class Source(BaseModel):
    type: Literal["upload", "url"]
    value: str = Field(description="The uploaded file's name, or the URL.")


class ModelRef(BaseModel):
    name: str
    version: str


class Links(BaseModel):
    self: str
    page: str | None = None
    batch: str | None = None


class JobSummary(BaseModel):
    job_id: str
    source: Source
    status: Status
    error: ErrorDetail | None = None

    @classmethod
    def from_record(cls, rec: dict, **extra) -> JobSummary:
        return cls(
            job_id=rec["job_id"],
            source=Source(type=rec["source_type"], value=rec["source"]),
            status=rec["status"],
            error=ErrorDetail.from_record(rec),
            **extra,
        )


class BatchCreated(BaseModel):
    batch_id: str
    jobs: list[JobSummary]
    links: Links


class JobCreated(JobSummary):
    links: Links


class Job(BaseModel):
    job_id: str
    batch_id: str
    status: Status
    source: Source
    image: str | None = Field(description="sha256 of the stored image; its thumbnail is /images/<sha256>.jpg.")
    top_k: int
    predictions: list[Prediction] | None = Field(description="Most likely first; null until done.")
    uncertain: bool | None = Field(
        None,
        description="The model is not sure: its top probability is below the "
        "threshold it ships with (chosen on real photos: below it an "
        "answer is more likely wrong than right). Null until done.",
    )
    model: ModelRef | None
    error: ErrorDetail | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    attempts: int = Field(description="Prediction attempts (a redelivered task counts again).")

    @classmethod
    def from_record(cls, rec: dict) -> Job:
        """A stored job record (shared/jobstore.py: every value a string) -> the API's job."""
        return cls(
            job_id=rec["job_id"],
            batch_id=rec["batch_id"],
            status=rec["status"],
            source=Source(type=rec["source_type"], value=rec["source"]),
            image=rec.get("image") or None,
            top_k=int(rec.get("top_k") or TOP_K_DEFAULT),
            predictions=json.loads(rec["predictions"]) if rec.get("predictions") else None,
            uncertain=rec["uncertain"] == "1" if rec.get("uncertain") else None,
            model=ModelRef(name=rec["model_name"], version=rec["model_version"]) if rec.get("model_name") else None,
            error=ErrorDetail.from_record(rec),
            created_at=rec["created_at"],
            started_at=rec.get("started_at") or None,
            finished_at=rec.get("finished_at") or None,
            attempts=int(rec.get("attempts") or 0),
        )


Counts = create_model("Counts", **{s: (int, ...) for s in STATUSES})


class Webhook(BaseModel):
    url: str
    status: Literal[WEBHOOK_STATUSES] = Field(
        description="pending until the batch is finished; then queued, and delivered or (after its attempts) failed."
    )
    attempts: int
    last_error: str | None
    delivered_at: str | None

    @classmethod
    def from_record(cls, rec: dict) -> Webhook | None:
        if not rec.get("webhook_url"):
            return None
        return cls(
            url=rec["webhook_url"],
            status=rec.get("webhook_status", "pending"),
            attempts=int(rec.get("webhook_attempts") or 0),
            last_error=rec.get("webhook_error") or None,
            delivered_at=rec.get("webhook_delivered_at") or None,
        )


class BatchSummary(BaseModel):
    """A batch without its jobs: what a completion webhook carries."""

    batch_id: str
    created_at: str
    total: int
    counts: Counts
    finished: bool = Field(description="Every job is done, failed or cancelled.")
    version: int = Field(description="Grows with every change; pass it back as ?since= to long-poll.")

    @classmethod
    def from_record(cls, rec: dict) -> BatchSummary:
        counts = {s: int(rec.get(f"n_{s}", 0)) for s in STATUSES}
        total = int(rec["total"])
        return cls(
            batch_id=rec["batch_id"],
            created_at=rec["created_at"],
            total=total,
            counts=counts,
            finished=sum(counts[s] for s in FINAL_STATUSES) == total,
            version=int(rec.get("version", 0)),
        )


class Batch(BatchSummary):
    jobs: list[Job] = Field(
        description="Every job in submission order; with ?since=V only the jobs that changed after version V."
    )
    webhook: Webhook | None = Field(None, description="The completion webhook, if the submission asked for one.")
    links: Links

    @classmethod
    def from_record(cls, rec: dict, jobs: list[dict], links: Links) -> Batch:
        """A stored batch record and some of its job records -> the API's batch."""
        return cls(
            **BatchSummary.from_record(rec).model_dump(),
            jobs=[Job.from_record(j) for j in jobs],
            webhook=Webhook.from_record(rec),
            links=links,
        )


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str | int]
