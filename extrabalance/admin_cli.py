"""Operator commands that work on the ledger file directly (no running node needed):
`extrabalance import-profiles`,
`extrabalance subscriber show|bar|unbar|auto-advance-on|auto-advance-off`,
`extrabalance purge-idempotency`, and `python -m extrabalance.admin_cli backup`
(SQLite online backup).

They may run beside a live node: SQLite (WAL) lets them read while the node writes,
and their few writes wait behind the node's writer (busy timeout), never around it.
`subscriber` and `reconcile-in` go through the services on the unit-of-work port, on
the configured ledger (SQLite or PostgreSQL): a bar or unbar from here takes the
subscriber's lock (on PostgreSQL his row lock, which orders it with every node's
work), is audited and writes its EDR line (`bar` / `unbar`, in the node's EDR
directory) like one from the admin API, but sends no SMS (the node owns the SMPP
binds); use the admin API when the subscriber should be told.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any, TextIO

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.config import Settings, load_settings
from extrabalance.private_files import private_dir, private_file

MSISDN_RE = re.compile(r"^[0-9]{1,15}$")
BAD_ROWS_PRINTED_MAX = 100  # bad rows listed on the terminal; the rest are counted
JOURNAL_LINES_PRINTED_MAX = 20
AUDIT_LINES_PRINTED_MAX = 10
BACKUP_PAGES_PER_STEP = 1024  # pages copied per step; the node writes between steps
EXIT_OK, EXIT_BAD_ROWS, EXIT_USAGE = 0, 1, 2
SUBSCRIBER_CHANGES = ("bar", "unbar", "auto-advance-on", "auto-advance-off")  # audited


def _ledger_path(settings: Settings) -> Path:
    return Path(settings.storage.path)


# -- import-profiles -----------------------------------------------------------------


def import_profiles_command(config_path: str | None, csv_path: str, progress: bool = True,
                            *, out: TextIO | None = None) -> int:
    """Import a profile CSV into the configured ledger: 0 if every row was good, 1 if
    some rows were refused, 2 if the file as a whole was (unreadable, bad header)."""
    from extrabalance.ledger.profiles import (
        ProfileFileError,
        import_profiles,
        import_profiles_postgresql,
    )

    out = out or sys.stdout
    settings = load_settings(config_path)
    options: dict[str, Any] = {"progress": progress, "languages": settings.templates.keys(),
                               "bulk_opt_in": settings.protection.policy().bulk_opt_in}
    try:
        if settings.storage.backend == "postgresql":
            report = _import_postgresql(settings, csv_path, import_profiles_postgresql, options)
            if report is None:
                return EXIT_USAGE
        else:
            db_path = _ledger_path(settings)
            private_dir(db_path.parent)
            report = import_profiles(db_path, csv_path, **options)
    except ProfileFileError as exc:
        print(f"import-profiles: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"import-profiles: {csv_path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{csv_path}: rows ok {report.rows_ok:,} (of which updated {report.rows_updated:,}), "
          f"bad rows {report.bad_rows_total:,}", file=out)
    for line_no, reason in report.bad_rows[:BAD_ROWS_PRINTED_MAX]:
        print(f"  line {line_no}: {reason}", file=out)
    hidden = report.bad_rows_total - min(len(report.bad_rows), BAD_ROWS_PRINTED_MAX)
    if hidden > 0:
        print(f"  ... and {hidden:,} more bad rows", file=out)
    return EXIT_OK if report.bad_rows_total == 0 else EXIT_BAD_ROWS


def _import_postgresql(settings: Settings, csv_path: str, into: Any,
                       options: dict[str, Any]) -> Any:
    """The import into the configured PostgreSQL ledger; None (after saying why) when
    the server cannot be reached or refuses the work."""
    from extrabalance.config import ConfigError
    from extrabalance.ledger.factory import ledger_errors

    try:
        return into(settings.storage.postgresql_conninfo(), csv_path, **options)
    except ConfigError as exc:
        print(f"import-profiles: {exc}", file=sys.stderr)
    except ledger_errors() as exc:
        print(f"import-profiles: PostgreSQL at {settings.storage.postgresql_url_shown()}: {exc}",
              file=sys.stderr)
    return None


# -- subscriber show | bar | unbar -------------------------------------------------------


# What to use instead when the ledger is on PostgreSQL (these commands open the SQLite
# file; the node and the commands on the unit-of-work port run on either ledger).
ON_POSTGRESQL = {
    "backup": "back the server up with PostgreSQL's own tools (pg_dump, pg_basebackup)",
}


def refused_on_postgresql(settings: Settings, command: str) -> bool:
    """True (after saying why on stderr) when `command` works on the SQLite file and
    the configured ledger is on PostgreSQL."""
    from extrabalance.ledger.factory import sqlite_only

    why = sqlite_only(settings.storage, command, ON_POSTGRESQL[command])
    if why:
        print(why, file=sys.stderr)
    return why is not None


def _ledger_missing(settings: Settings, command: str) -> bool:
    """True (after saying so) when the configured SQLite file does not exist: these
    commands never create a ledger."""
    if settings.storage.backend != "sqlite" or _ledger_path(settings).exists():
        return False
    print(f"{command}: no ledger at {_ledger_path(settings)} (storage.path in the config)",
          file=sys.stderr)
    return True


class _NoSms:
    """The commands' notifier: they have no SMSC (the running node has the binds)."""

    async def notify(self, notice: Any) -> None:
        raise RuntimeError("the operator commands send no SMS; use the admin API")


