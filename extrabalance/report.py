"""`extrabalance report --date YYYY-MM-DD`: the daily business report.

Built from the EDR files (`edr-YYYYMMDD.csv`, schema `observability.EDR_FIELDS`), and,
when the ledger file is at hand, from the ledger for what EDRs cannot say (time to
payback, ageing of what is still owed, segment). Output: `report.md` plus PNG plots
(matplotlib, Agg backend: no display needed) in the output directory, and the same
figures as `figures.json` for machines.

Figures and where they come from:
- loans by tier, channel and segment, principal and fees: EDR `loan` and `advance`
  lines of the day; segment from the ledger's profile matched against the config's
  segment rules *as they are now* (EDRs do not carry the segment yet);
- paybacks and amount recovered: EDR `payback` lines;
- cohort recovery rate and time to payback: the ledger, for the loans of the day;
- ageing: the ledger's open loans now, by age;
- refusals by reason, ads sent and suppressed: EDR lines; an ad "led to a loan" when
  the same subscriber borrowed within 24 h after it (the next day's file is read too).

Money stays integer minor units until it is formatted for the page.
"""

from __future__ import annotations

import csv
import json
import statistics
from bisect import bisect_right
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.observability import EDR_FIELDS
from extrabalance.private_files import narrow, open_private, private_dir

if TYPE_CHECKING:
    import sqlite3

AD_CONVERSION_WINDOW = timedelta(hours=24)
AGEING_BUCKETS_DAYS = ((0, 7), (8, 30), (31, 90), (91, 180), (181, None))
EDR_ROWS_MAX = 50_000_000  # a day beyond this is not a report, it is an incident
LOAN_KINDS = ("loan", "advance")


class ReportError(Exception):
    """The report cannot be built (no EDR file, bad date)."""


@dataclass
class LoanFigures:
    count: int = 0
    principal_minor: int = 0
    fee_minor: int = 0

    def add(self, principal: int, fee: int) -> None:
        self.count += 1
        self.principal_minor += principal
        self.fee_minor += fee


