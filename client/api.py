"""A small HTTP client for the service's API, with retries on 429/503 and network errors."""

from __future__ import annotations

import time
from pathlib import Path

import requests

RETRY_STATUSES = {429, 502, 503, 504}


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
        delay = 1.0
        for attempt in range(self.retries + 1):
            for _field, (_name, handle) in kw.get("files") or []:
                handle.seek(0)  # every attempt sends each file whole, however far the last one got
            try:
                resp = self.session.request(method, self.server + path, timeout=self.timeout, **kw)
            except requests.ConnectionError:
                if attempt == self.retries:
                    raise
                self.sleep(delay)
                delay = min(delay * 2, 30)
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
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
                err = body.get("error", {})
                raise ServiceError(resp.status_code, err.get("code", "http_error"), err.get("message", resp.text[:200]))
            return body
        raise AssertionError("unreachable")

    def submit_urls(self, urls: list[str], top_k: int = 3) -> dict:
        return self._request("POST", "/api/v1/batches", json={"urls": urls, "top_k": top_k})

    def submit_files(self, paths: list[Path], top_k: int = 3) -> dict:
        handles = [open(p, "rb") for p in paths]
        try:
            files = [("images", (p.name, h)) for p, h in zip(paths, handles, strict=True)]
            return self._request("POST", "/api/v1/batches", files=files, data={"top_k": str(top_k)})
        finally:
            for h in handles:
                h.close()

    def batch(self, batch_id: str, wait: float = 0, since: int | None = None) -> dict:
        params = {"wait": wait} if wait else {}
        if since is not None:
            params["since"] = since
        return self._request("GET", f"/api/v1/batches/{batch_id}", params=params)

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/api/v1/jobs/{job_id}")
