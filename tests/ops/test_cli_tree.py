"""The whole `extrabalance` command tree: every command and subcommand prints its help
on `--help` and exits 0 without running anything; bad input gives one line on stderr
that names the input, exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from extrabalance import cli

ROOT = Path(__file__).resolve().parents[2]


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _walk(sub, (*path, name))
    return paths


TREE = _walk(cli.build_parser())
GROUPS = {(): ["demo", "run", "bench", "sim", "phone", "backup"],
          ("bench",): ["codecs", "ledger", "e2e", "recharge"],
          ("sim",): ["in", "smsc"],
          ("ledger",): ["migrate"],
          ("policy",): ["backtest"]}
LEAVES = [p for p in TREE if p not in GROUPS]

# One bad input per command, and the text the error must name.
BAD_INPUT: dict[tuple[str, ...], tuple[list[str], str]] = {
    ("demo",): (["--bogus"], "--bogus"),
    ("run",): (["--config", "/nonexistent/eb.toml"], "/nonexistent/eb.toml"),
    ("check-config",): (["--config", "/nonexistent/eb.toml"], "/nonexistent/eb.toml"),
    ("bench", "codecs"): (["--seconds", "abc"], "abc"),
    ("bench", "ledger"): (["--loans", "abc"], "abc"),
    ("bench", "e2e"): (["--mix", "bogus=1"], "bogus"),
    ("bench", "recharge"): (["--messages", "abc"], "abc"),
    ("chaos",): (["--kills", "abc"], "abc"),
    ("fuzz",): (["--frames", "abc"], "abc"),
    ("sim", "in"): (["--delay-ms", "abc"], "abc"),
    ("sim", "smsc"): (["--throttle", "abc"], "abc"),
    ("phone",): (["2010000000000001"], "2010000000000001"),
    ("import-profiles",): (["/nonexistent/profiles.csv"], "/nonexistent/profiles.csv"),
    ("subscriber",): (["show", "abc"], "abc"),
    ("reconcile-in",): (["/nonexistent/extract.csv", "--in-node", "nosuch", "--until",
                         "2026-01-01T00:00:00+00:00"], "nosuch"),
    ("purge-idempotency",): (["--config", "/nonexistent/eb.toml"], "/nonexistent/eb.toml"),
    ("campaign",): (["--limit", "abc"], "abc"),
    ("report",): (["--date", "yesterday"], "yesterday"),
    ("backup",): (["/nonexistent/dir/copy.db"], "/nonexistent/dir"),
    ("dnd",): (["import", "/nonexistent/dnd.csv"], "/nonexistent/dnd.csv"),
    ("consent",): (["export", "20100abc"], "20100abc"),
    ("policy", "backtest"): (["--edrs", "/nonexistent/edr", "--config", "/nonexistent/new.toml"],
                             "/nonexistent/new.toml"),
    ("ledger", "migrate"): (["--from", "/nonexistent/l.db", "--to", "postgresql://eb@127.0.0.1/x"],
                            "/nonexistent/l.db"),
}


def test_the_tree_is_what_the_table_covers() -> None:
    assert set(LEAVES) == set(BAD_INPUT)


@pytest.mark.parametrize("path", TREE, ids=lambda p: " ".join(p) or "extrabalance")
def test_help_prints_help_and_runs_nothing(path: tuple[str, ...],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    for name in GROUPS.get(path, []):
        assert f"    {name}" in out, f"{name} not listed in {' '.join(path)} --help"


@pytest.mark.parametrize("path", sorted(BAD_INPUT), ids=" ".join)
def test_bad_input_is_one_line_naming_it(path: tuple[str, ...], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the embedded config's relative ledger path lands here
    argv, named = BAD_INPUT[path]
    try:
        code = cli.main([*path, *argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert named in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_phone_takes_a_plus_number(capsys: pytest.CaptureFixture[str]) -> None:
    from simulators.handset import _msisdn

    assert _msisdn("+201000000001") == "201000000001"
    # Through the command line: the number is taken (the phone then fails to reach an
    # SMSC on a closed port, which is not a usage error).
    code = cli.main(["phone", "+201000000001", "--control-port", "1", "--host", "127.0.0.1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "Traceback" not in err
    assert code != 0 and "cannot reach" in err


def _write_config(tmp_path: Path) -> Path:
    from extrabalance.config import default_config_text

    text = default_config_text().replace('path = "var/extrabalance.db"',
                                         f'path = "{tmp_path / "ledger.db"}"')
    config = tmp_path / "eb.toml"
    config.write_text(text)
    return config


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that already left
    proc = subprocess.run(
        [sys.executable, "-m", "extrabalance", "check-config", "--config", str(config)],
        check=False, stdout=write_end, stderr=subprocess.PIPE, cwd=ROOT, timeout=60,
        env={**os.environ, "EB_SMPP_PASSWORD": "pw123456", "PYTHONPATH": str(ROOT)})
    os.close(write_end)
    assert "Traceback" not in proc.stderr.decode()
    assert proc.returncode == 2


def test_run_with_a_storage_path_that_cannot_be_created(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = _write_config(tmp_path)
    config.write_text(config.read_text().replace(str(tmp_path / "ledger.db"),
                                                 str(blocker / "sub" / "ledger.db")))
    monkeypatch.setenv("EB_SMPP_PASSWORD", "pw123456")
    assert cli.main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "storage.path" in err and str(blocker) in err and "Traceback" not in err


def test_purge_idempotency_prints_its_summary_once(tmp_path: Path) -> None:
    import sqlite3

    from extrabalance.ledger.db import migrate

    config = _write_config(tmp_path)
    conn = sqlite3.connect(tmp_path / "ledger.db")
    migrate(conn)
    conn.close()
    # A process of its own: the command sets up logging for the whole process.
    proc = subprocess.run(
        [sys.executable, "-m", "extrabalance", "purge-idempotency", "--config", str(config)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert text.count("purged") == 1, text


def test_bench_prints_a_table_not_a_dict() -> None:
    from extrabalance.bench import format_table

    text = format_table({"benchmark": "codecs", "machine": {"cpu": "x", "cores": 2},
                         "diameter_ours_per_s": 32454, "ratio": 1.25})
    assert "{" not in text and "'" not in text
    assert "machine.cores" in text and "32,454" in text
