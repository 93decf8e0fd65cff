"""Everything the Docker images need before `docker-compose build`: an engine, the base images, the wheels.

    python -m tools.docker_bases          (what `make docker-prepare` and the compose test run)
    python -m tools.docker_bases --gpu    (also the CUDA wheels for the `gpu` target: several GB)

1. The engine: `docker` and `docker-compose` are apt-installed when missing (as root; and
   `debootstrap` when a stand-in needs it), and `dockerd` is started in the background when
   none answers (machines without systemd). It is left running, like a system service; its
   log is in the cache folder.
2. The base images `python:3.11-slim` and `redis:7-alpine`: pulled when a registry answers. On
   machines without one, local stand-ins are built under the same tags, so the Dockerfile and
   docker-compose.yml name only the official images: a Debian bookworm root file system from
   debootstrap (the mirror is the machine's own apt mirror, read at run time), imported with
   `docker import`; on it, docker/standins/*.Dockerfile. They carry the label
   cifar-svc.standin, and are never pushed anywhere.
3. The wheelhouse: every pinned package, downloaded on the host (containers here cannot reach
   the Python package index: TLS is intercepted) for the image's Python (3.11, manylinux),
   and linked into docker/wheels/, from where the Dockerfile's throwaway stages install with
   --no-index. An empty docker/wheels/ (a machine whose containers reach the index) installs
   from the index instead.

What is slow to make (the root file system, the wheels) is cached in
$CIFAR_SVC_CACHE/docker (default ~/.cache/cifar-svc/docker), outside the repository.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("CIFAR_SVC_CACHE", "~/.cache/cifar-svc")).expanduser() / "docker"
STANDINS_DIR = REPO_ROOT / "docker" / "standins"
WHEELS_DIR = REPO_ROOT / "docker" / "wheels"  # in the build context; only links to the cache
REQUIREMENTS = REPO_ROOT / "requirements"

SUITE = "bookworm"
ROOTFS_PACKAGES = ("python3", "python3-venv", "ca-certificates")
ROOTFS_TAG = "cifar-svc/bookworm-minbase:latest"
# tag -> the stand-in's Dockerfile (built on ROOTFS_TAG)
STANDINS = {"python:3.11-slim": "python.Dockerfile", "redis:7-alpine": "redis.Dockerfile"}
STANDIN_LABEL = "cifar-svc.standin"
# The wheels are for the Python the images run: CPython 3.11 (Debian bookworm's 3.11.2 in the
# stand-in, the newest 3.11 in the official image) on x86-64 with glibc 2.36 or newer. Every
# manylinux tag up to 2.36 is listed: pip before 24 does not widen a --platform by itself.
WHEEL_TARGET = [
    "--only-binary=:all:",
    "--implementation",
    "cp",
    "--python-version",
    "3.11",
    "--abi",
    "cp311",
    *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)),
    *(f"--platform={legacy}_x86_64" for legacy in ("manylinux2014", "manylinux2010", "manylinux1")),
]
APT_PACKAGES = {"docker": "docker.io", "docker-compose": "docker-compose"}  # debootstrap: when needed


def say(msg: str) -> None:
    print(f"docker_bases: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


# --- 1. the engine ---------------------------------------------------------------------------
def engine_answers() -> bool:
    return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def apt_install(packages: dict[str, str]) -> None:
    """Install the Debian packages (program -> package) whose program is not on PATH."""
    missing = sorted({pkg for exe, pkg in packages.items() if shutil.which(exe) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"install {' '.join(missing)} (apt-get, as root), then run this again")
    say(f"installing {' '.join(missing)}")
    run(["apt-get", "update", "-qq"])
    run(
        ["apt-get", "install", "-y", "-qq", *missing],
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )


def ensure_engine(timeout: float = 60.0) -> None:
    apt_install(APT_PACKAGES)
    if engine_answers():
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise SystemExit("no Docker engine answers `docker info`: start dockerd (or ask for access to it)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    log = CACHE_DIR / "dockerd.log"
    say(f"starting dockerd (log: {log})")
    with open(log, "ab") as out:
        # Its own session: it outlives this process and a Ctrl-C here does not reach it.
        subprocess.Popen(
            ["dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while not engine_answers():
        if time.monotonic() > deadline:
            raise SystemExit(f"dockerd did not answer within {timeout:.0f} s; see {log}")
        time.sleep(0.5)


# --- 2. base images --------------------------------------------------------------------------
def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", tag], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ).returncode
        == 0
    )


def is_standin(tag: str) -> bool:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{STANDIN_LABEL}"}}}}', tag],
        capture_output=True,
        text=True,
    )
    return out.returncode == 0 and out.stdout.strip() not in ("", "<no value>")


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses for the main suite (never written into the repo)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.+)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", line)
                if m:
                    return m.group(1)
    raise SystemExit(f"no apt source for Debian {SUITE} on this machine: cannot debootstrap")


def rootfs_tarball() -> Path:
    """A minimal Debian root file system with Python, cached (debootstrap takes minutes)."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(ROOTFS_PACKAGES)}".encode()).hexdigest()[:12]
    tarball = CACHE_DIR / f"{SUITE}-minbase-{key}.tar"
    if tarball.exists():
        return tarball
    apt_install({"debootstrap": "debootstrap"})
    mirror = apt_mirror()
    say(f"debootstrap {SUITE} from {mirror} (cached as {tarball})")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_DIR))
    try:
        run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}", SUITE, str(root), mirror],
            stdout=subprocess.DEVNULL,
        )
        # Package caches and lists are rebuilt by `apt-get update` in whatever image needs them.
        for pattern in (
            "var/cache/apt/archives/*.deb",
            "var/cache/apt/*.bin",
            "var/lib/apt/lists/*_*",
            "var/log/*.log",
            "var/log/apt/*",
        ):
            for p in root.glob(pattern):
                p.unlink()
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."])
        partial.rename(tarball)  # only a complete tarball counts as cached
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tarball


