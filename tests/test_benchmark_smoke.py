"""The benchmark, tiny: every section runs, cleans up after itself and reports every figure."""

import json
import subprocess
import sys

import psutil

from shared.settings import REPO_ROOT

KEYS = [
    "raw_best_img_s",
    "batch_img_s",
    "batch_vs_raw",
    "flask_img_s",
    "single_img_s",
    "single_vs_flask",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "web_rss_mb",
    "worker_rss_mb",
    "worker_ready_s",
    "machine",
    "git_commit",
    "one_image_median_ms",
    "result_cache",
]


def test_benchmark_quick_reports_every_figure(tiny_model_dir, tmp_path):
    before = {p.pid for p in psutil.process_iter()}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--model", str(tiny_model_dir), "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    r = json.loads((tmp_path / "quick.json").read_text())
    for key in KEYS + ["urls_50_s"]:
        assert key in r, key
    assert r["raw"]["tracing_count"] == {"float32": 1, "bfloat16": 1}  # one graph for every batch size
    assert r["batch_vs_raw"] > 0 and r["single_vs_flask"] > 0 and r["p50_ms"] <= r["p99_ms"]
    assert (tmp_path / "quick.png").stat().st_size > 0
    # What the benchmark starts (and must stop), in this checkout: gunicorn with our config,
    # `python -m worker` and its Celery workers, redis-server in the benchmark's own folder.
    # (Matching "worker" anywhere also caught other programs that started meanwhile.)
    ours = ("web.gunicorn_conf", "-m worker", "celery -A worker.app", "/bench-")
    leftover = [
        p.info["cmdline"]
        for p in psutil.process_iter(["pid", "cmdline", "cwd"])
        if p.pid not in before
        and p.info["cwd"] == str(REPO_ROOT)
        and any(w in " ".join(p.info["cmdline"] or []) for w in ours)
    ]
    assert not leftover, leftover
