"""What the docs say is true today: the wire contract they cite lives in the
repository, "Known gaps" lists only gaps, the README does not promise a PostgreSQL
scale-out the node does not have, and a newcomer's first phone call can work."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT_FILES = [p for top in ("docs", "extrabalance", "simulators", "bench", "tests", "deploy")
              for p in (ROOT / top).rglob("*") if p.suffix in (".md", ".py", ".toml", ".service")]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_the_wire_contract_is_in_the_repository() -> None:
    assert (ROOT / "docs" / "protocols.md").is_file()
    me = Path(__file__).resolve()
    citing = [str(p.relative_to(ROOT)) for p in [*TEXT_FILES, ROOT / "README.md"]
              if p.resolve() != me and "PROTOCOLS.md" in _read(p)]
    assert not citing, f"cite docs/protocols.md instead: {citing}"
    contract = _read(ROOT / "docs" / "protocols.md")
    for must in ("4012", "REFUND_ACCOUNT", "DIRECT_DEBITING", "CHECK_BALANCE",
                 "ussd_service_op", "its_session_info", "extrabalance/recharge/dead",
                 "event_id"):
        assert must in contract


def test_links_to_protocols_md_resolve() -> None:
    for path in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)", _read(path)):
            assert (path.parent / target).is_file(), f"{path.name} links to {target}"


def _known_gaps() -> str:
    text = _read(ROOT / "docs" / "operations.md")
    return text.split("## Known gaps", 1)[1].split("\n## ", 1)[0]


def test_known_gaps_lists_no_fixed_gap() -> None:
    gaps = _known_gaps()
    # Fixed: debt_after_minor is filled (full paybacks count), ad_suppressed carries its
    # reason and payback lines their event_id/in_node, the confirm screen re-asks after a
    # fee change, and protocol log lines go to the JSON log.
    for fixed in ("debt_after_minor", "carry no reason", "no `event_id`", "recomputed",
                  "standard\n  `logging`", "`logging` module"):
        assert fixed not in gaps, fixed
    assert "`segment` column" in gaps  # still true: EDR_FIELDS has no segment


def test_segment_gap_is_still_true() -> None:
    from extrabalance.observability import EDR_FIELDS

    assert "segment" not in EDR_FIELDS


def test_no_promise_of_a_makefile_target_that_exists() -> None:
    for path in (ROOT / "docs").glob("*.md"):
        assert "is to gain" not in _read(path), path.name
    assert "\nbrowser-test:" in _read(ROOT / "Makefile")


def test_readme_promises_no_postgres_scale_out_and_keeps_two_set_up_commands() -> None:
    readme = _read(ROOT / "README.md")
    assert "PostgreSQL to scale out" not in readme
    set_up = readme.split("## Set up", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in set_up.splitlines() if line.strip()
                and not line.startswith("sh")]
    assert commands == ["make demo", "make test"]


def test_phone_example_imports_profiles_first() -> None:
    text = _read(ROOT / "docs" / "simulators.md")
    phone = text.index("$ extrabalance phone 201000000001")
    assert "import-profiles" in text[text.index("## The phone"):phone]
