"""The worker's Celery app with faults injected into its model, for the fault tests:
`python -m worker` runs it with WORKER_APP=tests.fault_worker (tests/helpers.py Stack.add_worker).

FAULT_DELAY_S: every model call takes this much longer. FAULT_CRASH_ON_BLACK=1: a batch
holding an all-black image kills the process that predicts it, as a poison input would.
"""

from __future__ import annotations

import os
import signal
import time

from shared.settings import Settings
from worker.factory import create_worker_app, served_predictor


class FaultyPredictor:
    def __init__(self, predictor, delay: float, crash_on_black: bool):
        self._predictor, self._delay, self._crash = predictor, delay, crash_on_black
        self._warm = False  # the worker's warm-up call (an all-black image) is left alone

    def __getattr__(self, name):  # info, cache_namespace, ...: the real predictor's
        return getattr(self._predictor, name)

    def predict_proba(self, images):
        if not self._warm:
            self._warm = True
            return self._predictor.predict_proba(images)
        if self._crash and (images.reshape(len(images), -1).max(axis=1) == 0).any():
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self._delay)
        return self._predictor.predict_proba(images)


def faulty_predictor(settings: Settings) -> FaultyPredictor:
    return FaultyPredictor(
        served_predictor(settings),
        float(os.environ.get("FAULT_DELAY_S", "0")),
        os.environ.get("FAULT_CRASH_ON_BLACK") == "1",
    )


app = create_worker_app(Settings.from_env(), make_predictor=faulty_predictor)
