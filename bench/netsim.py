"""A simulator worker process for the end-to-end benchmark and the chaos run.

`python -m bench.netsim --role in|smsc --spec JSON` runs one bundled simulator (the IN
simulator with its out-of-balance and recharge traffic, or the SMSC / USSD gateway
simulator with its virtual handsets) in its own process, and takes commands as JSON
lines on stdin, one answer line on stdout each. The simulators' own CLIs have no way
to export what the IN applied or to start traffic on request, hence this wrapper; it
only uses the simulators' public methods.

First line out: `{"ok": true, "role": ..., "ports": ...}` once listening.
Requests: `{"op": NAME, ...}`; answers `{"ok": true, ...}` or `{"ok": false, "error": T}`.
Ops (both roles): traffic_start, progress, traffic_wait, stats, dump, quit;
IN only: wait_connected, disconnect; SMSC only: wait_bound, drop_binds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from extrabalance.clock import SYSTEM_CLOCK
from simulators.in_node import (
    InFaults,
    InNodeSpec,
    InSimulator,
    MqttTarget,
    MsisdnRange,
    NodePeer,
)
from simulators.smsc import SmscSimulator
from simulators.traffic import TrafficConfig, TrafficGenerator, TrafficMix

COMMAND_LINE_MAX = 1024 * 1024  # bytes of one request line


class CountingIn(InSimulator):
    """The IN simulator, also counting what the ledger does not show: usage (spend)
    and which recharge events the broker acknowledged (published for sure)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spent_minor: Counter[str] = Counter()
        self.published_event_ids: list[str] = []
        self.published_at_s: dict[str, float] = {}  # event id -> wall clock of its PUBACK
        self.unconfirmed_event_ids: list[str] = []  # applied on the IN, PUBACK not seen

    def spend(self, msisdn: str, amount_minor: int | None = None) -> int:
        spent = super().spend(msisdn, amount_minor)
        self.spent_minor[msisdn] += spent
        return spent

    async def recharge(self, msisdn: str, amount_minor: int) -> Any:
        event = self.top_up(msisdn, amount_minor)
        try:
            await self.publish_recharge(event)
        except BaseException:
            # The top-up is on the IN's books; whether the broker got the event is unknown.
            self.unconfirmed_event_ids.append(event.event_id)
            raise
        self.published_event_ids.append(event.event_id)
        self.published_at_s[event.event_id] = SYSTEM_CLOCK.time()
        return event


