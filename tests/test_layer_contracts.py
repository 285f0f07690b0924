"""Layer contracts, read from the source (docs/ledger.md "Unit of work"):

* the services reach storage only through the unit-of-work port: no `sqlite3` and no
  runtime import of the ledger's SQL modules in `extrabalance/service/` (imports under
  `if TYPE_CHECKING:` only name row types). The services not moved yet are listed in
  `KNOWN_OFFENDERS`; the list must shrink, never grow, and must name no file that
  already complies;
* the domain core does no IO and reads no clock: no asyncio, sockets, threads,
  processes or time module in `extrabalance/core/`, and no `datetime.now()` /
  `date.today()` / `time.time()`-style calls (the caller passes `now`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "extrabalance"

# What a service may not import at run time: the database and its SQL.
STORAGE_MODULES = ("sqlite3", "apsw", "psycopg", "asyncpg", "extrabalance.ledger")
# Service modules that still speak SQL, to be moved onto the port with the lending
# service (each with what it still uses).
KNOWN_OFFENDERS = {
    "lending.py": "sqlite3 closures and store calls (borrow, advance, confirm)",
    "resolver.py": "store calls and Ledger (settles loans the lending service booked)",
    "reconcile_in.py": "store calls on the operator's connection (reverses advances an IN"
    " never applied); landed beside the port, moves onto it with the lending service",
}

IO_MODULES = (
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "threading",
    "subprocess",
    "multiprocessing",
    "time",
    "sqlite3",
)
CLOCK_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "time_ns"}


def _runtime_imports(path: Path) -> list[str]:
    """Modules imported outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _hits(imports: list[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(
        {name for name in imports for ban in banned if name == ban or name.startswith(ban + ".")}
    )


def test_services_reach_storage_only_through_the_port() -> None:
    offenders = {}
    for path in sorted((PACKAGE / "service").glob("*.py")):
        hits = _hits(_runtime_imports(path), STORAGE_MODULES)
        if hits:
            offenders[path.name] = hits
    new = sorted(set(offenders) - set(KNOWN_OFFENDERS))
    assert not new, (
        f"service modules importing storage directly: { {n: offenders[n] for n in new} }"
    )
    fixed = sorted(set(KNOWN_OFFENDERS) - set(offenders))
    assert not fixed, f"{fixed} comply now: remove them from KNOWN_OFFENDERS"


def test_the_contract_test_sees_a_storage_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "import sqlite3\n"
        "if TYPE_CHECKING:\n    from extrabalance.ledger.store import LoanRow\n"
        "def f():\n    from extrabalance.ledger import store\n"
    )
    assert _hits(_runtime_imports(sample), STORAGE_MODULES) == [
        "extrabalance.ledger",
        "extrabalance.ledger.store",
        "sqlite3",
    ]


def test_the_core_does_no_io_and_reads_no_clock() -> None:
    problems = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        hits = _hits(_runtime_imports(path), IO_MODULES)
        if hits:
            problems.append(f"{path.name} imports {hits}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in CLOCK_CALLS
            ):
                problems.append(f"{path.name}:{node.lineno} calls {ast.unparse(node.func)}()")
    assert not problems
