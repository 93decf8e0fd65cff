"""One settings object, read from the environment, with defaults for a laptop.

Built once per process (`Settings.from_env()`) and passed down: to the Flask app factory, to
the Celery app, to the job store. Nothing else reads os.environ (a child process gets its
settings back with `Settings.to_env()`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "cifar10-airbench"

DEADLINE_MARGIN_SECONDS = 10.0  # what a deadline allows beyond the step's own limit (heartbeats, Redis)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """An environment variable that cannot be used; the message names it and its value."""


@dataclass(frozen=True)
class Settings:
    # Each field is read from the environment variable of the same name, upper-cased (or the
    # name in its metadata).
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_dir: Path = REPO_ROOT / "var" / "images"
    model_dir: Path = DEFAULT_MODEL_DIR
    app_env: str = "production"  # "development" enables Flask debug mode
    secret_key: str = ""  # signs form tokens; unset: one random key kept in Redis
    fetch_allow_hosts: frozenset[str] = frozenset()  # host:port pairs allowed despite being private
    fetch_timeout: float = 10.0  # seconds for one URL, all redirects included
    fetch_max_bytes: int = 10 * 1024 * 1024
    fetch_max_redirects: int = 5
    fetch_ca_bundle: str = ""  # PEM file of the CAs to trust for https URLs (empty: certifi's bundle)
    fetch_concurrency: int = 64  # fetch threads in all, split across the fetch processes
    fetch_processes: int = 2  # a URL's Python work holds a GIL: 2 fetch ~1.7x faster than 1 on 2 cores
    max_upload_bytes: int = 10 * 1024 * 1024  # one image
    max_request_bytes: int = 256 * 1024 * 1024  # one HTTP request (Flask MAX_CONTENT_LENGTH)
    max_image_pixels: int = 50_000_000  # declared size of any image (a 50 MP phone photo passes)
    max_full_decode_pixels: int = 16_000_000  # formats decoded at full size: all but JPEG (4K screenshots pass)
    max_request_decode_pixels: int = 64_000_000  # what one request's images may cost to decode, in all
    decode_budget_bytes: int = 320_000_000  # memory of the decodes running at once in one process (others wait)
    max_batch_items: int = 1000
    retention_days: float = 7.0  # job records and stored images expire after this
    web_processes: int = 2  # gunicorn worker processes of the web tier
    long_poll_max_seconds: float = 25.0
    long_poll_max_waiters: int = 500  # long-polls one web process holds at once; more are answered at once
    predict_batch_size: int = 64  # most images per model call
    predict_batch_wait_ms: float = 5.0  # how long a worker gathers concurrent jobs
    predict_chunk: int = 16  # most jobs per prediction message (Celery's cost is per message)
    predict_precision: str = "auto"  # float32 | bfloat16 | auto (bfloat16 where the CPU has it)
    predict_processes: int = 0  # model processes per worker (0: one per CPU, at most 4)
    predict_threads: int = 0  # compute threads per model process (0: the CPUs shared out)
    predict_tta_level: int = -1  # test-time augmentation: -1 as the model ships it, 0 none, 1, 2
    predict_runtime: str = "auto"  # keras | openvino | auto (as model.json serves it, where installed)
    result_cache: bool = True  # the same image (pixels) and model version: predicted once
    task_max_attempts: int = 3  # solo runs of a suspect job, and re-queues of any job past its deadline
    task_soft_time_limit: float = 30.0  # seconds for one prediction batch or fetch
    visibility_timeout: int = 300  # seconds before kombu's Redis transport redelivers a held task
    worker_heartbeat_seconds: float = 2.0
    worker_dead_after_seconds: float = 6.0  # a worker silent this long is dead: its jobs are queued again
    worker_role: str = "predict"  # what a Celery worker process does: predict | fetch (set by `python -m worker`)
    worker_pool: str = "prefork"  # predict queue: prefork (model in a child process) | solo (in the worker)
    worker_app: str = "worker.app"  # the Celery app `python -m worker` runs (tests run one that injects faults)
    worker_metrics_port: int = 0  # `python -m worker` serves its processes' metrics here (0: off)
    prometheus_multiproc_dir: str = ""  # where each process writes its metrics (prometheus-client's variable)
    rate_limit: str = "600/minute;20000/hour"  # per client, on all submissions together
    webhook_secret: str = ""  # signs completion webhooks (Standard Webhooks); unset: webhooks are refused
    webhook_timeout: float = 10.0  # seconds for one delivery attempt
    metrics_token: str = ""  # /metrics wants "Authorization: Bearer <this>"; unset: loopback clients only
    trusted_proxies: int = 0  # reverse proxies in front of the web tier (docker-compose: 1, nginx)
    log_json: bool = True
    cache_dir: Path = field(default=Path.home() / ".cache" / "cifar-svc", metadata={"env": "CIFAR_SVC_CACHE"})

    @classmethod
    def from_env(cls, environ=None, **overrides) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(_env_name(f))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables: what a child process needs to read them back."""
        return {_env_name(f): _format(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def image_limits(self) -> dict:
        """check_image's limits (shared/images.py) as these settings set them."""
        return dict(max_pixels=self.max_image_pixels, max_full_pixels=self.max_full_decode_pixels)

    def __post_init__(self):
        if self.visibility_timeout <= self.hold_deadline_seconds:
            raise SettingsError(
                f"VISIBILITY_TIMEOUT={self.visibility_timeout} must be longer than a task message may be held "
                f"({self.hold_deadline_seconds:g} s, from TASK_SOFT_TIME_LIMIT), or a slow batch is run twice"
            )

    # Deadlines: every unfinished job has one, set by its last step; past it, the janitor queues
    # its task again from the record (worker/janitor.py). Each is the longest the step may take
    # and a margin for the heartbeat that notices.
    @property
    def task_time_limit(self) -> float:
        """A pool child still running a task this long after it started is killed."""
        return self.task_soft_time_limit + 30

    @property
    def fetch_deadline_seconds(self) -> float:
        """From the start of a fetch: the download, then decoding (bounded by the soft limit)."""
        return self.fetch_timeout + 2 * DEADLINE_MARGIN_SECONDS

    @property
    def run_deadline_seconds(self) -> float:
        """From the start of a prediction batch."""
        return self.task_time_limit + DEADLINE_MARGIN_SECONDS

    @property
    def hold_deadline_seconds(self) -> float:
        """From when a worker took a message: it may wait behind one batch, then run as one."""
        return 2 * self.task_time_limit + DEADLINE_MARGIN_SECONDS

    @property
    def retention_seconds(self) -> int:
        return int(self.retention_days * 86400)

    @property
    def debug(self) -> bool:
        return self.app_env == "development"


def _env_name(f) -> str:
    return f.metadata.get("env", f.name.upper())


def _parse(f, raw: str):
    default, name = f.default, _env_name(f)
    if isinstance(default, bool):
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no or on/off)")
        return word in _TRUE
    if isinstance(default, frozenset):
        return frozenset(h.strip().lower() for h in raw.split(",") if h.strip())
    if isinstance(default, Path):
        return Path(raw).expanduser()
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a valid {type(default).__name__}") from None
    return raw


def _format(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value)
