"""`python -m worker`: which Celery workers it starts for each queue."""

import worker.__main__ as worker_main


class FinishedChild:
    def __init__(self, args, env=None):
        self.args, self.env = args, env

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0

    def send_signal(self, signum):
        pass


def started(monkeypatch, argv, threads=None, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    children = []
    monkeypatch.setattr(
        worker_main.subprocess,
        "Popen",
        lambda args, env=None: children.append(FinishedChild(args, env)) or children[-1],
    )
    worker_main.main(argv)
    if threads is not None:
        threads.extend(c.env.get("PREDICT_THREADS") for c in children)
    return [
        (c.args[c.args.index("-Q") + 1], c.args[c.args.index("-P") + 1], int(c.args[c.args.index("-c") + 1]))
        for c in children
    ]


def test_fetching_is_split_across_processes_sharing_the_threads(monkeypatch):
    assert started(monkeypatch, ["--queues", "fetch"]) == [("fetch", "threads", 32)] * 2
    assert (
        started(monkeypatch, ["--queues", "fetch", "--fetch-processes", "3", "--fetch-concurrency", "30"])
        == [("fetch", "threads", 10)] * 3
    )
    assert started(monkeypatch, ["--queues", "fetch"], FETCH_PROCESSES="1", FETCH_CONCURRENCY="8") == [
        ("fetch", "threads", 8)
    ]


def test_prediction_gets_one_model_process_per_core_each_with_its_share(monkeypatch):
    monkeypatch.setattr(worker_main, "available_cpus", lambda: 2)
    threads = []
    assert started(monkeypatch, ["--queues", "predict"], threads) == [("predict", "prefork", 2)]
    assert threads == ["1"]
    threads.clear()
    assert started(monkeypatch, ["--queues", "predict", "--concurrency", "1"], threads) == [("predict", "prefork", 1)]
    assert threads == ["2"]
    monkeypatch.setattr(worker_main, "available_cpus", lambda: 16)
    assert started(monkeypatch, ["--queues", "predict"]) == [("predict", "prefork", 4)]  # at most 4


def test_settings_choose_processes_and_threads(monkeypatch):
    threads = []
    assert started(monkeypatch, ["--queues", "predict"], threads, PREDICT_PROCESSES="3", PREDICT_THREADS="5") == [
        ("predict", "prefork", 3)
    ]
    assert threads == ["5"]  # from the environment, not overridden


def test_the_solo_pool_runs_one_model_with_all_the_cores(monkeypatch):
    monkeypatch.setattr(worker_main, "available_cpus", lambda: 2)
    threads = []
    assert started(monkeypatch, ["--queues", "predict", "--pool", "solo"], threads) == [("predict", "solo", 1)]
    assert threads == ["2"]
