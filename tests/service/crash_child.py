"""Child process for the SIGKILL test: borrows once against an IN whose state is kept
in a JSON file, and hangs at the chosen point so the parent can kill it.

usage: python -m tests.service.crash_child DB IN_STATE MODE   (MODE: before | after)
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from extrabalance.service.ports import InOperation, InOutcome, InResult
from tests.service.fakes import FakeIn, Harness


class RecordedIn(FakeIn):
    """A FakeIn whose memory (answers, credits, balances) survives the node's death."""

    path: Path = Path()

    @classmethod
    def load(cls, path: Path) -> RecordedIn:
        fake = cls()
        fake.path = path
        if path.exists():
            data = json.loads(path.read_text())
            fake.balances = data["balances"]
            fake.credits = data["credits"]
            fake.answers = {
                (s, int(n)): InResult(InOutcome(o), c, a) for s, n, o, c, a in data["answers"]
            }
        return fake

    def save(self) -> None:
        answers = [
            [s, n, r.outcome.value, r.result_code, r.amount_minor]
            for (s, n), r in self.answers.items()
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"balances": self.balances, "credits": self.credits, "answers": answers})
        )
        tmp.replace(self.path)


class HangingIn(RecordedIn):
    mode = "after"

    async def execute(self, op: InOperation) -> InResult:
        if self.mode == "before":
            print("SENDING", flush=True)
            await asyncio.sleep(3600)
        result = await super().execute(op)
        self.save()
        print("APPLIED", flush=True)
        await asyncio.sleep(3600)  # the answer never reaches the ledger
        return result


async def main(db: str, in_state: str, mode: str) -> None:
    fake = HangingIn.load(Path(in_state))
    fake.mode = mode
    h = Harness(Path(db), fake_in=fake)
    await h.add_profile("201001234567")
    print("READY", flush=True)
    await h.lending.borrow("201001234567", 4, "ussd", "ussd:dialog-1:1")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
