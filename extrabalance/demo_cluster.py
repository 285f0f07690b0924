"""`extrabalance demo --nodes 2`: two nodes on one PostgreSQL ledger, one killed mid-dialog.

Everything on loopback, over real sockets: two node processes sharing a PostgreSQL
schema of the demo's own (created at the start, dropped at the end), the IN simulator
dialling both nodes (one realm, each node its own Origin-Host), the SMSC / USSD
gateway simulator taking a bind from each node (each its own system_id), and an MQTT
broker. The story (docs/scale-out.md):

1. Subscriber A dials *123#, picks a tier and sees the confirm screen; the gateway
   kept the dialog on one node's bind.
2. That node is SIGKILLed. A confirms: the gateway gives the input to the other node,
   which never showed A this confirm screen: it ends the dialog with the expired
   screen and lends nothing.
3. A dials again and borrows on the node left.
4. Subscriber B runs out of credit: the IN's out-of-balance CCR, realm-routed, is
   answered by the node left (the IN lost its connection to the other).
5. A recharges: the node left recovers the loan (the broker delivers the recharge to
   it) and sends the payback SMS.
6. Summary: the ledger (PostgreSQL) against what the IN applied; they must agree.

`play_cluster(env)` returns the transcript as data so that a test asserts the story.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from extrabalance.config import Settings, load_settings
from extrabalance.demo import (
    SMS_WAIT_S,
    A,
    B,
    Entry,
    Summary,
    Transcript,
    _put_profiles,
    free_port,
    run_story,
    start_broker,
)
from extrabalance.diameter.dictionary import RESULT_CODE_NAMES
from extrabalance.service.templates import format_minor

PG_URL_ENV = "EB_DEMO_PG_URL"  # the PostgreSQL server the demo makes its schema on
PG_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
SMPP_PASSWORD_ENV = "EB_DEMO_SMPP_PASSWORD"
NODES_MAX = 4
SAGA_LEASE_S = 6.0  # the nodes' saga lease: a killed node's sagas move on quickly here
UP_WAIT_S = 30.0  # both nodes connected to the IN and bound to the gateway within this
STOP_GRACE_S = 10.0


@dataclass
class ClusterNode:
    name: str  # node.name, also its SMPP system_id here
    origin_host: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def kill(self) -> None:
        """SIGKILL (a crash): no DPR, no unbind, nothing flushed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> int | None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_GRACE_S)
            except TimeoutError:
                await self.kill()
        return self.process.returncode


@dataclass
class ClusterEnv:
    nodes: list[ClusterNode]
    in_sim: Any
    smsc: Any
    settings: Settings  # node 1's (the ledger URL and the currency are the same for all)
    broker_kind: str
    workdir: Path
    schema: str


def _schema_url(server_url: str, schema: str, application: str) -> str:
    joiner = "&" if "?" in server_url else "?"
    return (f"{server_url}{joiner}options={quote(f'-c search_path={schema}', safe='')}"
            f"&application_name={quote(application, safe='')}")


