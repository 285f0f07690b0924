"""With `diameter.election = true` on both sides (RFC 6733 §5.6.4) the node sends its
requests to an IN over the connection that IN dialled to it when it has none of its
own (here the address the node dials for that IN is dead); with it off (the default)
the node sends only over connections it dialled."""

from __future__ import annotations

import pytest

from extrabalance.config import load_settings
from extrabalance.demo import A, demo_env, free_port
from extrabalance.diameter import gy
from extrabalance.diameter.aio.node import NoPeerAvailable
from extrabalance.mosquitto import find_mosquitto


@pytest.mark.skipif(find_mosquitto() is None, reason="needs Mosquitto (make test installs it)")
@pytest.mark.parametrize("election", [True, False])
async def test_requests_use_the_connection_the_in_dialled_only_with_the_election(
        tmp_path, election, monkeypatch):
    dead = free_port()  # nothing listens there: the node's own dial never succeeds
    # Start-up waits this long for its own dial before it opens its listener: here that
    # dial never succeeds, and what is checked starts after the listener is open.
    monkeypatch.setattr("extrabalance.node.PEERS_READY_WAIT_S", 0.2)
    in_nodes = [{**n.model_dump(exclude_none=True), "peers": [{"host": "127.0.0.1",
                                                                "port": dead}]}
                for n in load_settings().in_nodes]
    overrides = {"diameter": {"election": election}, "in_nodes": in_nodes}
    async with demo_env(tmp_path, overrides=overrides) as env:
        node = env.node
        in_a = env.settings.in_nodes[0]
        request = gy.build_ccr(gy.CreditControlRequest(
            session_id=f"{env.settings.node.origin_host};election;1",
            origin_host=env.settings.node.origin_host,
            origin_realm=env.settings.node.origin_realm,
            destination_realm=in_a.realm, destination_host=in_a.origin_host,
            request_type=4, request_number=0, msisdn=A, requested_action=gy.CHECK_BALANCE,
            requested_minor=1, currency_numeric=818))
        if election:
            await node.diameter.wait_ready(in_a.origin_host, 30)
            answer = gy.parse_cca(await node.diameter.request(in_a.origin_host, request))
            assert answer.result_code == 2001 and answer.origin_host == in_a.origin_host
            [row] = [r for r in node.diameter.peer_states() if r["group"] == in_a.origin_host]
            assert (row["direction"], row["state"]) == ("in", "Open")
        else:
            [row] = [r for r in node.diameter.peer_states() if r["group"] == in_a.origin_host]
            assert row["state"] != "Open"
            with pytest.raises(NoPeerAvailable):
                await node.diameter.request(in_a.origin_host, request)