@dataclass
class ReportFigures:
    day: str
    edr_files: list[str]
    edr_lines: int
    currency: str
    currency_exponent: int
    loans: LoanFigures = field(default_factory=LoanFigures)
    loans_by_tier: dict[str, LoanFigures] = field(default_factory=dict)
    loans_by_channel: dict[str, LoanFigures] = field(default_factory=dict)
    loans_by_segment: dict[str, LoanFigures] = field(default_factory=dict)
    loans_by_hour: dict[str, dict[int, int]] = field(default_factory=dict)  # channel → hour
    paybacks: int = 0
    paybacks_full: int | None = None  # None: the EDRs do not say (debt_after_minor empty)
    recovered_minor: int = 0
    recovered_to_lent_ratio: float | None = None
    refusals_by_reason: dict[str, int] = field(default_factory=dict)
    ads_sent: int = 0
    ads_suppressed: int = 0
    ads_suppressed_by_reason: dict[str, int] = field(default_factory=dict)
    ads_followed_by_loan_24h: int = 0
    bars: int = 0
    unbars: int = 0
    write_offs: int = 0
    written_off_minor: int = 0
    adjustments: int = 0
    adjusted_minor: int = 0
    # From the ledger (None when the report ran without it):
    cohort_due_minor: int | None = None
    cohort_repaid_minor: int | None = None  # recovered from the subscribers' airtime
    cohort_waived_minor: int | None = None  # forgiven by an operator (adjustments)
    cohort_recovery_rate: float | None = None
    cohort_repaid_loans: int | None = None
    payback_seconds: list[float] | None = None
    payback_median_s: float | None = None
    payback_p90_s: float | None = None
    ageing: list[dict[str, Any]] | None = None
    ageing_as_of: str | None = None
    plots: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: str) -> int:
    return int(value) if value not in ("", None) else 0


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def read_edrs(path: Path) -> list[dict[str, str]]:
    """Rows of one EDR file as dicts, keyed by every `EDR_FIELDS` name.

    Columns are only ever added at the end of the schema, so a file written by an
    earlier release has a header that is a prefix of it: its missing cells read as
    empty. A day upgraded mid-way keeps its first header while later lines carry the
    new columns; cells are therefore matched to `EDR_FIELDS` by position."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader, ()))
        if not header or header != EDR_FIELDS[: len(header)]:
            raise ReportError(f"{path}: header is not the EDR schema {','.join(EDR_FIELDS)}")
        rows = []
        for cells in reader:
            if not cells:  # a blank line, skipped as csv.DictReader does
                continue
            if len(cells) > len(EDR_FIELDS):
                raise ReportError(f"{path}: line {reader.line_num} has more cells than the schema")
            padded = [*cells, *[""] * (len(EDR_FIELDS) - len(cells))]
            rows.append(dict(zip(EDR_FIELDS, padded, strict=True)))
            if len(rows) > EDR_ROWS_MAX:
                raise ReportError(f"{path}: more than {EDR_ROWS_MAX} lines")
        return rows


def edr_path(edr_dir: Path, day: date) -> Path:
    return edr_dir / f"edr-{day.strftime('%Y%m%d')}.csv"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def _segments_by_msisdn(conn: sqlite3.Connection, msisdns: set[str],
                        settings: Any) -> dict[str, str]:
    from extrabalance.core.segments import match_segment
    from extrabalance.ledger.read_models import profiles_of

    segments = settings.policy().segments
    found = profiles_of(conn, msisdns)
    out: dict[str, str] = {}
    for m in msisdns:
        profile = found.get(m)
        if profile is None:
            out[m] = "(no profile)"
            continue
        seg = match_segment(profile, segments)
        out[m] = seg.name if seg else "(no segment)"
    return out


def build_figures(day: date, edr_dir: Path, *, ledger_path: Path | None = None,
                  settings: Any = None, now: datetime | None = None) -> ReportFigures:
    """Every figure of the report for one UTC day (pure reading, no output)."""
    path = edr_path(edr_dir, day)
    if not path.exists():
        raise ReportError(f"no EDR file for {day.isoformat()}: {path}")
    rows = read_edrs(path)
    files = [str(path)]
    next_path = edr_path(edr_dir, day + timedelta(days=1))
    next_rows = read_edrs(next_path) if next_path.exists() else []
    if next_rows:
        files.append(str(next_path))
    currency = settings.node.currency if settings else "EGP"
    exponent = settings.node.currency_exponent if settings else 2
    f = ReportFigures(day.isoformat(), files, len(rows), currency, exponent)

    loan_times: dict[str, list[datetime]] = defaultdict(list)
    loan_msisdns: list[tuple[str, int, int]] = []
    refusals: Counter[str] = Counter()
    suppressed: Counter[str] = Counter()
    ads: list[tuple[str, datetime]] = []
    full_known = True
    full = 0
    by_hour: dict[str, Counter[int]] = defaultdict(Counter)
    for row in rows + next_rows:
        kind, when = row["kind"], _time(row["time"])
        if kind in LOAN_KINDS:
            loan_times[row["msisdn"]].append(when)
        if when.date() != day:
            continue  # the next day's file only serves the 24 h ad window
        if kind in LOAN_KINDS:
            principal, fee = _int(row["amount_minor"]), _int(row["fee_minor"])
            channel = row["channel"] or ("auto" if kind == "advance" else "?")
            f.loans.add(principal, fee)
            f.loans_by_tier.setdefault(row["tier_id"] or "?", LoanFigures()).add(principal, fee)
            f.loans_by_channel.setdefault(channel, LoanFigures()).add(principal, fee)
            loan_msisdns.append((row["msisdn"], principal, fee))
            by_hour[channel][when.hour] += 1
        elif kind == "payback":
            f.paybacks += 1
            f.recovered_minor += _int(row["recovered_minor"])
            if row["debt_after_minor"] == "":
                full_known = False
            elif _int(row["debt_after_minor"]) == 0:
                full += 1
        elif kind == "refusal":
            refusals[row["reason"] or "?"] += 1
        elif kind == "ad_sent":
            f.ads_sent += 1
            ads.append((row["msisdn"], when))
        elif kind == "ad_suppressed":
            f.ads_suppressed += 1
            suppressed[row["reason"] or row["detail"] or "(not given)"] += 1
        elif kind == "bar":
            f.bars += 1
        elif kind == "unbar":
            f.unbars += 1
        elif kind == "write_off":
            f.write_offs += 1
            f.written_off_minor += _int(row["amount_minor"])
        elif kind == "adjustment":
            f.adjustments += 1
            f.adjusted_minor += _int(row["amount_minor"])
    f.paybacks_full = full if full_known else None
    f.refusals_by_reason = dict(sorted(refusals.items()))
    f.ads_suppressed_by_reason = dict(sorted(suppressed.items()))
    f.loans_by_tier = dict(sorted(f.loans_by_tier.items(), key=lambda kv: (len(kv[0]), kv[0])))
    f.loans_by_hour = {ch: dict(sorted(c.items())) for ch, c in sorted(by_hour.items())}
    lent = f.loans.principal_minor + f.loans.fee_minor
    f.recovered_to_lent_ratio = round(f.recovered_minor / lent, 4) if lent else None
    for msisdn, sent_at in ads:
        times = sorted(loan_times.get(msisdn, []))
        i = bisect_right(times, sent_at)
        if i < len(times) and times[i] - sent_at <= AD_CONVERSION_WINDOW:
            f.ads_followed_by_loan_24h += 1

    if ledger_path is not None and ledger_path.exists():
        _ledger_figures(f, day, ledger_path, settings, loan_msisdns, now or SYSTEM_CLOCK.now())
    return f


def _ledger_figures(f: ReportFigures, day: date, ledger_path: Path, settings: Any,
                    loan_msisdns: list[tuple[str, int, int]], now: datetime) -> None:
    from extrabalance.ledger import read_models

    conn = read_models.open_read_only(ledger_path)
    try:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        end = start + timedelta(days=1)
        cohort = read_models.cohort_loans(conn, start, end)
        f.cohort_due_minor = sum(r.principal_minor + r.fee_minor for r in cohort)
        # A waiver (admin adjustment) is booked like a repayment on the loan: what was
        # recovered is what the loan shows repaid less what was waived on it.
        f.cohort_waived_minor = read_models.waived_minor(conn, {r.loan_id for r in cohort})
        f.cohort_repaid_minor = (sum(r.principal_repaid_minor + r.fee_repaid_minor
                                     for r in cohort) - f.cohort_waived_minor)
        f.cohort_recovery_rate = (round(f.cohort_repaid_minor / f.cohort_due_minor, 4)
                                  if f.cohort_due_minor else None)
        seconds = [(_time(r.updated_at) - _time(r.created_at)).total_seconds()
                   for r in cohort if r.state == "REPAID"]
        f.cohort_repaid_loans = len(seconds)
        f.payback_seconds = sorted(round(s, 3) for s in seconds)
        if seconds:
            f.payback_median_s = round(statistics.median(seconds), 3)
            f.payback_p90_s = round(_percentile(seconds, 0.9), 3)
        ageing = []
        open_rows = read_models.open_loan_ages(conn)
        for low, high in AGEING_BUCKETS_DAYS:
            in_bucket = [owed for created, owed in open_rows
                         if low <= (now - _time(created)).days
                         and (high is None or (now - _time(created)).days <= high)]
            ageing.append({"days": f"{low}-{high}" if high is not None else f"{low}+",
                           "loans": len(in_bucket), "owed_minor": sum(in_bucket)})
        f.ageing = ageing
        f.ageing_as_of = now.isoformat(timespec="seconds")
        if settings is not None:
            segs = _segments_by_msisdn(conn, {m for m, _, _ in loan_msisdns}, settings)
            by_segment: dict[str, LoanFigures] = {}
            for m, principal, fee in loan_msisdns:
                by_segment.setdefault(segs[m], LoanFigures()).add(principal, fee)
            f.loans_by_segment = dict(sorted(by_segment.items()))
    finally:
        conn.close()


# -- output ------------------------------------------------------------------------------


def _plots(f: ReportFigures, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    made = []

    def counts(axis: Any) -> None:
        axis.set_major_locator(MaxNLocator(integer=True))  # no "0.5 refusals"

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        made.append(name)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = [0] * 24
    for channel, hours in f.loans_by_hour.items():
        values = [hours.get(h, 0) for h in range(24)]
        ax.bar(range(24), values, bottom=bottom, label=channel)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(title=f"Loans per hour (UTC), {f.day}", xlabel="hour", ylabel="loans")
    counts(ax.yaxis)
    if f.loans_by_hour:
        ax.legend()
    save(fig, "loans_by_hour.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    reasons = list(f.refusals_by_reason)
    ax.barh(reasons or ["(none)"], [f.refusals_by_reason[r] for r in reasons] or [0])
    ax.set(title="Refusals by reason", xlabel="refusals")
    counts(ax.xaxis)
    save(fig, "refusals.png")

    if f.ageing is not None:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        scale = 10 ** f.currency_exponent
        ax.bar([b["days"] for b in f.ageing], [b["owed_minor"] / scale for b in f.ageing])
        ax.set(title=f"Debt outstanding by loan age (as of {f.ageing_as_of})",
               xlabel="days", ylabel=f.currency)
        save(fig, "ageing.png")

    if f.payback_seconds:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        longest_s = max(f.payback_seconds)
        unit, unit_s = (("seconds", 1) if longest_s < 120 else ("minutes", 60)
                        if longest_s < 7200 else ("hours", 3600))
        # Edged bars: neighbouring bins stay apart instead of merging into one block.
        ax.hist([s / unit_s for s in f.payback_seconds],
                bins=min(24, max(1, len(f.payback_seconds))), edgecolor="black", linewidth=0.8)
        ax.set(title="Time to full payback, loans of the day", xlabel=unit, ylabel="loans")
        counts(ax.yaxis)
        save(fig, "time_to_payback.png")
    return made


def _money(minor: int, f: ReportFigures) -> str:
    from extrabalance.service.templates import format_minor

    return f"{format_minor(minor, f.currency_exponent)} {f.currency}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_markdown(f: ReportFigures) -> str:
    def m(minor: int) -> str:
        return _money(minor, f)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x * 100:.1f} %"

    out = [f"# Extra Balance daily report, {f.day} (UTC)", "",
           f"From {f.edr_lines} EDR lines ({', '.join(Path(p).name for p in f.edr_files)})"
           + ("" if f.ageing is None else " and the ledger") + ".", "",
           "## Loans", "",
           (f"{f.loans.count} loans, {m(f.loans.principal_minor)} lent, "
           f"{m(f.loans.fee_minor)} in fees."), ""]

    def table(title: str, data: dict[str, LoanFigures]) -> None:
        out.extend([f"| {title} | loans | principal | fees |", "|---|---:|---:|---:|"])
        for key, lf in data.items():
            out.append(f"| {key} | {lf.count} | {m(lf.principal_minor)} | {m(lf.fee_minor)} |")
        out.append("")

    table("tier", f.loans_by_tier)
    table("channel", f.loans_by_channel)
    if f.loans_by_segment:
        out.append("Segment as the subscriber's profile matches the configured rules now "
                   "(the EDRs do not record it):")
        out.append("")
        table("segment", f.loans_by_segment)
    out += ["## Paybacks", "",
            f"{f.paybacks} paybacks"
            + (f" ({f.paybacks_full} full)" if f.paybacks_full is not None else "")
            + f", {m(f.recovered_minor)} recovered; recovered / lent the same day: "
              f"{pct(f.recovered_to_lent_ratio)}.", ""]
    if f.cohort_due_minor is not None:
        out += [(f"Loans of the day: {m(f.cohort_due_minor)} due (principal and fees), "
                f"{m(f.cohort_repaid_minor or 0)} recovered and "
                f"{m(f.cohort_waived_minor or 0)} waived so far: cohort recovery rate "
                f"{pct(f.cohort_recovery_rate)}. {f.cohort_repaid_loans} fully repaid; "
                f"time to full payback median {_duration(f.payback_median_s)}, "
                f"90th percentile {_duration(f.payback_p90_s)}."), ""]
    if f.ageing is not None:
        out += [f"## Ageing (open loans as of {f.ageing_as_of})", "",
                "| age (days) | loans | owed |", "|---|---:|---:|"]
        out += [f"| {b['days']} | {b['loans']} | {m(b['owed_minor'])} |" for b in f.ageing]
        out.append("")
    out += ["## Refusals", "", "| reason | count |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in f.refusals_by_reason.items()] or ["| (none) | 0 |"]
    out += ["", "## Advertisements", "",
            (f"{f.ads_sent} sent, {f.ads_suppressed} suppressed; "
            f"{f.ads_followed_by_loan_24h} of the ads sent were followed by a loan from the "
            f"same subscriber within 24 h."), ""]
    if f.ads_suppressed_by_reason:
        out += ["| suppressed because | count |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in f.ads_suppressed_by_reason.items()]
        out.append("")
    out += ["## Account actions", "",
            (f"{f.bars} bars, {f.unbars} unbars, {f.write_offs} write-offs "
            f"({m(f.written_off_minor)}), {f.adjustments} manual adjustments "
            f"({m(f.adjusted_minor)})."), ""]
    if f.plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in f.plots] + [""]
    return "\n".join(out)


def write_report(f: ReportFigures, out_dir: Path, *, plots: bool = True) -> Path:
    private_dir(out_dir)
    if plots:
        f.plots = _plots(f, out_dir)
        for name in f.plots:
            narrow(out_dir / name)
    with open_private(out_dir / "figures.json", "w", encoding="utf-8") as fh:
        fh.write(json.dumps(f.as_dict(), indent=2, sort_keys=True))
    path = out_dir / "report.md"
    with open_private(path, "w", encoding="utf-8") as fh:
        fh.write(render_markdown(f))
    return path


def report_command(config_path: str | None, day_text: str, edr_dir: str | None = None,
                   out_dir: str | None = None, *, use_ledger: bool = True) -> int:
    """`extrabalance report`: 0 written, 1 no EDRs for that day, 2 bad date."""
    import sys

    from extrabalance.config import load_settings

    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        print(f"report: --date must be YYYY-MM-DD, got {day_text!r}", file=sys.stderr)
        return 2
    settings = load_settings(config_path)
    db_path = Path(settings.storage.path)
    edrs = Path(edr_dir) if edr_dir else settings.storage.edr_directory()
    if use_ledger and settings.storage.backend != "sqlite":
        print('report: the ledger figures are read from the SQLite file; this config has '
              'storage.backend = "postgresql": run with --no-ledger for the EDR figures',
              file=sys.stderr)
        return 2
    out = Path(out_dir) if out_dir else Path(f"report-{day.isoformat()}")
    try:
        figures = build_figures(day, edrs, ledger_path=db_path if use_ledger else None,
                                settings=settings)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    path = write_report(figures, out)
    print(f"report for {day.isoformat()} written to {path}")
    return 0
