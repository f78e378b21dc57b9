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

**Acknowledgement -> visible** (``--visibility N``, needs ``--model``): the servers are real
``ecomrec serve`` processes (model, index, segments: ``serve_load.start_servers``) and,
while the load of each point flows, a probe sends N single events of new customers, one
after another; after each acknowledgement it calls GetUserProfile of that customer until
the event is counted: the wait from the acknowledgement to the response that shows it
(p50/p99/max, and how often the first read already did). With ``--backend nats`` a local
3-node JetStream cluster is started and two server replicas follow it: the load and the
probe's TrackEvents go to replica A, the reads alternate between A ("same") and B
("cross": the event reached B through the stream).

    python benchmarks/events_load.py --model RUN --index INDEX --backend nats \
        --concurrency 1,4 --visibility 200 --seconds 8 --out results/events_visibility.json
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


def serve(log_path: str, port_q: Any, stop: Any, extra: dict[str, Any] | None = None) -> None:
    """The server process: the service's servicer with an event log, no model needed."""
    from serving.config import ServeConfig
    from serving.server import start_server
    from serving.service import RecommendServicer

    cfg = ServeConfig(port=0, api_keys=(KEY,), event_log=log_path, metrics_port=-1, **(extra or {}))
    servicer = RecommendServicer(None, cfg=cfg)
    handle = start_server(cfg, servicer)
    port_q.put(handle.port)
    stop.wait()
    handle.stop(1.0)


def client(
    target: str, concurrency: int, batch: int, seconds: float, seed: int, out: Any, key: str = KEY
) -> None:
    import grpc

    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

    channel = grpc.insecure_channel(target)
    stub = pbg.RecommendServiceStub(channel)
    md = (("x-api-key", key),)
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


def _lag_summary(lags: list[float], first: list[bool]) -> dict[str, Any]:
    ms = np.array(lags) * 1e3
    return {
        "n": len(lags),
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "max_ms": float(ms.max()) if len(ms) else None,
        "first_read": float(np.mean(first)) if first else None,
    }


def probe_visibility(
    track: str, readers: dict[str, str], key: str, products: list[str], n: int, out: list[Any]
) -> None:
    """N single events of new customers tracked on ``track``; after each acknowledgement,
    GetUserProfile on one of ``readers`` (in turn) until the event counts: the wait from
    the acknowledgement to the response showing it. Appends a summary per reader to out."""
    import grpc

    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

    md = (("x-api-key", key),)
    chans = {t: grpc.insecure_channel(t) for t in {track, *readers.values()}}
    stubs = {t: pbg.RecommendServiceStub(c) for t, c in chans.items()}
    names = list(readers)
    lags: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, list[bool]] = {name: [] for name in names}
    tag = secrets.token_hex(4)
    try:
        for i in range(n):
            name = names[i % len(names)]
            stub = stubs[readers[name]]
            cust = f"vis-{tag}-{i}"
            req = pb.TrackEventsRequest(
                events=[pb.TrackedEvent(customer_id=cust, product_id=products[i % len(products)])]
            )
            stubs[track].TrackEvents(req, metadata=md, timeout=30)
            t_ack = time.perf_counter()
            reads = 0
            while True:
                reads += 1
                try:
                    prof = stub.GetUserProfile(
                        pb.GetUserProfileRequest(user_id=cust), metadata=md, timeout=10
                    )
                    seen = prof.n_events >= 1
                except grpc.RpcError as e:  # NOT_FOUND: no event of this customer yet
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    seen = False
                if seen or time.perf_counter() - t_ack > 10:
                    break
            lags[name].append(time.perf_counter() - t_ack)
            first[name].append(reads == 1)
            time.sleep(0.01)
    finally:
        for c in chans.values():
            c.close()
    out.append({name: _lag_summary(lags[name], first[name]) for name in names})


def run_point(
    target: str,
    server_pid: int | list[int],
    a: argparse.Namespace,
    concurrency: int,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pids = server_pid if isinstance(server_pid, list) else [server_pid]
    cpu0 = sum(_proc_cpu_s(p) for p in pids)
    t0 = time.monotonic()
    procs = [
        ctx.Process(
            target=client,
            args=(target, concurrency, a.batch, a.seconds, 1000 * concurrency + i, q, a.key),
        )
        for i in range(a.client_procs)
    ]
    for p in procs:
        p.start()
    vis: list[Any] = []
    prober = None
    if probe is not None:  # while the load flows
        prober = threading.Thread(target=probe_visibility, kwargs={**probe, "out": vis})
        time.sleep(min(2.0, a.seconds / 4))  # the load generators are up
        prober.start()
    res = [q.get(timeout=a.seconds + 300) for _ in procs]
    for p in procs:
        p.join()
    if prober is not None:
        prober.join()
    wall = time.monotonic() - t0
    server_cpu = sum(_proc_cpu_s(p) for p in pids) - cpu0
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
        "visibility": vis[0] if vis else None,
    }


