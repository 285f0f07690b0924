"""The deploy/ files agree with the code: dashboard metric names exist, the unit and
the image run as a dedicated non-root user with secrets from the environment."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from extrabalance.observability import Metrics

DEPLOY = Path(__file__).parents[2] / "deploy"


def exported_names() -> set[str]:
    m = Metrics()
    # Touch every labelled family once so it appears in the exposition.
    m.loans.labels("ussd").inc()
    m.refusals.labels("X").inc()
    m.paybacks.labels("full").inc()
    m.ads.labels("sent", "X").inc()
    m.bars.labels("bar").inc()
    m.events.labels("loan").inc()
    m.in_latency.labels("REFUND_ACCOUNT").observe(0.01)
    m.ussd_latency.observe(0.01)
    m.recharges.labels("ok").inc()
    m.peer_up.labels("p").set(1)
    m.bind_up.labels("b").set(1)
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_dashboard_uses_only_metrics_the_node_exports():
    dash = json.loads((DEPLOY / "grafana" / "extrabalance-dashboard.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\beb_[a-z_]+", target["expr"]))
    assert used, "no metrics in the dashboard"
    missing = used - exported_names()
    assert not missing, f"dashboard queries unknown metrics {missing}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_systemd_unit_essentials():
    unit = (DEPLOY / "systemd" / "extrabalance.service").read_text()
    for line in ("User=extrabalance", "EnvironmentFile=/etc/extrabalance/secrets.env",
                 "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM"):
        assert line in unit.splitlines(), line


def test_dockerfile_runs_as_non_root_on_python_311_slim():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    users = [line for line in text.splitlines() if line.startswith("USER ")]
    assert users and all("root" not in u and u.strip() != "USER 0" for u in users)


def _image_config(tmp_path):
    """The config the image carries, made by the Dockerfile's own sed line."""
    import shlex
    import subprocess
    import tomllib

    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("RUN sed "))
    argv = shlex.split(line.removeprefix("RUN ").split(">")[0])
    source = DEPLOY.parent / "config" / "extrabalance.toml"
    out = subprocess.run([*argv[:-1], str(source)], check=True, capture_output=True,
                         text=True).stdout
    return tomllib.loads(out)


def test_image_config_listens_on_every_interface(tmp_path):
    from extrabalance.config import parse_settings

    doc = _image_config(tmp_path)
    settings = parse_settings(doc, "image config")
    assert settings.diameter.listen_host == "0.0.0.0"  # -p 3868:3868 reaches it
    assert settings.admin.listen_host == "0.0.0.0"
    assert settings.storage.path.startswith("/var/lib/extrabalance/")  # the volume
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "/etc/extrabalance/extrabalance.toml" in dockerfile.split("COPY --from=build")[-1]


def test_unit_documentation_is_installed_by_the_install_steps():
    unit = (DEPLOY / "systemd" / "extrabalance.service").read_text()
    docs = [line.split("=", 1)[1] for line in unit.splitlines()
            if line.startswith("Documentation=")]
    install = (DEPLOY.parent / "docs" / "operations.md").read_text().split("## Install", 1)[1]
    install = install.split("\n## ", 1)[0]
    assert docs
    for target in docs:
        assert target.startswith(("http://", "https://", "file://", "man:")), target
        if target.startswith("file://"):
            assert target.removeprefix("file://") in install, f"{target} is never installed"