async def _with_accounts(settings: Settings, fn: Any) -> Any:
    """Run `await fn(ledger, accounts)` on the configured ledger, with the account
    service whose events go to the node's EDR directory; closes both after."""
    from extrabalance.ledger.factory import open_ledger
    from extrabalance.observability import EdrWriter, EventRecorder, Metrics
    from extrabalance.service.accounts import AccountService
    from extrabalance.service.locks import SubscriberLocks

    ledger = open_ledger(settings.storage)
    edr = EdrWriter(settings.storage.edr_directory(), settings.node.name)
    # The command's own locks: it is the only service of its process.
    accounts = AccountService(ledger, _NoSms(), EventRecorder(Metrics(), edr),
                              settings.policy(), SYSTEM_CLOCK.now, locks=SubscriberLocks())
    try:
        return await fn(ledger, accounts)
    finally:
        edr.flush()
        await ledger.close()


def _open_existing(db_path: Path) -> sqlite3.Connection:
    from extrabalance.ledger.db import connect

    if not db_path.exists():
        raise FileNotFoundError(f"no ledger at {db_path} (storage.path in the config)")
    return connect(db_path)


def _money(minor: int | None, settings: Settings) -> str:
    from extrabalance.service.templates import format_minor

    return f"{format_minor(int(minor or 0), settings.node.currency_exponent)} {settings.node.currency}"


def subscriber_view_with_route(view: dict[str, Any], settings: Settings,
                               msisdn: str) -> dict[str, Any]:
    """The ledger's view of `msisdn` (`ledger/views.py`) with his route and segment."""
    from extrabalance.core.model import SubscriberProfile
    from extrabalance.core.segments import match_segment
    from extrabalance.service.routing import Router, RouteRule

    router = Router([RouteRule(n.origin_host, prefix=r.prefix, start=r.start, end=r.end)
                     for n in settings.in_nodes for r in n.ranges])
    learned = view["route"]["learned_in_node"]
    static = router.static_route(msisdn)
    view["route"] = {"learned_in_node": learned, "static_in_node": static,
                     "in_node": learned or static}
    sub = view["subscriber"]
    segment = None
    if sub and sub.get("tenure_days") is not None:
        profile = SubscriberProfile(msisdn, sub["tenure_days"], sub.get("arpu_minor") or 0,
                                    sub.get("attributes") or {})
        seg = match_segment(profile, settings.policy().segments)
        segment = seg.name if seg else None
    view["segment"] = segment
    return view


