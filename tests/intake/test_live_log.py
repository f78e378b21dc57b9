"""The live event log: validation by index and field, durability under kill -9, replay,
group commit, idempotent retries and forgetting a customer."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ecomrec.errors import DataError
from intake.live_log import LiveEvent, SqliteEventLog, validate_batch

NOW = 1_760_000_000

WRITER = r"""
import sys
from intake.live_log import LiveEvent, SqliteEventLog
path, start, retry = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = SqliteEventLog(path)
if retry != "-":  # the batch that was in flight when the last writer died, sent again
    b = int(retry)
    ack = log.append([LiveEvent(f"c{b % 7}", f"b{b}-{i}", "view", 1_700_000_000 + b) for i in range(50)], f"batch-{b}")
    print(f"ack {b} {ack.first_seq} {ack.last_seq}", flush=True)
b = start
while True:
    print(f"send {b}", flush=True)
    ack = log.append([LiveEvent(f"c{b % 7}", f"b{b}-{i}", "view", 1_700_000_000 + b) for i in range(50)], f"batch-{b}")
    print(f"ack {b} {ack.first_seq} {ack.last_seq}", flush=True)
    b += 1
"""


def _event(i: int, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "customer_id": "c1",
        "product_id": f"p{i}",
        "event_type": "view",
        "timestamp": NOW - 10,
    }
    return {**base, **kw}


def test_each_bad_event_is_named_by_index_and_field_and_good_ones_pass() -> None:
    batch = [
        _event(0),
        _event(1, event_type="teleport"),
        _event(2, quantity=0),
        _event(3, timestamp=NOW + 3 * 86400),
        _event(4, customer_id=""),
        _event(5, price=float("nan")),
        _event(6, event_type="add_to_cart", quantity=3, price=2.5, order_id=" 007 "),
        _event(7, colour="red"),
    ]
    good, problems = validate_batch(batch, now=NOW)
    assert [(p.index, p.field) for p in problems] == [
        (1, "event_type"),
        (2, "quantity"),
        (3, "timestamp"),
        (4, "customer_id"),
        (5, "price"),
        (7, "colour"),
    ]
    assert [e.product_id for e in good] == ["p0", "p6"]
    # synonyms map to the contract's types; ids stay exactly as written; quantity defaults to 1
    assert good[0] == LiveEvent("c1", "p0", "view", NOW - 10, 1, None, None, None)
    assert good[1] == LiveEvent("c1", "p6", "cart", NOW - 10, 3, 2.5, " 007 ", None)
    with pytest.raises(DataError, match="at most 1000"):
        validate_batch([_event(0)] * 1001, now=NOW)


def test_append_read_positions_and_idempotent_retry(tmp_path: Path) -> None:
    with SqliteEventLog(tmp_path / "log.db") as log:
        a = log.append([LiveEvent("c1", "p1", "view", NOW), LiveEvent("c2", "p2", "purchase", NOW)])
        b = log.append([LiveEvent("c1", "p3", "cart", NOW)], batch_id="x")
        again = log.append([LiveEvent("c1", "p3", "cart", NOW)], batch_id="x")
        assert (a.first_seq, a.last_seq, b.first_seq, b.last_seq) == (1, 2, 3, 3)
        assert again.replayed and (again.first_seq, again.last_seq) == (3, 3)
        assert log.position() == 3
        assert [s.event.product_id for s in log.read(after=1)] == ["p2", "p3"]
    # reopened: the same events, the retry still recognised
    with SqliteEventLog(tmp_path / "log.db") as log:
        assert [s.seq for s in log.read()] == [1, 2, 3]
        assert log.append([LiveEvent("c1", "p3", "cart", NOW)], batch_id="x").replayed


def test_concurrent_appends_share_commits_and_lose_nothing(tmp_path: Path) -> None:
    seen: list[int] = []
    commits: list[int] = []

    def hook(stored: list) -> None:  # type: ignore[type-arg]
        commits.append(len(stored))
        seen.extend(s.seq for s in stored)

    with SqliteEventLog(tmp_path / "log.db", on_commit=hook) as log:

        def client(k: int) -> None:
            for b in range(20):
                log.append([LiveEvent(f"c{k}", f"p{b}-{i}", "view", NOW) for i in range(50)])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.position() == 8 * 20 * 50
        # the hook saw every acknowledged event once, in log order
        assert seen == list(range(1, 8 * 20 * 50 + 1))
    # group commit: fewer transactions than batches
    assert len(commits) < 8 * 20


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_event_and_tears_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    rng = random.Random(7)
    acked: dict[int, tuple[int, int]] = {}
    start, retry = 0, "-"
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(start), retry],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        # let it write for a random while (at least one acknowledged batch), then kill -9
        deadline = time.monotonic() + 60
        acks_here = 0
        want = rng.randint(1, 6)
        last_sent = start
        while acks_here < want and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            kind, b, *seqs = line.split()
            if kind == "send":
                last_sent = int(b)
            else:
                acked[int(b)] = (int(seqs[0]), int(seqs[1]))
                acks_here += 1
        time.sleep(rng.random() * 0.05)  # kill at a random moment, mid-commit at times
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for line in proc.stdout:  # acknowledgements printed before the kill count too
            kind, b, *seqs = line.split()
            if kind == "send":
                last_sent = int(b)
            else:
                acked[int(b)] = (int(seqs[0]), int(seqs[1]))
        assert acks_here >= 1
        retry = str(last_sent)  # the batch possibly in flight is retried with its id
        start = last_sent + 1

    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT seq, customer_id, product_id FROM events ORDER BY seq").fetchall()
    conn.close()
    by_batch: dict[int, list[tuple[int, str]]] = {}
    for seq, _cust, prod in rows:
        b = prod[1:].split("-")[0]
        by_batch.setdefault(int(b), []).append((seq, prod))
    # every acknowledged batch is there, whole, at its acknowledged positions
    for b, (first, last) in acked.items():
        got = by_batch.get(b)
        assert got is not None, f"acknowledged batch {b} lost"
        assert [s for s, _ in got] == list(range(first, last + 1))
    # no torn batch and no duplicate: each batch has its 50 distinct events exactly once
    for b, got in by_batch.items():
        assert sorted(p for _, p in got) == sorted(f"b{b}-{i}" for i in range(50)), b
    assert len(acked) >= 20


def test_forget_removes_the_customer_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with SqliteEventLog(path) as log:
        log.append([LiveEvent("alice-secret-id", f"p{i}", "view", NOW) for i in range(30)])
        log.append([LiveEvent("bob", "p1", "purchase", NOW)])
        assert log.forget("alice-secret-id") == 30
        assert [s.event.customer_id for s in log.read()] == ["bob"]
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"alice-secret-id" not in blob
