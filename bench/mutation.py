"""Mutation testing of the money code: does a wrong line make a test fail?

    python -m bench.mutation                      # every mutant of bench/mutation.toml
    python -m bench.mutation --jobs 1 --keep-killed
    python -m bench.mutation --list               # the mutants, nothing run
    python -m bench.mutation --only store.py      # keys containing the text

One small change at a time is made to a copy of a target module's syntax tree
(a comparison flipped or moved off by one, `+` for `-`, a constant +-1, a statement
deleted, `min` for `max`, a sign dropped, `and` for `or`, a journal account swapped
with its sibling, a saga state swapped with its neighbour), and the tests that ran
the mutated function in the baseline pass are run against it, fastest first,
stopping at the first failure. A mutant is *killed* when a test fails (or errors, or
runs past its timeout) and *survives* when every test passes: then no test would
have noticed that line being wrong.

How a mutant runs: the baseline pass runs in a child that imports the target
modules through an import hook serving them with a call at the top of each function
recording which test entered it; that gives each mutant its tests (all of them for a
change outside any function). Then this process imports pytest, the project and
the test modules once, and forks one child per mutant: for a change inside a
function the child swaps that function's code object for the mutated one (every
reference to the function sees it) and calls pytest in-process on the mutant's
tests; for any other change (a module constant, a dataclass default) the child
drops the project's modules and imports them afresh, the mutated module through the
import hook. The files on disk are never touched, so runs may go in parallel and in
a checkout others use. Mutated code keeps the file's line numbers.

Results are cached in var/mutation/results.json by the mutated module's source: a
second run re-runs only what changed. A cached survivor is run again whenever the
sources or tests changed; a cached kill is reused only when nothing changed, or
with `--keep-killed` (right when tests were only added: a test added cannot make a
killed mutant survive). The report goes to var/mutation/report.md.

Equivalent mutants (same behaviour as the original for every input the code can be
given) are listed in the config's `[equivalent]` table with the reason; they are left
out of the score and listed apart. A key that no longer matches a mutant is reported.
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import hashlib
import importlib
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "bench" / "mutation.toml"

# Journal accounts: each swapped with the account the same event posts beside it.
ACCOUNT_SWAP = {
    "principal_receivable": "fee_receivable",
    "fee_receivable": "principal_receivable",
    "disbursed_float": "fee_income",
    "fee_income": "disbursed_float",
    "recovered_cash": "written_off",
    "written_off": "recovered_cash",
}
# Saga states (names of the store's constants): each swapped with a neighbour.
STATE_SWAP = {
    "REQUESTED": "CREDITING",
    "CREDITING": "REQUESTED",
    "ACTIVE": "PARTIALLY_REPAID",
    "PARTIALLY_REPAID": "ACTIVE",
    "REPAID": "PARTIALLY_REPAID",
    "FAILED": "UNKNOWN",
    "UNKNOWN": "FAILED",
    "WRITTEN_OFF": "REPAID",
    "CONFIRMING": "ACTIVE",
    "RECOVERING": "UNKNOWN",
    "DONE": "RECOVERING",
}
CMP_SWAPS: dict[type[ast.cmpop], tuple[type[ast.cmpop], ...]] = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
}
ARITH_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
}
HIT = "__mutation_hit__"
MODULE_SCOPE = "<module>"


# -- mutants ---------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    path: str  # relative to the root
    module: str
    line: int
    scope: str  # qualified name of the top-level function or method, or <module>
    op: str
    before: str
    after: str
    key: str  # stable across line moves: path::scope::op::before -> after[#n]
    node_path: tuple[tuple[str, int | None], ...]
    replace: Callable[[ast.AST], ast.AST] = field(compare=False, repr=False)


def _short(node: ast.AST, limit: int = 70) -> str:
    text = ast.unparse(node).splitlines()[0] if not isinstance(node, ast.Pass) else "pass"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_docstring(stmt: ast.stmt, body: list[ast.stmt]) -> bool:
    return (
        body
        and stmt is body[0]
        and isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


class _Enumerator:
    """Walks a module in a fixed order and lists every mutation point."""

    def __init__(self, path: str, module: str, functions: set[str] | None) -> None:
        self.path = path
        self.module = module
        self.functions = functions  # None: the whole module
        self.found: list[Mutant] = []
        self._seen: dict[str, int] = {}
        self._parents: list[ast.AST] = []

    def run(self, tree: ast.Module) -> list[Mutant]:
        self._visit(tree, (), MODULE_SCOPE, [], in_function=False)
        return self.found

    def _in_scope(self, scope: str) -> bool:
        return self.functions is None or scope in self.functions

    def _add(self, node: ast.AST, node_path: tuple[Any, ...], scope: str, op: str,
             replacement: Callable[[ast.AST], ast.AST]) -> None:
        if not self._in_scope(scope):
            return
        before = _short(node)
        after = _short(replacement(copy.deepcopy(node)))
        base = f"{self.path}::{scope}::{op}::{before} -> {after}"
        if op in ("const", "sign", "not", "state", "account") and self._parents:
            # a bare `0 -> 1` says little: name the expression it sits in
            base += f" in {_short(self._parents[-1], 60)}"
        n = self._seen.get(base, 0)
        self._seen[base] = n + 1
        key = base if n == 0 else f"{base}#{n + 1}"
        line = getattr(node, "lineno", 0)
        self.found.append(
            Mutant(self.path, self.module, line, scope, op, before, after, key, node_path,
                   replacement)
        )

    def _visit(self, node: ast.AST, node_path: tuple[Any, ...], scope: str,
               class_stack: list[str], *, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Assert, ast.Delete, ast.Global,
                             ast.Nonlocal)):
            return
        if isinstance(node, ast.JoinedStr):
            return  # messages
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not in_function:
                scope = ".".join([*class_stack, node.name])
            self._visit_list(node.body, (*node_path, ("body", None)), scope, class_stack,
                             in_function=True, statements=True)
            # arguments' defaults are behaviour too
            for i, default in enumerate(node.args.defaults):
                self._visit(default, (*node_path, ("args", None), ("defaults", i)), scope,
                            class_stack, in_function=in_function)
            for i, default in enumerate(node.args.kw_defaults):
                if default is not None:
                    self._visit(default, (*node_path, ("args", None), ("kw_defaults", i)),
                                scope, class_stack, in_function=in_function)
            return
        if isinstance(node, ast.ClassDef):
            stack = [*class_stack, node.name] if not in_function else class_stack
            self._visit_list(node.body, (*node_path, ("body", None)), scope, stack,
                             in_function=in_function, statements=False)
            return
        self._mutations(node, node_path, scope, in_function)
        self._parents.append(node)
        try:
            self._visit_fields(node, node_path, scope, class_stack, in_function=in_function)
        finally:
            self._parents.pop()

    def _visit_fields(self, node: ast.AST, node_path: tuple[Any, ...], scope: str,
                      class_stack: list[str], *, in_function: bool) -> None:
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            if isinstance(value, list):
                if value and isinstance(value[0], ast.stmt):
                    self._visit_list(value, (*node_path, (name, None)), scope, class_stack,
                                     in_function=in_function, statements=in_function)
                else:
                    for i, item in enumerate(value):
                        if isinstance(item, ast.AST):
                            self._visit(item, (*node_path, (name, i)), scope, class_stack,
                                        in_function=in_function)
            elif isinstance(value, ast.AST):
                self._visit(value, (*node_path, (name, None)), scope, class_stack,
                            in_function=in_function)

    def _visit_list(self, body: list[ast.stmt], list_path: tuple[Any, ...], scope: str,
                    class_stack: list[str], *, in_function: bool, statements: bool) -> None:
        field_name = list_path[-1][0]
        base = list_path[:-1]
        for i, stmt in enumerate(body):
            path = (*base, (field_name, i))
            if _is_docstring(stmt, body):
                continue
            if not in_function:
                # Outside functions: name the scope after what the statement binds
                # (`RecoveryPolicy.share_bp`, `BP_PER_UNIT`); every test runs these.
                target = getattr(stmt, "target", None) or (getattr(stmt, "targets", None)
                                                            or [None])[0]
                name = target.id if isinstance(target, ast.Name) else f"line {stmt.lineno}"
                scope = f"{MODULE_SCOPE}:" + ".".join([*class_stack, name])
            if statements and not isinstance(
                stmt, (ast.Pass, ast.Assert, ast.Delete, ast.Global, ast.Nonlocal,
                       ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import,
                       ast.ImportFrom)
            ):
                self._add(stmt, path, scope, "delete", lambda _n: ast.Pass())
            self._visit(stmt, path, scope, class_stack, in_function=in_function)

    def _mutations(self, node: ast.AST, path: tuple[Any, ...], scope: str,
                   in_function: bool) -> None:
        if isinstance(node, ast.Compare):
            for i, cmp in enumerate(node.ops):
                for new in CMP_SWAPS.get(type(cmp), ()):
                    self._add(node, path, scope, "compare", _set_cmp(i, new))
        elif isinstance(node, (ast.BinOp, ast.AugAssign)):
            new = ARITH_SWAPS.get(type(node.op))
            if new is not None:
                self._add(node, path, scope, "arith", _set_op(new))
        elif isinstance(node, ast.BoolOp):
            new_bool = ast.Or if isinstance(node.op, ast.And) else ast.And
            self._add(node, path, scope, "bool", _set_op(new_bool))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            self._add(node, path, scope, "sign" if isinstance(node.op, ast.USub) else "not",
                      lambda n: n.operand)  # type: ignore[attr-defined]
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool):
                self._add(node, path, scope, "const", lambda _n, v=value: ast.Constant(not v))
            elif isinstance(value, int):
                for delta in (1, -1):
                    self._add(node, path, scope, "const",
                              lambda _n, v=value + delta: ast.Constant(v))
            elif isinstance(value, str) and value in ACCOUNT_SWAP:
                self._add(node, path, scope, "account",
                          lambda _n, v=ACCOUNT_SWAP[value]: ast.Constant(v))
        elif (
            isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Load)
            and in_function
            and node.id in STATE_SWAP
        ):
            self._add(node, path, scope, "state",
                      lambda _n, v=STATE_SWAP[node.id]: ast.Name(v, ast.Load()))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("max", "min")
        ):
            other = "min" if node.func.id == "max" else "max"
            self._add(node, path, scope, "minmax", _set_func(other))


def _set_cmp(i: int, new: type[ast.cmpop]) -> Callable[[ast.AST], ast.AST]:
    def apply(node: ast.AST) -> ast.AST:
        assert isinstance(node, ast.Compare)
        node.ops[i] = new()
        return node
    return apply


def _set_op(new: type[ast.AST]) -> Callable[[ast.AST], ast.AST]:
    def apply(node: ast.AST) -> ast.AST:
        node.op = new()  # type: ignore[attr-defined]
        return node
    return apply


def _set_func(name: str) -> Callable[[ast.AST], ast.AST]:
    def apply(node: ast.AST) -> ast.AST:
        assert isinstance(node, ast.Call)
        node.func = ast.Name(name, ast.Load())
        return node
    return apply


def _get(tree: ast.AST, node_path: tuple[tuple[str, int | None], ...]) -> tuple[Any, str, Any]:
    """The parent, field and index (or None) of the node at `node_path`."""
    parent: Any = tree
    for name, index in node_path[:-1]:
        parent = getattr(parent, name)
        if index is not None:
            parent = parent[index]
    name, index = node_path[-1]
    return parent, name, index


def mutated_tree(tree: ast.Module, mutant: Mutant) -> ast.Module:
    """A copy of the module with the one change; line numbers stay those of the file
    (tracebacks, and tests that map executed lines back to the source, still agree)."""
    tree = copy.deepcopy(tree)
    parent, name, index = _get(tree, mutant.node_path)
    old = getattr(parent, name) if index is None else getattr(parent, name)[index]
    new = mutant.replace(old)
    for node in ast.walk(new):
        ast.copy_location(node, old)
    if index is None:
        setattr(parent, name, new)
    else:
        getattr(parent, name)[index] = new
    return ast.fix_missing_locations(tree)


def instrumented_tree(tree: ast.Module) -> ast.Module:
    """The module with a call recording the test at the top of every function."""
    tree = copy.deepcopy(tree)

    def walk(body: list[ast.stmt], prefix: list[str], scope: str | None) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                own = scope or ".".join([*prefix, stmt.name])
                at = 1 if _is_docstring(stmt.body[0], stmt.body) else 0
                call = ast.Expr(ast.Call(ast.Name(HIT, ast.Load()), [ast.Constant(own)], []))
                for node in ast.walk(call):
                    ast.copy_location(node, stmt.body[0])
                stmt.body.insert(at, call)
                walk(stmt.body, prefix, own)
            elif isinstance(stmt, ast.ClassDef):
                walk(stmt.body, [*prefix, stmt.name] if scope is None else prefix, scope)
            else:
                for name in ("body", "orelse", "finalbody", "handlers"):
                    inner = getattr(stmt, name, None)
                    if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                        walk(inner, prefix, scope)

    walk(tree.body, [], None)
    return ast.fix_missing_locations(tree)


# -- configuration ---------------------------------------------------------------


@dataclass
class Target:
    path: str
    module: str
    functions: set[str] | None
    group: str
    tree: ast.Module


@dataclass
class Config:
    root: Path
    tests: list[str]
    targets: list[Target]
    equivalent: dict[str, str]
    timeout_factor: float
    timeout_floor: float
    state_dir: Path


def load_config(path: Path, root: Path | None = None) -> Config:
    raw = tomllib.loads(path.read_text())
    root = root or ROOT
    targets = []
    for t in raw["target"]:
        rel = t["path"]
        module = rel.removesuffix(".py").replace("/", ".")
        tree = ast.parse((root / rel).read_text(), rel)
        functions = set(t["functions"]) if "functions" in t else None
        targets.append(Target(rel, module, functions, t.get("group", rel), tree))
    return Config(
        root=root,
        tests=list(raw["tests"]),
        targets=targets,
        equivalent={k: str(v) for k, v in raw.get("equivalent", {}).items()},
        timeout_factor=float(raw.get("timeout_factor", 3.0)),
        timeout_floor=float(raw.get("timeout_floor", 30.0)),
        state_dir=root / raw.get("state_dir", "var/mutation"),
    )


def enumerate_mutants(config: Config) -> list[Mutant]:
    mutants: list[Mutant] = []
    for target in config.targets:
        mutants.extend(_Enumerator(target.path, target.module, target.functions).run(target.tree))
    return mutants


def _fingerprint(config: Config) -> str:
    """Every source and test file: a change to any of them may change an outcome."""
    h = hashlib.sha256()
    dirs = sorted({config.root / t.path.split("/")[0] for t in config.targets}
                  | {config.root / t for t in config.tests})
    for d in dirs:
        files = [d] if d.is_file() else sorted(d.rglob("*.py"))
        for f in files:
            h.update(str(f.relative_to(config.root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# -- running pytest in a forked child --------------------------------------------


class _SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the given syntax trees for the given module names."""

    def __init__(self, sources: dict[str, tuple[ast.Module, str]]) -> None:
        self.sources = sources  # module -> (tree, file path)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.sources:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=self.sources[fullname][1])

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        tree, filename = self.sources[module.__name__]
        module.__file__ = filename
        module.__dict__[HIT] = _hit
        exec(compile(tree, filename, "exec"), module.__dict__)  # noqa: S102


