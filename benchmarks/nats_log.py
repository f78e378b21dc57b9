"""The distributed live event log on a local 3-node NATS JetStream cluster: acknowledged
events/s, acknowledgement latency and CPU per event, for the layout NatsEventLog uses (one
message per event) against the alternative (one message per batch), with the embedded
SqliteEventLog on the same machine as the reference.

    python benchmarks/nats_log.py --seconds 5 --clients 1,4 --out results/nats_log.json

Every figure is of acknowledged appends (the JetStream publish ack: 2 of 3 replicas hold the
message). The cluster runs on this machine, so its three servers share the cores with the
client: a lower bound for a real 3-machine cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from intake.live_log import LiveEvent, SqliteEventLog
from intake.live_log_nats import NatsEventLog, NatsLogConfig, encode_event
from intake.nats_local import LocalNatsCluster

log = logging.getLogger("nats_log")
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def _batch(k: int, b: int, size: int) -> list[LiveEvent]:
    return [
        LiveEvent(f"c{(k * 31 + b + i) % 500}", f"p{i}", "view", 1_700_000_000) for i in range(size)
    ]


def _run(
    name: str,
    append: Callable[[list[LiveEvent], str], None],
    clients: int,
    seconds: float,
    size: int,
    server_pids: list[int],
) -> dict[str, object]:
    lat: list[float] = []
    counts = [0] * clients
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        b = 0
        mine: list[float] = []
        while time.monotonic() < stop:
            batch = _batch(k, b, size)
            t = time.perf_counter()
            append(batch, f"{k}-{b}-{uuid.uuid4().hex[:8]}")
            mine.append(time.perf_counter() - t)
            counts[k] += len(batch)
            b += 1
        with lock:
            lat.extend(mine)

    cpu0, srv0, t0 = time.process_time(), _cpu_s(server_pids), time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    events = sum(counts)
    cpu = time.process_time() - cpu0
    srv = _cpu_s(server_pids) - srv0
    row = {
        "layout": name,
        "clients": clients,
        "batch": size,
        "events": events,
        "events_per_s": round(events / wall),
        "ack_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
        "ack_p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2),
        "client_cpu_us_per_event": round(cpu / events * 1e6, 1),
        "server_cpu_us_per_event": round(srv / events * 1e6, 1),
    }
    log.info("%s", row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    ap.add_argument("--clients", default="1,4", help="comma-separated client thread counts")
    ap.add_argument("--batch", type=int, default=50, help="events per append")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("intake").setLevel(logging.WARNING)
    clients = [int(c) for c in args.clients.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, LocalNatsCluster(Path(tmp) / "nats") as cluster:
        pids = [p.pid for p in cluster.procs if p is not None]
        nlog = NatsEventLog(NatsLogConfig(servers=tuple(cluster.urls)))

        def per_event(batch: list[LiveEvent], bid: str) -> None:
            nlog.append(batch, bid)

        batch_log = NatsEventLog(
            NatsLogConfig(servers=tuple(cluster.urls), stream="BENCH_BATCH", subject_prefix="bb")
        )

        async def publish_batch(batch: list[LiveEvent], bid: str) -> None:
            payload = b"[" + b",".join(encode_event(e) for e in batch) + b"]"
            await batch_log._js.publish(
                "bb.batch", payload, stream="BENCH_BATCH", headers={"Nats-Msg-Id": bid}
            )

        def per_batch(batch: list[LiveEvent], bid: str) -> None:
            batch_log._call(publish_batch(batch, bid))

        slog = SqliteEventLog(Path(tmp) / "log.db")

        def sqlite(batch: list[LiveEvent], bid: str) -> None:
            slog.append(batch, bid)

        for c in clients:
            rows.append(
                _run(
                    "nats: message per event (NatsEventLog)",
                    per_event,
                    c,
                    args.seconds,
                    args.batch,
                    pids,
                )
            )
            rows.append(
                _run("nats: message per batch", per_batch, c, args.seconds, args.batch, pids)
            )
            rows.append(
                _run("sqlite (embedded, reference)", sqlite, c, args.seconds, args.batch, [])
            )
        nlog.close()
        batch_log.close()
        slog.close()
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
