"""HTML pages: the upload form and the shareable batch page (plain HTML/CSS/JS, no build step)."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, redirect, render_template, request, send_file, url_for

from shared import formats
from shared.schemas import TOP_K_DEFAULT, TOP_K_MAX, TOP_K_MIN
from web.errors import ApiError
from web.extensions import submissions
from web.openapi import build_openapi
from web.submit import create_submission, parse_submission

pages = Blueprint("pages", __name__)


def _form(error: str | None = None):
    s = current_app.extensions["settings"]
    return render_template(
        "index.html",
        error=error,
        max_items=s.max_batch_items,
        max_mb=s.max_upload_bytes // (1024 * 1024),
        formats=formats.NAMES,
        top_k_choices=range(TOP_K_MIN, TOP_K_MAX + 1),
        top_k_default=TOP_K_DEFAULT,
    )


@pages.get("/")
def index():
    return _form()


@pages.post("/batches")
@submissions
def submit_form():
    """The form's no-JavaScript path: submit, then go to the batch page."""
    try:
        batch_id, _ = create_submission(parse_submission(request, current_app.extensions["settings"], single=False))
    except ApiError as e:
        return _form(e.message), e.status
    return redirect(url_for("pages.batch_page", batch_id=batch_id), 303)


@pages.get("/batches/<batch_id>")
def batch_page(batch_id: str):
    if current_app.extensions["jobs"].batch_version(batch_id) is None:
        abort(404)
    return render_template("batch.html", batch_id=batch_id)


@pages.get("/api/docs")
def api_docs():
    return render_template("api_docs.html", spec=build_openapi(current_app.extensions["settings"], current_app))


@pages.get("/images/<sha>.jpg")
def thumbnail(sha: str):
    path = current_app.extensions["images"].thumbnail_path(sha)
    if path is None:
        abort(404)
    return send_file(path, mimetype="image/jpeg", max_age=86400)
