"""Where a model came from: the commit it was trained at and the machine it was trained on."""

from __future__ import annotations

import os
import platform
import subprocess

from shared.machine import cpu_name
from shared.settings import REPO_ROOT


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True, capture_output=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(**frameworks: str) -> dict:
    """The CPU (with family and model), cores and platform, plus the given framework versions."""
    return dict(
        cpu=cpu_name(),
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        **frameworks,
    )
