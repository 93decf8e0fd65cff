"""The OpenAPI 3.1 document, generated from the routes and shared/schemas.py.

Each API route carries its operation (`@documented`, beside the route itself); build_openapi
walks the app's URL map, so the paths, methods and path parameters are the ones Flask serves,
and every body is a pydantic model the code validates or answers with."""

from __future__ import annotations

import re
from dataclasses import dataclass

from flask import Flask
from pydantic import BaseModel
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
SUBMIT_ERRORS = ("400", "409", "413", "415", "422", "429", "503")
_MODELS = [s.UrlSubmission, s.ErrorResponse, s.BatchCreated, s.JobCreated, s.Job, s.Batch, s.Health, s.Readiness]


@dataclass(frozen=True)
class Operation:
    operation_id: str
    summary: str  # may name settings: "{settings.max_batch_items}"
    responses: dict  # status -> (description, model)
    errors: tuple = ()  # statuses answered with an ErrorResponse (ERRORS says when)
    query: tuple = ()  # names in QUERY_PARAMETERS
    submits: bool = False  # takes a submission body and an Idempotency-Key, answers 202 with Location
    description: str = ""


def documented(operation_id: str, summary: str, responses: dict, **more):
    """This route's OpenAPI operation (see Operation), kept on its view function. Put it right
    under the route decorator, so that it marks the function Flask registers."""

    def attach(view):
        view.openapi = Operation(operation_id, summary, responses, **more)
        return view

    return attach


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def _query_parameters(settings: Settings) -> dict:
    return {
        "wait": {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": f"Long-poll: answer when something changed, or after this many seconds "
            f"(at most {settings.long_poll_max_seconds:g}).",
            "schema": {"type": "number", "minimum": 0},
        },
        "since": {
            "name": "since",
            "in": "query",
            "required": False,
            "description": "The version you already have: answer only the jobs "
            "changed since (and, with wait, wait for a change).",
            "schema": {"type": "integer"},
        },
    }


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": f"Printable, at most {KEY_MAX_LENGTH} characters. The same key from the same client "
    "within the retention period answers with the original batch (Idempotent-Replayed: true) and "
    "queues nothing again; with another request it is a 422.",
    "schema": {"type": "string", "maxLength": KEY_MAX_LENGTH},
}
ACCEPTED_HEADERS = {
    "Location": {"schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "schema": {"type": "string", "enum": ["true", "false"]},
        "description": "Sent with an Idempotency-Key: whether this answer is the original one, replayed.",
    },
}
# The multipart form web/submit.py parse_submission reads (JSON bodies are s.UrlSubmission).
MULTIPART_SUBMISSION = {
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


def _operation(op: Operation, path_arguments: list[str], settings: Settings) -> dict:
    query = _query_parameters(settings)
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": s.ID_PATTERN}}
        for name in path_arguments  # every id in a path is one of ours
    ] + [query[name] for name in op.query]
    responses = {status: {"description": d, "content": _json(model)} for status, (d, model) in op.responses.items()}
    responses |= {c: {"description": ERRORS[c], "content": _json(s.ErrorResponse)} for c in op.errors}
    out = {"operationId": op.operation_id, "summary": op.summary.format(settings=settings)}
    if op.description:
        out["description"] = op.description
    if op.submits:
        parameters.insert(0, IDEMPOTENCY_KEY)
        out["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": MULTIPART_SUBMISSION}} | _json(s.UrlSubmission),
        }
        responses["202"]["headers"] = ACCEPTED_HEADERS
    if parameters:
        out["parameters"] = parameters
    out["responses"] = responses
    return out


_PATH_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")  # <name> or <converter:name>


def build_openapi(settings: Settings, app: Flask) -> dict:
    """The document for every route of `app` that carries an operation (@documented)."""
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    paths: dict = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        op = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if op is None:
            continue
        path = _PATH_ARGUMENT.sub(r"{\1}", rule.rule)  # Flask's <name> -> OpenAPI's {name}
        arguments = _PATH_ARGUMENT.findall(rule.rule)  # in the order of the path
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(op, arguments, settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "CIFAR-10 classification service",
            "version": "1",
            "description": "Submit images or image URLs; poll jobs and batches for their top "
            'classes. Errors are always {"error": {"code", "message"}}.',
        },
        "paths": paths,
        "components": {"schemas": defs["$defs"]},
    }
