"""docker-compose.yml as docker-compose resolves it: shape, settings from the environment, safe
defaults. Needs only the docker-compose program, no engine (test_compose.py runs the stack)."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from shared.settings import REPO_ROOT
from tests.helpers import require


@pytest.fixture
def config():
    exe = shutil.which("docker-compose")
    require(exe is not None, "docker-compose", "apt-get install docker-compose")
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}

    def resolve(*args, **env):
        out = subprocess.run(
            [exe, *args, "config"], cwd=REPO_ROOT, env=dict(clean, **env), capture_output=True, text=True
        )
        return out if out.returncode else yaml.safe_load(out.stdout)["services"]

    return resolve


def test_flower_is_never_open_by_default(config):
    failed = config()
    assert failed.returncode != 0 and "FLOWER_BASIC_AUTH" in failed.stderr
    assert config(FLOWER_BASIC_AUTH="u:p")["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "u:p"


def test_defaults_publish_nginx_and_a_loopback_flower_only(config):
    services = config("--profile", "gpu", FLOWER_BASIC_AUTH="u:p")
    assert {"redis", "nginx", "web", "worker", "fetcher", "flower", "worker-gpu"} == set(services)
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"nginx", "flower"}
    assert published == {"nginx": ["0.0.0.0:8000:8080/tcp"], "flower": ["127.0.0.1:5555:5555/tcp"]}
    assert services["web"]["environment"]["SECRET_KEY"] == ""  # unset: a random key kept in Redis


def test_ports_workers_cpus_and_settings_come_from_the_environment(config):
    services = config(
        FLOWER_BASIC_AUTH="u:p",
        WEB_PORT="8080",
        WEB_BIND="127.0.0.1",
        FLOWER_PORT="0",
        WORKERS="4",
        WORKER_CPUS="1.5",
        SECRET_KEY="s3cret",
        FETCH_ALLOW_HOSTS="img:8000",
        MAX_REQUEST_BYTES="1000",
    )
    assert services["nginx"]["ports"] == ["127.0.0.1:8080:8080/tcp"]
    assert services["flower"]["ports"] == ["127.0.0.1:0:5555/tcp"]  # 0: a free port, chosen by Docker
    assert services["worker"]["scale"] == 4 and services["worker"]["cpus"] == 1.5
    for name in ("web", "worker", "fetcher", "flower"):
        env = services[name]["environment"]
        assert env["SECRET_KEY"] == "s3cret" and env["FETCH_ALLOW_HOSTS"] == "img:8000"
    assert (
        services["nginx"]["environment"]["MAX_REQUEST_BYTES"]
        == services["web"]["environment"]["MAX_REQUEST_BYTES"]
        == "1000"
    )


def test_images_by_target_and_redis_persists(config):
    services = config("--profile", "gpu", FLOWER_BASIC_AUTH="u:p")
    targets = {name: s["build"]["target"] for name, s in services.items() if "build" in s}
    assert targets == {
        "nginx": "nginx",
        "web": "runtime",
        "fetcher": "runtime",
        "flower": "runtime",
        "worker": "worker",
        "worker-gpu": "gpu",
    }
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    for name in ("worker", "fetcher", "worker-gpu"):  # scalable: no fixed name, no host port
        assert "container_name" not in services[name] and "ports" not in services[name]
    assert "--appendonly" in services["redis"]["command"] and "noeviction" in services["redis"]["command"]
    assert "healthcheck" in services["redis"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


def test_the_cpu_images_never_build_tensorflow():
    # The legacy builder (docker-compose v1's) builds every stage above the target, needed or
    # not: the GPU stages (the only ones with TensorFlow) must come after every CPU target, and
    # OpenVINO (the CPU worker's runtime) after runtime's and nginx's.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M)
    assert stages.index("deps-gpu") > max(stages.index(t) for t in ("runtime", "nginx", "worker"))
    assert stages.index("deps-worker") > max(stages.index(t) for t in ("runtime", "nginx"))
    blocks = re.split(r"^FROM \S+ AS ", dockerfile, flags=re.M)[1:]
    installs = {b.split()[0]: re.findall(r"venv-install -r /requirements/(\w+)\.txt", b) for b in blocks}
    assert installs["deps-runtime"] == ["runtime"] and installs["deps-worker"] == ["worker"]
    pins = {
        line.split("==")[0].lower()
        for name in ("worker", "runtime")
        for line in (REPO_ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert not pins & {"tensorflow", "tensorflow-cpu", "keras"} and "openvino" in pins
