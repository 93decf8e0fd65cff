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


def started(monkeypatch, argv, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    children = []
    monkeypatch.setattr(worker_main.subprocess, "Popen",
                        lambda args, env=None: children.append(FinishedChild(args, env)) or children[-1])
    worker_main.main(argv)
    return [(c.args[c.args.index("-Q") + 1], c.args[c.args.index("-P") + 1], int(c.args[c.args.index("-c") + 1]))
            for c in children]


def test_fetching_is_split_across_processes_sharing_the_threads(monkeypatch):
    assert started(monkeypatch, ["--queues", "fetch"]) == [("fetch", "threads", 32)] * 2
    assert started(monkeypatch, ["--queues", "fetch", "--fetch-processes", "3", "--fetch-concurrency", "30"]) \
        == [("fetch", "threads", 10)] * 3
    assert started(monkeypatch, ["--queues", "fetch"], FETCH_PROCESSES="1", FETCH_CONCURRENCY="8") \
        == [("fetch", "threads", 8)]


def test_prediction_gets_one_worker_with_its_model_processes(monkeypatch):
    assert started(monkeypatch, ["--queues", "predict", "--concurrency", "2"]) == [("predict", "prefork", 2)]
