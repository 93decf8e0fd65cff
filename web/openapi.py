"""The OpenAPI 3.1 document, generated from shared/schemas.py (the models the code validates with)."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from shared import formats
from shared import schemas as s
from shared.settings import Settings
from web.idempotency import KEY_MAX_LENGTH

ERRORS = {
    "400": "Bad request: no image, a malformed body or field, a URL that is refused.",
    "404": "Unknown id, or expired after the retention period.",
    "413": "Too large: the request, one image, or more items than a batch holds.",
    "415": "Not an image we accept, or a body that is neither multipart nor JSON.",
    "409": "A request with this Idempotency-Key is still being answered; send it again shortly.",
    "422": "This Idempotency-Key came with another request (idempotency_key_reused).",
    "429": "Too many submissions from this client; see Retry-After.",
    "503": "Redis is unavailable; nothing was stored. See Retry-After.",
}
_MODELS = [s.UrlSubmission, s.ErrorResponse, s.BatchCreated, s.JobCreated, s.Job, s.Batch, s.Health, s.Readiness]


def _ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def _errors(*codes: str) -> dict:
    return {c: {"description": ERRORS[c], "content": _json(s.ErrorResponse)} for c in codes}


def build_openapi(settings: Settings) -> dict:
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    multipart = {
        "type": "object",
        "properties": {
            "images": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": f"Image files ({formats.NAMES}).",
            },
            "urls": {"type": "string", "description": "Image URLs, one per line."},
            "top_k": s.top_k_adapter.json_schema() | {"default": s.TOP_K_DEFAULT},
            "webhook_url": {
                "type": "string",
                "description": "POSTed the batch summary, signed, once the batch "
                "is finished (needs WEBHOOK_SECRET on the server).",
            },
        },
    }
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": f"Printable, at most {KEY_MAX_LENGTH} characters. The same key from the same client "
        "within the retention period answers with the original batch (Idempotent-Replayed: true) and "
        "queues nothing again; with another request it is a 422.",
        "schema": {"type": "string", "maxLength": KEY_MAX_LENGTH},
    }
    accepted_headers = {
        "Location": {"schema": {"type": "string"}},
        "Idempotent-Replayed": {
            "schema": {"type": "string", "enum": ["true", "false"]},
            "description": "Sent with an Idempotency-Key: whether this answer is the original one, replayed.",
        },
    }
    submit_body = {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": multipart},
            "application/json": {"schema": _ref(s.UrlSubmission)},
        },
    }
    hex_id = {"type": "string", "pattern": s.ID_PATTERN}
    wait = {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": f"Long-poll: answer when something changed, or after this many seconds "
        f"(at most {settings.long_poll_max_seconds:g}).",
        "schema": {"type": "number", "minimum": 0},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "CIFAR-10 classification service",
            "version": "1",
            "description": "Submit images or image URLs; poll jobs and batches for their top "
            'classes. Errors are always {"error": {"code", "message"}}.',
        },
        "paths": {
            "/api/v1/batches": {
                "post": {
                    "operationId": "createBatch",
                    "parameters": [idempotency_key],
                    "summary": f"Submit up to {settings.max_batch_items} images and/or URLs",
                    "description": "Items that are not usable become failed jobs with their reason; a "
                    "request in which no item is usable is answered with that error.",
                    "requestBody": submit_body,
                    "responses": {
                        "202": {
                            "description": "Accepted",
                            "content": _json(s.BatchCreated),
                            "headers": accepted_headers,
                        },
                        **_errors("400", "409", "413", "415", "422", "429", "503"),
                    },
                }
            },
            "/api/v1/jobs": {
                "post": {
                    "operationId": "createJob",
                    "parameters": [idempotency_key],
                    "summary": "Submit exactly one image or URL",
                    "requestBody": submit_body,
                    "responses": {
                        "202": {
                            "description": "Accepted",
                            "content": _json(s.JobCreated),
                            "headers": accepted_headers,
                        },
                        **_errors("400", "409", "413", "415", "422", "429", "503"),
                    },
                }
            },
            "/api/v1/jobs/{job_id}": {
                "get": {
                    "operationId": "getJob",
                    "summary": "A job's status and predictions",
                    "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": hex_id}, wait],
                    "responses": {
                        "200": {"description": "The job", "content": _json(s.Job)},
                        **_errors("400", "404", "503"),
                    },
                }
            },
            "/api/v1/batches/{batch_id}": {
                "get": {
                    "operationId": "getBatch",
                    "summary": "A batch: counts per status and every job",
                    "parameters": [
                        {"name": "batch_id", "in": "path", "required": True, "schema": hex_id},
                        wait,
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "description": "The version you already have: answer only the jobs "
                            "changed since (and, with wait, wait for a change).",
                            "schema": {"type": "integer"},
                        },
                    ],
                    "responses": {
                        "200": {"description": "The batch", "content": _json(s.Batch)},
                        **_errors("400", "404", "503"),
                    },
                }
            },
            "/api/v1/batches/{batch_id}/cancel": {
                "post": {
                    "operationId": "cancelBatch",
                    "summary": "Cancel every unfinished job of a batch (finished ones keep their results; "
                    "again is a no-op)",
                    "parameters": [{"name": "batch_id", "in": "path", "required": True, "schema": hex_id}],
                    "responses": {
                        "200": {"description": "The batch, cancelled", "content": _json(s.Batch)},
                        **_errors("404", "503"),
                    },
                }
            },
            "/api/v1/jobs/{job_id}/cancel": {
                "post": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a job if it is not finished",
                    "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": hex_id}],
                    "responses": {
                        "200": {"description": "The job", "content": _json(s.Job)},
                        **_errors("404", "503"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "The process is up",
                    "responses": {"200": {"description": "Up", "content": _json(s.Health)}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Redis answers and a worker with the model is alive",
                    "responses": {
                        "200": {"description": "Ready", "content": _json(s.Readiness)},
                        "503": {"description": "Not ready", "content": _json(s.Readiness)},
                    },
                }
            },
        },
        "components": {"schemas": defs["$defs"]},
    }
