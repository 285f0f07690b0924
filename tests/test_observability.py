import logging

from extrabalance.observability import EdrWriter, EventRecorder, Metrics, RepeatLimiter, mask_msisdn


def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("extrabalance.diameter.aio.node", level, __file__, 1, msg, (), None)


def test_repeat_limiter_bounds_lines_per_kind_and_counts_the_rest():
    now = [100.0]
    limiter = RepeatLimiter(per_s=3, clock=lambda: now[0])
    passed = [limiter.filter(record("rejected %s")) for _ in range(10)]
    assert passed.count(True) == 3
    assert limiter.filter(record("other kind"))  # another kind has its own budget
    assert limiter.filter(record("boom", logging.ERROR))  # errors always pass
    now[0] = 101.0
    first = record("rejected %s")
    assert limiter.filter(first)
    assert "and 7 more like it" in first.msg


def test_mask_msisdn():
    assert mask_msisdn("201001234567") == "2010*****567"
    assert mask_msisdn("12345") == "*****"


def test_event_recorder_writes_edr_columns_and_metrics(tmp_path):
    edr = EdrWriter(tmp_path, "n1", clock=lambda: 0.0)
    rec = EventRecorder(Metrics(), edr)
    rec.emit("payback", msisdn="201001234567", recovered_minor=550, debt_after_minor=0)
    rec.emit("ad_suppressed", msisdn="201001234567", reason="cap_day")
    rec.emit("loan_pending", msisdn="201001234567", loan_id="L1")
    edr.flush()
    lines = (tmp_path / "edr-19700101.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert rows[0]["kind"] == "payback" and rows[0]["debt_after_minor"] == "0"
    assert rows[1]["reason"] == "cap_day"
    assert rows[2]["kind"] == "loan_pending" and rows[2]["loan_id"] == "L1"
    assert rec.metrics.paybacks.labels("full")._value.get() == 1


def test_every_event_the_services_emit_is_an_edr_kind_with_edr_columns():
    """The services name kinds and fields as the EDR does: read every emit() call."""
    import ast
    from pathlib import Path

    import extrabalance
    from extrabalance.observability import EDR_FIELDS, EDR_KINDS

    # Fields for the debug log only: who did it (the audit table has it), whether the
    # resolver settled it, the IN's result code, the decision an advance's refusal was
    # (its reason column says why), what debt_after_minor already says.
    log_only = {"who", "resolved", "result_code", "decision", "full", "requested_minor"}
    root = Path(extrabalance.__file__).parent
    seen = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "emit" and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                kind = node.args[0].value
                seen.add(kind)
                assert kind in EDR_KINDS, f"{path.name}: emit({kind!r}) is not an EDR kind"
                for keyword in node.keywords:
                    if keyword.arg is not None:
                        assert keyword.arg in EDR_FIELDS or keyword.arg in log_only, (
                            f"{path.name}: emit({kind!r}, {keyword.arg}=...) names no EDR column")
    assert {"loan", "payback", "loan_pending", "payback_pending", "refusal"} <= seen


def test_edr_lines_go_to_the_file_of_their_utc_day(tmp_path):
    now = [86_400.0 - 0.5]  # half a second before midnight UTC, 1970-01-02
    edr = EdrWriter(tmp_path, "n1", clock=lambda: now[0])
    edr.write("loan", {"msisdn": "201001234567", "loan_id": "L1"})
    now[0] += 1.0
    edr.write("loan", {"msisdn": "201001234567", "loan_id": "L2, with a comma"})
    edr.flush()
    edr.write("loan", {"msisdn": "201001234567", "loan_id": "L3"})
    edr.flush()
    edr.flush()  # nothing buffered: nothing written
    first = (tmp_path / "edr-19700101.csv").read_text().splitlines()
    second = (tmp_path / "edr-19700102.csv").read_text().splitlines()
    assert first[0] == second[0] and first[0].startswith("time,")
    assert len(first) == 2 and "L1" in first[1] and first[1].startswith("1970-01-01T23:59:59.500Z")
    assert len(second) == 3 and '"L2, with a comma"' in second[1] and "L3" in second[2]


def test_log_level_is_accepted_in_any_case_and_a_wrong_one_is_named():
    import io
    import logging

    import pytest

    from extrabalance.observability import configure_logging

    try:
        for level in ("info", "Warning", " DEBUG "):
            configure_logging(level=level, stream=io.StringIO())
        assert logging.getLogger().level == logging.DEBUG
        with pytest.raises(ValueError, match="'loud'"):
            configure_logging(level="loud", stream=io.StringIO())
    finally:
        configure_logging(level="WARNING")


def test_log_lines_are_stamped_by_the_nodes_clock_not_the_machines():
    import io
    import json
    import logging
    from datetime import UTC, datetime

    import structlog

    from extrabalance.clock import FixedClock
    from extrabalance.observability import configure_logging

    out = io.StringIO()
    clock = FixedClock(datetime(2031, 2, 3, 23, 59, 58, 250000, tzinfo=UTC))
    try:
        configure_logging(level="INFO", stream=out, clock=clock)
        structlog.get_logger("t").info("first")
        clock.advance(2)
        logging.getLogger("stdlib").warning("second")
    finally:
        configure_logging(level="WARNING")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["event"], line["timestamp"]) for line in lines] == [
        ("first", "2031-02-03T23:59:58.250000Z"),
        ("second", "2031-02-04T00:00:00.250000Z"),
    ]
