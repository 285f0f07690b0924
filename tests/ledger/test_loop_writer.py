"""The writer runs its batches on the event loop: what that must not change (one
transaction per batch, durable before awaited, readers see only committed rows) and
what it must not do (hold the loop for a whole batch, or while another connection
holds the write lock)."""

import asyncio
import os

from extrabalance.ledger import Ledger
from extrabalance.ledger.db import connect
from extrabalance.ledger.writer import GroupCommitWriter


def insert(key, seen=None, ticks=None):
    def fn(conn):
        if seen is not None:
            seen.append(ticks[0])
        conn.execute(
            "INSERT INTO idempotency (key, outcome, created_at) VALUES (?, '{}', 'x')", (key,)
        )
        return key

    return fn


def count(conn):
    return conn.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]


async def ticker(ticks, stop):
    while not stop.is_set():
        ticks[0] += 1
        await asyncio.sleep(0)


async def test_long_batch_gives_the_loop_turns_and_commits_once(tmp_path):
    led = Ledger(tmp_path / "l.db", batch_window_ms=0)
    led.writer.loop_slice_ops = 10
    ticks, seen, stop = [0], [], asyncio.Event()
    tick_task = asyncio.create_task(ticker(ticks, stop))
    try:
        await asyncio.sleep(0)
        keys = await asyncio.gather(*(led.write(insert(f"k{i}", seen, ticks)) for i in range(100)))
        assert keys == [f"k{i}" for i in range(100)]
        assert led.writer.batches_committed == 1  # one transaction, one fsync
        # the ticker ran between slices: later operations saw more ticks
        assert len(set(seen)) >= 10 and seen == sorted(seen)
    finally:
        stop.set()
        await tick_task
        await led.close()


async def test_readers_see_only_committed_rows(tmp_path):
    led = Ledger(tmp_path / "l.db", batch_window_ms=0)
    led.writer.loop_slice_ops = 1
    seen_mid_batch = []

    async def reader():
        await asyncio.sleep(0)  # the writer has run its first operation and yielded
        seen_mid_batch.append(await led.read_point(count))
        seen_mid_batch.append(await led.read(count))

    try:
        await asyncio.gather(led.write(insert("a")), led.write(insert("b")), reader())
        # The read on the loop runs mid-batch: it sees nothing uncommitted. The read in
        # a reader thread may run before or after the COMMIT: all or nothing, never 1.
        assert seen_mid_batch[0] == 0 and seen_mid_batch[1] in (0, 2)
        assert await led.read_point(count) == 2 and await led.read(count) == 2
    finally:
        await led.close()


async def test_write_lock_held_elsewhere_does_not_block_the_loop(tmp_path):
    led = Ledger(tmp_path / "l.db", batch_window_ms=0)
    other = connect(tmp_path / "l.db")
    ticks, stop = [0], asyncio.Event()
    tick_task = asyncio.create_task(ticker(ticks, stop))
    try:
        other.execute("BEGIN IMMEDIATE")  # e.g. a profile import in another process
        write = asyncio.create_task(led.write(insert("late")))
        before = ticks[0]
        await asyncio.sleep(0.05)
        assert not write.done() and ticks[0] > before + 10  # waiting, loop running
        other.execute("COMMIT")
        assert await write == "late"
        assert await led.read(count) == 1
    finally:
        other.close()
        stop.set()
        await tick_task
        await led.close()


async def test_close_commits_what_is_queued(tmp_path):
    led = Ledger(tmp_path / "l.db", batch_window_ms=5)
    tasks = [asyncio.create_task(led.write(insert(f"q{i}"))) for i in range(50)]
    await asyncio.sleep(0)  # every write is queued
    await led.close()
    assert [t.result() for t in tasks] == [f"q{i}" for i in range(50)]
    other = connect(tmp_path / "l.db")
    assert count(other) == 50
    other.close()


