"""The soak script, short: jobs keep flowing while a worker and a model process are killed, Redis
restarts and some URLs point at servers that break mid-answer."""

import json
import subprocess
import sys

import pytest

from shared.settings import REPO_ROOT


@pytest.mark.timeout(500)  # above the soak's own 240 s and the run's 400 s
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
            "--child-kills",
            "1",
            "--url-share",
            "0.2",
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
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]  # the soak's own verdict
    assert report["jobs_submitted"] == report["unique_job_ids"] == 300, run.stdout[-2000:]
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["wrongly_ended"] == 0, report
    assert report["done"] + report["failed"] == 300  # every job's record holds its result
    assert report["url_jobs_to_breaking_servers"] > 0 and report["failed"] == report["url_jobs_to_breaking_servers"]
    assert len(report["faults"]) == 3, report["faults"]
