"""The OpenAPI document: generated from the models the code validates with, and served."""

import re

import schemathesis

from shared.schemas import Batch, BatchCreated, Job, UrlSubmission
from tests.helpers import noise_png, upload


def test_the_document_is_served_and_valid(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(spec)  # schemathesis refuses an invalid document
    ops = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert {
        ("POST", "/api/v1/batches"),
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/{job_id}"),
        ("GET", "/api/v1/batches/{batch_id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    } <= ops


def test_the_request_schema_is_the_validating_model(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    documented = spec["components"]["schemas"]["UrlSubmission"]
    assert documented["properties"]["top_k"] == UrlSubmission.model_json_schema()["properties"]["top_k"]
    assert documented["properties"]["top_k"]["maximum"] == 10
    # ...and the code enforces exactly that bound:
    assert client.post("/api/v1/batches", json={"urls": ["https://example.com/a.jpg"], "top_k": 11}).status_code == 400


def test_responses_match_their_documented_shapes(client, app):
    created = upload(client, [("a.png", noise_png(1))]).get_json()
    BatchCreated.model_validate(created)
    Batch.model_validate(client.get(created["links"]["self"]).get_json())
    Job.model_validate(client.get(f"/api/v1/jobs/{created['jobs'][0]['job_id']}").get_json())


def test_the_docs_page_lists_every_operation(client):
    page = client.get("/api/docs").data.decode()
    for path in ("/api/v1/batches", "/api/v1/jobs/{job_id}", "/readyz", "UrlSubmission"):
        assert path in page


def test_every_api_route_is_in_the_document(client, app):
    """The paths are generated from the URL map: a route added without @documented fails here,
    and the document has no operation that Flask does not serve."""
    spec = client.get("/api/v1/openapi.json").get_json()
    undocumented = {"api.openapi", "pages.api_docs", "api.metrics"}  # the document, its page; Prometheus' text
    served = {
        (method.lower(), re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if (rule.endpoint.startswith("api.") or rule.rule.startswith("/api/")) and rule.endpoint not in undocumented
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(method, path) for path, operations in spec["paths"].items() for method in operations}
    assert served == documented
    assert {("get", "/healthz"), ("get", "/readyz"), ("post", "/api/v1/batches/{batch_id}/cancel")} <= documented
