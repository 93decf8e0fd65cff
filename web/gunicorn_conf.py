"""gunicorn settings for the web tier (`gunicorn -c python:web.gunicorn_conf web.wsgi:app`)."""

import glob
import os

from prometheus_client import multiprocess

from shared.settings import Settings

_metrics_dir = Settings.from_env().prometheus_multiproc_dir


def on_starting(server):
    # Metrics files of a previous run would be added to this run's counts: start clean.
    if _metrics_dir:
        os.makedirs(_metrics_dir, exist_ok=True)
        for f in glob.glob(os.path.join(_metrics_dir, "*.db")):
            os.remove(f)


def child_exit(server, worker):
    if _metrics_dir:
        multiprocess.mark_process_dead(worker.pid, _metrics_dir)
