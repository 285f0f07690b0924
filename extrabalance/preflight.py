"""What `run` needs from the machine beyond a valid file: secrets present and within
their protocol's limits, a ledger path that can be created (or, on PostgreSQL, a server
that answers), an EDR directory that can be written. `check-config` and `run`
ask the same questions, so a config that checks OK does not fail at start-up (or, worse,
start and then fail to bind for ever with a missing password).
"""

from __future__ import annotations

import os
from pathlib import Path

from extrabalance.config import ConfigError, Settings


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


def directory_problem(path: Path, what: str) -> str | None:
    """Why directory `path` cannot be created or written (None: it can)."""
    if path.exists() and not path.is_dir():
        return f"{what} {str(path)!r} is a file, not a directory"
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{what} {str(path)!r} cannot be created or written: {str(ancestor)!r} is not writable"
    return None


def runtime_problems(settings: Settings) -> list[str]:
    """Everything `run` would fail on that the file's validation cannot see."""
    problems = []
    storage = settings.storage
    if storage.backend == "postgresql":
        from extrabalance.ledger.factory import postgresql_problem

        problem = postgresql_problem(storage)
    else:
        problem = storage_problem(storage.path)
    if problem:
        problems.append(problem)
    problem = directory_problem(storage.edr_directory(), "storage.edr_dir (EDR files)")
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
