"""gunicorn settings for the web tier: `gunicorn -c web/gunicorn_conf.py web.wsgi:app`.

Loaded by path, not as python:web.gunicorn_conf: importing the web package here, in gunicorn's
master, would create metric files before on_starting had made their folder.
"""

import glob
import os

from gunicorn.http import wsgi
from prometheus_client import multiprocess

from shared.settings import Settings

_settings = Settings.from_env()

# A worker class made for waiting: gevent holds each connection in a greenlet, so long-polls
# (a results page polls with ?wait=20) and slow clients cost memory, not one of 32 threads
# (with gthread, 100 held long-polls made /healthz wait 40 s). web/gunicorn_worker.py adds read
# deadlines.
worker_class = "web.gunicorn_worker.Worker"
workers = _settings.web_processes
worker_connections = 1000  # per process: held long-polls are capped lower (LONG_POLL_MAX_WAITERS)
# Under gevent this is also the deadline for a request's headers (each request's head is read
# under it): a slowloris client sending a byte a second is cut off after 5 s.
keepalive = 5
timeout = 60
graceful_timeout = 20


def on_starting(server):
    # Metrics files of a previous run would be added to this run's counts: start clean.
    d = _settings.prometheus_multiproc_dir
    if d:
        os.makedirs(d, exist_ok=True)
        for f in glob.glob(os.path.join(d, "*.db")):
            os.remove(f)


def child_exit(server, worker):
    if _settings.prometheus_multiproc_dir:
        multiprocess.mark_process_dead(worker.pid, _settings.prometheus_multiproc_dir)


# No "Server: gunicorn" banner: gunicorn has no setting for its Server header (checked against
# gunicorn 27's settings), so its default response headers are filtered.
_default_headers = wsgi.Response.default_headers
wsgi.Response.default_headers = lambda self: [h for h in _default_headers(self) if not h.startswith("Server:")]