@contextlib.contextmanager
def _schema(server_url: str) -> Any:
    import psycopg

    schema = f"eb_demo_{secrets.token_hex(5)}"
    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.Error as exc:
        raise SystemExit(f"extrabalance demo --nodes: no PostgreSQL at {server_url} "
                         f"({str(exc).strip().splitlines()[0]}); set {PG_URL_ENV}") from None
    try:
        yield schema
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
                         (schema.replace("_", "-") + "-%",))
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.asynccontextmanager
async def cluster_env(workdir: Path, nodes: int = 2,
                      pg_url: str | None = None) -> AsyncIterator[ClusterEnv]:
    """Broker, simulators, a PostgreSQL schema and `nodes` node processes; all stopped
    (and the schema dropped) afterwards."""
    from simulators.in_node import InNodeSpec, InSimulator, MqttTarget, MsisdnRange, NodePeer
    from simulators.smsc import SmscSimulator

    if not 2 <= nodes <= NODES_MAX:
        raise ValueError(f"a cluster demo has 2..{NODES_MAX} nodes")
    server_url = pg_url or os.environ.get(PG_URL_ENV, PG_URL_DEFAULT)
    async with contextlib.AsyncExitStack() as stack:
        schema = stack.enter_context(_schema(server_url))
        mqtt_port, broker_kind = await start_broker(stack, workdir)

        base = load_settings()
        names = [f"eb-node-{i + 1}" for i in range(nodes)]
        hosts = [f"node{i + 1}.{base.node.origin_host}" for i in range(nodes)]
        diameter_ports = [free_port() for _ in range(nodes)]
        in_sim = InSimulator(
            [InNodeSpec(n.name, n.origin_host, n.realm, ranges=tuple(
                MsisdnRange.parse(f"{r.start}-{r.end}" if r.start else f"{r.prefix}*")
                for r in n.ranges)) for n in base.in_nodes],
            [NodePeer("127.0.0.1", port, host, base.node.origin_realm)
             for port, host in zip(diameter_ports, hosts, strict=True)],
            base.node.currency_numeric, base.node.currency_exponent,
            base.diameter.service_context_id, currency=base.node.currency,
            mqtt=MqttTarget("127.0.0.1", mqtt_port),
        )
        in_ports = await in_sim.start()
        stack.push_async_callback(in_sim.close)

        password = os.urandom(4).hex()  # SMPP: at most 8 octets
        smsc = SmscSimulator(system_id=names[0], password=password,
                             short_code=base.smpp.short_code,
                             more_binds={name: password for name in names[1:]})
        smsc_port = await smsc.start()
        stack.push_async_callback(smsc.close)

        configs: list[Settings] = []
        for i, name in enumerate(names):
            configs.append(load_settings(overrides={
                "node": {"name": name, "origin_host": hosts[i]},
                "storage": {"backend": "postgresql",
                            "url": _schema_url(server_url, schema,
                                               f"{schema.replace('_', '-')}-{name}"),
                            "edr_dir": str(workdir / f"edr-{name}"), "pool_max": 4,
                            # no SQLite ledger of the working directory is in play
                            "path": str(workdir / f"{name}.db"),
                            "saga_lease_s": SAGA_LEASE_S},
                "diameter": {"listen_port": diameter_ports[i]},
                "in_nodes": [
                    {**n.model_dump(exclude_none=True),
                     "peers": [{"host": "127.0.0.1", "port": in_ports[n.name]}]}
                    for n in base.in_nodes
                ],
                "smpp": {"binds": [{"host": "127.0.0.1", "port": smsc_port, "system_id": name,
                                    "password_env": SMPP_PASSWORD_ENV}]},
                "mqtt": {"port": mqtt_port, "client_id": f"extrabalance-demo-{name}"},
                "admin": {"listen_port": 0},
                "ads": {"quiet_hours": None, "triggers": {"debt_limit": {"enabled": False}}},
            }))
        profiles = workdir / "profiles.csv"
        profiles.write_text("msisdn,tenure_days,arpu_minor,language\n"
                            f"{A},400,5000,en\n{B},400,5000,en\n", encoding="utf-8")
        await _put_profiles(configs[0], profiles)

        started: list[ClusterNode] = []

        async def stop_all() -> None:
            for node in started:
                await node.stop()

        stack.push_async_callback(stop_all)
        for name, host, settings in zip(names, hosts, configs, strict=True):
            started.append(await _start_node(workdir, name, host, settings, password))
        try:
            await in_sim.wait_connected(UP_WAIT_S, every_node=True)
            async with asyncio.timeout(UP_WAIT_S):
                while len(smsc.binds()) < nodes:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            logs = "; ".join(f"{n.name}: {n.log_path.read_text()[-1500:]}" for n in started)
            raise RuntimeError(f"the nodes did not come up in {UP_WAIT_S:g} s: {logs}") from None
        yield ClusterEnv(started, in_sim, smsc, configs[0], broker_kind, workdir, schema)


async def _start_node(workdir: Path, name: str, host: str, settings: Settings,
                      smpp_password: str) -> ClusterNode:
    settings_path = workdir / f"{name}.json"
    settings_path.write_text(settings.model_dump_json(), encoding="utf-8")
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extrabalance.demo_cluster", "--node", str(settings_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, SMPP_PASSWORD_ENV: smpp_password, "EB_LOG_LEVEL": "ERROR"},
            start_new_session=True,  # its own process group: a SIGKILL takes all of it
        )
    return ClusterNode(name, host, process, log_path)


def _node_process(settings_path: str) -> int:
    """One node of the demo, in its own process: run until SIGTERM."""
    from extrabalance.node import Node, serve
    from extrabalance.observability import configure_logging

    settings = Settings.model_validate_json(Path(settings_path).read_text(encoding="utf-8"))
    configure_logging(level=os.environ.get("EB_LOG_LEVEL", "ERROR"))

    async def main() -> None:
        await serve(Node(settings))  # the node is built inside the loop it runs on

    asyncio.run(main())
    return 0


