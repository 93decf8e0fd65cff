"""README says what the code does, where a test can read both (issue 24): the Configuration
table names every setting with its default, and the figures it quotes from the code match."""

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from shared.settings import REPO_ROOT, Settings, _env_name
from web.api import READY_WINDOW_FACTOR

README = (REPO_ROOT / "README.md").read_text()


def configuration_rows() -> dict[str, str]:
    """Environment variable -> the default cell of its row in README's Configuration table
    (a row naming several variables gives each its part of the cell, split at ", ")."""
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0])
        defaults = cells[1].split(", ") if len(names) > 1 else [cells[1]]
        assert len(defaults) == len(names), line
        rows.update(zip(names, defaults, strict=True))
    return rows


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def written(value) -> str | float:
    """A default as README writes it: a number (units and thousands separators dropped), "on",
    "off", "empty", or a `code` string."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Path):
        home = Path.home()
        return f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value.relative_to(REPO_ROOT))
    return "empty" if not value else str(value)


def read(cell: str) -> str | float:
    number = re.match(r"^(-?[\d,.]+)\s*(MiB)?", cell)
    if number:
        return float(number[1].replace(",", "")) * (2**20 if number[2] else 1)
    code = re.match(r"^`([^`]*)`", cell)
    if code:
        return code[1]
    return cell.split()[0]  # on, off, empty


ROWS = configuration_rows()
SETTINGS = {_env_name(f): f for f in fields(Settings)}


def test_every_setting_is_in_the_configuration_table_and_nothing_else():
    assert sorted(set(SETTINGS) - set(ROWS)) == [], "settings README does not list"
    assert sorted(set(ROWS) - set(SETTINGS)) == [], "README lists variables Settings does not read"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_configuration_table_gives_each_settings_default(name):
    if name in ROWS:  # a missing row is the test above's
        assert read(ROWS[name]) == written(default_of(SETTINGS[name])), ROWS[name]


def test_the_readiness_window_is_the_one_the_code_uses():
    window = READY_WINDOW_FACTOR * Settings().worker_heartbeat_seconds
    assert f"sent a heartbeat in the last {window:g} s" in README
