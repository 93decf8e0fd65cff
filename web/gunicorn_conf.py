"""gunicorn settings for the web tier (`gunicorn -c python:web.gunicorn_conf web.wsgi:app`)."""
import glob
import os


def on_starting(server):
    # Metrics files of a previous run would be added to this run's counts: start clean.
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        for f in glob.glob(os.path.join(d, "*.db")):
            os.remove(f)


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
