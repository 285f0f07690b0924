"""`extrabalance demo`: the whole service on loopback, played as a phone transcript.

Everything talks over real sockets: the node, the IN simulator (Diameter), the SMSC /
USSD gateway simulator (SMPP) and an MQTT broker (a private Mosquitto when installed,
else the in-process demo-only broker). The story:

1. Subscriber A (balance 0) tries a call: the IN's out-of-balance CCR gets 4012
   (A has not opted in to automatic advances) and A gets the advertisement SMS.
2. A dials *123#, picks a tier, sees fee and total, confirms: the node credits the
   IN (CCR REFUND_ACCOUNT); final screen and SMS.
3. A recharges less than the debt: partial payback SMS; recharges again: full payback,
   and his limit from behaviour rises (the demo runs with `[limits]` on: a starter
   limit of 10.00, -5 % for the partial payback, +10 % for the full one on time: 10.50),
   shown in "My account".
4. Subscriber B borrows up to his segment's ceiling and is refused with the reason,
   and after the allowed number of loans without a full payback he is barred.
5. Subscriber C, whose language is Arabic, turns automatic advances on from the
   *123# menu (Arabic screens); when he runs out of credit the node grants the
   advance inside the CCA (2001) and tells him by SMS in Arabic.
6. A texts DATA: a 500 MB data bundle (tier 13, price 5.00 EGP) credited at the IN as
   units in a Multiple-Services-Credit-Control, owed in money.
7. Summary: loans, fees, recovered, outstanding — checked against the IN simulator,
   money and the bundle units of its data bucket.

`play(env)` returns the transcript as data so the test suite asserts every screen,
SMS, result code and balance of the same story.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from extrabalance.clock import SYSTEM_CLOCK, Clock
from extrabalance.config import Settings, deep_merge, load_settings
from extrabalance.diameter.constants import DIAMETER_SUCCESS
from extrabalance.diameter.dictionary import RESULT_CODE_NAMES
from extrabalance.service.templates import format_minor

A = "201001234567"
B = "201001234568"
C = "201001234569"  # Arabic; opts in to automatic advances
SMS_WAIT_S = 5.0
# The demo's tier 13: a data bundle for the `regular` segment (docs/lending.md).
DEMO_BUNDLE_TIER = 13
DEMO_BUNDLE = {"kind": "data", "quantity": 500 * 2**20, "service_identifier": 1,
               "rating_group": 10}
DEMO_BUNDLE_PRICE_MINOR = 500
DEMO_SMPP_PASSWORD_ENV = "EB_DEMO_SMPP_PASSWORD"


@dataclass
class Entry:
    # "title" | "diameter" (the node's CCA to the IN's out-of-balance CCR) | "in_op"
    # (the node's CCR to the IN and its answer) | "screen" | "sms" | "note"
    kind: str
    msisdn: str = ""
    text: str = ""
    final: bool = False
    dialled: str = ""
    result_code: int | None = None


@dataclass
class Summary:
    loans: int
    principal_lent_minor: int
    fees_minor: int
    recovered_minor: int
    outstanding_minor: int
    in_credited_minor: int
    in_debited_minor: int
    balances_minor: dict[str, int]
    ledger_matches_in: bool
    journal_balanced: bool
    broker: str
    bundle_loans: int = 0  # loans of a bundle tier (counted in `loans` too)
    bundle_units_credited: dict[str, int] = field(default_factory=dict)  # the IN's buckets


@dataclass
class Transcript:
    entries: list[Entry] = field(default_factory=list)
    echo: Callable[[Entry], None] | None = None

    def add(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        if self.echo is not None:
            self.echo(entry)
        return entry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoEnv:
    node: Any
    in_sim: Any
    smsc: Any
    settings: Settings
    broker_kind: str
    workdir: Path


def loopback_overrides(base: Settings, *, diameter_port: int, in_ports: dict[str, int],
                       smsc_port: int, mqtt_port: int, mqtt_client_id: str) -> dict[str, Any]:
    """Config overrides that point a node at simulators on 127.0.0.1: its Diameter
    port, the IN simulator's ports, the SMSC simulator's bind, the broker's port."""
    return {
        "diameter": {"listen_port": diameter_port},
        "in_nodes": [
            {**n.model_dump(exclude_none=True),
             "peers": [{"host": "127.0.0.1", "port": in_ports[n.name]}]}
            for n in base.in_nodes
        ],
        "smpp": {"binds": [{"host": "127.0.0.1", "port": smsc_port,
                            "system_id": "extrabalance",
                            "password_env": DEMO_SMPP_PASSWORD_ENV}]},
        "mqtt": {"port": mqtt_port, "client_id": mqtt_client_id},
        "admin": {"listen_port": 0},
    }


