"""`h`: the services over each ledger in turn (SQLite, in memory, PostgreSQL), with the
same assertions; `h_sqlite`: over SQLite only, for the cases about the SQLite ledger's
own machinery (the group-commit writer, a killed process)."""

import pytest

from tests.service.fakes import BACKENDS, Harness


@pytest.fixture(params=BACKENDS)
async def h(request, tmp_path):
    harness = Harness(tmp_path / "ledger.db", backend=request.param)
    yield harness
    await harness.close()


@pytest.fixture
async def h_sqlite(tmp_path):
    harness = Harness(tmp_path / "ledger.db")
    yield harness
    await harness.close()