_current_test = ""
_hits: dict[str, set[str]] = {}


def _hit(scope: str) -> None:
    _hits.setdefault(scope, set()).add(_current_test)


class _Recorder:
    """pytest plugin: which test is running, how long each took, what failed."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.durations: dict[str, float] = {}
        self.failed: list[str] = []

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        global _current_test
        _current_test = nodeid
        self.order.append(nodeid)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.failed.append(f"collecting {report.nodeid}")

    def pytest_runtest_logreport(self, report: Any) -> None:
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration
        if report.failed and report.nodeid not in self.failed:
            self.failed.append(report.nodeid)


def _pytest_args(config: Config, nodeids: list[str]) -> list[str]:
    return ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not slow",
            "--rootdir", str(config.root), "-W", "ignore::DeprecationWarning", *nodeids]


def _hypothesis_profile() -> None:
    """Reproducible runs that leave no example database behind."""
    try:
        from hypothesis import settings
    except ImportError:
        return
    settings.register_profile("mutation", database=None, derandomize=True)
    settings.load_profile("mutation")


def _own_modules(config: Config) -> set[str]:
    """Top-level names of the project's and the tests' packages."""
    return {t.path.split("/")[0] for t in config.targets} | {
        Path(t).parts[0] for t in config.tests}


def _find_code(code: Any, qualname: str) -> Any:
    for const in code.co_consts:
        if hasattr(const, "co_qualname"):
            if const.co_qualname == qualname:
                return const
            found = _find_code(const, qualname)
            if found is not None:
                return found
    return None


def _patch(module_name: str, scope: str, tree: ast.Module, filename: str) -> None:
    """Give the live function `scope` of the imported module the mutated code: every
    reference to it (imported names, callbacks, tables) now runs the mutant."""
    module: Any = sys.modules[module_name]
    new = _find_code(compile(tree, filename, "exec"), scope)
    owner: Any = module
    parts = scope.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    func = owner.__dict__[parts[-1]]
    if isinstance(func, property):
        func = func.fget
    if isinstance(func, (staticmethod, classmethod)):
        func = func.__func__
    func.__code__ = new


CHILD_FAILED = 70


def _child_run(config: Config, sources: dict[str, tuple[ast.Module, str]], nodeids: list[str],
               log: Path, out: Path, patch: tuple[str, str] | None = None) -> None:
    """In a forked child: run pytest on `nodeids` with `sources` served; never returns.
    With `patch` (module, scope), the project is already imported: the one function
    gets the mutated code instead."""
    code = CHILD_FAILED
    try:
        os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(config.root)
        sys.path.insert(0, str(config.root))
        if patch is not None:
            module_name, scope = patch
            tree, filename = sources[module_name]
            _patch(module_name, scope, tree, filename)
        else:
            # Import the project afresh, the mutated module from its mutated tree.
            own = _own_modules(config)
            for name in [n for n in sys.modules if n.split(".")[0] in own]:
                del sys.modules[name]
            sys.meta_path.insert(0, _SourceFinder(sources))
        _hypothesis_profile()
        import pytest

        recorder = _Recorder()
        code = int(pytest.main(_pytest_args(config, nodeids), plugins=[recorder]))
        out.write_text(json.dumps({
            "order": recorder.order,
            "durations": recorder.durations,
            "failed": recorder.failed,
            "hits": {k: sorted(v) for k, v in _hits.items()},
            "modules": list(sys.modules),  # in import order
        }))
    except BaseException as exc:  # noqa: BLE001 - reported through the exit code
        print(f"mutation child: {exc!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class _Job:
    pid: int
    deadline: float
    started: float
    log: Path
    out: Path
    mutant: Mutant | None


def _fork(config: Config, sources: dict[str, tuple[ast.Module, str]], nodeids: list[str],
          tag: str, timeout: float, mutant: Mutant | None,
          patch: tuple[str, str] | None = None) -> _Job:
    work = config.state_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    log, out = work / f"{tag}.log", work / f"{tag}.json"
    out.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child_run(config, sources, nodeids, log, out, patch)
    now = time.monotonic()
    return _Job(pid, now + timeout, now, log, out, mutant)


def _reap(job: _Job, block: bool) -> int | None:
    """The job's exit code, None while it runs; kills its process group past the deadline."""
    pid, status = os.waitpid(job.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        if time.monotonic() < job.deadline:
            return None
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(job.pid, 0)
        return -1
    return os.waitstatus_to_exitcode(status)


def _preimport(config: Config) -> None:
    """Import once, in this process, the third-party modules the tests import, so that
    each forked child only imports the project and the tests."""
    own = _own_modules(config) | {"bench", "simulators", "__main__"}
    job = _fork(config, {}, [*config.tests, "--collect-only"], "collect", 300, None)
    code = _reap(job, block=True)
    if code != 0 or not job.out.exists():
        raise SystemExit(f"collecting the tests failed (exit {code}); see {job.log}")
    names = json.loads(job.out.read_text())["modules"]
    for name in names:
        if name.split(".")[0] in own:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S110 - a module that fails here fails in the child too
            pass


def _import_project(config: Config, base: dict[str, Any]) -> None:
    """Import, in this process, the project and every test module the baseline ran
    (and their conftest files), so that a child forked for a mutant inside a function
    only swaps that function's code and runs the tests: no import, little collection.
    The baseline ran in a child, so nothing here was imported before it."""
    sys.path.insert(0, str(config.root))
    os.chdir(config.root)
    _hypothesis_profile()
    files = {nodeid.split("::")[0] for nodeid in base["order"]}
    for test_dir in config.tests:
        files |= {str(p.relative_to(config.root))
                  for p in (config.root / test_dir).rglob("conftest.py")}
    for t in config.targets:
        importlib.import_module(t.module)
    for rel in sorted(files, key=lambda f: (not f.endswith("conftest.py"), f)):
        name = rel.removesuffix(".py").replace("/", ".")
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S110 - pytest imports it in the child then
            pass


def _fast(mutant: Mutant, base: dict[str, Any]) -> bool:
    """Can the mutant run by swapping one function's code? Not for a change outside
    functions or in argument defaults, nor for a function that ran while the tests
    were imported (its results may be baked into module-level values)."""
    if mutant.scope.startswith(MODULE_SCOPE):
        return False
    if any(step[0] in ("args", "defaults", "kw_defaults") for step in mutant.node_path):
        return False
    return "" not in base["hits"].get(mutant.scope, [])


# -- the run ----------------------------------------------------------------------


@dataclass
class Result:
    status: str  # killed | survived | timeout | error | uncovered
    killer: str = ""
    seconds: float = 0.0
    fingerprint: str = ""
    source_hash: str = ""
    key: str = ""


def _source_hash(path: str, source: str) -> str:
    return hashlib.sha256(f"{path}\n{source}".encode()).hexdigest()


def baseline(config: Config, fingerprint: str) -> dict[str, Any]:
    """Run every test once against the instrumented targets: all must pass."""
    cache = config.state_dir / "baseline.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("fingerprint") == fingerprint:
            return dict(data)
    sources = {t.module: (instrumented_tree(t.tree), str(config.root / t.path))
               for t in config.targets}
    started = time.monotonic()
    job = _fork(config, sources, list(config.tests), "baseline", 3600, None)
    code = _reap(job, block=True)
    if code != 0 or not job.out.exists():
        raise SystemExit(f"the baseline run failed (exit {code}); see {job.log}")
    data = json.loads(job.out.read_text())
    data["fingerprint"] = fingerprint
    data["seconds"] = time.monotonic() - started
    cache.write_text(json.dumps(data))
    return dict(data)


def _tests_for(mutant: Mutant, base: dict[str, Any]) -> list[str]:
    durations: dict[str, float] = base["durations"]
    if mutant.scope.startswith(MODULE_SCOPE):
        chosen = list(base["order"])
    else:
        chosen = [t for t in base["hits"].get(mutant.scope, []) if t in durations]
    return sorted(chosen, key=lambda t: (durations.get(t, 0.0), t))


def _say(text: str) -> None:
    print(text, flush=True)


def run(config: Config, mutants: list[Mutant], *, jobs: int, keep_killed: bool,
        fresh: bool, fast: bool = True,
        progress: Callable[[str], None] = _say) -> dict[str, Result]:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    results_path = config.state_dir / "results.json"
    cache: dict[str, dict[str, Any]] = {}  # by the mutated module's hash
    if results_path.exists() and not fresh:
        cache = {v["source_hash"]: v for v in json.loads(results_path.read_text()).values()
                 if v.get("source_hash")}
    fingerprint = _fingerprint(config)
    base = baseline(config, fingerprint)
    progress(f"baseline: {len(base['order'])} tests pass in {base.get('seconds', 0):.0f} s")
    trees = {t.module: t for t in config.targets}
    results: dict[str, Result] = {}
    pending: list[tuple[Mutant, str, list[str]]] = []
    for m in mutants:
        digest = _source_hash(m.path, ast.unparse(mutated_tree(trees[m.module].tree, m)))
        old = cache.get(digest)
        if old:
            same = old.get("fingerprint") == fingerprint
            if same or (keep_killed and old["status"] in ("killed", "timeout", "error")):
                results[m.key] = Result(**{**old, "key": m.key})
                continue
        nodeids = _tests_for(m, base)
        if not nodeids:
            results[m.key] = Result("uncovered", "", 0.0, fingerprint, digest, m.key)
            continue
        pending.append((m, digest, nodeids))
    progress(f"{len(mutants)} mutants: {len(results)} known, {len(pending)} to run, "
             f"{jobs} at a time")
    running: list[tuple[_Job, str, str]] = []
    done = 0

    def save() -> None:
        merged = {**cache, **{r.source_hash: vars(r) for r in results.values()}}
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
        tmp.replace(results_path)

    queue = list(reversed(pending))
    n = 0
    if fast and queue:
        _import_project(config, base)
    # A child's garbage collector would otherwise walk (and so copy) every object this
    # process holds: freezing them keeps the fork's pages shared.
    gc.collect()
    gc.freeze()
    while queue or running:
        while queue and len(running) < jobs:
            m, digest, nodeids = queue.pop()
            source = mutated_tree(trees[m.module].tree, m)
            budget = sum(base["durations"].get(t, 0.0) for t in nodeids)
            timeout = config.timeout_floor + config.timeout_factor * budget
            n += 1
            sources = {m.module: (source, str(config.root / m.path))}
            patch = (m.module, m.scope) if fast and _fast(m, base) else None
            running.append((_fork(config, sources, nodeids, f"m{n % 64}", timeout, m, patch),
                            digest, ""))
        still = []
        for job, digest, _ in running:
            code = _reap(job, block=False)
            if code is None:
                still.append((job, digest, ""))
                continue
            assert job.mutant is not None
            seconds = time.monotonic() - job.started
            killer = ""
            if job.out.exists():
                failed = json.loads(job.out.read_text()).get("failed", [])
                killer = failed[0] if failed else ""
            # 70: the child failed before or around pytest (the tool, not the tests):
            # never counted as a kill.
            status = {0: "survived", 1: "killed", -1: "timeout", CHILD_FAILED: "broken"}.get(
                code, "error")
            if status in ("error", "broken") and not killer:
                killer = f"exit {code}; see {job.log}"
            results[job.mutant.key] = Result(status, killer, seconds, fingerprint, digest,
                                             job.mutant.key)
            done += 1
            mark = {"survived": "SURVIVED", "killed": "killed"}.get(status, status)
            progress(f"[{done}/{len(pending)}] {mark:8} {seconds:5.1f}s "
                     f"{job.mutant.path}:{job.mutant.line} {job.mutant.op}: "
                     f"{job.mutant.before} -> {job.mutant.after}")
            if done % 5 == 0:
                save()
        running = still
        if running:
            time.sleep(0.05)
    save()
    return results


# -- report -----------------------------------------------------------------------


def score_table(config: Config, mutants: list[Mutant],
                results: dict[str, Result]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    group_of = {t.path: t.group for t in config.targets}
    for m in mutants:
        for name in (m.path, f"group: {group_of[m.path]}"):
            g = groups.setdefault(name, {"name": name, "mutants": 0, "killed": 0,
                                         "survived": 0, "equivalent": 0})
            g["mutants"] += 1
            if m.key in config.equivalent:
                g["equivalent"] += 1
            elif results[m.key].status in ("killed", "timeout", "error"):
                g["killed"] += 1
            else:
                g["survived"] += 1
    for g in groups.values():
        scored = g["mutants"] - g["equivalent"]
        g["score"] = 100.0 * g["killed"] / scored if scored else 100.0
    return sorted(groups.values(), key=lambda g: (not g["name"].startswith("group"), g["name"]))


def report(config: Config, mutants: list[Mutant], results: dict[str, Result]) -> str:
    rows = score_table(config, mutants, results)
    lines = ["# Mutation report", "",
             "| code | mutants | killed | survived | equivalent | score |",
             "|---|---|---|---|---|---|"]
    for g in rows:
        lines.append(f"| {g['name']} | {g['mutants']} | {g['killed']} | {g['survived']} | "
                     f"{g['equivalent']} | {g['score']:.1f} % |")
    survivors = [m for m in mutants
                 if m.key not in config.equivalent
                 and results[m.key].status in ("survived", "uncovered", "broken")]
    lines += ["", f"## Survivors ({len(survivors)})", ""]
    for m in survivors:
        lines.append(f"- `{m.path}:{m.line}` {m.op} ({results[m.key].status}): "
                     f"`{m.before}` → `{m.after}`  \n  key: `{m.key}`")
    equivalents = [m for m in mutants if m.key in config.equivalent]
    lines += ["", f"## Equivalent ({len(equivalents)})", ""]
    for m in equivalents:
        lines.append(f"- `{m.path}:{m.line}` `{m.before}` → `{m.after}`: "
                     f"{config.equivalent[m.key]}")
    stale = sorted(set(config.equivalent) - {m.key for m in mutants})
    if stale:
        lines += ["", "## Equivalent keys matching no mutant (stale)", ""]
        lines += [f"- `{k}`" for k in stale]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mutation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--root", type=Path, default=None,
                        help="the project root (default: the config's, else this checkout)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the cache and report go (default: the config's)")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default=None, help="run mutants whose key contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--keep-killed", action="store_true",
                        help="reuse cached kills although sources or tests changed")
    parser.add_argument("--fresh", action="store_true", help="ignore the cache")
    parser.add_argument("--no-fast", action="store_true",
                        help="import the project afresh for every mutant (slower; the "
                             "default swaps a mutated function's code in place)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="exit 1 when a group scores below this (percent)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.root.resolve() if args.root else None)
    if args.state_dir is not None:
        config.state_dir = args.state_dir.resolve()
    mutants = enumerate_mutants(config)
    if args.only:
        mutants = [m for m in mutants if args.only in m.key]
    if args.list:
        for m in mutants:
            eq = "  [equivalent]" if m.key in config.equivalent else ""
            print(f"{m.path}:{m.line} {m.key}{eq}")
        print(f"{len(mutants)} mutants")
        return 0
    _preimport(config)
    to_run = [m for m in mutants if m.key not in config.equivalent]
    results = run(config, to_run, jobs=max(1, args.jobs), keep_killed=args.keep_killed,
                  fresh=args.fresh, fast=not args.no_fast)
    for m in mutants:
        results.setdefault(m.key, Result("equivalent"))
    text = report(config, mutants, results)
    out = config.state_dir / "report.md"
    out.write_text(text)
    print(text)
    print(f"report: {out}")
    if args.min_score is not None:
        groups = [g for g in score_table(config, mutants, results)
                  if g["name"].startswith("group")]
        if any(g["score"] < args.min_score for g in groups):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
