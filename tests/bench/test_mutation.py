"""The mutation tool (bench/mutation.py) on a tiny project: which mutants it makes,
that a mutant a test notices is killed, that one no test can notice survives, and
that listing it as equivalent takes it out of the score."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from bench import mutation

ROOT = Path(__file__).resolve().parents[2]

CALC = '''\
"""A tiny module to mutate."""

LIMIT = 100


def capped(amount):
    """At most LIMIT."""
    if amount > LIMIT:
        return LIMIT
    return amount


def unused(x):
    return x + 1
'''

TEST = '''\
from tiny.calc import capped


def test_capped():
    assert capped(150) == 100
    assert capped(50) == 50
'''

SURVIVOR = "tiny/calc.py::capped::compare::amount > LIMIT -> amount >= LIMIT"


def project(tmp_path: Path, equivalent: str = "") -> Path:
    (tmp_path / "tiny").mkdir(parents=True)
    (tmp_path / "tiny" / "__init__.py").write_text("")
    (tmp_path / "tiny" / "calc.py").write_text(CALC)
    (tmp_path / "tiny_tests").mkdir()
    (tmp_path / "tiny_tests" / "__init__.py").write_text("")
    (tmp_path / "tiny_tests" / "test_calc.py").write_text(TEST)
    config = tmp_path / "mutation.toml"
    config.write_text(textwrap.dedent(f"""\
        tests = ["tiny_tests"]
        timeout_floor = 60
        state_dir = "state"

        [[target]]
        path = "tiny/calc.py"
        group = "tiny"

        [equivalent]
        {equivalent}
        """))
    return config


def run_tool(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.mutation", "--config", str(config),
         "--root", str(config.parent), "--jobs", "1", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )


def test_mutants_of_each_kind_with_stable_keys(tmp_path: Path) -> None:
    config = mutation.load_config(project(tmp_path), tmp_path)
    keys = [m.key for m in mutation.enumerate_mutants(config)]
    assert SURVIVOR in keys
    assert "tiny/calc.py::capped::compare::amount > LIMIT -> amount <= LIMIT" in keys
    assert "tiny/calc.py::capped::delete::return LIMIT -> pass" in keys
    assert "tiny/calc.py::<module>:LIMIT::const::100 -> 101 in LIMIT = 100" in keys
    assert "tiny/calc.py::unused::arith::x + 1 -> x - 1" in keys
    assert not [k for k in keys if "At most" in k], "docstrings are not mutated"
    assert len(keys) == len(set(keys))


def test_account_and_state_swaps_only_inside_the_listed_functions(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(textwrap.dedent('''\
        ACTIVE = "ACTIVE"
        REPAID = "REPAID"

        def post_it(post):
            post([("fee_receivable", -1), ("recovered_cash", 1)])
            return REPAID if post else ACTIVE

        def other():
            return ACTIVE
        '''))
    (tmp_path / "c.toml").write_text(
        'tests = []\n[[target]]\npath = "m.py"\nfunctions = ["post_it"]\n')
    config = mutation.load_config(tmp_path / "c.toml", tmp_path)
    mutants = mutation.enumerate_mutants(config)
    found = {(m.scope, m.op, m.before, m.after) for m in mutants}
    keys = [m.key for m in mutants]
    assert ("post_it", "account", "'fee_receivable'", "'principal_receivable'") in found
    assert ("post_it", "account", "'recovered_cash'", "'written_off'") in found
    assert ("post_it", "state", "REPAID", "PARTIALLY_REPAID") in found
    assert ("post_it", "sign", "-1", "1") in found
    assert any(k.endswith("::sign::-1 -> 1 in ('fee_receivable', -1)") for k in keys)
    assert {scope for scope, *_ in found} == {"post_it"}


def test_mutated_tree_keeps_the_file_line_numbers(tmp_path: Path) -> None:
    config = mutation.load_config(project(tmp_path), tmp_path)
    mutant = next(m for m in mutation.enumerate_mutants(config) if m.key == SURVIVOR)
    tree = mutation.mutated_tree(config.targets[0].tree, mutant)
    namespace: dict[str, object] = {}
    exec(compile(tree, "calc.py", "exec"), namespace)  # noqa: S102
    capped = namespace["capped"]
    assert capped(100) == 100 and capped(101) == 100  # type: ignore[operator]
    compare = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert compare.lineno == 8


def test_a_run_kills_what_the_test_sees_and_reports_the_survivors(tmp_path: Path) -> None:
    config = project(tmp_path)
    done = run_tool(config)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "state" / "report.md").read_text()
    # 11 mutants: LIMIT +-1, the comparison two ways, the `if` and both returns
    # deleted (7, all but `>=` killed), and 4 in `unused`, which no test runs.
    assert "| group: tiny | 11 | 6 | 5 | 0 | 54.5 % |" in report, report
    assert f"key: `{SURVIVOR}`" in report
    assert "(uncovered): `x + 1` → `x - 1`" in report
    assert "killed" in done.stdout

    # Marked equivalent (amount == LIMIT returns LIMIT either way): out of the score,
    # listed with its reason; the cached results are reused, nothing runs again.
    config = project(tmp_path / "again", equivalent=f'"{SURVIVOR}" = "same at the boundary"')
    (tmp_path / "again" / "state").mkdir()
    (tmp_path / "again" / "state" / "results.json").write_text(
        (tmp_path / "state" / "results.json").read_text())
    (tmp_path / "again" / "state" / "baseline.json").write_text(
        (tmp_path / "state" / "baseline.json").read_text())
    done = run_tool(config, "--min-score", "50")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 to run" in done.stdout
    report = (tmp_path / "again" / "state" / "report.md").read_text()
    assert "| group: tiny | 11 | 6 | 4 | 1 | 60.0 % |" in report, report
    assert "same at the boundary" in report
    assert run_tool(config, "--min-score", "95").returncode == 1
