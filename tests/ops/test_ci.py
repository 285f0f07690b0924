"""What CI runs: the same `make test` and `make lint` a developer types, with the lint
tools pinned in the project (a new ruff or mypy release must not fail a build that
passed), and `make test` replaying the hour-sensitive checks at night and at noon."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_test_and_lint() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in lines and "make lint" in lines


def test_lint_tools_are_pinned_and_make_lint_uses_the_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.fullmatch(r"([a-z-]+)==([0-9.]+)", req).groups()  # type: ignore[union-attr]
                for req in project["optional-dependencies"]["lint"])
    assert set(pins) >= {"ruff", "mypy"}
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert ".[lint]" in lint
    assert "pip install --quiet ruff" not in lint


def test_make_test_replays_hour_checks_under_faketime() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "test-hours" in target
    hours = makefile.split("\ntest-hours:", 1)[1].split("\n\n", 1)[0]
    assert "faketime" in hours and "23:30" in hours and "12:00" in hours
    assert "skipped" in hours  # says why when faketime is missing
