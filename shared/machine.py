"""What machine this is: the CPU's name and features, and how many CPUs this process may use."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with family and model: "AMD EPYC" alone hides the
    generation, and speeds differ by almost 2x between the ones these figures came from."""
    info = _first_cpu()
    if not info:
        return "unknown"
    return f"{info.get('model name', 'unknown')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def cpu_flags() -> set[str]:
    return set(_first_cpu().get("flags", "").split())


def available_cpus() -> int:
    """CPUs this process may use: its affinity, and a container's CPU quota (`docker run
    --cpus`, compose's `cpus:`), which os.cpu_count() does not see. Rounded down, at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU limit in CPUs (cgroup v2 cpu.max, or v1 cfs quota/period); None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _first_cpu() -> dict:
    """The first processor's fields in /proc/cpuinfo ({} where there is none, as off Linux)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in first.splitlines()) if sep}
