"""The Celery app the workers run: `celery -A worker.app worker ...` (`python -m worker` wraps it).

`python -m worker` sets WORKER_ROLE for each Celery worker it starts (worker/factory.py says
what each role does).
"""

from shared.settings import Settings
from worker.factory import create_worker_app

app = create_worker_app(Settings.from_env())
