"""One demo network (broker, IN and SMSC simulators, node) per test module, with an
admin server on a free port and a known token."""

from __future__ import annotations

import pytest_asyncio

from extrabalance.admin import AdminServer
from extrabalance.demo import Transcript, demo_env, play

TOKEN = "test-token-0123456789"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def played(tmp_path_factory):
    """The demo story played once; yields (env, admin server with token, port)."""
    workdir = tmp_path_factory.mktemp("admin-demo")
    async with demo_env(workdir) as env:
        await play(env, Transcript())
        admin = AdminServer(env.node, token=TOKEN, port=0)
        port = await admin.start()
        try:
            yield env, admin, port
        finally:
            await admin.close()
