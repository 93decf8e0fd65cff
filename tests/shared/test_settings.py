"""Settings: read from the environment once, with clear errors, and handed to children intact."""

import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import REPO_ROOT, Settings, SettingsError
from web.app import create_app


def test_defaults_without_any_variable():
    s = Settings.from_env({})
    assert s == Settings() and s.result_cache is True and s.fetch_allow_hosts == frozenset()


@pytest.mark.parametrize(
    "word, value",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_booleans(word, value):
    assert Settings.from_env({"RESULT_CACHE": word}).result_cache is value


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RESULT_CACHE": "maybe"}, "RESULT_CACHE='maybe' is not a boolean"),
        ({"VISIBILITY_TIMEOUT": "1.5"}, "VISIBILITY_TIMEOUT='1.5' is not a valid int"),
        ({"FETCH_TIMEOUT": "ten"}, "FETCH_TIMEOUT='ten' is not a valid float"),
    ],
)
def test_a_value_that_cannot_be_used_is_an_error_naming_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_lists_paths_and_the_variable_with_another_name():
    s = Settings.from_env(
        {
            "FETCH_ALLOW_HOSTS": " Example.test:8080, ,b.test:80",
            "STORAGE_DIR": "~/x",
            "CIFAR_SVC_CACHE": "/tmp/c",
            "MAX_BATCH_ITEMS": "7",
            "REDIS_URL": "",
        }
    )
    assert s.fetch_allow_hosts == frozenset({"example.test:8080", "b.test:80"})
    assert s.storage_dir == Path.home() / "x" and s.cache_dir == Path("/tmp/c") and s.max_batch_items == 7
    assert s.redis_url == Settings().redis_url  # empty means unset


def test_to_env_gives_a_child_the_same_settings():
    s = Settings.from_env(
        {},
        fetch_allow_hosts=frozenset({"a.test:81", "b.test:82"}),
        result_cache=False,
        retention_days=0.5,
        storage_dir=Path("/tmp/st"),
        cache_dir=Path("/tmp/c"),
    )
    assert Settings.from_env(s.to_env()) == s


def test_a_worker_with_a_bad_setting_stops_at_once_saying_which():
    run = subprocess.run(
        [sys.executable, "-m", "worker"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "VISIBILITY_TIMEOUT": "soon"},
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "worker: cannot start: VISIBILITY_TIMEOUT='soon' is not a valid int"


@pytest.mark.parametrize("app_env, debug", [("development", True), ("production", False), ("staging", False)])
def test_debug_mode_only_in_development(settings_factory, app_env, debug):
    assert create_app(settings_factory(app_env=app_env)).debug is debug