def _start_served(
    a: argparse.Namespace, extra: dict[str, Any]
) -> tuple[list[str], str, list[Any], list[str]]:
    """``ecomrec serve`` processes of ``--model`` (one; two replicas on NATS), through the
    same start-up as ``serve_load.py``; returns their targets, the API key, the processes
    and the catalogue's product ids."""
    from benchmarks.serve_load import start_servers
    from intake.loaders import load_dataset

    ds = load_dataset(a.dataset, a.data_dir)
    sets = [f"max_track_events={max(a.batch, 1000)}"]
    for k, v in extra.items():
        sets.append(f"{k}={json.dumps(list(v)) if isinstance(v, tuple) else v}")
    ns = argparse.Namespace(
        model=a.model,
        dataset=a.dataset,
        data_dir=a.data_dir,
        index=a.index,
        catalogue=0,
        index_set=[],
        set=sets,
        workers=8,
        batch_max=16,
        server_procs=1,
        encoder=a.encoder,
        events_rate=1,  # an event log (sqlite: a file in --work)
        api_key=secrets.token_hex(8),  # the same for every replica
    )
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    targets, procs = [], []
    key = ns.api_key
    for tag in ["-a", "-b"] if extra.get("event_backend") == "nats" else ["-a"]:
        target, k, ps, _ = start_servers(ns, ds, work, None, tag)
        targets.append(target)
        procs += ps
        key = k
    return targets, key, procs, list(ds.item_ids.external_ids)


def write_table(res: dict[str, Any], path: Path) -> None:
    lines = [
        f"TrackEvents, batches of {res['batch']}, {res['backend']} log ({res['date']}, "
        f"{res['machine']})",
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
    vis = [r for r in res["runs"] if r.get("visibility")]
    if vis:
        lines += [
            "",
            f"Acknowledgement -> visible in the next GetUserProfile ({res['backend']}; "
            "'cross': tracked on replica A, read on replica B), while the load above flows",
            "",
            "| in flight | reader | probes | p50 ms | p99 ms | max ms | first read saw it |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in vis:
            for name, v in r["visibility"].items():
                lines.append(
                    f"| {r['concurrency']} | {name} | {v['n']} | {v['p50_ms']:.1f} | "
                    f"{v['p99_ms']:.1f} | {v['max_ms']:.1f} | {100 * v['first_read']:.0f} % |"
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
    ap.add_argument(
        "--backend",
        choices=["sqlite", "nats"],
        default="sqlite",
        help="the event log: the embedded SQLite file, or a local 3-node NATS JetStream "
        "cluster started here (serve's event_backend)",
    )
    ap.add_argument(
        "--visibility",
        type=int,
        default=0,
        help="probes per point of acknowledgement -> visible in GetUserProfile (needs --model; "
        "0 = off)",
    )
    ap.add_argument(
        "--model", default=None, help="trained run: serve it with `ecomrec serve` processes"
    )
    ap.add_argument("--dataset", default="beauty", help="the run's dataset (with --model)")
    ap.add_argument("--data-dir", default=None, help="dataset root (default: $ECOMREC_DATA_DIR)")
    ap.add_argument(
        "--index", default=None, help="index directory (with --model; default: built in --work)"
    )
    ap.add_argument(
        "--work", default="artifacts/bench", help="where an index / segments built here go"
    )
    ap.add_argument("--encoder", choices=["inprocess", "onnx"], default="onnx", help="user tower")
    a = ap.parse_args(argv)
    a.key = KEY
    if a.visibility and not a.model:
        ap.error("--visibility needs --model (GetUserProfile needs a served model)")

    work = Path(tempfile.mkdtemp(prefix="events-load-"))
    log_path = a.log or str(work / "events.db")
    cluster = None
    extra: dict[str, Any] = {}
    if a.backend == "nats":
        from intake.nats_local import LocalNatsCluster

        cluster = LocalNatsCluster(work / "nats").start()
        extra = {
            "event_backend": "nats",
            "nats_servers": tuple(cluster.urls),
            "nats_stream": f"LOAD{secrets.token_hex(4).upper()}",
        }
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    server = None
    procs: list[Any] = []
    try:
        if a.model:
            targets, key, procs, products = _start_served(a, extra)
            pids = [p.pid for p in procs]
            readers = {"same": targets[0]}
            if len(targets) > 1:
                readers["cross"] = targets[1]
            probe = None
            if a.visibility:
                probe = {
                    "track": targets[0],
                    "readers": readers,
                    "key": key,
                    "products": products,
                    "n": a.visibility,
                }
            a.key = key
            runs = [
                run_point(targets[0], pids, a, int(c), probe) for c in a.concurrency.split(",") if c
            ]
        else:
            port_q = ctx.Queue()
            server = ctx.Process(target=serve, args=(log_path, port_q, stop, extra))
            server.start()
            port = port_q.get(timeout=120)
            target = f"127.0.0.1:{port}"
            assert server.pid is not None
            runs = [run_point(target, server.pid, a, int(c)) for c in a.concurrency.split(",") if c]
    finally:
        stop.set()
        if server is not None:
            server.join(timeout=30)
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        if cluster is not None:
            cluster.stop()
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores",
        "batch": a.batch,
        "backend": a.backend,
        "servers": "ecomrec serve" if a.model else "servicer without a model",
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