def ensure_base_images() -> dict[str, str]:
    """Each base image's origin: 'present', 'pulled' or 'stand-in built'."""
    origin = {}
    for tag in STANDINS:
        if image_exists(tag):
            origin[tag] = "present (stand-in)" if is_standin(tag) else "present"
            continue
        pulled = subprocess.run(["docker", "pull", "-q", tag], capture_output=True, text=True)
        if pulled.returncode == 0:
            origin[tag] = "pulled"
            continue
        say(f"cannot pull {tag} ({pulled.stderr.strip().splitlines()[-1:]}): building a stand-in")
        if not image_exists(ROOTFS_TAG):
            run(
                ["docker", "import", "-m", "debootstrap --variant=minbase", str(rootfs_tarball()), ROOTFS_TAG],
                stdout=subprocess.DEVNULL,
            )
        run(
            [
                "docker",
                "build",
                "-q",
                "-t",
                tag,
                "--build-arg",
                f"BASE={ROOTFS_TAG}",
                "-f",
                str(STANDINS_DIR / STANDINS[tag]),
                str(STANDINS_DIR),
            ],
            stdout=subprocess.DEVNULL,
        )
        origin[tag] = "stand-in built"
    return origin


# --- 3. the wheelhouse -----------------------------------------------------------------------
def pinned_requirements(path: Path, seen: set[Path] | None = None) -> list[str]:
    """Every `name==version` of a requirements file and the files it includes, markers dropped:
    pip would evaluate them for the host's Python, and the wheelhouse must hold what any
    3.11 needs (async-timeout is only for 3.11.2, the stand-in's)."""
    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out += pinned_requirements(path.parent / line[3:].strip(), seen)
        elif line:
            out.append(line.split(";", 1)[0].strip())
    return out


def gpu_requirement() -> str:
    version = re.search(r"^tensorflow-cpu==(\S+)", (REQUIREMENTS / "model.txt").read_text(), re.M).group(1)
    return f"tensorflow[and-cuda]=={version}"


def ensure_wheelhouse(gpu: bool = False) -> int:
    """Download the pinned wheels and their dependencies into the cache (pip skips files it
    already has) and link exactly those into docker/wheels/. Returns how many there are."""
    reqs = pinned_requirements(REQUIREMENTS / "model.txt") + ([gpu_requirement()] if gpu else [])
    cache = CACHE_DIR / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    say(f"wheelhouse: pip download of {len(reqs)} pins and their dependencies into {cache}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="wheelhouse-") as f:
        f.write("\n".join(reqs) + "\n")
        f.flush()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "-d",
                str(cache),
                *WHEEL_TARGET,
                "-r",
                f.name,
            ],
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        raise SystemExit(f"pip download failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    # The files of this download (a cache filled by other pins holds more): pip names each one.
    wheels = {Path(p).name for p in re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", out.stdout)}
    if not wheels:
        raise SystemExit(f"pip download named no wheels:\n{out.stdout[-3000:]}")
    WHEELS_DIR.mkdir(parents=True, exist_ok=True)
    for old in WHEELS_DIR.glob("*.whl"):
        if old.name not in wheels:
            old.unlink()
    for name in wheels:
        if not (WHEELS_DIR / name).exists():
            _link(cache / name, WHEELS_DIR / name)
    return len(wheels)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy when the cache and the checkout share a file system
    except OSError:
        shutil.copy2(src, dst)


def prepare(gpu: bool = False) -> dict:
    """All three steps; what the compose test's first fixture calls."""
    t0 = time.monotonic()
    ensure_engine()
    origin = ensure_base_images()
    wheels = ensure_wheelhouse(gpu)
    return {"base_images": origin, "wheels": wheels, "seconds": round(time.monotonic() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="also download the CUDA wheels of the gpu target")
    args = p.parse_args(argv)
    result = prepare(gpu=args.gpu)
    for tag, how in result["base_images"].items():
        say(f"{tag}: {how}")
    say(f"{result['wheels']} wheels in {WHEELS_DIR.relative_to(REPO_ROOT)} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