class CountingSmsc(SmscSimulator):
    """The SMSC simulator, also counting USSD dialogs opened and SMS sent per MSISDN
    (a loan per dialog at most: the chaos check compares)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dials: Counter[str] = Counter()
        self.mo_sms: Counter[str] = Counter()

    async def ussd_begin(self, msisdn: str, code: str, *, timeout_s: float = 10.0) -> Any:
        self.dials[msisdn] += 1
        return await super().ussd_begin(msisdn, code, timeout_s=timeout_s)

    async def send_mo_sms(self, msisdn: str, text: str, *, to: str | None = None) -> int:
        self.mo_sms[msisdn] += 1
        return await super().send_mo_sms(msisdn, text, to=to)


class Worker:
    def __init__(self, role: str, spec: dict[str, Any]) -> None:
        self.role = role
        self.spec = spec
        self.in_sim: CountingIn | None = None
        self.smsc: CountingSmsc | None = None
        self.generator: TrafficGenerator | None = None
        self.traffic: asyncio.Task[Any] | None = None
        self.stop_traffic = asyncio.Event()

    async def start(self) -> dict[str, Any]:
        s = self.spec
        if self.role == "in":
            # "node_peers": several Extra Balance nodes (docs/scale-out.md); "node_peer": one.
            peers = [NodePeer(*p) for p in s.get("node_peers") or
                     ([s["node_peer"]] if s.get("node_peer") else [])]
            mqtt = MqttTarget(s["mqtt"][0], int(s["mqtt"][1])) if s.get("mqtt") else None
            self.in_sim = CountingIn(
                [InNodeSpec(n["name"], n["origin_host"], n["realm"],
                            ranges=tuple(MsisdnRange.parse(r) for r in n["ranges"]))
                 for n in s["nodes"]],
                peers or None, int(s["currency_numeric"]), int(s["currency_exponent"]),
                s["service_context_id"], currency=s["currency"], mqtt=mqtt,
                request_timeout_ms=int(s.get("request_timeout_ms", 2000)),
                seed=s.get("seed"),
                advance_confirmation=bool(s.get("advance_confirmation", False)),
                faults=InFaults(
                    drop_share=float(s.get("faults", {}).get("drop_share", 0.0)),
                    result_share={int(code): float(share) for code, share
                                  in s.get("faults", {}).get("result_share", {}).items()},
                ),
            )
            return {"ports": await self.in_sim.start()}
        self.smsc = CountingSmsc(system_id=s["system_id"], password=s["password"],
                                 short_code=s["short_code"], seed=s.get("seed"),
                                 repeat_share=float(s.get("repeat_share", 0.0)),
                                 submit_resp_delay_s=float(s.get("submit_resp_delay_s", 0.0)))
        return {"ports": {"smpp": await self.smsc.start()}}

    # -- ops ------------------------------------------------------------------------------

    async def op_wait_connected(self, timeout_s: float = 30.0,
                                every_node: bool = False) -> dict[str, Any]:
        assert self.in_sim is not None
        await self.in_sim.wait_connected(timeout_s, every_node=every_node)
        return {}

    async def op_wait_bound(self, timeout_s: float = 30.0, binds: int = 1) -> dict[str, Any]:
        """Until `binds` node binds can take a deliver_sm (every node's, with several)."""
        assert self.smsc is not None
        await self.smsc.wait_bound(timeout_s)
        async with asyncio.timeout(timeout_s):
            while len(self.smsc.binds()) < binds:
                await asyncio.sleep(0.02)
        return {}

    async def op_disconnect(self, node: str | None = None) -> dict[str, Any]:
        assert self.in_sim is not None
        return {"closed": await self.in_sim.disconnect(node)}

    async def op_drop_binds(self) -> dict[str, Any]:
        assert self.smsc is not None
        return {"dropped": await self.smsc.drop_binds()}

    async def op_traffic_start(self, msisdns: list[str], mix: dict[str, float],
                               rate_per_s: float | None, duration_s: float,
                               concurrency_max: int = 200, seed: int = 0,
                               recharge_minor: tuple[int, int] = (500, 5000)) -> dict[str, Any]:
        if self.traffic is not None and not self.traffic.done():
            raise RuntimeError("traffic already running")
        config = TrafficConfig(
            msisdns=msisdns, mix=TrafficMix(**mix), rate_per_s=rate_per_s,
            duration_s=duration_s, concurrency_max=concurrency_max, seed=seed,
            recharge_minor=(int(recharge_minor[0]), int(recharge_minor[1])),
        )
        self.generator = TrafficGenerator(config, smsc=self.smsc, in_sim=self.in_sim)
        self.stop_traffic = asyncio.Event()
        self.traffic = asyncio.create_task(self.generator.run(stop=self.stop_traffic))
        return {}

    async def op_progress(self) -> dict[str, Any]:
        if self.generator is None:
            return {"started": 0, "outcomes": {}, "done": True}
        report = self.generator.report
        return {"started": report.operations, "outcomes": dict(report.outcomes),
                "done": self.traffic is None or self.traffic.done()}

    async def op_traffic_wait(self, timeout_s: float = 60.0, stop: bool = False,
                              samples_path: str | None = None) -> dict[str, Any]:
        if self.traffic is None:
            raise RuntimeError("no traffic started")
        if stop:
            self.stop_traffic.set()
        report = await asyncio.wait_for(asyncio.shield(self.traffic), timeout_s)
        if samples_path:
            Path(samples_path).write_text(json.dumps(report.ussd_latency.samples()))
        return {"report": report.as_dict()}

    async def op_stats(self) -> dict[str, Any]:
        if self.in_sim is not None:
            return {"stats": self.in_sim.stats_summary()}
        assert self.smsc is not None
        return {"stats": dict(self.smsc.stats)}

    async def op_dump(self, path: str) -> dict[str, Any]:
        """Write what this simulator knows to `path` (JSON) for the reconciliation."""
        if self.in_sim is not None:
            sim = self.in_sim
            doc: dict[str, Any] = {
                "applied": [
                    [op.node, op.session_id, op.request_number, op.action, op.msisdn,
                     op.amount_minor, op.result_code, op.balance_after_minor]
                    for op in sim.applied()
                ],
                "balances": sim.balances(),
                "initial_balance_minor": 0,
                "spent_minor": dict(sim.spent_minor),
                "published_event_ids": sim.published_event_ids,
                "published_at_s": sim.published_at_s,
                "unconfirmed_event_ids": sim.unconfirmed_event_ids,
                "stats": sim.stats_summary(),
                "duplicate_mismatch": sum(b.stats["duplicate_mismatch"]
                                          for b in sim.accounts.values()),
                "nonstandard": sim.nonstandard(),
            }
        else:
            assert self.smsc is not None
            doc = {"dials": dict(self.smsc.dials), "mo_sms": dict(self.smsc.mo_sms),
                   "stats": dict(self.smsc.stats)}
        Path(path).write_text(json.dumps(doc))
        return {"path": path}

    async def close(self) -> None:
        self.stop_traffic.set()
        if self.traffic is not None:
            self.traffic.cancel()
            with contextlib.suppress(BaseException):
                await self.traffic
        if self.in_sim is not None:
            await self.in_sim.close()
        if self.smsc is not None:
            await self.smsc.close()


async def serve(role: str, spec: dict[str, Any]) -> int:
    worker = Worker(role, spec)
    out = sys.stdout

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        ready = await worker.start()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, then exit
        send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 2
    send({"ok": True, "role": role, **ready})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=COMMAND_LINE_MAX)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            try:
                request = json.loads(line)
                op = request.pop("op")
            except (ValueError, KeyError, AttributeError) as exc:
                send({"ok": False, "error": f"bad request: {exc}"})
                continue
            if op == "quit":
                send({"ok": True})
                break
            handler = getattr(worker, f"op_{op}", None)
            if handler is None:
                send({"ok": False, "error": f"unknown op {op!r}"})
                continue
            try:
                send({"ok": True, **(await handler(**request))})
            except Exception as exc:  # noqa: BLE001 - one request fails, the worker goes on
                send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        await worker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.netsim")
    parser.add_argument("--role", choices=["in", "smsc"], required=True)
    parser.add_argument("--spec", required=True, help="JSON object (see bench/e2e.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    return asyncio.run(serve(args.role, json.loads(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
