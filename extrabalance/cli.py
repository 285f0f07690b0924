"""The `extrabalance` command: one entry point for operators and engineers.

Each sub-command imports only what it needs, so `extrabalance --help` stays fast and
a missing optional dependency breaks only the command that uses it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from extrabalance.config import ConfigError


def _cmd_demo(args: argparse.Namespace) -> int:
    from extrabalance.demo import run_demo

    return run_demo(json_output=args.json, keep=args.keep)


def _cmd_run(args: argparse.Namespace) -> int:
    from extrabalance.node import run_node

    return run_node(args.config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from extrabalance.config import load_settings

    settings = load_settings(args.config)
    print(f"{args.config or 'embedded default config'}: OK "
          f"({len(settings.tiers)} tiers, {len(settings.segments)} segments, "
          f"{len(settings.in_nodes)} IN nodes)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from extrabalance.bench import run_bench

    return run_bench(args.what, json_output=args.json, seconds=args.seconds, extra=args.extra)


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
    from extrabalance.config import load_settings
    from extrabalance.service.campaign import campaign_command

    return campaign_command(load_settings(args.config), template=args.template,
                            segment=args.segment, dry_run=args.dry_run, limit=args.limit,
                            list_only=args.list, cancel=args.cancel, who=args.who,
                            json_output=args.json)


def _cmd_report(args: argparse.Namespace) -> int:
    from extrabalance.report import report_command

    return report_command(args.config, args.date, args.edr_dir, args.out,
                          use_ledger=not args.no_ledger)


def _cmd_backup(args: argparse.Namespace) -> int:
    from extrabalance.admin_cli import backup_command

    return backup_command(args.config, args.dest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extrabalance",
        description="Extra Balance: airtime advances for prepaid subscribers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="play the whole story on loopback with the bundled simulators")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the demo's temp dir (ledger, logs)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run the node (production entry point)")
    p.add_argument("--config", required=True, help="TOML config file")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("--config", default=None, help="TOML config file (default: embedded)")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("bench", help="benchmarks (codecs, ledger, e2e)")
    p.add_argument("what", choices=["codecs", "ledger", "e2e", "recharge"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per case")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="options for that benchmark")
    p.set_defaults(func=_cmd_bench)

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

    p = sub.add_parser("sim", help="run a bundled network simulator")
    p.add_argument("which", choices=["in", "smsc"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_sim)

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

    p = sub.add_parser("subscriber", help="show, bar or unbar a subscriber")
    p.add_argument("action", choices=["show", "bar", "unbar"])
    p.add_argument("msisdn")
    p.add_argument("--config", default=None)
    p.add_argument("--reason", default="", help="why (bar/unbar; kept in the audit trail)")
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
                   help="EDR directory (default: 'edr' beside the ledger file)")
    p.add_argument("--out", default=None, help="output directory (default: report-DATE)")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--no-ledger", action="store_true",
                   help="EDRs only: no cohort, payback time, ageing or segment figures")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("backup", help="online, integrity-checked copy of the ledger")
    p.add_argument("dest", help="file to write (never overwritten)")
    p.add_argument("--config", default=None, help="TOML config file")
    p.set_defaults(func=_cmd_backup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"extrabalance: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