def test_one_ledger_across_successive_event_loops(tmp_path):
    """CLI commands and tests run a new event loop per step on one ledger."""
    led = Ledger(tmp_path / "l.db")

    async def step(key):
        return await led.write(insert(key)), await led.read_point(count)

    assert asyncio.run(step("one")) == ("one", 1)
    assert asyncio.run(step("two")) == ("two", 2)
    led.close_sync()


async def test_a_staged_write_answers_before_its_commit_and_then_becomes_durable(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    writer = ledger.writer
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    plain_commit = writer._commit_and_check

    def held_commit(conn):  # the COMMIT waits until the test lets it go
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        plain_commit(conn)

    writer._commit_and_check = held_commit
    value, durable = await ledger.writer.submit_staged(insert("a"))
    assert value == "a" and not durable.done()
    # A later write on the same writer sees it before it is durable; a reader does not.
    later = asyncio.ensure_future(ledger.write(count))
    other = connect(tmp_path / "l.db")
    assert count(other) == 0
    release.set()
    assert await durable == "a"
    assert await later == 1
    assert count(other) == 1
    other.close()
    await ledger.close()


async def test_a_staged_write_lost_with_its_batch_says_so_on_its_durable_future(tmp_path):
    ledger = Ledger(tmp_path / "l.db")

    def failing_commit(conn):
        raise OSError("disk I/O error (injected)")

    ledger.writer._commit_and_check = failing_commit
    value, durable = await ledger.writer.submit_staged(insert("a"))
    assert value == "a"
    try:
        await durable
    except OSError as exc:
        assert "injected" in str(exc)
    else:
        raise AssertionError("the lost batch was reported durable")
    del ledger.writer._commit_and_check
    assert await ledger.read(count) == 0  # rolled back: as if it never ran
    await ledger.close()


async def test_a_staged_write_that_raises_raises_at_once(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    await ledger.write(insert("a"))
    try:
        await ledger.writer.submit_staged(insert("a"))  # duplicate key
    except Exception as exc:  # noqa: BLE001
        assert "UNIQUE" in str(exc)
    else:
        raise AssertionError("a failing staged write returned")
    assert await ledger.write(count) == 1
    await ledger.close()


async def test_a_wal_once_past_the_checkpoint_size_is_cut_back_when_it_starts_over(tmp_path):
    # SQLite writes over a checkpointed WAL instead of shrinking it: unless the writer
    # makes it cut the file back, a WAL that once reached the threshold would wake the
    # checkpointer after every later commit (two more fsyncs each), for good.
    threshold = 256 << 10
    path = tmp_path / "l.db"
    writer = GroupCommitWriter(path, batch_window_ms=0, checkpoint_wal_bytes=threshold)
    blob = "x" * 4000

    def bulk(batch):
        def fn(conn):
            conn.executemany(
                "INSERT INTO idempotency (key, outcome, created_at) VALUES (?, ?, 'x')",
                [(f"bulk-{batch}-{i}", blob) for i in range(32)],
            )
        return fn

    try:
        largest = 0
        for batch in range(8):  # about 1 MiB: four times the threshold
            await writer.submit(bulk(batch))
            # The checkpointer runs beside the writes: on a busy machine it may already
            # have restarted the WAL before the last batch, so the peak is what counts.
            largest = max(largest, os.path.getsize(f"{path}-wal"))
        assert largest >= threshold
        # Commits go on asking for checkpoints until the WAL starts over and is cut.
        for i in range(200):
            await writer.submit(insert(f"a-{i}"))
            if os.path.getsize(f"{path}-wal") < threshold:
                break
            await asyncio.sleep(0.01)
        assert os.path.getsize(f"{path}-wal") < threshold
        before = writer.checkpoints
        assert before >= 1
        for i in range(15):
            await writer.submit(insert(f"b-{i}"))
        await asyncio.sleep(0.2)  # a checkpointer woken by those commits would have run
        assert writer.checkpoints == before  # a small WAL wakes nobody
        assert os.path.getsize(f"{path}-wal") < threshold
    finally:
        await writer.aclose()
