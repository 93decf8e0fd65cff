"""A small HTTP client for the service's API, with retries on 429/503 and network errors."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from shared.schemas import TOP_K_DEFAULT

RETRY_STATUSES = {429, 502, 503, 504}
RETRY_CODES = {"idempotency_key_in_use"}  # a 409: our earlier attempt is still being answered


class ServiceError(RuntimeError):
    """The service answered with an error (after any retries): HTTP status, code, message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Client:
    def __init__(self, server: str, retries: int = 8, timeout: float = 120.0, sleep=time.sleep):
        self.server = server.rstrip("/")
        self.session = requests.Session()
        self.retries, self.timeout, self.sleep = retries, timeout, sleep

    def _request(self, method: str, path: str, **kw) -> dict:
        # A request that may have reached the server is only sent again when that is safe: a GET,
        # or a submission with an Idempotency-Key (the server answers a repeat with the original).
        safe = method == "GET" or "Idempotency-Key" in (kw.get("headers") or {})
        retry_on = (requests.ConnectionError, requests.Timeout) if safe else requests.ConnectionError
        delay = 1.0
        for attempt in range(self.retries + 1):
            for _field, (_name, handle) in kw.get("files") or []:
                handle.seek(0)  # every attempt sends each file whole, however far the last one got
            try:
                resp = self.session.request(method, self.server + path, timeout=self.timeout, **kw)
            except retry_on:
                if attempt == self.retries:
                    raise
                self.sleep(delay)
                delay = min(delay * 2, 30)
                continue
            if attempt < self.retries and (resp.status_code in RETRY_STATUSES or _code(resp) in RETRY_CODES):
                # The server says when to come back; otherwise back off exponentially.
                after = resp.headers.get("Retry-After", "")
                self.sleep(float(after) if after.replace(".", "", 1).isdigit() else delay)
                delay = min(delay * 2, 30)
                continue
            try:
                body = resp.json()
            except ValueError:
                body = {}
            if resp.status_code >= 400:
                err = (body.get("error") if isinstance(body, dict) else None) or {}
                raise ServiceError(resp.status_code, err.get("code", "http_error"), err.get("message", resp.text[:200]))
            return body
        raise AssertionError("unreachable")

    def submit_urls(self, urls: list[str], top_k: int = TOP_K_DEFAULT, key: str | None = None) -> dict:
        return self._request("POST", "/api/v1/batches", json={"urls": urls, "top_k": top_k}, headers=_key(key))

    def submit_files(self, paths: list[Path], top_k: int = TOP_K_DEFAULT, key: str | None = None) -> dict:
        handles = [open(p, "rb") for p in paths]
        try:
            files = [("images", (p.name, h)) for p, h in zip(paths, handles, strict=True)]
            return self._request("POST", "/api/v1/batches", files=files, data={"top_k": str(top_k)}, headers=_key(key))
        finally:
            for h in handles:
                h.close()

    def cancel(self, batch_or_job_id: str) -> dict:
        """Cancel a batch's unfinished jobs, or one job."""
        try:
            return self._request("POST", f"/api/v1/batches/{batch_or_job_id}/cancel")
        except ServiceError as exc:
            if exc.status != 404:
                raise
            return self._request("POST", f"/api/v1/jobs/{batch_or_job_id}/cancel")

    def batch(self, batch_id: str, wait: float = 0, since: int | None = None) -> dict:
        params = {"wait": wait} if wait else {}
        if since is not None:
            params["since"] = since
        return self._request("GET", f"/api/v1/batches/{batch_id}", params=params)

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/api/v1/jobs/{job_id}")


def _key(key: str | None) -> dict:
    return {"Idempotency-Key": key} if key else {}


def _code(resp) -> str:
    """The error code of an answer, "" if it has none. A job's own "error" is null until it fails:
    reading it as a dict broke `get JOB_ID` once."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code", "") if isinstance(error, dict) else ""
