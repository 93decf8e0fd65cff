"""One settings object, read from the environment, with defaults for a laptop.

Built once per process (`Settings.from_env()`) and passed down: to the Flask app
factory, to the Celery app, to the job store. Nothing reads os.environ elsewhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _host_ports(value: str) -> frozenset[str]:
    return frozenset(h.strip().lower() for h in value.split(",") if h.strip())


@dataclass(frozen=True)
class Settings:
    # Each field is read from the environment variable of the same name, upper-cased.
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_dir: Path = REPO_ROOT / "var" / "images"
    model_dir: Path = REPO_ROOT / "models" / "cifar10-airbench"
    app_env: str = "production"          # "development" enables Flask debug mode
    secret_key: str = ""                 # signs form tokens; unset: one random key kept in Redis
    fetch_allow_hosts: frozenset[str] = frozenset()  # host:port pairs allowed despite being private
    fetch_timeout: float = 10.0          # seconds for one URL, all redirects included
    fetch_max_bytes: int = 10 * 1024 * 1024
    fetch_max_redirects: int = 5
    fetch_concurrency: int = 64          # fetch threads in all, split across the fetch processes
    fetch_processes: int = 2             # a URL's Python work holds a GIL: 2 fetch ~1.7x faster than 1 on 2 cores
    max_upload_bytes: int = 10 * 1024 * 1024      # one image
    max_request_bytes: int = 256 * 1024 * 1024    # one HTTP request (Flask MAX_CONTENT_LENGTH)
    max_image_pixels: int = 40_000_000
    max_batch_items: int = 1000
    retention_days: float = 7.0          # job records and stored images expire after this
    long_poll_max_seconds: float = 25.0
    predict_batch_size: int = 64         # most images per model call
    predict_batch_wait_ms: float = 5.0   # how long a worker gathers concurrent jobs
    predict_precision: str = "auto"      # float32 | bfloat16 | auto (bfloat16 where the CPU has it)
    predict_processes: int = 0           # model processes per worker (0: one per core, at most 4)
    predict_threads: int = 0             # compute threads per model process (0: the cores shared out)
    predict_tta_level: int = -1          # test-time augmentation: -1 as the model ships it, 0 none, 1, 2
    result_cache: bool = True            # the same image (pixels) and model version: predicted once
    task_max_attempts: int = 3           # deliveries of one job before it fails as poison
    task_soft_time_limit: float = 30.0   # seconds for one prediction batch or fetch
    visibility_timeout: int = 60         # seconds before an unacknowledged task is redelivered
    worker_heartbeat_seconds: float = 5.0
    rate_limit: str = "600/minute;20000/hour"  # per client, on submissions
    trusted_proxies: int = 0             # reverse proxies in front of the web tier (docker-compose: 1, nginx)
    log_json: bool = True

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.name.upper())
            if raw is None or raw == "":
                continue
            default = f.default
            if isinstance(default, bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, frozenset):
                values[f.name] = _host_ports(raw)
            elif isinstance(default, Path):
                values[f.name] = Path(raw).expanduser()
            elif isinstance(default, (int, float)):
                try:
                    values[f.name] = type(default)(raw)
                except ValueError:
                    raise ValueError(f"{f.name.upper()}={raw!r} is not a valid {type(default).__name__}") from None
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls(**values)

    @property
    def retention_seconds(self) -> int:
        return int(self.retention_days * 86400)

    @property
    def debug(self) -> bool:
        return self.app_env == "development"
