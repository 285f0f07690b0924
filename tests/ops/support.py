"""Config files for the ops tests: the embedded default with a private ledger path."""

from __future__ import annotations

from pathlib import Path

from extrabalance.config import default_config_text

DEFAULT_DB_LINE = 'path = "var/extrabalance.db"'


def write_config(directory: Path, *, extra: str = "", replace: dict[str, str] | None = None) -> Path:
    text = default_config_text()
    assert DEFAULT_DB_LINE in text
    text = text.replace(DEFAULT_DB_LINE, f'path = "{directory / "ledger.db"}"')
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "extrabalance.toml"
    path.write_text(text + extra, encoding="utf-8")
    return path
