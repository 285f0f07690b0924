"""Issue 16: at start-up the resolver runs in the background; the listeners do not
wait for it. (It used to settle the last run's pending operations one after another
before the Diameter listener opened: 20 loans against a slow IN kept the node deaf to
out-of-balance requests for 50 s.)"""

from __future__ import annotations

import asyncio

import pytest

from extrabalance.demo import demo_env
from extrabalance.mosquitto import find_mosquitto
from extrabalance.node import Node


@pytest.mark.skipif(find_mosquitto() is None, reason="needs Mosquitto (make test installs it)")
async def test_the_node_serves_while_its_start_up_resolution_is_still_running(tmp_path):
    async with demo_env(tmp_path) as env:
        await env.node.stop()
        node = Node(env.settings)
        resolving = asyncio.Event()
        never = asyncio.Event()

        async def slow_resolution() -> None:  # an IN that takes forever to answer
            resolving.set()
            await never.wait()

        node.resolver.run_once = slow_resolution  # type: ignore[method-assign]
        try:
            # Generous bound, not a timing margin: before, start() never returned.
            await asyncio.wait_for(node.start(), 60)
            await asyncio.wait_for(resolving.wait(), 60)
            assert node.ports.diameter
            await env.in_sim.wait_connected(30)
            result, _granted = await env.in_sim.send_out_of_balance("201000000001")
            assert result in (2001, 4012, 5030)  # answered by the lending service
            assert not never.is_set()  # the resolution is still running
        finally:
            never.set()
            await node.stop()