async def play_cluster(env: ClusterEnv, transcript: Transcript) -> Summary:
    """Play the story; every step is recorded in `transcript`."""
    t = transcript
    in_sim, smsc = env.in_sim, env.smsc
    exponent = env.settings.node.currency_exponent
    def money(minor: int) -> str:
        return f"{format_minor(minor, exponent)} {env.settings.node.currency}"
    by_name = {n.name: n for n in env.nodes}
    phone_a, phone_b = smsc.handset(A), smsc.handset(B)
    in_sim.set_balance(A, 0)
    in_sim.set_balance(B, 0)

    async def screen(phone: Any, dialled: str, *, dial: bool) -> Entry:
        shown = await (phone.dial(dialled) if dial else phone.reply(dialled))
        return t.add(Entry("screen", phone.msisdn, shown.text, shown.final, dialled))

    async def sms(phone: Any) -> Entry:
        return t.add(Entry("sms", phone.msisdn, await phone.next_sms(SMS_WAIT_S)))

    t.add(Entry("title", text=f"1. Subscriber A dials *123# ({len(env.nodes)} nodes, one ledger)"))
    await screen(phone_a, "*123#", dial=True)
    await screen(phone_a, "1", dial=False)
    serving = smsc.dialog_system_id(A, phone_a._dialog_id)
    assert serving is not None, "the dialog is open on a bind"
    t.add(Entry("note", A, f"the gateway keeps this dialog on {serving}'s bind"))

    t.add(Entry("title", text=f"2. {serving} is killed (SIGKILL) before A confirms"))
    await by_name[serving].kill()
    t.add(Entry("note", A, f"{serving} is gone: no DPR, no unbind"))
    await screen(phone_a, "1", dial=False)
    loans = await _count(env, "SELECT COUNT(*) FROM loans WHERE msisdn = %s", A)
    t.add(Entry("note", A, f"the other node never showed A the confirm screen: it ends the "
                           f"dialog and lends nothing (loans for A: {loans})"))

    survivor = next(n.name for n in env.nodes if n.alive)
    t.add(Entry("title", text=f"3. A dials again and borrows on {survivor}"))
    await screen(phone_a, "*123#", dial=True)
    await screen(phone_a, "1", dial=False)
    await screen(phone_a, "1", dial=False)
    await sms(phone_a)

    t.add(Entry("title", text=f"4. B runs out of credit: the IN's CCR reaches {survivor}"))
    t.add(Entry("note", B, f"balance {money(in_sim.balance(B))}; the IN sends an "
                           "out-of-balance CCR (EVENT), realm-routed"))
    code, granted = await in_sim.send_out_of_balance(B)
    t.add(Entry("diameter", B, f"CCA {code} {RESULT_CODE_NAMES.get(code, '')}"
                               + (f", granted {money(granted)}" if granted else ""),
                result_code=code))
    answered = {key.split(" ", 1)[1]: n for stats in in_sim.stats_summary().values()
                for key, n in stats.items() if key.startswith("oob_answered_by ")}
    t.add(Entry("note", B, "answered by " + ", ".join(f"{h} ({n})" for h, n in answered.items())))
    await sms(phone_b)

    t.add(Entry("title", text=f"5. A recharges: {survivor} recovers the loan"))
    in_sim.spend(A)
    event = await in_sim.recharge(A, 2000)
    t.add(Entry("note", A, f"recharges {money(2000)} (MQTT event {event.event_id})"))
    await sms(phone_a)
    t.add(Entry("note", A, f"IN balance after payback {money(in_sim.balance(A))}"))

    t.add(Entry("title", text="6. Summary"))
    return await _summarise(env)


async def _count(env: ClusterEnv, sql: str, *params: Any) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(env.settings.storage.postgresql_conninfo(),
                                                     autocommit=True) as conn:
        cursor = await conn.execute(sql, params)
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _summarise(env: ClusterEnv) -> Summary:
    """The ledger's figures (read from PostgreSQL) next to what the IN applied."""
    from extrabalance.demo import summarise
    from extrabalance.ledger.factory import open_ledger

    ledger = open_ledger(env.settings.storage, migrate=False)
    try:
        summary = await summarise(_SummaryEnv(SimpleNamespace(ledger=ledger), env))  # type: ignore[arg-type]
    finally:
        await ledger.close()
    return summary


@dataclass
class _SummaryEnv:
    """What `demo.summarise` reads: the ledger, the IN simulator, the broker's name."""

    node: Any
    cluster: ClusterEnv

    @property
    def in_sim(self) -> Any:
        return self.cluster.in_sim

    @property
    def broker_kind(self) -> str:
        return self.cluster.broker_kind

    @property
    def settings(self) -> Settings:  # the tiers: which of them are bundles
        return self.cluster.settings


def run_cluster_demo(*, nodes: int = 2, json_output: bool = False, keep: bool = False) -> int:
    async def story(workdir: Path, transcript: Transcript) -> Summary:
        async with cluster_env(workdir, nodes) as env:
            if not json_output:
                print(f"Extra Balance on {nodes} nodes, one PostgreSQL ledger (schema "
                      f"{env.schema}, dropped at the end; MQTT: {env.broker_kind})")
            return await play_cluster(env, transcript)

    return run_story(story, prefix="extrabalance-demo-cluster-", json_output=json_output,
                     keep=keep)


if __name__ == "__main__":  # a node of the demo: python -m extrabalance.demo_cluster --node FILE
    if len(sys.argv) == 3 and sys.argv[1] == "--node":
        sys.exit(_node_process(sys.argv[2]))
    print("usage: extrabalance demo --nodes N", file=sys.stderr)
    sys.exit(2)
