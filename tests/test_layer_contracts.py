"""Layer contracts, read from the source (docs/ledger.md "Unit of work"):

* the services reach storage only through the unit-of-work port: no `sqlite3` (or any
  database driver) and no runtime import of the ledger's modules in
  `extrabalance/service/`; imports under `if TYPE_CHECKING:` may name the row types
  the port's operations return (`...Row`, `LoadedSubscriber`), never a module such as
  `ledger.store` (whose functions take a connection and bypass the adapters' locks).
  Loan and recovery states come from `core/sagas.py`;
* entry points (`admin_cli`, `report`, `backtest`, the admin API) move money through
  the services and read through the port or a read model of `ledger/`: they import
  neither `ledger.store` nor `ledger.adjustments`, and those with no file of their own
  to handle import no database driver;
* Diameter Result-Codes are declared once, in `diameter/constants.py` (not in an
  adapter, a simulator or a bench tool), and no service imports `diameter/` or an
  adapter: the services decide in neutral terms (`AdvanceDecision`), the Gy adapter
  says the decision in a code (`service/outcomes.py` alone maps the codes of rows
  kept before, to read them);
* the admin API depends on what it needs of the node (`admin/ports.py`), never on the
  node module (which imports the admin package): no import of `extrabalance.node`
  in `extrabalance/admin/`, not even for annotations;
* the domain core and the protocol cores do no IO and read no clock: no asyncio,
  sockets, threads, processes or time module in `extrabalance/core/` nor in the
  top level of `extrabalance/diameter/` and `extrabalance/smpp/` (their transports are
  in `diameter/aio/` and `smpp/aio/`); the domain core makes no `datetime.now()` /
  `date.today()` / `time.time()`-style call (the caller passes `now`), and a protocol
  core reads time only through the injectable clock (`extrabalance/clock.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "extrabalance"

# What a service may not import at run time: the database and its SQL.
STORAGE_MODULES = ("sqlite3", "apsw", "psycopg", "asyncpg", "extrabalance.ledger")
# What a service may name from the ledger for its annotations (under TYPE_CHECKING).
ROW_TYPE_NAMES = ("LoadedSubscriber",)
ROW_TYPE_SUFFIX = "Row"

# Entry points translate; they reach the ledger through the services, the port, or a
# read model of `ledger/` (`read_models`, `views`), never its business SQL.
ENTRY_POINTS = ("admin_cli.py", "report.py", "backtest.py", "admin/server.py")
ENTRY_POINT_BANS = ("extrabalance.ledger.store", "extrabalance.ledger.adjustments")
# Of those, the ones with no reason to open a database themselves (admin_cli keeps
# `sqlite3` for the SQLite online backup, a tool of the file itself).
NO_DRIVER = ("report.py", "backtest.py", "admin/server.py")

# Diameter Result-Codes are named once, in the generated `diameter/constants.py`; the
# services decide in neutral terms (`service/outcomes.py`) and the Diameter adapters
# say it in codes. `outcomes.py` alone names codes, to read rows kept before that.
RESULT_CODE_HOME = PACKAGE / "diameter" / "constants.py"
SCANNED_TREES = (PACKAGE, PACKAGE.parent / "simulators", PACKAGE.parent / "bench")
SERVICES_READING_OLD_CODES = ("outcomes.py",)

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


def _type_checking_imports(path: Path) -> list[str]:
    """`module.name` of every `from module import name` inside `if TYPE_CHECKING:`
    (and `module` for a plain `import module` there)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for child in ast.walk(inner):
                    if isinstance(child, ast.Import):
                        found.extend(alias.name for alias in child.names)
                    elif isinstance(child, ast.ImportFrom) and child.module:
                        found.extend(f"{child.module}.{alias.name}" for alias in child.names)
    return found


def _not_a_row_type(qualified: str) -> bool:
    name = qualified.rsplit(".", 1)[-1]
    return not (name.endswith(ROW_TYPE_SUFFIX) or name in ROW_TYPE_NAMES)


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
        typed = [
            name
            for name in _hits(_type_checking_imports(path), STORAGE_MODULES)
            if _not_a_row_type(name)
        ]
        if hits or typed:
            offenders[path.name] = hits + typed
    assert not offenders, f"service modules reaching storage around the port: {offenders}"


def test_services_take_no_connection() -> None:
    """No unit of work in a service is typed over a database connection (`conn:
    sqlite3.Connection`, `psycopg.Connection`): every closure takes a `LedgerTx`."""
    problems = []
    for path in sorted((PACKAGE / "service").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.arg) and node.annotation is not None:
                annotation = ast.unparse(node.annotation)
                if "Connection" in annotation or "Cursor" in annotation:
                    problems.append(f"{path.name}:{node.lineno} {node.arg}: {annotation}")
    assert not problems


