"""Turning one HTTP submission into stored images, job records and queued tasks."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from flask import current_app
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from redis import RedisError
from werkzeug.datastructures import FileStorage

from shared.fetch import MAX_URL_LENGTH, UrlRefused, check_url
from shared.images import DecodeBudget, ImageRefused, PreparedImage, open_image, prepare
from shared.jobstore import Claim, NewJob
from shared.metrics import JOBS_FINISHED, JOBS_SUBMITTED
from shared.queue import FetchTask, PredictTask, enqueue
from shared.schemas import TOP_K_DEFAULT, UrlSubmission, top_k_adapter
from shared.settings import Settings
from web.errors import ApiError, unavailable
from web.forms import has_undecodable

log = logging.getLogger(__name__)


@dataclass
class Upload:
    filename: str
    data: bytes | None  # None when the file was refused on arrival (refusal says why)
    refusal: ImageRefused | None = None


@dataclass
class SubmittedUrl:
    url: str


@dataclass
class Submission:
    items: list  # Upload and SubmittedUrl, in the order sent
    top_k: int
    webhook_url: str = ""

    def fingerprint(self, path: str) -> str:
        """What makes two requests the same request (for idempotency keys): the route, the
        choices and the inputs themselves (files by content: a retried multipart body has
        another boundary, and the same files)."""
        items = [
            ["url", i.url]
            if isinstance(i, SubmittedUrl)
            else ["upload", i.filename, i.refusal.code if i.refusal else hashlib.sha256(i.data).hexdigest()]
            for i in self.items
        ]
        return hashlib.sha256(json.dumps([path, self.top_k, self.webhook_url, items]).encode()).hexdigest()


def parse_submission(request, settings: Settings, single: bool) -> Submission:
    """Read files and URLs from a multipart form, a plain form or a JSON body (shared/schemas.py)."""
    if request.is_json:
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # json.loads recurses once per level: 100,000 brackets blow the stack
            raise ApiError(400, "invalid_json", "The JSON body is nested too deeply.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", 'The body must be a JSON object like {"urls": ["https://..."]}.')
        try:
            sub = UrlSubmission.model_validate(body)
        except ValidationError as exc:
            raise _invalid(exc) from None
        files, urls, top_k, webhook = [], ([sub.url] if sub.url else []) + sub.urls, sub.top_k, sub.webhook_url
    elif request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        webhook = request.form.get("webhook_url", "").strip()
        files = [f for name in ("images", "image") for f in request.files.getlist(name)]
        text = "\n".join(request.form.getlist("urls") + request.form.getlist("url"))
        urls = [line.strip() for line in text.splitlines() if line.strip()]
        try:
            top_k = top_k_adapter.validate_python(request.form.get("top_k", request.args.get("top_k", TOP_K_DEFAULT)))
        except ValidationError as exc:
            raise _invalid(exc, "top_k") from None
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send multipart/form-data (fields 'images' and/or 'urls') or JSON {\"urls\": [...]}.",
        )
    count = len(files) + len(urls)
    if count == 0:
        raise ApiError(400, "no_images", "Send at least one image (field 'images') or URL (field 'urls').")
    if single and count > 1:
        raise ApiError(
            400,
            "too_many_items",
            f"This endpoint takes one image or URL; got {count}. Use POST /api/v1/batches for several.",
        )
    if count > settings.max_batch_items:
        raise ApiError(
            413,
            "too_many_items",
            f"A batch holds at most {settings.max_batch_items} "
            f"images or URLs; got {count}. Split it into several batches.",
        )
    if webhook:
        _check_webhook(webhook, settings)
    return Submission([_upload(f, settings) for f in files] + [SubmittedUrl(u) for u in urls], top_k, webhook or "")


def _check_webhook(url: str, settings: Settings) -> None:
    """The same rules as for image URLs (resolved, pinned and checked again at every delivery)."""
    if not settings.webhook_secret:
        raise ApiError(
            400,
            "webhooks_not_configured",
            "This deployment sends no webhooks (WEBHOOK_SECRET is not set): poll the batch instead.",
        )
    try:
        check_url(url, settings.fetch_allow_hosts, resolve=False)
    except UrlRefused as exc:
        raise ApiError(400, exc.code, f"webhook_url: {exc.message}") from None


def _invalid(exc: ValidationError, field: str | None = None) -> ApiError:
    err = exc.errors()[0]
    field = field or ".".join(str(p) for p in err["loc"]) or "body"
    code = "invalid_top_k" if field == "top_k" else "invalid_field"
    return ApiError(400, code, f"{field}: {err['msg']}")


def _upload(f: FileStorage, settings: Settings) -> Upload:
    # The name is shown back to the user only (never used as a path): short and printable.
    name = "".join(ch for ch in (f.filename or "upload") if ch.isprintable())[-200:] or "upload"
    if has_undecodable(f.filename or ""):
        return Upload(
            name,
            None,
            ImageRefused("bad_filename", "The file name is not UTF-8 text; rename the file and send it again.", 400),
        )
    data = f.stream.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        return Upload(
            name,
            None,
            ImageRefused(
                "file_too_large", f"{name} is larger than {settings.max_upload_bytes // (1024 * 1024)} MB.", 413
            ),
        )
    return Upload(name, data)


@dataclass
class PreparedJob:
    """One item of a submission, checked: its new record, and an upload's decoded image with
    the bytes it came as (kept once the batch is queued)."""

    job: NewJob
    image: PreparedImage | None = None
    original: bytes = b""


def prepare_submission(sub: Submission) -> list[PreparedJob]:
    """Check and decode every item (the slow part, before anything is stored): an item that
    fails becomes a failed job with its reason; if every item fails, the request does."""
    settings: Settings = current_app.extensions["settings"]
    decode = _RequestDecoder(settings, current_app.extensions["decode_budget"])
    prepared, first_error = [], None
    for item in sub.items:
        try:
            if isinstance(item, SubmittedUrl):
                check_url(item.url, settings.fetch_allow_hosts, resolve=False)
                prepared.append(PreparedJob(NewJob("url", item.url, status="fetching")))
            else:
                image = decode(item)
                job = NewJob("upload", item.filename, image.sha256, pixels=image.pixels_b64)
                prepared.append(PreparedJob(job, image, item.data))
        except (ImageRefused, UrlRefused) as exc:
            first_error = first_error or exc
            source = ("upload", item.filename) if isinstance(item, Upload) else ("url", item.url[:MAX_URL_LENGTH])
            prepared.append(
                PreparedJob(NewJob(*source, status="failed", error_code=exc.code, error_message=exc.message))
            )
    if first_error is not None and all(p.job.status == "failed" for p in prepared):
        # Nothing usable at all: answer with the reason instead of a batch of failures.
        raise ApiError(first_error.status, first_error.code, first_error.message)
    return prepared


def store_submission(
    sub: Submission, prepared: list[PreparedJob], claim: Claim | None = None
) -> tuple[str, list[dict]]:
    """Write the records (answering the idempotency claim with them), queue the work, then keep
    the images. If queueing fails, the batch is taken back and the client gets a 503 (nothing
    stored); if taking it back fails too, the batch stays and is answered: its jobs are queued
    again from their records when their deadlines pass (worker/janitor.py), like any lost
    message. Returns (batch_id, job records)."""
    store = current_app.extensions["jobs"]
    batch_id, records = store.create_batch([p.job for p in prepared], sub.top_k, sub.webhook_url, claim)
    try:
        enqueue(
            current_app.extensions["celery"],
            [
                PredictTask(r["job_id"], p.job.pixels, sub.top_k)
                for p, r in zip(prepared, records, strict=True)
                if p.image
            ],
            [FetchTask(r["job_id"], r["source"], sub.top_k) for r in records if r["status"] == "fetching"],
        )
    except (OperationalError, RedisError, OSError) as exc:
        log.warning("could not queue batch %s: %s", batch_id, exc)
        try:
            store.delete_batch(batch_id, [r["job_id"] for r in records], claim)
        except RedisError:
            log.warning("batch %s is stored but not queued: its deadlines will queue it", batch_id)
        else:
            raise unavailable("nothing was queued") from None
    for p in prepared:
        if p.image is not None:
            current_app.extensions["images"].keep(p.image.sha256, p.original, p.image.thumbnail)
    for r in records:
        JOBS_SUBMITTED.labels(r["source_type"]).inc()
        if r["status"] == "failed":
            JOBS_FINISHED.labels("failed", r["error_code"]).inc()
    log.info("batch submitted", extra={"batch_id": batch_id, "jobs": len(records)})
    return batch_id, records


def create_submission(sub: Submission) -> tuple[str, list[dict]]:
    """A submission without an idempotency key: prepare it, then store it."""
    return store_submission(sub, prepare_submission(sub))


class _RequestDecoder:
    """Prepares one request's uploads within its pixel budget: a request's images may cost
    MAX_REQUEST_DECODE_PIXELS to decode in all (ten 6300x6300 PNGs took 7.4 s of one request);
    the rest of them fail with the reason, and can come in another request."""

    def __init__(self, settings: Settings, budget: DecodeBudget):
        self.settings, self.budget, self.spent = settings, budget, 0

    def __call__(self, item: Upload) -> PreparedImage:
        if item.refusal is not None:
            raise item.refusal
        opened = open_image(item.data, **self.settings.image_limits())  # its header, read once
        cost = opened.cost.pixels  # the time this request spends decoding
        if self.spent + cost > self.settings.max_request_decode_pixels:
            raise ImageRefused(
                "too_many_pixels",
                f"This request's images would take more than "
                f"{self.settings.max_request_decode_pixels:,} pixels to decode in all; send the rest "
                "in another request.",
                413,
            )
        self.spent += cost
        return prepare(opened, budget=self.budget)
