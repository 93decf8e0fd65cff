"""The benchmark, tiny: every section runs, cleans up after itself and reports every figure."""

import json
import subprocess
import sys

import psutil

from shared.settings import REPO_ROOT

# Throughputs, latencies and sizes: each must be a measured, positive, finite number.
POSITIVE = [
    "raw_best_img_s",
    "raw_served_img_s",
    "raw_served_b1_ms",
    "old_default_batch_img_s",
    "batch_img_s",
    "flask_img_s",
    "single_img_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "one_image_median_ms",
    "web_rss_mb",
    "worker_rss_mb",
    "worker_ready_s",
    "urls_50_s",
    "urls_fetched_s",
]


def check_figures(r: dict) -> None:
    """What a results file must hold: every figure measured, and the derived ones derived right."""
    for key in POSITIVE:
        assert isinstance(r[key], (int, float)) and 0 < r[key] < 1e7, (key, r.get(key))
    assert r["raw_served_img_s"] == r["raw_best_img_s"]
    assert r["batch_vs_raw"] == round(r["batch_img_s"] / r["raw_served_img_s"], 3)
    assert r["single_vs_raw"] == round(r["single_img_s"] / r["raw_served_img_s"], 3)
    assert r["single_vs_flask"] == round(r["single_img_s"] / r["flask_img_s"], 2)
    assert r["speedup_vs_old_default"] == round(r["batch_img_s"] / r["old_default_batch_img_s"], 2)
    assert r["cpu_ms_per_image"] == r["batch"]["cpu_ms_per_image"]
    assert r["old_default"]["images"] == r["batch"]["images"]
    assert r["served_accuracy"] is None  # the tiny model has no test figures in its model.json
    # The raw ceiling is the served configuration: the worker's precision, runtime and views.
    assert list(r["raw"]["img_s"]) == [r["precision"]] and r["raw"]["runtime"] in ("keras", "openvino")
    assert r["raw_served_b1_ms"] == r["raw"]["one_image_ms"][r["precision"]]
    assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert r["urls_fetched_s"] <= r["urls_50_s"]  # everything was fetched before everything was done
    best = r["raw"]["best"]
    assert best["img_s"] == r["raw_best_img_s"] == max(v for d in r["raw"]["img_s"].values() for v in d.values())
    assert r["raw"]["tracing_count"] == {r["precision"]: 1}  # one graph for every batch size
    for part in ("batch", "single"):
        cpu = r[part]["cpu_ms_per_image"]
        assert set(cpu) == {"web", "worker", "redis"} and all(v >= 0 for v in cpu.values()) and cpu["worker"] > 0
    assert r["result_cache"]["first_img_s"] > 0 and r["result_cache"]["repeat_img_s"] > 0
    assert "family" in r["machine"]["cpu"] and r["machine"]["cores"] >= 1
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r["git_commit"] == head.stdout.strip()


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
    check_figures(json.loads((tmp_path / "quick.json").read_text()))
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
