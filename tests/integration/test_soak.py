"""The soak script, short: jobs keep flowing while a worker is killed and Redis restarts."""

import json
import subprocess
import sys

from shared.settings import REPO_ROOT


def test_short_soak_loses_and_duplicates_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--jobs",
            "300",
            "--kills",
            "1",
            "--redis-restarts",
            "1",
            "--max-seconds",
            "240",
            "--model",
            str(tiny_model_dir),
            "--clients",
            "3",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    report = json.loads(out.read_text())
    assert report["jobs_submitted"] == report["unique_job_ids"] == 300, run.stdout[-2000:]
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["done"] + report["failed"] == 300 and report["results_written"] == 300
    assert len(report["faults"]) == 2