def test_entry_points_reach_money_through_services_or_the_port() -> None:
    problems = {}
    for name in ENTRY_POINTS:
        path = PACKAGE / name
        hits = _hits(_runtime_imports(path), ENTRY_POINT_BANS)
        if name in NO_DRIVER:
            hits += _hits(_runtime_imports(path), ("sqlite3", "psycopg"))
        if hits:
            problems[name] = hits
    assert not problems, f"entry points around the services: {problems}"
    sql = [
        f"{name}:{node.lineno}"
        for name in NO_DRIVER
        for node in ast.walk(ast.parse((PACKAGE / name).read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("execute", "executemany", "executescript")
    ]
    assert not sql, f"entry points running SQL themselves: {sql}"


def _result_code_declarations(path: Path) -> list[str]:
    """`NAME = <int>` at module level where NAME is a Diameter result (DIAMETER_*,
    but not the dictionary's data types) or an int that is one of the codes."""
    from extrabalance.diameter import constants

    codes = {v for k, v in vars(constants).items()
             if k.startswith("DIAMETER_") and isinstance(v, int) and v >= 1000}
    found = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, (ast.Assign, ast.AnnAssign))
                and isinstance(node.value, ast.Constant) and type(node.value.value) is int):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Name) and target.id.startswith("DIAMETER_")
                        and node.value.value in codes):
                    found.append(f"{path.name}:{node.lineno} {target.id}")
    return found


def test_result_codes_are_declared_once_and_services_decide_without_them() -> None:
    redeclared = [
        hit
        for tree in SCANNED_TREES
        for path in sorted(tree.rglob("*.py"))
        if path != RESULT_CODE_HOME
        for hit in _result_code_declarations(path)
    ]
    assert not redeclared, f"Result-Codes declared outside diameter/constants.py: {redeclared}"
    speaking_diameter = {
        path.name: hits
        for path in sorted((PACKAGE / "service").glob("*.py"))
        if path.name not in SERVICES_READING_OLD_CODES
        and (hits := _hits(_all_imports(path), ("extrabalance.diameter", "extrabalance.adapters")))
    }
    assert not speaking_diameter


def _all_imports(path: Path) -> list[str]:
    return _runtime_imports(path) + _type_checking_imports(path)


def test_the_contract_test_sees_a_result_code_declared(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("DIAMETER_SUCCESS = 2001\nDIAMETER_PORT = 3868\nOTHER = 4012\n")
    assert _result_code_declarations(sample) == ["sample.py:1 DIAMETER_SUCCESS"]


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
    assert _type_checking_imports(sample) == ["extrabalance.ledger.store.LoanRow"]
    assert not _not_a_row_type("extrabalance.ledger.store.LoanRow")


def test_the_contract_test_sees_a_ledger_module_named_for_typing(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from extrabalance.ledger import store\n"
        "    import sqlite3\n"
    )
    names = _hits(_type_checking_imports(sample), STORAGE_MODULES)
    assert [n for n in names if _not_a_row_type(n)] == ["extrabalance.ledger.store", "sqlite3"]


# The sans-IO protocol cores: the Diameter codec and peer state machine, the SMPP PDU
# codec and session state machine. Their transports live in `aio/` below each.
SANS_IO_PACKAGES = ("core", "diameter", "smpp")


def test_the_core_and_the_protocol_cores_do_no_io_and_read_no_clock() -> None:
    problems = []
    for path in sorted(p for pkg in SANS_IO_PACKAGES for p in (PACKAGE / pkg).glob("*.py")):
        hits = _hits(_runtime_imports(path), IO_MODULES)
        if hits:
            problems.append(f"{path.parent.name}/{path.name} imports {hits}")
        if path.parent.name != "core":
            continue  # a protocol core may take the injectable clock (Session-Id high word)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in CLOCK_CALLS
            ):
                problems.append(f"{path.parent.name}/{path.name}:{node.lineno} calls "
                                f"{ast.unparse(node.func)}()")
    assert not problems


def test_the_admin_api_does_not_import_the_node() -> None:
    offenders = {}
    for path in sorted((PACKAGE / "admin").glob("*.py")):
        names = _runtime_imports(path) + _type_checking_imports(path)
        hits = _hits(names, ("extrabalance.node",))
        if hits:
            offenders[path.name] = hits
    assert not offenders, f"admin modules importing the node: {offenders}"
