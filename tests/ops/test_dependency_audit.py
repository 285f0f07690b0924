"""`make audit` (tools/dependency_audit.py) reads pip-audit's report right, falls back on
the registry's project document, and fails on a known vulnerability (issue 22)."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "tools" / "dependency_audit.py"


@pytest.fixture
def audit():
    spec = importlib.util.spec_from_file_location("dependency_audit", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_pip_audit(monkeypatch, audit, dependencies):
    out = json.dumps({"dependencies": dependencies, "fixes": []})
    monkeypatch.setattr(
        audit.subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=out, stderr=""),
    )


def project_documents(monkeypatch, audit, docs):
    def urlopen(url, timeout):
        name = url.split("/pypi/")[1].split("/")[0]
        if name not in docs:
            raise OSError("404")
        return io.BytesIO(json.dumps(docs[name]).encode())

    monkeypatch.setattr(audit.urllib.request, "urlopen", urlopen)


def test_a_known_vulnerability_fails_the_audit(monkeypatch, audit, capsys):
    fake_pip_audit(
        monkeypatch,
        audit,
        [
            {
                "name": "aiohttp",
                "version": "3.9.1",
                "vulns": [{"id": "PYSEC-X", "aliases": ["CVE-0000-1"], "fix_versions": ["3.9.2"]}],
            },
            {"name": "extrabalance", "skip_reason": "distribution marked as editable"},
        ],
    )
    project_documents(monkeypatch, audit, {})
    assert audit.main() == 1
    out = capsys.readouterr().out
    assert "VULNERABLE aiohttp 3.9.1: PYSEC-X (CVE-0000-1) fixed in 3.9.2" in out
    assert "1 of 1 installed distributions audited" in out


def test_the_project_document_audits_the_latest_release_only(monkeypatch, audit, capsys):
    fake_pip_audit(
        monkeypatch,
        audit,
        [
            {
                "name": "yarl",
                "skip_reason": "Dependency not found on PyPI and could not be "
                "audited: yarl (1.25.1)",
            },
            {
                "name": "numpy",
                "skip_reason": "Dependency not found on PyPI and could not be "
                "audited: numpy (2.4.6)",
            },
        ],
    )
    project_documents(
        monkeypatch,
        audit,
        {
            "yarl": {
                "info": {"version": "1.25.1"},
                "vulnerabilities": [
                    {"id": "GHSA-Y", "aliases": [], "fixed_in": ["1.25.2"], "withdrawn": None},
                    {"id": "GHSA-OLD", "aliases": [], "fixed_in": [], "withdrawn": "2026-01-01"},
                ],
            },
            "numpy": {"info": {"version": "2.5.0"}, "vulnerabilities": []},  # not ours: newer
        },
    )
    monkeypatch.setenv("AUDIT_STRICT", "0")
    assert audit.main() == 1
    out = capsys.readouterr().out
    assert "VULNERABLE yarl 1.25.1: GHSA-Y" in out and "GHSA-OLD" not in out
    assert "NOT audited (1)" in out and "numpy (2.4.6)" in out


def test_strict_mode_fails_on_what_could_not_be_audited(monkeypatch, audit):
    fake_pip_audit(
        monkeypatch,
        audit,
        [
            {
                "name": "numpy",
                "skip_reason": "Dependency not found on PyPI and could not be "
                "audited: numpy (2.4.6)",
            }
        ],
    )
    project_documents(monkeypatch, audit, {})
    monkeypatch.setenv("AUDIT_STRICT", "1")
    assert audit.main() == 2
    monkeypatch.setenv("AUDIT_STRICT", "0")
    assert audit.main() == 0


def test_make_has_an_audit_target():
    makefile = (PATH.parents[1] / "Makefile").read_text()
    assert "\naudit:" in makefile and "tools/dependency_audit.py" in makefile