def _print_view(view: dict[str, Any], settings: Settings, out: TextIO) -> None:
    sub = view["subscriber"] or {}

    def m(minor: int | None) -> str:
        return _money(minor, settings)

    print(f"subscriber {view['msisdn']}" + ("" if view["known"] else " (not in the ledger)"),
          file=out)
    barred = "yes, " + (sub.get("barred_reason") or "") if sub.get("barred_manual") else "no"
    rows = [
        ("profile", f"tenure {sub.get('tenure_days')} days, ARPU {m(sub.get('arpu_minor'))}"
         if sub.get("tenure_days") is not None else "none imported"),
        ("segment", view.get("segment") or "-"),
        ("debt", m(view["debt_minor"])),
        ("operation pending", "yes" if view["operation_pending"] else "no"),
        ("barred (manual)", barred),
        ("loans since full payback", str(sub.get("loans_since_full_payback", 0))),
        ("auto-advance opt-in", "yes" if sub.get("auto_advance_opt_in") else "no"),
        ("ads opt-out", "yes" if sub.get("ads_opt_out") else "no"),
        ("route", (f"{view['route']['in_node'] or '-'} (learned: "
                  f"{view['route']['learned_in_node'] or '-'}, static: "
                  f"{view['route']['static_in_node'] or '-'})")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    print(f"loans ({len(view['loans'])}):", file=out)
    for loan in view["loans"]:
        owed = (loan["principal_minor"] - loan["principal_repaid_minor"]
                + loan["fee_minor"] - loan["fee_repaid_minor"])
        print(f"  {loan['created_at'][:19]}  {loan['state']:<16} tier {loan['tier_id']:>2}  "
              f"{m(loan['principal_minor'])} + fee {m(loan['fee_minor'])}, owed {m(owed)}  "
              f"[{loan['channel']}] {loan['loan_id']}", file=out)
    print(f"recoveries ({len(view['recoveries'])}):", file=out)
    for rec in view["recoveries"]:
        print(f"  {rec['created_at'][:19]}  {rec['state']:<10} recharge "
              f"{m(rec['recharge_minor'])}, recovered {m(rec['recovered_minor'])}  "
              f"event {rec['event_id']}", file=out)
    journal = view["journal"]
    print(f"journal (latest {min(len(journal), JOURNAL_LINES_PRINTED_MAX)} of {len(journal)} "
          "lines):", file=out)
    for line in journal[:JOURNAL_LINES_PRINTED_MAX]:
        print(f"  {line['created_at'][:19]}  {line['memo']:<14} {line['account']:<22} "
              f"{line['amount_minor']:>10}", file=out)
    print("audit:", file=out)
    for a in view["audit"][:AUDIT_LINES_PRINTED_MAX]:
        print(f"  {a['created_at'][:19]}  {a['action']:<8} by {a['who']}: {a['why']}", file=out)


def subscriber_command(config_path: str | None, action: str, msisdn: str, reason: str = "",
                       who: str = "cli", json_output: bool = False, *,
                       out: TextIO | None = None) -> int:
    """`extrabalance subscriber show|bar|unbar|auto-advance-on|auto-advance-off MSISDN`:
    0 done, 1 not found, 2 usage. The changes go through `AccountService` (lock, audit,
    EDR), on the configured ledger."""
    import asyncio

    out = out or sys.stdout
    if not MSISDN_RE.match(msisdn):
        print(f"subscriber: {msisdn!r} is not an MSISDN (1 to 15 digits)", file=sys.stderr)
        return EXIT_USAGE
    if action not in ("show", *SUBSCRIBER_CHANGES):
        print(f"subscriber: unknown action {action!r}", file=sys.stderr)
        return EXIT_USAGE
    if action in SUBSCRIBER_CHANGES and (not reason.strip() or not who.strip()):
        print(f"subscriber {action}: --reason and --who are required (audit trail)",
              file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(config_path)
    if _ledger_missing(settings, "subscriber"):
        return EXIT_BAD_ROWS
    why, by = reason.strip(), who.strip()

    async def change(ledger: Any, accounts: Any) -> tuple[dict[str, Any], bool]:
        changed = True
        if action == "bar":
            await accounts.bar(msisdn, why, by, notify=False)
        elif action == "unbar":
            await accounts.unbar(msisdn, by, why)
        elif action in ("auto-advance-on", "auto-advance-off"):
            changed = await accounts.set_auto_advance(
                msisdn, action == "auto-advance-on", by, why)
        return await ledger.subscriber_view(msisdn), changed

    shown, changed = asyncio.run(_with_accounts(settings, change))
    view = subscriber_view_with_route(shown, settings, msisdn)
    if action == "show" and not view["known"] and not view["loans"]:
        if json_output:
            print(json.dumps(view, indent=2, sort_keys=True, default=str), file=out)
        else:
            print(f"subscriber {msisdn}: not in the ledger", file=out)
        return EXIT_BAD_ROWS
    if json_output:
        print(json.dumps(view, indent=2, sort_keys=True, default=str), file=out)
    else:
        if action in ("bar", "unbar"):
            print(f"{msisdn}: {'barred' if action == 'bar' else 'unbarred'} by {who.strip()} "
                  f"({reason.strip()})", file=out)
        elif action != "show":
            state = "on" if action == "auto-advance-on" else "off"
            print(f"{msisdn}: automatic advances {state}, by {who.strip()} ({reason.strip()})"
                  if changed else f"{msisdn}: automatic advances already {state} (nothing "
                  "written)", file=out)
        _print_view(view, settings, out)
    return EXIT_OK


# -- purge-idempotency -------------------------------------------------------------------


def purge_idempotency_command(config_path: str | None, *, out: TextIO | None = None) -> int:
    """Delete idempotency keys older than `storage.idempotency_retention_hours`.

    The running node does this every hour; the command is for a first purge after an
    upgrade or an operator who wants the space now. Safe beside a live node: it
    deletes in small batches, each its own short transaction.
    """
    import asyncio
    from datetime import timedelta

    from extrabalance.ledger.factory import open_ledger
    from extrabalance.observability import configure_logging
    from extrabalance.service.retention import IdempotencyRetention

    out = out or sys.stdout
    settings = load_settings(config_path)
    if settings.storage.backend == "sqlite":
        db_path = _ledger_path(settings)
        if not db_path.exists():
            print(f"purge-idempotency: no ledger at {db_path} (storage.path in the config)",
                  file=sys.stderr)
            return EXIT_BAD_ROWS
        where = str(db_path)
    else:
        where = settings.storage.postgresql_url_shown()
    hours = settings.storage.idempotency_retention_hours
    # The service logs its own `idempotency_purged` line (for the running node); here
    # the summary below says it once, and warnings still reach stderr.
    configure_logging(mask_msisdn_in_logs=settings.node.mask_msisdn_in_logs, level="WARNING")

    async def purge() -> Any:
        ledger = open_ledger(settings.storage)
        try:
            retention = IdempotencyRetention(ledger, timedelta(hours=hours),
                                             lambda: SYSTEM_CLOCK.now())
            return await retention.purge()
        finally:
            await ledger.close()

    report = asyncio.run(purge())
    print(f"{where}: {report.rows_purged:,} idempotency keys older than {hours} hours "
          f"(before {report.cutoff.isoformat(timespec='seconds')}) purged in "
          f"{report.batches:,} batches, {report.seconds:.1f} s "
          f"({report.rows_per_s:,.0f} rows/s)", file=out)
    return EXIT_OK


# -- backup ----------------------------------------------------------------------------


def backup_command(config_path: str | None, dest: str, *, out: TextIO | None = None) -> int:
    """Copy the live ledger to `dest` with SQLite's online backup API, then check it.

    Safe while the node runs: the copy is a consistent snapshot of committed data.
    Written to `dest.partial` and renamed only after `PRAGMA integrity_check` passes.
    """
    out = out or sys.stdout
    settings = load_settings(config_path)
    if refused_on_postgresql(settings, "backup"):
        return EXIT_USAGE
    src_path = _ledger_path(settings)
    target = Path(dest)
    if target.is_dir():
        stamp = SYSTEM_CLOCK.now().strftime("%Y%m%dT%H%M%SZ")
        target = target / f"extrabalance-{stamp}.db"
    if target.exists():
        print(f"backup: {target} exists; not overwriting", file=sys.stderr)
        return EXIT_USAGE
    if not target.parent.is_dir():
        print(f"backup: directory {str(target.parent)!r} does not exist; create it first "
              "or name an existing one", file=sys.stderr)
        return EXIT_USAGE
    partial = target.with_name(target.name + ".partial")
    try:
        src = _open_existing(src_path)
    except FileNotFoundError as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return EXIT_BAD_ROWS
    try:
        private_file(partial)  # a copy of the ledger: the node's user alone reads it
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst, pages=BACKUP_PAGES_PER_STEP)
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            version = dst.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    if check != "ok":
        print(f"backup: integrity check of the copy failed: {check}", file=sys.stderr)
        return EXIT_BAD_ROWS
    partial.rename(target)
    print(f"backup of {src_path} written to {target} (schema version {version}, "
          f"integrity ok)", file=out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m extrabalance.admin_cli backup DEST [--config FILE]`."""
    from extrabalance.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m extrabalance.admin_cli")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backup", help="online backup of the ledger to a file or directory")
    p.add_argument("dest")
    p.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    try:
        return backup_command(args.config, args.dest)
    except ConfigError as exc:
        print(f"extrabalance: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())


# -- reconcile-in ---------------------------------------------------------------------


def reconcile_in_command(config_path: str | None, csv_path: str, in_node: str, until: str,
                         *, apply: bool = False, json_output: bool = False,
                         out: TextIO | None = None) -> int:
    """`extrabalance reconcile-in FILE --in-node HOST --until TIME [--apply]`: compare
    the ledger's automatic advances with the IN's extract of the grants it applied
    (extrabalance.service.reconcile_in). 0: the books agree (or every difference was
    reversed with --apply); 1: differences left to look at; 2: usage."""
    import asyncio
    from datetime import datetime

    from extrabalance.service.reconcile_in import ExtractError, read_extract, reconcile_in

    out = out or sys.stdout
    settings = load_settings(config_path)
    known = {n.origin_host for n in settings.in_nodes}
    if in_node not in known:
        print(f"reconcile-in: --in-node {in_node!r} is not an IN node of the config"
              f" ({', '.join(sorted(known))})", file=sys.stderr)
        return EXIT_USAGE
    try:
        cut_off = datetime.fromisoformat(until)
    except ValueError:
        print(f"reconcile-in: --until {until!r} is not an ISO 8601 time", file=sys.stderr)
        return EXIT_USAGE
    if cut_off.tzinfo is None:
        print("reconcile-in: --until needs a time zone (e.g. 2026-12-07T00:00:00+00:00)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        grants = read_extract(csv_path)
    except (OSError, ExtractError) as exc:
        print(f"reconcile-in: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if _ledger_missing(settings, "reconcile-in"):
        return EXIT_USAGE

    async def run(ledger: Any, accounts: Any) -> Any:
        def check(tx: Any) -> Any:
            return reconcile_in(tx, grants, in_node=in_node, until=cut_off, apply=apply,
                                now=SYSTEM_CLOCK.now())

        # A dry run only reads; --apply reverses in one unit of work, then writes an
        # `advance_reversed` EDR line per reversal (what the report and the policy
        # backtest read to undo the advance's `advance` line).
        if not apply:
            return await ledger.read(check)
        report = await ledger.write(check)
        for row in report.reversed:
            accounts.events.emit("advance_reversed", msisdn=row["msisdn"],
                                 loan_id=row["loan_id"], amount_minor=row["amount_minor"],
                                 fee_minor=row["fee_minor"],
                                 debt_after_minor=row["debt_after_minor"],
                                 in_node=in_node, reason="reconcile-in")
        return report

    report = asyncio.run(_with_accounts(settings, run))
    doc = report.as_dict()
    if json_output:
        print(json.dumps(doc, indent=2, sort_keys=True), file=out)
    else:
        print(f"advances to {in_node} up to {doc['until']}: {report.advances_checked} checked,"
              f" {report.confirmed} confirmed by the IN", file=out)
        for name in ("reversed", "not_credited", "needs_review", "mismatches",
                     "grants_without_advance", "session_confirmed_missing"):
            print(f"  {name.replace('_', ' ')}: {len(doc[name])}", file=out)
            for row in doc[name][:20]:
                print(f"    {row}", file=out)
        if report.not_credited:
            print("  (dry run: --apply reverses the advances not credited)", file=out)
    return EXIT_OK if report.clean else EXIT_BAD_ROWS
