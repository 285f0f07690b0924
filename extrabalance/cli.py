"""The `extrabalance` command: one entry point for operators and engineers.

Each sub-command imports only what it needs, so `extrabalance --help` stays fast and
a missing optional dependency breaks only the command that uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime

from extrabalance.argparsing import Parser
from extrabalance.config import ConfigError


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.nodes > 1:
        from extrabalance.demo_cluster import run_cluster_demo

        return run_cluster_demo(nodes=args.nodes, json_output=args.json, keep=args.keep)
    from extrabalance.demo import run_demo

    return run_demo(json_output=args.json, keep=args.keep)


def _cmd_run(args: argparse.Namespace) -> int:
    from extrabalance.clock import SYSTEM_CLOCK, StartedClock
    from extrabalance.node import run_node

    clock = StartedClock(args.clock_start) if args.clock_start else SYSTEM_CLOCK
    return run_node(args.config, clock)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from extrabalance.config import load_settings
    from extrabalance.preflight import check_runtime

    settings = load_settings(args.config)
    check_runtime(settings, args.config or "embedded default config")
    print(f"{args.config or 'embedded default config'}: OK "
          f"({len(settings.tiers)} tiers, {len(settings.segments)} segments, "
          f"{len(settings.in_nodes)} IN nodes)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from extrabalance.bench import run_bench

    return run_bench(args.what, json_output=args.json, seconds=args.seconds,
                     extra=list(getattr(args, "rest", [])))


def _cmd_chaos(args: argparse.Namespace) -> int:
    from extrabalance.bench import _bench_module

    return int(_bench_module("chaos").run_cli(list(args.rest)))


def _cmd_fuzz(args: argparse.Namespace) -> int:
    from extrabalance.bench import _bench_module

    argv = ["--frames", str(args.frames), "--seed", str(args.seed)]
    if args.seconds is not None:
        argv += ["--seconds", str(args.seconds)]
    argv += ["--json"] * args.json + ["--keep"] * args.keep
    return int(_bench_module("fuzz").run_cli(argv))


def _cmd_sim(args: argparse.Namespace) -> int:
    if args.which == "in":
        from simulators.in_node import main_in as entry
    else:
        from simulators.smsc import main_smsc as entry
    return entry(list(args.rest))


def _cmd_phone(args: argparse.Namespace) -> int:
    from simulators.handset import main_phone

    return main_phone(list(args.rest))


def _cmd_import(args: argparse.Namespace) -> int:
    from extrabalance.admin_cli import import_profiles_command

    return import_profiles_command(args.config, args.csv, progress=not args.quiet)


def _cmd_reconcile_in(args: argparse.Namespace) -> int:
    from extrabalance.admin_cli import reconcile_in_command

    return reconcile_in_command(args.config, args.csv, args.in_node, args.until,
                                apply=args.apply, json_output=args.json)


def _cmd_subscriber(args: argparse.Namespace) -> int:
    from extrabalance.admin_cli import subscriber_command

    return subscriber_command(args.config, args.action, args.msisdn, reason=args.reason,
                              who=args.who, json_output=args.json)


def _cmd_purge_idempotency(args: argparse.Namespace) -> int:
    from extrabalance.admin_cli import purge_idempotency_command

    return purge_idempotency_command(args.config)


def _cmd_campaign(args: argparse.Namespace) -> int:  # issue 7
    from extrabalance.campaign_cli import campaign_command
    from extrabalance.config import load_settings

    return campaign_command(load_settings(args.config), template=args.template,
                            segment=args.segment, dry_run=args.dry_run, limit=args.limit,
                            list_only=args.list, cancel=args.cancel, who=args.who,
                            json_output=args.json)


def _cmd_report(args: argparse.Namespace) -> int:
    from extrabalance.report import report_command

    return report_command(args.config, args.date, args.edr_dir, args.out,
                          use_ledger=not args.no_ledger)


def _cmd_policy_backtest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from extrabalance.backtest import BacktestError, backtest, ledger_profiles, render
    from extrabalance.config import load_settings

    current = load_settings(args.current).policy()
    new = load_settings(args.config).policy()
    try:
        profiles = ledger_profiles(Path(args.ledger)) if args.ledger else None
        result = backtest(Path(args.edrs), current, new, profiles)
    except (BacktestError, OSError) as exc:
        print(f"policy backtest: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def _cmd_consent(args: argparse.Namespace) -> int:
    from extrabalance.config import load_settings
    from extrabalance.consent_cli import consent_export_command

    return consent_export_command(load_settings(args.config), args.msisdn, as_json=args.json)


def _cmd_dnd(args: argparse.Namespace) -> int:
    from extrabalance.config import load_settings
    from extrabalance.dnd_cli import dnd_command

    return dnd_command(load_settings(args.config), args.action, args.file, args.source, args.who)


def _cmd_backup(args: argparse.Namespace) -> int:
    from extrabalance.admin_cli import backup_command

    return backup_command(args.config, args.dest)


def _cmd_ledger_migrate(args: argparse.Namespace) -> int:
    from extrabalance.config import load_settings

    if args.to:
        from pydantic import ValidationError

        from extrabalance.config import StorageSection

        try:
            storage = StorageSection(backend="postgresql", url=args.to,
                                     password_env=args.password_env)
        except ValidationError as exc:
            raise ConfigError("ledger migrate --to: " + "; ".join(
                str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())) from None
    else:
        storage = load_settings(args.config).storage
        if storage.backend != "postgresql":
            raise ConfigError('ledger migrate: give --to postgresql://... or a config with '
                              'storage.backend = "postgresql"')
    conninfo = storage.postgresql_conninfo()
    from extrabalance.ledger.pg_copy import CopyError, copy_ledger

    def progress(table: str, total: int, batch: int) -> None:
        print(f"  {table}: {total} rows copied", file=sys.stderr)

    try:
        report = copy_ledger(args.source, conninfo, batch_rows=args.batch,
                             progress=progress if not args.quiet else None)
    except CopyError as exc:
        print(f"extrabalance ledger migrate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2))
    if not report.verified:
        print("extrabalance ledger migrate: the copy does NOT match the source "
              "(see the figures above)", file=sys.stderr)
        return 1
    return 0


def _instant(text: str) -> datetime:
    from extrabalance.clock import parse_instant

    try:
        return parse_instant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="extrabalance",
        description="Extra Balance: airtime advances for prepaid subscribers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="play the whole story on loopback with the bundled simulators")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the demo's temp dir (ledger, logs)")
    p.add_argument("--nodes", type=int, default=1, choices=range(1, 5), metavar="N",
                   help="N > 1: N node processes on one PostgreSQL ledger (a schema of its own "
                        "at $EB_DEMO_PG_URL, default the local server), one killed mid-dialog "
                        "(docs/scale-out.md)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run the node (production entry point)")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--clock-start", type=_instant, default=None, metavar="ISO8601",
                   help="the node's clock starts at this instant (with its UTC offset) and "
                        "advances in real time; for tests and benches that play a chosen hour")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("--config", default=None, help="TOML config file (default: embedded)")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("bench", help="benchmarks (codecs, ledger, e2e, recharge)",
                       description="Benchmarks kept in the repository's bench/.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per case")
    p.set_defaults(func=_cmd_bench)
    bench = p.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    b = bench.add_parser("codecs", help="Diameter and SMPP codecs, ours against peer libraries")
    # SUPPRESS: given before the benchmark's name, the option is not reset here.
    b.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one JSON object")
    b.add_argument("--seconds", type=float, default=argparse.SUPPRESS,
                   help="measuring time per case (default 2)")
    for name, text in DELEGATED_BENCHMARKS.items():
        b = bench.add_parser(name, help=text, add_help=False, prefix_chars="+")
        b.add_argument("rest", nargs=argparse.REMAINDER,
                       help=f"options (see `extrabalance bench {name} --help`)")

    # Every option goes to bench/chaos.py's own parser (`chaos --help` shows them): no
    # prefix character here means argparse takes them all as the remainder.
    p = sub.add_parser("chaos", help="kill the node and its links under load, then reconcile",
                       prefix_chars="+", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options (see `chaos --help`)")
    p.set_defaults(func=_cmd_chaos)

    p = sub.add_parser("fuzz", help="malformed Diameter/SMPP/MQTT against a running node")
    p.add_argument("--frames", type=int, default=1_000_000, help="frames in all protocols")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--keep", action="store_true", help="keep the work dir (ledger, node log)")
    p.set_defaults(func=_cmd_fuzz)

    p = sub.add_parser("sim", help="run a bundled network simulator (in, smsc)",
                       description="Network simulators for trying the node without a network.")
    p.set_defaults(func=_cmd_sim)
    sims = p.add_subparsers(dest="which", required=True, metavar="SIMULATOR")
    for name, text in SIMULATORS.items():
        s = sims.add_parser(name, help=text, add_help=False, prefix_chars="+")
        s.add_argument("rest", nargs=argparse.REMAINDER,
                       help=f"options (see `extrabalance sim {name} --help`)")

    p = sub.add_parser("phone", help="an interactive handset in the terminal "
                       "(on the simulators, or on a GSM modem with --modem)",
                       prefix_chars="+", add_help=False)  # every option goes to the phone
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_phone)

    p = sub.add_parser("import-profiles", help="import the operator's subscriber profile CSV")
    p.add_argument("csv")
    p.add_argument("--config", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("reconcile-in", help="check automatic advances against the IN's own"
                                            " records of the grants it applied")
    p.add_argument("csv", help="the IN's extract: session_id,request_number,msisdn,amount_minor")
    p.add_argument("--in-node", required=True, help="Origin-Host of the IN the extract is from")
    p.add_argument("--until", required=True,
                   help="the extract's cut-off, ISO 8601 with a time zone")
    p.add_argument("--apply", action="store_true",
                   help="reverse the advances the IN never credited (default: report only)")
    p.add_argument("--config", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_reconcile_in)

    p = sub.add_parser("subscriber", help="show, bar or unbar a subscriber, or opt him in to"
                       " automatic advances or out")
    p.add_argument("action", choices=["show", "bar", "unbar", "auto-advance-on",
                                      "auto-advance-off"])
    p.add_argument("msisdn")
    p.add_argument("--config", default=None)
    p.add_argument("--reason", default="", help="why (every change; kept in the audit trail)")
    p.add_argument("--who", default="cli", help="operator name for the audit trail")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_subscriber)

    p = sub.add_parser("purge-idempotency",
                       help="delete idempotency keys past storage.idempotency_retention_hours")
    p.add_argument("--config", default=None, help="TOML config file")
    p.set_defaults(func=_cmd_purge_idempotency)

    p = sub.add_parser("campaign", help="queue an advertisement campaign for the running node")
    p.add_argument("--template", default="ad_campaign", help="template key (every language)")
    p.add_argument("--segment", default=None, help="only this segment (default: all)")
    p.add_argument("--dry-run", action="store_true", help="count and show a sample; queue nothing")
    p.add_argument("--limit", type=int, default=None, help="at most N recipients")
    p.add_argument("--list", action="store_true", help="show campaigns and their progress")
    p.add_argument("--cancel", default=None, metavar="ID", help="stop a queued or running campaign")
    p.add_argument("--config", default=None)
    p.add_argument("--who", default="cli", help="operator name kept with the campaign")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_campaign)

    p = sub.add_parser("report", help="daily report (Markdown + PNG) from the EDRs and ledger")
    p.add_argument("--date", required=True, help="UTC day, YYYY-MM-DD")
    p.add_argument("--edr-dir", default=None,
                   help="EDR directory (default: storage.edr_dir, or 'edr' beside the ledger file)")
    p.add_argument("--out", default=None, help="output directory (default: report-DATE)")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--no-ledger", action="store_true",
                   help="EDRs only: no cohort, payback time, ageing or segment figures")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("ledger", help="ledger storage: copy the embedded ledger to PostgreSQL")
    ledger = p.add_subparsers(dest="ledger_command", required=True)
    m = ledger.add_parser(
        "migrate", help="copy a SQLite ledger into PostgreSQL, verified and resumable",
        description="Copies every table in batches (a re-run continues where a stopped "
                    "copy left off), then compares rows per table and the journal's sum "
                    "per account. Stop the node first.")
    m.add_argument("--from", dest="source", required=True, metavar="SQLITE_PATH",
                   help="the embedded ledger file")
    m.add_argument("--to", default=None, metavar="URL",
                   help="postgresql://USER@HOST:PORT/DATABASE (default: the config's "
                        "[storage] url); the password comes from --password-env, "
                        "PGPASSWORD or ~/.pgpass, never the URL")
    m.add_argument("--password-env", default=None, metavar="NAME",
                   help="environment variable holding the password (with --to)")
    m.add_argument("--config", default=None, help="TOML config file (without --to)")
    m.add_argument("--batch", type=int, default=5000, help="rows per transaction")
    m.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    m.set_defaults(func=_cmd_ledger_migrate)
    p = sub.add_parser("policy", help="lending policy tools: replay past EDRs under a new policy")
    policy = p.add_subparsers(dest="policy_command", required=True)
    b = policy.add_parser(
        "backtest", help="lent, fees, recovery and bad debt: recorded, current and new policy",
        description="Replays the EDR files of a directory under the current and a new "
                    "config's lending policy (docs/lending.md \"Backtest\").")
    b.add_argument("--edrs", required=True, metavar="DIR", help="directory of edr-*.csv files")
    b.add_argument("--config", required=True, metavar="NEW.toml", help="the policy to try")
    b.add_argument("--current", default=None, metavar="TOML",
                   help="the policy that ran (default: the node's config)")
    b.add_argument("--ledger", default=None, metavar="SQLITE_PATH",
                   help="embedded ledger to read the subscribers' profiles from (read-only)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_policy_backtest)
    p = sub.add_parser("dnd", help="the do-not-disturb list: import a file of MSISDNs, or list it")
    p.add_argument("action", choices=("import", "list"))
    p.add_argument("file", nargs="?", default=None,
                   help="import: CSV or text, one MSISDN per line (first column)")
    p.add_argument("--source", default="file", help="kept with each listed MSISDN")
    p.add_argument("--who", default="cli", help="operator name kept with each listed MSISDN")
    p.add_argument("--config", default=None, help="TOML config file")
    p.set_defaults(func=_cmd_dnd)
    p = sub.add_parser("consent", help="a subscriber's consent trail (consents, refusals, opt-ins)")
    p.add_argument("action", choices=("export",))
    p.add_argument("msisdn", help="the subscriber, international form, digits only")
    p.add_argument("--json", action="store_true", help="JSON instead of CSV")
    p.add_argument("--config", default=None, help="TOML config file")
    p.set_defaults(func=_cmd_consent)
    p = sub.add_parser("backup", help="online, integrity-checked copy of the ledger")
    p.add_argument("dest", help="file to write (never overwritten)")
    p.add_argument("--config", default=None, help="TOML config file")
    p.set_defaults(func=_cmd_backup)
    return parser


# Commands whose every argument goes to their own parser (their --help is theirs).
SIMULATORS = {"in": "an IN (OCS): Diameter Gy server and MQTT recharge publisher",
              "smsc": "an SMSC: SMPP server with handsets driven over a control port"}
DELEGATED_BENCHMARKS = {"ledger": "the ledger's write path (group commit against naive)",
                        "e2e": "end to end over real sockets: node, IN, SMSC, broker",
                        "recharge": "MQTT recharges through Mosquitto, ours against aiomqtt"}
_DELEGATED = {("phone",), ("chaos",), *(("sim", n) for n in SIMULATORS),
              *(("bench", n) for n in DELEGATED_BENCHMARKS)}


def _delegated_args(argv: list[str]) -> argparse.Namespace | None:
    """`phone +201000000001`, `sim in --help`, `bench e2e --rate 100`: argparse would
    take a leading `+` or `--help` for its own; these go whole to the command."""
    for n in (2, 1):
        if tuple(argv[:n]) in _DELEGATED:
            command, rest = argv[:n], argv[n:]
            func = {"phone": _cmd_phone, "chaos": _cmd_chaos, "sim": _cmd_sim,
                    "bench": _cmd_bench}[command[0]]
            return argparse.Namespace(command=command[0], func=func, rest=rest,
                                      which=command[-1], what=command[-1],
                                      json=False, seconds=2.0)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _delegated_args(argv) or build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"extrabalance: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)  # a command's usage error, already one line
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, and no traceback from
        # the interpreter flushing stdout into the closed pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 2
    except OSError as exc:
        # A file or directory the command needs (a ledger path, a backup target, a
        # port): one line naming it, no traceback.
        print(f"extrabalance {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
