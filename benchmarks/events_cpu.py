"""CPU per event of ``TrackEvents`` inside the serving process, by thread: what lands on the
event loop (validation) and what on the log's writer thread (the SQLite insert, the commit,
the ``on_commit`` hook into the live history), for the path the service runs
(``EventIntake.track_async``), and the validation alone both ways, paired in each round:
the loop-side typed checks and the contract's dicts (``validate_batch(raw_events(...))``,
the path before them). No gRPC: ``events_load.py`` measures the whole server.

    python benchmarks/events_cpu.py --batch 50 --calls 400 --rounds 5 --out results/events_cpu.json

Writes JSON (per round and medians: loop-thread and writer-thread CPU microseconds per
event, both validations and their ratio) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _requests(batch: int, calls: int, seed: int) -> list[Any]:
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb

    rng = np.random.default_rng(seed)
    now = int(time.time()) - 60
    return [
        pb.TrackEventsRequest(
            batch_id=f"{seed}-{i}",
            events=[
                pb.TrackedEvent(
                    customer_id=f"cust-{int(c)}",
                    product_id=f"prod-{int(p)}",
                    event_type="view",
                    timestamp=now,
                )
                for c, p in zip(
                    rng.integers(0, 100_000, batch), rng.integers(0, 10_000, batch), strict=True
                )
            ],
        )
        for i in range(calls)
    ]


def measure_service(reqs: list[Any], work: Path) -> dict[str, float]:
    """The service's path (``EventIntake.track_async`` on an event loop, a fresh embedded
    log): CPU per event of the loop thread, and of the rest of the process (the log's
    writer thread: insert, commit, the live-history hook)."""
    from serving.events import EventIntake

    intake = EventIntake.open(work / f"log-{time.monotonic_ns()}.db")

    async def run() -> float:
        t = time.thread_time()
        for r in reqs:
            await intake.track_async(r)
        return time.thread_time() - t

    try:
        p0 = time.process_time()
        loop_s = asyncio.run(run())
        proc_s = time.process_time() - p0
    finally:
        intake.close()
    n = sum(len(r.events) for r in reqs)
    return {"loop_us": 1e6 * loop_s / n, "writer_us": 1e6 * max(proc_s - loop_s, 0.0) / n}


def measure_validation(reqs: list[Any]) -> dict[str, float]:
    """Validation alone, both ways, CPU per event: the loop-side typed checks the service
    runs and the contract's dict path (``validate_batch(raw_events(...))``)."""
    from intake.live_log import validate_batch
    from serving.events import raw_events, validate_request_events

    now = time.time()
    n = sum(len(r.events) for r in reqs)
    t = time.thread_time()
    for r in reqs:
        validate_request_events(r.events, now)
    fast = time.thread_time() - t
    t = time.thread_time()
    for r in reqs:
        validate_batch(raw_events(r, now), now=now)
    contract = time.thread_time() - t
    return {"typed_us": 1e6 * fast / n, "contract_us": 1e6 * contract / n}


def _follow(urls: list[str], stream: str, n: int, out: Any) -> None:
    """A follower process: a live history fed by ``NatsEventLog.follow`` (what a replica
    runs for the other replicas' events), CPU of the whole process per event over ``n``."""
    import threading

    from intake.live_log_nats import NatsEventLog, NatsLogConfig
    from serving.live import LiveHistory

    cfg = NatsLogConfig(servers=tuple(urls), stream=stream, subject_prefix=stream.lower())
    log = NatsEventLog(cfg)
    live = LiveHistory()
    got = [0]
    done = threading.Event()

    def on_events(stored: Any) -> None:
        live.add(stored)
        got[0] += len(stored)
        if got[0] >= n:
            done.set()

    t = time.process_time()
    stop = log.follow(0, on_events)
    done.wait(300)
    out.put(1e6 * (time.process_time() - t) / n)
    stop()
    log.close()


def measure_follower(n: int) -> float:
    """µs of CPU per event of a replica that only follows the NATS stream (3 local nodes;
    ``n`` events appended first, then followed from the start)."""
    import multiprocessing as mp

    from intake.live_log import LiveEvent
    from intake.live_log_nats import NatsEventLog, NatsLogConfig
    from intake.nats_local import LocalNatsCluster

    with LocalNatsCluster(tempfile.mkdtemp(prefix="events-cpu-nats-")) as c:
        cfg = NatsLogConfig(servers=tuple(c.urls), stream="CPU", subject_prefix="cpu")
        with NatsEventLog(cfg) as w:
            for b in range(n // 50):
                w.append(
                    [
                        LiveEvent(f"c{(b * 50 + i) % 5000}", f"p{i}", "view", 1_760_000_000)
                        for i in range(50)
                    ]
                )
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_follow, args=(c.urls, "CPU", n // 50 * 50, q))
        proc.start()
        us = float(q.get(timeout=600))
        proc.join(60)
    return us


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--batch", type=int, default=50, help="events per TrackEvents call")
    ap.add_argument("--calls", type=int, default=400, help="calls per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (medians reported)")
    ap.add_argument("--out", default="results/events_cpu.json", help="JSON result path")
    ap.add_argument(
        "--follow",
        type=int,
        default=0,
        help="also: CPU per event of a replica following the NATS stream, over this many "
        "events (starts 3 local nats-server nodes; 0 = off)",
    )
    a = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="events-cpu-"))
    rows: list[dict[str, Any]] = []
    for rnd in range(a.rounds):
        reqs = _requests(a.batch, a.calls, rnd)
        rows.append(
            {"round": rnd, "service": measure_service(reqs, work), **measure_validation(reqs)}
        )

    def med(f: Any) -> float:
        return float(statistics.median(f(r) for r in rows))

    m = {
        "loop_us": med(lambda r: r["service"]["loop_us"]),
        "writer_us": med(lambda r: r["service"]["writer_us"]),
        "validation_typed_us": med(lambda r: r["typed_us"]),
        "validation_contract_us": med(lambda r: r["contract_us"]),
        "validation_ratio": med(lambda r: r["typed_us"] / r["contract_us"]),
    }
    if a.follow:
        m["nats_follower_us"] = measure_follower(a.follow)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores",
        "loadavg": os.getloadavg()[0],
        "batch": a.batch,
        "rounds": rows,
        "median": m,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    lines = [
        f"TrackEvents CPU per event in the serving process, batches of {a.batch}, medians of "
        f"{a.rounds} rounds ({res['date']}, {res['machine']}, load {res['loadavg']:.1f})",
        "",
        "| what | µs / event |",
        "|---|---:|",
        f"| event-loop thread (validation, hand-off, answer) | {m['loop_us']:.2f} |",
        f"| writer thread (insert, commit, live-history hook) | {m['writer_us']:.2f} |",
        f"| validation: typed proto checks (the service's) | {m['validation_typed_us']:.2f} |",
        f"| validation: contract dicts (before) | {m['validation_contract_us']:.2f} |",
    ]
    if a.follow:
        lines.append(
            f"| a replica following the NATS stream (whole process, {a.follow:,} events) | "
            f"{m['nats_follower_us']:.2f} |"
        )
    lines += [
        "",
        f"validation, typed / contract, median of per-round ratios: {m['validation_ratio']:.2f}",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
