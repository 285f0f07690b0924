import pytest

from tests.service.fakes import Harness


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path / "ledger.db")
    yield harness
    await harness.close()