@contextlib.asynccontextmanager
async def demo_env(workdir: Path, overrides: dict[str, Any] | None = None, *,
                   clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[DemoEnv]:
    """Start broker, simulators and node on loopback; stop them all afterwards.
    `overrides` are deep-merged over the demo's settings, `clock` is the node's (tests
    use them)."""
    from extrabalance.ledger.profiles import import_profiles
    from extrabalance.node import Node
    from simulators.in_node import InNodeSpec, InSimulator, MqttTarget, MsisdnRange, NodePeer
    from simulators.smsc import SmscSimulator

    async with contextlib.AsyncExitStack() as stack:
        mqtt_port, broker_kind = await start_broker(stack, workdir)
        base = load_settings()
        diameter_port = free_port()
        in_sim = InSimulator(
            [
                InNodeSpec(n.name, n.origin_host, n.realm, ranges=tuple(
                    MsisdnRange.parse(f"{r.start}-{r.end}" if r.start else f"{r.prefix}*")
                    for r in n.ranges))
                for n in base.in_nodes
            ],
            NodePeer("127.0.0.1", diameter_port, base.node.origin_host, base.node.origin_realm),
            base.node.currency_numeric, base.node.currency_exponent,
            base.diameter.service_context_id,
            currency=base.node.currency,
            mqtt=MqttTarget("127.0.0.1", mqtt_port),
            election=bool((overrides or {}).get("diameter", {}).get("election", False)),
        )
        in_ports = await in_sim.start()
        stack.push_async_callback(in_sim.close)

        os.environ[DEMO_SMPP_PASSWORD_ENV] = os.urandom(4).hex()  # SMPP: at most 8 octets
        smsc = SmscSimulator(system_id="extrabalance",
                             password=os.environ[DEMO_SMPP_PASSWORD_ENV],
                             short_code=base.smpp.short_code)
        smsc_port = await smsc.start()
        stack.push_async_callback(smsc.close)

        db_path = workdir / "extrabalance.db"
        settings = load_settings(overrides={
            **loopback_overrides(base, diameter_port=diameter_port, in_ports=in_ports,
                                 smsc_port=smsc_port, mqtt_port=mqtt_port,
                                 mqtt_client_id="extrabalance-demo"),
            "storage": {"path": str(db_path)},
            # issue 7: the story plays the same at any hour (no quiet hours) and shows
            # the out-of-balance ad only (the debt-limit ad would interleave its SMS).
            "ads": {"quiet_hours": None, "triggers": {"debt_limit": {"enabled": False}}},
            # Limits from behaviour, on in the demo only: everyone starts at 10.00.
            "limits": {"enabled": True, "floor_minor": 1000},
            **_demo_bundle(base),
        })
        if overrides:
            settings = Settings.model_validate(deep_merge(settings.model_dump(), overrides))
        profiles = workdir / "profiles.csv"
        profiles.write_text(
            "msisdn,tenure_days,arpu_minor,language\n"
            f"{A},400,5000,en\n"
            f"{B},120,1000,en\n"
            f"{C},400,5000,ar\n",
            encoding="utf-8",
        )
        if settings.storage.backend == "sqlite":
            report = import_profiles(db_path, profiles, progress=False)
            if report.bad_rows:
                raise RuntimeError(f"demo profiles rejected: {report.bad_rows}")
        else:  # the profile import is SQLite's: the same rows through the ledger port
            await _put_profiles(settings, profiles)

        node = Node(settings, clock=clock)
        await node.start()
        stack.push_async_callback(node.stop)
        await node.wait_connected(10.0)
        await in_sim.wait_connected(10.0)
        await smsc.wait_bound(10.0)
        yield DemoEnv(node, in_sim, smsc, settings, broker_kind, workdir)


def _demo_bundle(base: Settings) -> dict[str, Any]:
    """The shipped tiers plus the demo's data bundle, offered to `regular`."""
    tiers = [t.model_dump(exclude_none=True) for t in base.tiers]
    tiers.append({"id": DEMO_BUNDLE_TIER, "amount_minor": DEMO_BUNDLE_PRICE_MINOR,
                  "bundle": DEMO_BUNDLE})
    segments = [s.model_dump(mode="json") for s in base.segments]
    for seg in segments:
        if seg["name"] == "regular":
            seg["tiers"] = [*seg["tiers"], DEMO_BUNDLE_TIER]
    return {"tiers": tiers, "segments": segments}


async def start_broker(stack: contextlib.AsyncExitStack, workdir: Path) -> tuple[int, str]:
    """A private Mosquitto when installed, else the in-process demo-only broker; stopped
    when `stack` closes. Returns (port, what it is)."""
    from extrabalance.demo_broker import DemoBroker
    from extrabalance.mosquitto import MosquittoBroker, find_mosquitto

    if find_mosquitto() is not None:
        mosquitto = MosquittoBroker(workdir / "mosquitto")
        mosquitto.start()
        stack.callback(mosquitto.stop)
        return mosquitto.port, "mosquitto"
    demo_broker = DemoBroker()
    port = await demo_broker.start()
    stack.push_async_callback(demo_broker.stop)
    return port, "in-process demo-only broker (Mosquitto not installed)"


async def _put_profiles(settings: Settings, profiles: Path) -> None:
    """The demo's profile CSV written one row at a time through the ledger port."""
    import csv

    from extrabalance.core.model import SubscriberProfile
    from extrabalance.ledger.factory import open_ledger

    now = SYSTEM_CLOCK.now()
    ledger = open_ledger(settings.storage)
    try:
        with profiles.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                msisdn = row["msisdn"]
                profile = SubscriberProfile(msisdn, int(row["tenure_days"]), int(row["arpu_minor"]))

                def put(tx: Any, profile: SubscriberProfile = profile,
                        language: str = row["language"]) -> None:
                    tx.put_profile(profile, now)
                    tx.set_preferences(profile.msisdn, now, language=language)

                await ledger.write(put)
    finally:
        await ledger.close()


async def play(env: DemoEnv, transcript: Transcript) -> Summary:
    """Play the story; every step is recorded in `transcript`."""
    t = transcript
    in_sim, smsc = env.in_sim, env.smsc
    exponent = env.settings.node.currency_exponent
    def money(minor: int) -> str:
        return f"{format_minor(minor, exponent)} {env.settings.node.currency}"
    phone_a, phone_b = smsc.handset(A), smsc.handset(B)

    seen = [len(in_sim.applied())]

    def in_ops() -> None:
        """What the node asked the IN to do since the last look (node → IN CCRs)."""
        applied = in_sim.applied()
        for op in applied[seen[0]:]:
            if op.action in ("REFUND_ACCOUNT", "DIRECT_DEBITING", "CHECK_BALANCE"):
                what = (f"{op.units // 2**20} MB {op.bundle_kind}" if op.bundle_kind
                        else money(op.amount_minor))
                t.add(Entry("in_op", op.msisdn,
                            f"CCR {op.action} {what} on {op.node}: "
                            f"{op.result_code} {RESULT_CODE_NAMES.get(op.result_code, '')}",
                            result_code=op.result_code))
        seen[0] = len(applied)

    async def screen(phone: Any, dialled: str, *, dial: bool) -> Entry:
        shown = await (phone.dial(dialled) if dial else phone.reply(dialled))
        return t.add(Entry("screen", phone.msisdn, shown.text, shown.final, dialled))

    async def sms(phone: Any) -> Entry:
        text = await phone.next_sms(SMS_WAIT_S)
        in_ops()
        return t.add(Entry("sms", phone.msisdn, text))

    async def out_of_balance(msisdn: str) -> Entry:
        t.add(Entry("note", msisdn, f"balance {money(in_sim.balance(msisdn))}; "
                                    "the IN sends an out-of-balance CCR (EVENT)"))
        code, granted = await in_sim.send_out_of_balance(msisdn)
        text = f"CCA {code} {RESULT_CODE_NAMES.get(code, '')}" + (
            f", granted {money(granted)}" if granted else "")
        return t.add(Entry("diameter", msisdn, text, result_code=code))

    async def recharge(msisdn: str, amount_minor: int) -> None:
        in_sim.spend(msisdn)  # he has used the credit he had
        event = await in_sim.recharge(msisdn, amount_minor)
        t.add(Entry("note", msisdn, f"recharges {money(amount_minor)} "
                                    f"(MQTT event {event.event_id}); balance {money(in_sim.balance(msisdn))}"))

    in_sim.set_balance(A, 0)
    in_sim.set_balance(B, 0)

    t.add(Entry("title", text="1. Subscriber A runs out of credit"))
    await out_of_balance(A)
    t.add(Entry("note", A, "A has not opted in to automatic advances: the node answers 4012 "
                           "(no credit granted now) and offers the *123# menu by SMS"))
    await sms(phone_a)

    t.add(Entry("title", text="2. A borrows from the *123# menu"))
    await screen(phone_a, "*123#", dial=True)
    await screen(phone_a, "4", dial=False)
    await screen(phone_a, "1", dial=False)
    await sms(phone_a)
    t.add(Entry("note", A, f"IN balance now {money(in_sim.balance(A))}"))

    t.add(Entry("title", text="3. A pays back from two recharges"))
    await recharge(A, 300)
    await sms(phone_a)
    t.add(Entry("note", A, f"IN balance after payback {money(in_sim.balance(A))}"))
    await recharge(A, 1000)
    await sms(phone_a)
    t.add(Entry("note", A, f"IN balance after payback {money(in_sim.balance(A))}"))
    t.add(Entry("note", A, "a partial payback (-5 %), then a full one on time (+10 %): his "
                           "limit rises from 10.00 to 10.50 EGP; My account shows it"))
    await screen(phone_a, "*123*0#", dial=True)

    t.add(Entry("title", text="4. Subscriber B borrows up to his ceiling, then is barred"))
    await phone_b.send_sms("LOAN 5")
    t.add(Entry("note", B, 'sends SMS "LOAN 5" to the short code'))
    await sms(phone_b)
    in_sim.spend(B)
    await screen(phone_b, "*123*3#", dial=True)
    await screen(phone_b, "1", dial=False)
    await sms(phone_b)
    in_sim.spend(B)
    await screen(phone_b, "*123*2#", dial=True)
    await screen(phone_b, "*123*1#", dial=True)
    await screen(phone_b, "1", dial=False)
    await sms(phone_b)
    in_sim.spend(B)
    await screen(phone_b, "*123#", dial=True)
    await out_of_balance(B)

    t.add(Entry("title", text="5. Subscriber C (Arabic) turns automatic advances on"))
    in_sim.set_balance(C, 0)
    phone_c = smsc.handset(C)
    await screen(phone_c, "*123#", dial=True)
    await screen(phone_c, "0", dial=False)  # My account
    await screen(phone_c, "1", dial=False)  # automatic advance: on
    await screen(phone_c, "9", dial=False)  # back to the menu
    await out_of_balance(C)
    t.add(Entry("note", C, "C opted in: the node lends inside its answer (CCA 2001 with the "
                           "granted amount); the call goes on"))
    await sms(phone_c)

    t.add(Entry("title", text="6. A borrows a data bundle by SMS"))
    in_sim.spend(A)
    await phone_a.send_sms("DATA")
    t.add(Entry("note", A, 'sends SMS "DATA": the largest data bundle that fits his limit'))
    await sms(phone_a)
    t.add(Entry("note", A, f"IN data bucket {in_sim.buckets(A).get('data', 0) // 2**20} MB; "
                           f"IN balance {money(in_sim.balance(A))} (the bundle is owed in money)"))

    t.add(Entry("title", text="7. Summary"))
    return await summarise(env)


async def summarise(env: DemoEnv) -> Summary:
    """Ledger figures next to what the IN simulator applied: they must match exactly."""
    from simulators.in_node import KIND_OUT_OF_BALANCE_GRANT

    ledger = env.node.ledger
    totals = await ledger.account_totals()
    loans = await ledger.read(lambda c: c.execute(
        "SELECT COUNT(*), COALESCE(SUM(principal_minor), 0), COALESCE(SUM(fee_minor), 0) "
        "FROM loans WHERE state NOT IN ('FAILED', 'REQUESTED')").fetchone())
    recovered = await ledger.read(lambda c: c.execute(
        "SELECT COALESCE(SUM(recovered_minor), 0) FROM recoveries WHERE state = 'DONE'"
    ).fetchone()[0])
    journal_sum = sum(totals.values())
    # What the ledger booked for its bundle loans: the units stored with each loan
    # (never the tiers as configured now) and their money price.
    by_kind = await ledger.read(lambda c: c.execute(
        "SELECT bundle_kind, COUNT(*), COALESCE(SUM(bundle_quantity), 0),"
        " COALESCE(SUM(principal_minor), 0) FROM loans WHERE state NOT IN"
        " ('FAILED', 'REQUESTED') AND bundle_kind IS NOT NULL GROUP BY bundle_kind").fetchall())
    expected_units = {str(kind): int(quantity) for kind, _, quantity, _ in by_kind}
    bundle_loans = sum(int(count) for _, count, _, _ in by_kind)
    bundle_price = sum(int(price) for _, _, _, price in by_kind)
    applied = env.in_sim.applied()
    credited = sum(op.moved_minor for op in applied
                   if op.action in ("REFUND_ACCOUNT", KIND_OUT_OF_BALANCE_GRANT))
    units: dict[str, int] = {}
    for op in applied:
        if op.bundle_kind and op.result_code == DIAMETER_SUCCESS:
            units[op.bundle_kind] = units.get(op.bundle_kind, 0) + op.units
    debited = -sum(op.moved_minor for op in applied if op.action == "DIRECT_DEBITING")
    outstanding = totals.get("principal_receivable", 0) + totals.get("fee_receivable", 0)
    return Summary(
        loans=int(loans[0]),
        principal_lent_minor=int(loans[1]),
        fees_minor=int(loans[2]),
        recovered_minor=int(recovered),
        outstanding_minor=int(outstanding),
        in_credited_minor=credited,
        in_debited_minor=debited,
        balances_minor={m: env.in_sim.balance(m) for m in (A, B, C)},
        # Money loans are the IN's money credits; bundle loans its units, owed in money.
        ledger_matches_in=(credited == int(loans[1]) - int(bundle_price)
                           and units == expected_units and debited == int(recovered)
                           and int(loans[1]) + int(loans[2]) - int(recovered) == outstanding),
        journal_balanced=journal_sum == 0,
        broker=env.broker_kind,
        bundle_loans=bundle_loans,
        bundle_units_credited=units,
    )


def _print_entry(entry: Entry) -> None:
    if entry.kind == "title":
        print(f"\n== {entry.text} " + "=" * max(0, 60 - len(entry.text)))
    elif entry.kind == "note":
        print(f"   [{entry.msisdn}] {entry.text}")
    elif entry.kind in ("diameter", "in_op"):  # the node's CCA, or its own CCR
        print(f"   [node -> IN] {entry.text}")
    elif entry.kind == "screen":
        print(f"   +-- {entry.msisdn} sends {entry.dialled!r}")
        for line in entry.text.splitlines():
            print(f"   | {line}")
        print("   +-- " + ("(dialog closed)" if entry.final else "(reply expected)"))
    elif entry.kind == "sms":
        print(f"   SMS to {entry.msisdn}: {entry.text}")


def _print_summary(s: Summary, exponent: int, currency: str) -> None:
    def m(minor: int) -> str:
        return f"{format_minor(minor, exponent)} {currency}"
    rows = [
        ("loans granted", str(s.loans)),
        ("principal lent", m(s.principal_lent_minor)),
        ("fees charged", m(s.fees_minor)),
        ("recovered", m(s.recovered_minor)),
        ("outstanding", m(s.outstanding_minor)),
        ("IN credited (REFUND_ACCOUNT + advances)", m(s.in_credited_minor)),
        ("bundle loans / IN units credited", f"{s.bundle_loans} / " + (", ".join(
            f"{units // 2**20} MB {kind}" if kind == "data" else f"{units} {kind}"
            for kind, units in sorted(s.bundle_units_credited.items())) or "none")),
        ("IN debited (DIRECT_DEBITING)", m(s.in_debited_minor)),
        ("ledger matches the IN", "yes" if s.ledger_matches_in else "NO"),
        ("journal balanced", "yes" if s.journal_balanced else "NO"),
        ("MQTT broker", s.broker),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"   {key:<{width}}  {value}")


def run_demo(*, json_output: bool = False, keep: bool = False) -> int:
    async def story(workdir: Path, transcript: Transcript) -> Summary:
        async with demo_env(workdir) as env:
            if not json_output:
                print(f"Extra Balance demo on loopback (ledger {workdir / 'extrabalance.db'}; "
                      f"MQTT: {env.broker_kind})")
            return await play(env, transcript)

    return run_story(story, prefix="extrabalance-demo-", json_output=json_output, keep=keep)


def run_story(story: Callable[[Path, Transcript], Coroutine[Any, Any, Summary]], *, prefix: str,
              json_output: bool, keep: bool) -> int:
    """Play `story` in a temporary directory, print it (or the summary as JSON); 0 when
    the ledger and the IN agree."""
    import logging

    from extrabalance.observability import configure_logging

    configure_logging(level="ERROR")
    logging.disable(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    transcript = Transcript(echo=None if json_output else _print_entry)
    try:
        summary = asyncio.run(story(workdir, transcript))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = summary.ledger_matches_in and summary.journal_balanced
    if json_output:
        print(json.dumps(asdict(summary), indent=2, sort_keys=True))
    else:
        settings = load_settings()
        _print_summary(summary, settings.node.currency_exponent, settings.node.currency)
        print("\nDemo finished: " + ("ledger and IN agree." if ok else "MISMATCH between ledger and IN."),
              file=sys.stdout)
    return 0 if ok else 1
