"""The API's data shapes, defined once: requests are validated with them, responses are built
to them, and the OpenAPI document (web/openapi.py) is generated from them."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.fetch import MAX_URL_LENGTH

TopK = Annotated[int, Field(ge=1, le=10, description="How many classes to return per image.")]
Status = Literal["queued", "fetching", "running", "done", "failed"]
top_k_adapter = TypeAdapter(TopK)


class UrlSubmission(BaseModel):
    """JSON body of POST /api/v1/batches and /api/v1/jobs."""
    model_config = ConfigDict(extra="forbid")
    urls: list[Annotated[str, Field(max_length=MAX_URL_LENGTH)]] = Field(
        default_factory=list, description="http(s) URLs of images; at most MAX_BATCH_ITEMS.")
    url: Annotated[str, Field(max_length=MAX_URL_LENGTH)] | None = Field(None, description="One URL (same as urls: [url]).")
    top_k: TopK = 3


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable reason, e.g. unsupported_format.")
    message: str = Field(description="What went wrong, for people.")


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


class JobSummary(BaseModel):
    job_id: str
    source: Source
    status: Status
    error: ErrorDetail | None = None


class Links(BaseModel):
    self: str
    page: str | None = None
    batch: str | None = None


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
    model: ModelRef | None
    error: ErrorDetail | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    attempts: int = Field(description="Prediction attempts (a redelivered task counts again).")


class Counts(BaseModel):
    queued: int
    fetching: int
    running: int
    done: int
    failed: int


class Batch(BaseModel):
    batch_id: str
    created_at: str
    total: int
    counts: Counts
    finished: bool = Field(description="Every job is done or failed.")
    version: int = Field(description="Grows with every change; pass it back as ?since= to long-poll.")
    jobs: list[Job] = Field(description="Every job in submission order; with ?since=V only the jobs "
                                        "that changed after version V.")
    links: Links


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str | int]
