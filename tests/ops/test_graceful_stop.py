"""`extrabalance run --config FILE` as a real process against the bundled simulators:
it becomes ready, SIGHUP reloads, SIGTERM stops it cleanly (exit code 0) with a DPR to
every Diameter peer and the SMPP bind released on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys

import pytest

from extrabalance.config import load_settings
from extrabalance.demo import free_port
from tests.admin.client import call
from tests.ops.support import write_config

STOP_TIMEOUT_S = 30
SECOND_IN_NODE = """[[in_nodes]]
name = "in-b"
origin_host = "in-b.operator.example"
realm = "operator.example"
peers = [{ host = "127.0.0.1", port = 3871 }]
ranges = [{ prefix = "20105" }, { prefix = "20106" }]
"""
READY_TIMEOUT_S = 20
TOKEN = "stop-test-token"
SMPP_PASSWORD = "pw123456"

# The node's protocol layers log through the standard `logging` module, which
# `run_node` does not configure; the child turns it on so the DPR/unbind lines show.
CHILD = (
    "import sys\n"
    "from extrabalance.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@contextlib.asynccontextmanager
async def network(workdir):
    from extrabalance.demo_broker import DemoBroker
    from extrabalance.mosquitto import MosquittoBroker, find_mosquitto
    from simulators.in_node import InNodeSpec, InSimulator, MqttTarget, MsisdnRange, NodePeer
    from simulators.smsc import SmscSimulator

    base = load_settings()
    async with contextlib.AsyncExitStack() as stack:
        if find_mosquitto() is not None:
            broker = MosquittoBroker(workdir / "mosquitto")
            broker.start()
            stack.callback(broker.stop)
            mqtt_port = broker.port
        else:
            demo_broker = DemoBroker()
            mqtt_port = await demo_broker.start()
            stack.push_async_callback(demo_broker.stop)
        diameter_port = free_port()
        in_sim = InSimulator(
            [InNodeSpec(n.name, n.origin_host, n.realm, ranges=tuple(
                MsisdnRange.parse(f"{r.start}-{r.end}" if r.start else f"{r.prefix}*")
                for r in n.ranges)) for n in base.in_nodes],
            NodePeer("127.0.0.1", diameter_port, base.node.origin_host, base.node.origin_realm),
            base.node.currency_numeric, base.node.currency_exponent,
            base.diameter.service_context_id, currency=base.node.currency,
            mqtt=MqttTarget("127.0.0.1", mqtt_port),
        )
        in_ports = await in_sim.start()
        stack.push_async_callback(in_sim.close)
        smsc = SmscSimulator(system_id="extrabalance", password=SMPP_PASSWORD,
                             short_code=base.smpp.short_code)
        smsc_port = await smsc.start()
        stack.push_async_callback(smsc.close)
        admin_port = free_port()
        config = write_config(workdir, replace={
            "listen_port = 3868": f"listen_port = {diameter_port}",
            "port = 3870": f"port = {in_ports['in-a']}",
            "port = 3871": f"port = {in_ports['in-b']}",
            "port = 2775": f"port = {smsc_port}",
            "port = 1883": f"port = {mqtt_port}",
            "listen_port = 8080": f"listen_port = {admin_port}",
        })
        yield config, admin_port, in_sim, smsc


async def wait_ready(port: int) -> dict:
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError):
            reply = await call(port, "GET", "/readyz", token=TOKEN)
            if reply.status == 200:
                return reply.json()
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("node not ready in time")
        await asyncio.sleep(0.1)


async def test_run_sighup_sigterm_stops_cleanly(tmp_path):
    async with network(tmp_path) as (config, admin_port, in_sim, smsc):
        env = {**os.environ, "EB_ADMIN_TOKEN": TOKEN, "EB_SMPP_PASSWORD": SMPP_PASSWORD,
               "PYTHONPATH": os.getcwd()}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, "run", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            ready = await wait_ready(admin_port)
            assert ready["ready"] is True
            await in_sim.wait_connected(10)
            await smsc.wait_bound(10)
            # SIGHUP with a changed file: reloaded, the node keeps running.
            config.write_text(config.read_text().replace("percent_bp = 1000", "percent_bp = 1200", 1))
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert (await call(admin_port, "GET", "/healthz")).status == 200
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT_S)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = output.decode(errors="replace")
        assert proc.returncode == 0, text[-3000:]
        events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        names = [e.get("event") for e in events]
        assert "config_reload_by_signal" in names, text[-3000:]
        reload_event = events[names.index("config_reload_by_signal")]
        assert reload_event["changed"] == ["fee_plans"]
        assert "node_stopped" in names
        assert names.index("admin_api_started") < names.index("node_started")
        # DPR to every Diameter connection (two IN nodes, each both ways). The protocol
        # stacks log through the standard library; the node's logging turns those
        # lines into the same JSON log.
        stdlib = [e["event"] for e in events if e.get("logger", "").startswith("extrabalance.")]
        closed = [line for line in stdlib if "diameter peer closed" in line]
        assert len(closed) >= 2, "\n".join(stdlib[-40:])
        assert all("we disconnected (DPR)" in line for line in closed), "\n".join(closed)
        # The SMPP client logs no line for its unbind; what can be seen is that the
        # SMSC has no bind left (and the stop did not wait for a timeout: exit 0 above).
        assert not smsc.is_bound()
        assert "Traceback" not in text, text[-3000:]


async def test_sigterm_with_no_peers_up_still_exits_0(tmp_path):
    """Nothing listens where the config points: the node starts degraded, not ready,
    and SIGTERM still stops it with exit code 0.

    One IN node only: start-up waits PEERS_READY_WAIT_S per IN node, one after the
    other, and a SIGTERM is only acted on once `Node.start` has returned.
    """
    admin_port = free_port()
    config = write_config(tmp_path, replace={
        "listen_port = 3868": f"listen_port = {free_port()}",
        "port = 3870": f"port = {free_port()}",
        SECOND_IN_NODE: "",
        "port = 2775": f"port = {free_port()}",
        "port = 1883": f"port = {free_port()}",
        "listen_port = 8080": f"listen_port = {admin_port}",
    })
    env = {**os.environ, "EB_ADMIN_TOKEN": TOKEN, "EB_SMPP_PASSWORD": SMPP_PASSWORD,
           "PYTHONPATH": os.getcwd()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extrabalance", "run", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    try:
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError):
                reply = await call(admin_port, "GET", "/readyz", token=TOKEN)
                break
            assert asyncio.get_running_loop().time() < deadline, "admin API never came up"
            await asyncio.sleep(0.1)
        assert reply.status == 503
        checks = reply.json()["checks"]
        assert checks["ledger"]["ok"] is True
        assert checks["diameter"]["ok"] is False and checks["smpp"]["ok"] is False
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert '"node_stopped"' in text and "Traceback" not in text, text[-3000:]


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
