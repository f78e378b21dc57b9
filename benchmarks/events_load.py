"""Load test of ``TrackEvents``: events/s acknowledged, acknowledgement latency, CPU per event.

Starts the real gRPC server (``serving.server.start_server`` with the service's servicer and
the embedded event log, the code ``ecomrec serve`` runs) in a child process, then drives it
from ``--client-procs`` processes, each with ``--concurrency`` calls in flight (threads on
one channel), batches of ``--batch`` events of random customers and products, for
``--seconds``. Every call carries a batch id (the at-least-once retry key).

CPU milliseconds per 1,000 events are measured for the server process (``/proc``
utime+stime) and the clients (``getrusage``): the headline on a shared machine.

    python benchmarks/events_load.py --batch 50 --concurrency 1,4,8 --seconds 10 \
        --out results/events_load.json

Writes JSON (``runs``: one row per concurrency with events/s, calls/s, p50/p95/p99
acknowledgement ms, errors, cpu_ms_per_1k_events {server, clients}, load average) and a
markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "events-load-key"
_CLK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def serve(log_path: str, port_q: Any, stop: Any) -> None:
    """The server process: the service's servicer with an event log, no model needed."""
    from serving.config import ServeConfig
    from serving.server import start_server
    from serving.service import RecommendServicer

    cfg = ServeConfig(port=0, api_keys=(KEY,), event_log=log_path, metrics_port=-1)
    servicer = RecommendServicer(None, cfg=cfg)
    handle = start_server(cfg, servicer)
    port_q.put(handle.port)
    stop.wait()
    handle.stop(1.0)


def client(target: str, concurrency: int, batch: int, seconds: float, seed: int, out: Any) -> None:
    import grpc
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

    channel = grpc.insecure_channel(target)
    stub = pbg.RecommendServiceStub(channel)
    md = (("x-api-key", KEY),)
    rng = np.random.default_rng(seed)
    now = int(time.time()) - 60
    # requests prepared up front: the measurement is the server's, not protobuf building
    reqs = [
        pb.TrackEventsRequest(
            batch_id=f"{seed}-{i}-{secrets.token_hex(4)}",
            events=[
                pb.TrackedEvent(
                    customer_id=f"cust-{int(c)}",
                    product_id=f"prod-{int(p)}",
                    event_type="view",
                    timestamp=now,
                    quantity=1,
                )
                for c, p in zip(
                    rng.integers(0, 100_000, batch), rng.integers(0, 10_000, batch), strict=True
                )
            ],
        )
        for i in range(4000)
    ]
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = time.monotonic()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    counter = iter(range(10**9))

    def worker() -> None:
        while time.monotonic() - start < seconds:
            req = reqs[next(counter) % len(reqs)]
            t = time.perf_counter()
            try:
                resp = stub.TrackEvents(req, metadata=md, timeout=10)
                ok = resp.accepted == batch or resp.replayed
            except grpc.RpcError:
                ok = False
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out.put({"lat": lat, "errors": errors[0], "cpu": cpu, "wall": time.monotonic() - start})
    channel.close()


def run_point(
    target: str, server_pid: int, a: argparse.Namespace, concurrency: int
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    cpu0 = _proc_cpu_s(server_pid)
    t0 = time.monotonic()
    procs = [
        ctx.Process(
            target=client, args=(target, concurrency, a.batch, a.seconds, 1000 * concurrency + i, q)
        )
        for i in range(a.client_procs)
    ]
    for p in procs:
        p.start()
    res = [q.get(timeout=a.seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    wall = time.monotonic() - t0
    server_cpu = _proc_cpu_s(server_pid) - cpu0
    lat = np.array([x for r in res for x in r["lat"]]) * 1e3
    calls = len(lat)
    events = calls * a.batch
    span = max(r["wall"] for r in res)
    return {
        "concurrency": concurrency * a.client_procs,
        "batch": a.batch,
        "events_per_s": events / span,
        "calls_per_s": calls / span,
        "p50_ms": float(np.percentile(lat, 50)) if calls else None,
        "p95_ms": float(np.percentile(lat, 95)) if calls else None,
        "p99_ms": float(np.percentile(lat, 99)) if calls else None,
        "errors": sum(r["errors"] for r in res),
        "cpu_ms_per_1k_events": {
            # the server process's CPU over the whole point (start-up of clients included)
            "server": 1e6 * server_cpu / max(events, 1),
            "clients": 1e6 * sum(r["cpu"] for r in res) / max(events, 1),
        },
        "wall_s": wall,
        "loadavg": os.getloadavg()[0],
    }


def write_table(res: dict[str, Any], path: Path) -> None:
    lines = [
        f"TrackEvents, batches of {res['batch']}, embedded log ({res['date']}, {res['machine']})",
        "",
        "| in flight | events/s | p50 ms | p99 ms | errors | server CPU ms / 1k events "
        "| client CPU ms / 1k events | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        c = r["cpu_ms_per_1k_events"]
        lines.append(
            f"| {r['concurrency']} | {r['events_per_s']:,.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {c['server']:.1f} | {c['clients']:.1f} | "
            f"{r['loadavg']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--batch", type=int, default=50, help="events per TrackEvents call")
    ap.add_argument(
        "--concurrency", default="1,4,8", help="calls in flight per client process, per point"
    )
    ap.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per point")
    ap.add_argument("--log", default=None, help="event log file (default: a temporary one)")
    ap.add_argument("--out", default="results/events_load.json", help="JSON result path")
    a = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="events-load-"))
    log_path = a.log or str(work / "events.db")
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    stop = ctx.Event()
    server = ctx.Process(target=serve, args=(log_path, port_q, stop))
    server.start()
    try:
        port = port_q.get(timeout=120)
        target = f"127.0.0.1:{port}"
        assert server.pid is not None
        runs = [run_point(target, server.pid, a, int(c)) for c in a.concurrency.split(",") if c]
    finally:
        stop.set()
        server.join(timeout=30)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores",
        "batch": a.batch,
        "runs": runs,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    write_table(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
