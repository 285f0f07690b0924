"""`make audit`: known vulnerabilities in the installed dependencies, from the package
registry alone.

It runs pip-audit over the project's virtual environment (`--local`, the project itself
skipped) with the PyPI vulnerability service: for each installed distribution PyPI's
JSON API returns the advisories (from the Python Packaging Advisory Database and OSV)
that affect that exact version. No other service is asked. Responses are cached in
`.audit-cache/` (pip-audit's HTTP cache), so a re-run needs the registry only for what
changed. Where the registry serves no per-version document (some registry proxies
serve only the project document), the project document is read instead: its
`vulnerabilities` list is the one for the latest release, so it audits a distribution
whose installed version is that latest release, and only that.

What it says, and its limits:
- a table of every known vulnerability with the version that fixes it; exit 1 if any;
- how many installed distributions were audited, and which could not be: a version
  PyPI does not publish (a private build, a mirror's own build, or a registry proxy that
  serves no per-version JSON) cannot be audited, and is listed, not passed over;
  `AUDIT_STRICT=1` makes such a gap fail the run too (exit 2);
- it knows only advisories filed against PyPI packages: a hole in the C libraries that
  wheels bundle (OpenSSL in cryptography, libuv in uvloop) is covered only when the
  package's maintainers file one, and the Debian packages of the image (Mosquitto,
  Python itself) are not covered at all: audit those with the distribution's tools;
- an advisory without a fixed version is reported with an empty fix column.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".audit-cache"
PROJECT_JSON = "https://pypi.org/pypi/{name}/json"
FETCH_TIMEOUT_S = 20


def latest_release_audit(name: str, version: str) -> list[dict[str, Any]] | None:
    """The advisories of `name` `version` from PyPI's project document, when `version`
    is its latest release (the only one that document speaks for); None otherwise."""
    try:
        with urllib.request.urlopen(
            PROJECT_JSON.format(name=name), timeout=FETCH_TIMEOUT_S
        ) as reply:
            doc = json.load(reply)
    except (OSError, ValueError):
        return None
    if doc.get("info", {}).get("version") != version:
        return None
    return [
        {
            "id": v.get("id", "?"),
            "aliases": v.get("aliases") or [],
            "fix_versions": v.get("fixed_in") or [],
        }
        for v in doc.get("vulnerabilities") or []
        if not v.get("withdrawn")
    ]


def main() -> int:
    cmd = [
        sys.executable,
        "-m",
        "pip_audit",
        "--local",
        "--skip-editable",
        "--vulnerability-service",
        "pypi",
        "--cache-dir",
        str(CACHE),
        "--progress-spinner",
        "off",
        "--format",
        "json",
        "--desc",
        "off",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        print("audit: pip-audit gave no report:", proc.stderr.strip()[-2000:], file=sys.stderr)
        return 3
    deps = [
        d
        for d in report["dependencies"]  # the project itself (installed editable)
        if "editable" not in (d.get("skip_reason") or "")
    ]
    pending = [d for d in deps if d.get("skip_reason")]
    named = [(d["name"], d["skip_reason"].rsplit("(", 1)[-1].rstrip(")")) for d in pending]
    with ThreadPoolExecutor(8) as pool:
        for dep, (name, version), vulns in zip(
            pending, named, pool.map(lambda nv: latest_release_audit(*nv), named), strict=True
        ):
            if vulns is not None:
                dep.update(version=version, vulns=vulns, skip_reason=None)
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = [d for d in deps if not d.get("skip_reason")]
    vulnerable = [(d, v) for d in audited for v in d.get("vulns", [])]
    for dep, vuln in vulnerable:
        fixes = ", ".join(vuln.get("fix_versions", [])) or "-"
        aliases = ", ".join(vuln.get("aliases", []))
        print(
            f"VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} ({aliases}) fixed in {fixes}"
        )
    print(
        f"audit: {len(audited)} of {len(deps)} installed distributions audited against "
        f"PyPI's advisories; {len(vulnerable)} known vulnerabilities"
    )
    if skipped:
        print(f"audit: NOT audited ({len(skipped)}), PyPI has no data for these versions:")
        for dep in skipped:
            print(f"  {dep['skip_reason'].split(': ', 1)[-1]}")
    if vulnerable:
        return 1
    if skipped and os.environ.get("AUDIT_STRICT") == "1":
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
