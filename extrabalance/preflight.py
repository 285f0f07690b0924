"""What `run` needs from the machine beyond a valid file: secrets present and within
their protocol's limits, a ledger path that can be created. `check-config` and `run`
ask the same questions, so a config that checks OK does not fail at start-up (or, worse,
start and then fail to bind for ever with a missing password).
"""

from __future__ import annotations

import os
from pathlib import Path

from extrabalance.config import ConfigError, Settings

# The PostgreSQL ledger adapter exists (ledger/postgres.py) and the tools on the
# unit-of-work port use it (`extrabalance ledger migrate`), but the node's lending
# service and resolver still talk to the SQLite ledger directly: a node started on
# PostgreSQL would lend from a file the other nodes never see.
POSTGRESQL_NOT_YET = (
    'storage.backend = "postgresql": the node\'s lending service does not yet run on '
    "PostgreSQL (it still uses the SQLite ledger directly); run the node on "
    'backend = "sqlite". The PostgreSQL ledger serves `extrabalance ledger migrate` '
    "for now (docs/ledger.md \"PostgreSQL\")"
)


def storage_problem(path_text: str) -> str | None:
    """Why the ledger file `path_text` cannot be created or opened (None: it can)."""
    path = Path(path_text)
    if path.is_dir():
        return f"storage.path {path_text!r} is a directory; name the ledger file in it"
    parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return (f"storage.path {path_text!r} cannot be created: {str(ancestor)!r} "
                "is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK) and not (path.exists()
                                                          and os.access(path, os.W_OK)):
        return f"storage.path {path_text!r} cannot be created: {str(ancestor)!r} is not writable"
    return None


def runtime_problems(settings: Settings) -> list[str]:
    """Everything `run` would fail on that the file's validation cannot see."""
    problems = []
    if settings.storage.backend == "postgresql":
        problems.append(POSTGRESQL_NOT_YET)
    else:
        problem = storage_problem(settings.storage.path)
        if problem:
            problems.append(problem)
    for i, bind in enumerate(settings.smpp.binds):
        where = f"smpp.binds[{i}] ({bind.system_id})"
        if bind.password_env and bind.password_env not in os.environ:
            problems.append(f"{where}: environment variable {bind.password_env} "
                            "(password_env) is not set; the SMSC would refuse every bind")
            continue
        try:
            bind.password()
        except (ConfigError, ValueError) as exc:  # each names the bind
            problems.append(str(exc))
    mqtt = settings.mqtt
    if mqtt.password_env and mqtt.password_env not in os.environ:
        problems.append(f"mqtt: environment variable {mqtt.password_env} (password_env) "
                        "is not set")
    else:
        try:
            mqtt.password()
        except ValueError as exc:
            problems.append(f"mqtt: {exc}")
    return problems


def check_runtime(settings: Settings, source: str) -> None:
    """Raise ConfigError listing every problem (one per line) when there is one."""
    problems = runtime_problems(settings)
    if problems:
        raise ConfigError("\n".join([f"{source}: cannot run", *(f"  {p}" for p in problems)]))
