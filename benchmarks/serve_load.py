"""Load test of the gRPC Recommend service with a load generator cheaper than the server.

Starts what it needs unless ``--target`` is given: trains the quick tower config (unless
``--model``), builds the embedded index, fits segments, optionally exports the tower and
starts a real Triton server (``--encoder triton``), starts ``ecomrec serve`` in one or
more subprocesses (``--server-procs``: SO_REUSEPORT on one port), then drives it from
real users (80% by user id, 20% with their newest item as a session event).

The load generator runs in its own processes (``--client-procs``): requests are
serialised once up front and sent as bytes on a raw ``unary_unary`` channel (no protobuf
work per call), completions arrive as gRPC future callbacks.  Two modes:

* closed loop: ``--concurrency 1,8`` requests in flight, each answer sends the next;
* open loop: ``--offered 100,200,...`` requests/s with Poisson arrivals; latency counts
  from the *scheduled* send time, so a server that falls behind shows it (no coordinated
  omission).  ``--offered auto`` steps up until the server saturates.

CPU milliseconds per request are measured separately for the server processes (``/proc``
utime+stime) and the load generator (``getrusage`` in each client process) over the
measured window: the headline, since it does not depend on other jobs on the machine.
The load average is recorded beside every row.

``--catalogue N`` serves a larger shop than the dataset: the index it builds holds the
dataset's items plus synthetic index-only items up to N (``synthetic_catalogue``), which
the server knows only from their index payloads (HNSW above ``exact_max_items``).

    python benchmarks/serve_load.py --dataset beauty --encoder onnx \
        --concurrency 1,8 --offered auto --seconds 20 --out results/serve_load_onnx.json

Writes JSON (``runs``: one row per point with rps, p50/p95/p99, errors,
cpu_ms_per_request {server, loadgen}, stages, load average; the top level repeats the
concurrency-8 closed-loop row), a markdown table and a latency-vs-offered-load PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("serve_load")

METHOD = "/ecomrec.v1.RecommendService/Recommend"
#: ``--method``: which call the load drives (the requests come from ``make_requests``).
METHODS = {
    "recommend": METHOD,
    "complete-basket": "/ecomrec.v1.RecommendService/CompleteBasket",
    "search": "/ecomrec.v1.RecommendService/SearchProducts",
}
_CLK = os.sysconf("SC_CLK_TCK")


def _pct(x: np.ndarray | list[float], q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


# -- CPU accounting -------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for c in f.read().split():
                    out += _descendants(int(c))
    except OSError:
        pass
    return out


def proc_cpu_s(pids: list[int]) -> float:
    """utime + stime of ``pids`` and their descendants, seconds (from /proc)."""
    total = 0
    for root in pids:
        for p in _descendants(root):
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
            except OSError:
                pass
    return total / _CLK


def _self_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_idle(pids: list[int], timeout_s: float = 180.0, busy: float = 0.05) -> float:
    """Wait until the server processes use < ``busy`` of a core over a second (start-up
    work such as FindAudience's user vectors is done); returns the seconds waited."""
    t0 = time.monotonic()
    last = proc_cpu_s(pids)
    while time.monotonic() - t0 < timeout_s:
        time.sleep(1.0)
        now = proc_cpu_s(pids)
        if now - last < busy:
            break
        last = now
    return time.monotonic() - t0


# -- the load generator (runs in its own processes) -----------------------------------------
def client_worker(
    target: str,
    key: str,
    payloads: list[bytes],
    mode: str,
    amount: float,
    t_measure: float,
    t_end: float,
    seed: int,
    out: Any,
    channels: int = 1,
    method: str = METHOD,
) -> None:
    """Closed loop (``amount`` = in-flight requests) or open loop (``amount`` = req/s).

    ``t_measure``/``t_end`` are ``time.monotonic()`` values (system-wide on Linux).  Puts
    one dict on ``out``: latencies of requests *sent* in the window, error codes, stage
    trailers, and this process's CPU seconds over the window.

    ``channels``: TCP connections of this process (own subchannel pools; closed loop: each
    in-flight chain keeps one connection, as a client would, so at most ``amount`` are
    used; open loop: round-robin): with several server processes on one port (SO_REUSEPORT) the kernel
    assigns each *connection* to a process, so one connection per generator process can
    leave a server process idle while another takes all the load.
    """
    import grpc

    n_chan = max(1, min(channels, int(amount)) if mode == "closed" else channels)
    chans = [
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n_chan)
    ]
    # bytes in, bytes out: no protobuf work per request
    calls = [ch.unary_unary(method) for ch in chans]
    n_calls = len(calls)
    md = (("x-api-key", key),)
    n_pay = len(payloads)
    lock = threading.Lock()
    lat: list[float] = []
    trailers: list[str] = []
    errors: dict[str, int] = {}
    done_in_window = [0]
    lags: list[float] = []  # open loop: actual send time - scheduled time (client lag)
    state = {"i": seed * 7919, "inflight": 0}
    finished = threading.Event()

    def record(fut: Any, t_sched: float) -> None:
        t1 = time.monotonic()
        code = fut.code()
        with lock:
            state["inflight"] -= 1
            if t_measure <= t_sched < t_end:
                if code == grpc.StatusCode.OK:
                    lat.append(t1 - t_sched)
                    for k, v in fut.trailing_metadata() or ():
                        if k == "ecomrec-stages":
                            trailers.append(v)
                else:
                    errors[code.name] = errors.get(code.name, 0) + 1
            if t_measure <= t1 < t_end and code == grpc.StatusCode.OK:
                done_in_window[0] += 1

    def send(t_sched: float, then: Any, slot: int | None = None) -> None:
        with lock:
            i = state["i"]
            state["i"] = i + 1
            state["inflight"] += 1
        call = calls[(i if slot is None else slot) % n_calls]
        fut = call.future(payloads[i % n_pay], metadata=md, timeout=2.0)
        fut.add_done_callback(lambda f: then(f, t_sched))

    # warm the channels (connection set-up is not part of the measurement)
    for call in calls:
        with contextlib.suppress(grpc.RpcError):
            call(payloads[0], metadata=md, timeout=10.0)
    cpu0 = cpu1 = 0.0
    if mode == "closed":

        def chain(slot: int) -> Any:
            def again(fut: Any, t_sched: float) -> None:
                record(fut, t_sched)
                now = time.monotonic()
                if now < t_end:
                    send(now, again, slot)  # this chain's own connection
                else:
                    with lock:
                        if state["inflight"] == 0:
                            finished.set()

            return again

        for slot in range(int(amount)):
            send(time.monotonic(), chain(slot), slot)
        time.sleep(max(t_measure - time.monotonic(), 0))
        cpu0 = _self_cpu_s()
        time.sleep(max(t_end - time.monotonic(), 0))
        cpu1 = _self_cpu_s()
        finished.wait(5.0)
    else:
        rng = np.random.default_rng(seed)
        t = time.monotonic()
        measuring = False
        while t < t_end:
            t += float(rng.exponential(1.0 / amount))  # Poisson arrivals
            now = time.monotonic()
            if not measuring and now >= t_measure:
                cpu0, measuring = _self_cpu_s(), True
            if t > now:
                time.sleep(t - now)
            if t >= t_measure:
                lags.append(time.monotonic() - t)
            send(t, record)
        cpu1 = _self_cpu_s()
        end = time.monotonic() + 5.0
        while state["inflight"] > 0 and time.monotonic() < end:
            time.sleep(0.01)
    for ch in chans:
        ch.close()
    out.put(
        {
            "lat": lat,
            "errors": errors,
            "trailers": trailers,
            "cpu_s": cpu1 - cpu0,
            "done_in_window": done_in_window[0],
            "lags": lags,
        }
    )


def events_sender(
    target: str,
    key: str,
    customers: list[str],
    products: list[str],
    rate: float,
    batch: int,
    stop: Any,
    out: Any,
) -> None:
    """Send TrackEvents at ``rate`` events/s (batches of ``batch``) until ``stop`` is set;
    puts (events acknowledged, calls failed) on ``out``."""
    import grpc

    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

    rng = np.random.default_rng(0)
    channel = grpc.insecure_channel(target)
    stub = pbg.RecommendServiceStub(channel)
    md = (("x-api-key", key),)
    sent = failed = 0
    t0 = time.monotonic()
    k = 0
    while not stop.is_set():
        due = t0 + k * batch / rate
        wait = due - time.monotonic()
        if wait > 0:
            stop.wait(wait)
            continue
        now = int(time.time())
        req = pb.TrackEventsRequest(
            events=[
                pb.TrackedEvent(
                    customer_id=customers[int(c)],
                    product_id=products[int(i)],
                    event_type="view",
                    timestamp=now,
                )
                for c, i in zip(
                    rng.integers(0, len(customers), batch),
                    rng.integers(0, len(products), batch),
                    strict=True,
                )
            ]
        )
        try:
            sent += stub.TrackEvents(req, metadata=md, timeout=10).accepted
        except grpc.RpcError:
            failed += 1
        k += 1
    channel.close()
    out.put((sent, failed))


def run_point(
    target: str,
    key: str,
    payloads: list[bytes],
    mode: str,
    amount: float,
    seconds: float,
    warmup_s: float,
    client_procs: int,
    server_pids: list[int],
    channels: int = 1,
    method: str = METHOD,
) -> dict[str, Any]:
    """One measured point: ``client_procs`` generator processes, server CPU from /proc."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = max(1, min(client_procs, int(amount)) if mode == "closed" else client_procs)
    shares = (
        [int(amount) // procs + (1 if j < int(amount) % procs else 0) for j in range(procs)]
        if mode == "closed"
        else [amount / procs] * procs
    )
    start = time.monotonic() + 1.5  # process start-up (spawn + import grpc) before the clock
    t_measure, t_end = start + warmup_s, start + warmup_s + seconds
    workers = [
        ctx.Process(
            target=client_worker,
            args=(
                target,
                key,
                payloads,
                mode,
                shares[j],
                t_measure,
                t_end,
                j + 1,
                q,
                channels,
                method,
            ),
            daemon=True,
        )
        for j in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(max(t_measure - time.monotonic(), 0))
    each0 = [proc_cpu_s([p]) for p in server_pids]
    s0 = sum(each0)
    load0 = os.getloadavg()[0]
    time.sleep(max(t_end - time.monotonic(), 0))
    each1 = [proc_cpu_s([p]) for p in server_pids]
    s1 = sum(each1)
    load1 = os.getloadavg()[0]
    res = [q.get(timeout=seconds + warmup_s + 60) for _ in workers]
    for w in workers:
        w.join(10)
    lat = np.concatenate([np.asarray(r["lat"], np.float64) for r in res]) * 1e3  # ms
    errors: dict[str, int] = {}
    for r in res:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    stages: dict[str, list[float]] = {}
    for r in res:
        for v in r["trailers"]:
            for kv in v.split(","):
                name, _, ms = kv.partition("=")
                stages.setdefault(name, []).append(float(ms))
    done = sum(r["done_in_window"] for r in res)
    client_cpu = sum(r["cpu_s"] for r in res)
    lags = np.concatenate([np.asarray(r["lags"], np.float64) for r in res]) * 1e3  # ms
    n_err = sum(errors.values())
    row: dict[str, Any] = {
        "mode": mode,
        "concurrency": int(amount) if mode == "closed" else None,
        "offered_rps": float(amount) if mode == "open" else None,
        "seconds": seconds,
        "requests": len(lat) + n_err,
        "errors": n_err,
        "error_codes": errors,
        "rps": done / seconds,
        "p50_ms": _pct(lat, 50),
        "p95_ms": _pct(lat, 95),
        "p99_ms": _pct(lat, 99),
        "mean_ms": float(lat.mean()) if len(lat) else float("nan"),
        "cpu_ms_per_request": {
            "server": (s1 - s0) * 1e3 / max(done, 1),
            "loadgen": client_cpu * 1e3 / max(done, 1),
        },
        # the generator's work per request is fixed (bytes out, a callback in): server CPU
        # in generator-CPU units cancels the machine's speed of the moment (the same code
        # measured 0.33-0.68 ms/request on this box within an hour)
        "server_cpu_per_loadgen_cpu": (s1 - s0) / client_cpu if client_cpu > 0 else None,
        "server_cpu_cores": (s1 - s0) / seconds,
        # per server process: shows an unbalanced SO_REUSEPORT spread
        "server_cpu_cores_each": [round((b - a) / seconds, 3) for a, b in zip(each0, each1)],
        "channels_per_client": channels,
        "loadgen_cpu_cores": client_cpu / seconds,
        "client_procs": procs,
        # open loop: how late the generator sent (included in the latencies: a busy machine
        # delays the sender too, so read p99 next to this)
        "send_lag_p50_ms": _pct(lags, 50) if len(lags) else None,
        "send_lag_p99_ms": _pct(lags, 99) if len(lags) else None,
        "load_avg": [round(load0, 2), round(load1, 2)],
        "stages": {
            k: {"p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99), "mean_ms": float(np.mean(v))}
            for k, v in sorted(stages.items())
        },
    }
    log.info(
        "%s %s: %.0f req/s p50 %.2f p99 %.2f ms errors %d | cpu ms/req server %.2f loadgen %.2f"
        " | load %.1f",
        mode,
        amount,
        row["rps"],
        row["p50_ms"],
        row["p99_ms"],
        n_err,
        row["cpu_ms_per_request"]["server"],
        row["cpu_ms_per_request"]["loadgen"],
        load1,
    )
    return row


# -- requests and server set-up ---------------------------------------------------------------
def make_basket_requests(ds: Any, n: int, seed: int) -> list[Any]:
    """CompleteBasket requests: a real user's newest 1-4 items as the basket, every second
    request with the user id (personalised)."""
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from towers.sequences import Interactions

    inter = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))
    users = np.flatnonzero(inter.lengths() >= 2)
    rng = np.random.default_rng(seed)
    out = []
    for j, u in enumerate(rng.choice(users, size=min(n, len(users)), replace=False)):
        seq = inter.seq(int(u))
        take = seq[-int(rng.integers(1, 5)) :]
        items = [ds.item_ids.to_external(int(i)) for i in dict.fromkeys(take.tolist())]
        user = ds.users.to_external(int(u)) if j % 2 else ""
        out.append(pb.CompleteBasketRequest(item_ids=items, user_id=user, k=10))
    return out


def make_search_requests(ds: Any, n: int, seed: int) -> list[Any]:
    """SearchProducts requests: 1-3 words of a random catalogue title (with its brand for
    every third), every second request with a real user id (personalised)."""
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb

    rng = np.random.default_rng(seed)
    titles = ds.items["title"].to_list()
    brands = ds.items["brand"].to_list() if "brand" in ds.items.columns else [None] * len(titles)
    rows = [i for i, t in enumerate(titles) if t and len(t.split()) >= 2]
    n_users = len(ds.users)
    out = []
    for j in range(n):
        r = rows[int(rng.integers(len(rows)))]
        words = titles[r].split()
        pick = sorted(
            rng.choice(len(words), size=min(len(words), int(rng.integers(1, 4))), replace=False)
        )
        q = " ".join(words[i] for i in pick)
        if j % 3 == 0 and brands[r]:
            q = f"{brands[r]} {q}"
        user = ds.users.to_external(int(rng.integers(1, n_users + 1))) if j % 2 else ""
        out.append(pb.SearchProductsRequest(query=q[:200], user_id=user, k=10))
    return out


def make_requests(ds: Any, n: int, seed: int) -> list[Any]:
    """Recommend requests of ``n`` real users (every 5th with its newest item as a session event)."""
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from towers.sequences import Interactions

    inter = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))
    lens = inter.lengths()
    users = np.flatnonzero(lens >= 3)
    rng = np.random.default_rng(seed)
    pick = rng.choice(users, size=min(n, len(users)), replace=False)
    out = []
    for j, u in enumerate(pick):
        ext = ds.users.to_external(int(u))
        if j % 5 == 4:
            last = int(inter.seq(int(u))[-1])
            ts = int(inter.seq_ts(int(u))[-1])
            ev = pb.Event(item_id=ds.item_ids.to_external(last), event_type="view", ts=ts)
            out.append(pb.RecommendRequest(user_id=ext, k=10, recent_events=[ev]))
        else:
            out.append(pb.RecommendRequest(user_id=ext, k=10))
    return out


def _wait_health(target: str, timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"server exited with {p.returncode}")
            try:
                if (
                    h.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"server on {target} not SERVING after {timeout_s} s")


def fit_segments_table(parts: Any, k: int = 6) -> Any:
    """RFM segments (segments.rfm) and k-means behavioural segments over user-tower vectors."""
    import polars as pl

    from segments.behaviour import SegmentConfig, fit_segments
    from segments.rfm import rfm_table
    from serving.assemble import all_user_vectors
    from serving.encoders import TowerEncoder
    from serving.segments import TableSegmentLookup

    ds = parts.dataset
    cutoff = int(ds.events["ts"].max()) + 1
    rfm, _ = rfm_table(ds.events, cutoff, ds.items)
    users, vecs = all_user_vectors(
        TowerEncoder(parts.model.model, parts.model.max_len), parts.history, parts.model.max_len
    )
    seg = fit_segments(vecs.astype(np.float64), SegmentConfig(k=k, n_init=2))
    names = [f"B{int(x)}" for x in seg.assign(vecs.astype(np.float64))]
    beh = pl.DataFrame({"user_id": users.astype(np.int64), "behavioural_segment": names})
    table = beh.join(rfm.with_columns(pl.col("user_id").cast(pl.Int64)), on="user_id", how="left")
    return TableSegmentLookup(table)


def synthetic_catalogue(
    real_ids: np.ndarray,
    real_vecs: np.ndarray,
    real_payloads: list[dict[str, Any]],
    n_total: int,
    seed: int = 0,
    noise: float = 0.7,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The real items plus ``n_total - len(real)`` synthetic ones: ids after the real ones,
    each a real item's vector (tiled in turn) plus Gaussian noise of norm ~``noise``,
    re-normalised (cosine ~0.82 to its source: variants, not near-copies, which crowd HNSW:
    at noise 0.35, 1M items, recall@10 was 0.87 at ef 128), with the source's category and
    brand, its price times a log-normal factor, in stock with probability 0.9, no
    popularity and an external id ``SYN<id>``.  The serving catalogue (the dataset) does not know them.

    Returns ``(ids (N,), vectors (N, D) float32, payloads)``, the real items first.
    """
    n_real, dim = real_vecs.shape
    n_syn = max(n_total - n_real, 0)
    rng = np.random.default_rng(seed)
    base = np.arange(n_syn) % n_real  # (S,) source row of each synthetic item
    ids = np.concatenate([real_ids, int(real_ids.max()) + 1 + np.arange(n_syn)]).astype(np.int64)
    unit = real_vecs / np.linalg.norm(real_vecs, axis=1, keepdims=True)  # (R, D)
    syn = unit[base] + rng.normal(0.0, noise / np.sqrt(dim), (n_syn, dim)).astype(np.float32)
    syn /= np.linalg.norm(syn, axis=1, keepdims=True)  # (S, D)
    vecs = np.concatenate([real_vecs.astype(np.float32), syn.astype(np.float32)])  # (N, D)
    factor = np.exp(rng.normal(0.0, 0.2, n_syn))  # (S,)
    stock = rng.random(n_syn) < 0.9  # (S,)
    payloads = list(real_payloads)
    for j in range(n_syn):
        src = real_payloads[base[j]]
        price = src.get("price")
        payloads.append(
            {
                **src,
                "external_id": f"SYN{ids[n_real + j]}",
                "price": None if price is None else round(float(price) * float(factor[j]), 2),
                "in_stock": int(stock[j]),
                "popularity": 0,
            }
        )
    return ids, vecs, payloads


def build_catalogue_index(
    parts: Any, location: Path, n_total: int, index_sets: dict[str, str], seed: int = 0
) -> str:
    """A verified index version of the dataset's items plus synthetic ones up to ``n_total``
    (:func:`synthetic_catalogue`), through ``indexing.build.build_version`` (HNSW built,
    recall verified with real user vectors, alias moved); returns the version."""
    from indexing.base import IndexConfig
    from indexing.build import build_version, item_payloads, open_store, user_query_vectors

    m = parts.model
    items = parts.dataset.items
    real = np.concatenate(
        [m.embed_items(items[a : a + 4096]) for a in range(0, items.height, 4096)]
    )  # (R, D)
    real_ids, real_payloads = item_payloads(
        items, m.model_version, parts.history.inter.item_counts()
    )
    ids, vecs, payloads = synthetic_catalogue(real_ids, real, real_payloads, n_total, seed)
    queries, _, _ = user_query_vectors(m, parts.dataset, 500, seed)  # (Q, D) real users
    kw: dict[str, Any] = {k: json.loads(_toml_value(v)) for k, v in index_sets.items()}
    store = open_store(IndexConfig(location=str(location), **kw))
    t0 = time.perf_counter()
    try:
        man = build_version(
            store, ids, vecs, payloads,
            model_version=m.model_version, config_hash=m.config_hash, queries=queries,
            progress=True,
        )  # fmt: skip
    finally:
        store.close()
    log.info(
        "catalogue index %s: %d items (%d synthetic) in %.0f s, recall@%d %.4f",
        location,
        len(ids),
        len(ids) - len(real_ids),
        time.perf_counter() - t0,
        man.verify.get("k", 0),
        man.verify.get("recall", float("nan")),
    )
    return man.version


def _toml_value(v: str) -> str:
    if v.startswith("["):  # a TOML array as written, e.g. nats_servers=["nats://a:4222"]
        return v
    try:
        float(v)
        return v
    except ValueError:
        return v if v in ("true", "false") else json.dumps(v)


def start_servers(
    a: argparse.Namespace, ds: Any, work: Path, code: str | None = None, tag: str = ""
) -> tuple[str, str, list[subprocess.Popen[bytes]], Any]:
    """Build what is missing and start ``--server-procs`` ``ecomrec serve`` processes
    (from checkout ``code`` when given; ``tag`` names their log files)."""
    import socket

    from ecomrec.demo import build_item_index, train_quick
    from serving.assemble import load_parts

    run_dir = (
        Path(a.model)
        if a.model
        else train_quick(a.dataset, work / f"run-{ds.name}", data_dir=a.data_dir)
    ).resolve()
    default_index = f"index-{ds.name}" + (f"-{a.catalogue}" if a.catalogue else "")
    index_dir = (Path(a.index) if a.index else work / default_index).resolve()
    parts = None
    if not (index_dir / "aliases").exists():
        parts = load_parts(run_dir, ds)
        if a.catalogue:
            build_catalogue_index(
                parts, index_dir, a.catalogue, dict(kv.split("=", 1) for kv in a.index_set)
            )
        else:
            build_item_index(parts, index_dir)
    seg_path = (work / f"segments-{ds.name}.parquet").resolve()
    if not seg_path.exists():
        parts = parts or load_parts(run_dir, ds)
        fit_segments_table(parts).save(seg_path)
    del parts
    sets = dict(kv.split("=", 1) for kv in a.set)
    sets.setdefault("workers", str(a.workers))
    sets.setdefault("batch_max", str(a.batch_max))
    sets.setdefault("rerank_policies", str(ROOT / "ecomrec/configs/serving/rerank.toml"))
    if a.server_procs > 1:
        sets["reuse_port"] = "true"
    if getattr(a, "events_rate", 0):
        log_file = (work / f"serve_load.events{tag}.{os.getpid()}.db").resolve()
        sets.setdefault("event_log", str(log_file))
    port_cfg = (work / f"serve_load.{os.getpid()}{tag}.toml").resolve()
    port_cfg.write_text(
        "[serve]\nport = 0\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in sets.items())
    )
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    key = getattr(a, "api_key", None) or secrets.token_hex(8)  # several sets: one key
    cmd = [
        sys.executable,
        "-m",
        "ecomrec",
        "serve",
        "--model",
        str(run_dir),
        "--dataset",
        a.dataset,
        "--index",
        str(index_dir),
        "--segments",
        str(seg_path),
        "--config",
        str(port_cfg),
        "--port",
        str(port),
        "--encoder",
        a.encoder,
    ]
    if a.data_dir:
        cmd += ["--data-dir", a.data_dir]
    triton = None
    if a.encoder == "triton":
        from serving.triton import TritonProcess, export_triton

        repo = work / f"triton-{ds.name}"
        export_triton(run_dir, repo)
        triton = TritonProcess(repo).start()
        cmd += ["--triton-url", triton.url]
    env = dict(os.environ, ECOMREC_API_KEYS=key, OMP_NUM_THREADS="1")
    cwd = ROOT
    if code:  # A/B: serve another checkout's code (e.g. main) under the same load
        cwd = Path(code).resolve()  # `python -m` puts the working directory first
        env["PYTHONPATH"] = str(cwd)
    servers = []
    target = f"127.0.0.1:{port}"
    for j in range(a.server_procs):
        servers.append(
            subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=open(work / f"serve_load.server{tag}{j}.log", "wb"),  # noqa: SIM115
            )
        )
        _wait_health(target, 300, servers)
    # every process must be SERVING before the clock starts: wait until each has logged it
    end = time.monotonic() + 300
    for j in range(a.server_procs):
        logf = work / f"serve_load.server{tag}{j}.log"
        while "serving " not in logf.read_text(errors="replace"):
            if servers[j].poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"server {j} did not start; see {logf}")
            time.sleep(0.2)
    port_cfg.unlink(missing_ok=True)  # read by every server by now
    return target, key, servers, triton


# -- output -----------------------------------------------------------------------------------
def _point_key(r: dict[str, Any]) -> str:
    return f"closed {r['concurrency']}" if r["mode"] == "closed" else f"open {r['offered_rps']:g}"


def paired_summary(
    runs: list[dict[str, Any]], base: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per point: medians over the rounds of req/s, p99 and server CPU per request, and
    (with a baseline set) the medians of the per-round ratios this / baseline: both sets
    were measured back to back in every round, so a ratio does not follow the machine."""

    def med(rows: list[dict[str, Any]], f: Any) -> float:
        return float(np.median([f(r) for r in rows])) if rows else float("nan")

    out: dict[str, dict[str, Any]] = {}
    metrics = {
        "rps": lambda r: r["rps"],
        "p99_ms": lambda r: r["p99_ms"],
        "server_cpu_ms": lambda r: r["cpu_ms_per_request"]["server"],
        "server_cpu_per_loadgen_cpu": lambda r: r["server_cpu_per_loadgen_cpu"] or float("nan"),
    }
    for key in dict.fromkeys(_point_key(r) for r in runs):
        mine = [r for r in runs if _point_key(r) == key]
        theirs = {r["round"]: r for r in base if _point_key(r) == key}
        row: dict[str, Any] = {"rounds": len(mine)}
        for name, f in metrics.items():
            row[name] = med(mine, f)
            if theirs:
                row[f"baseline_{name}"] = med(list(theirs.values()), f)
                pairs = [f(r) / f(theirs[r["round"]]) for r in mine if r["round"] in theirs]
                row[f"ratio_{name}"] = float(np.median(pairs)) if pairs else float("nan")
        out[key] = row
    return out


def write_table(res: dict[str, Any], path: Path) -> None:
    head = (
        "| mode | conc. / offered | requests | errors | req/s | p50 ms | p95 ms | p99 ms "
        "| server cpu ms/req | loadgen cpu ms/req | encode p50 | ann p50 | rerank p50 | send lag p99 | load avg |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in res["runs"]:
        st = r["stages"]
        amount = r["concurrency"] if r["mode"] == "closed" else f"{r['offered_rps']:.0f}/s"
        lines.append(
            f"| {r['mode']} | {amount} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['cpu_ms_per_request']['server']:.2f} | {r['cpu_ms_per_request']['loadgen']:.2f} | "
            + " | ".join(
                f"{st.get(s, {}).get('p50_ms', float('nan')):.2f}"
                for s in ("encode", "ann", "rerank")
            )
            + (f" | {r['send_lag_p99_ms']:.1f}" if r.get("send_lag_p99_ms") is not None else " | ")
            + f" | {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f} |"
        )
    title = (
        f"{res['dataset']}, encoder {res['encoder']}, {res['server_procs']} server process(es), "
        f"{res['seconds']} s per row\n\n"
    )
    text = title + head + "\n".join(lines) + "\n"
    paired = res.get("paired")
    if paired:
        base = res.get("baseline_code")
        text += (
            "\nMedians over the rounds"
            + (
                f"; baseline = the server of {base}, measured back to "
                "back in every round, ratio = median of the per-round ratios"
                if base
                else ""
            )
            + "\n\n| point | rounds | req/s | p99 ms | server cpu ms/req | server/loadgen cpu |"
            + (
                " baseline req/s | baseline p99 | baseline cpu | baseline server/loadgen "
                "| ratio req/s | ratio p99 | ratio cpu | ratio server/loadgen |"
                if base
                else ""
            )
            + "\n|---|---|---|---|---|---|"
            + ("---|" * 8 if base else "")
            + "\n"
        )
        for key, r in paired.items():
            text += (
                f"| {key} | {r['rounds']} | {r['rps']:.0f} | {r['p99_ms']:.2f} | "
                f"{r['server_cpu_ms']:.2f} | {r['server_cpu_per_loadgen_cpu']:.2f} |"
            )
            if base:
                text += (
                    f" {r['baseline_rps']:.0f} | {r['baseline_p99_ms']:.2f} | "
                    f"{r['baseline_server_cpu_ms']:.2f} | "
                    f"{r['baseline_server_cpu_per_loadgen_cpu']:.2f} | {r['ratio_rps']:.2f} | "
                    f"{r['ratio_p99_ms']:.2f} | {r['ratio_server_cpu_ms']:.2f} | "
                    f"{r['ratio_server_cpu_per_loadgen_cpu']:.3f} |"
                )
            text += "\n"
    path.write_text(text)


def plot_open_loop(res: dict[str, Any], path: Path) -> bool:
    rows = [r for r in res["runs"] if r["mode"] == "open"]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["offered_rps"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        ax[0].plot(x, [r[q] for r in rows], marker="o", label=q.split("_")[0])
    lag = [r.get("send_lag_p99_ms") or float("nan") for r in rows]
    ax[0].plot(x, lag, ls=":", color="k", label="generator send lag p99")
    ax[0].axhline(15, color="grey", ls="--", lw=0.8)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("offered load (req/s, Poisson)")
    ax[0].set_ylabel("latency (ms)")
    ax[0].legend()
    ax[0].set_title(f"{res['dataset']} / {res['encoder']}: latency vs offered load")
    ax[1].plot(x, [r["rps"] for r in rows], marker="o", label="achieved req/s")
    ax[1].plot(x, x, color="grey", ls="--", lw=0.8, label="offered")
    ax2 = ax[1].twinx()
    ax2.plot(x, [r["cpu_ms_per_request"]["server"] for r in rows], "r.-", label="server CPU ms/req")
    ax2.set_ylabel("server CPU ms / request", color="r")
    ax[1].set_xlabel("offered load (req/s)")
    ax[1].set_ylabel("achieved (req/s)")
    ax[1].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter  # shows each default once

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--dataset", default="beauty", help="dataset name or path")
    ap.add_argument("--data-dir", default=None, help="dataset root (default: $ECOMREC_DATA_DIR)")
    ap.add_argument("--encoder", choices=["inprocess", "onnx", "triton"], default="onnx")
    ap.add_argument(
        "--concurrency",
        default="1,8",
        help="closed-loop in-flight requests, comma list ('' = none)",
    )
    ap.add_argument(
        "--offered",
        default="",
        help="open-loop offered req/s, comma list; 'auto' = 100, 200, ... until saturation",
    )
    ap.add_argument("--seconds", type=float, default=20, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per point")
    ap.add_argument("--client-procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--server-procs", type=int, default=1, help="server processes (SO_REUSEPORT)")
    ap.add_argument(
        "--channels",
        type=int,
        default=4,
        help="TCP connections per generator process (SO_REUSEPORT spreads connections, "
        "not requests, over the server processes)",
    )
    ap.add_argument(
        "--model", default=None, help="trained run directory (default: train the quick config)"
    )
    ap.add_argument(
        "--index",
        default=None,
        help="index location (default: WORK/index-DATASET, WORK/index-DATASET-N with --catalogue)",
    )
    ap.add_argument(
        "--catalogue",
        type=int,
        default=0,
        help="when the index is built here: the dataset's items plus synthetic ones up to N "
        "items (index-only: unknown to the serving catalogue; 0 = the dataset's items only)",
    )
    ap.add_argument(
        "--index-set",
        action="append",
        default=[],
        help="IndexConfig key=value for an index built here, e.g. hnsw_m=16 (repeatable)",
    )
    ap.add_argument(
        "--work", default="artifacts/demo", help="where the run, index and segments live"
    )
    ap.add_argument(
        "--target", default=None, help="drive an already running service (needs --api-key)"
    )
    ap.add_argument("--api-key", default=None, help="API key for --target")
    ap.add_argument("--workers", type=int, default=8, help="server thread pool")
    ap.add_argument("--batch-max", type=int, default=16, help="server batch size (1 = off)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra [serve] key=value for the server config (repeatable)",
    )
    ap.add_argument(
        "--server-code",
        default=None,
        help="run the server from this checkout (PYTHONPATH), e.g. /work/main for an A/B",
    )
    ap.add_argument(
        "--baseline-code",
        default=None,
        help="paired A/B: also start the same servers from this checkout (e.g. a worktree of "
        "main) and measure every point on both, alternating, --rounds times; the JSON gets "
        "per-point medians and median ratios (this / baseline) of req/s, p99 and CPU/request",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="measurements of every point (per server set)"
    )
    ap.add_argument(
        "--events-rate",
        type=float,
        default=0.0,
        help="paired A/B of live events: the servers get an event log, and every point is "
        "measured with TrackEvents flowing at this many events/s (batches of 50: 'this') and "
        "without ('baseline'), alternating, --rounds times (0 = off)",
    )
    ap.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="recommend",
        help="the call to load: Recommend, CompleteBasket (real users' newest items as "
        "baskets) or SearchProducts (words of catalogue titles); half of the last two "
        "personalised",
    )
    ap.add_argument("--users", type=int, default=2000, help="distinct users in the request mix")
    ap.add_argument("--seed", type=int, default=0, help="user sample seed")
    ap.add_argument("--out", required=True, help="JSON output (.md table and .png plot beside)")
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # SIGTERM -> SystemExit, so `finally` stops the servers this run started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from intake.loaders import load_dataset
    from serving.gen_protos import OUT_DIR, generate

    if not (OUT_DIR / "ecomrec" / "v1" / "recommend_pb2.py").exists():
        generate()
    ds = load_dataset(a.dataset, a.data_dir)
    make = {
        "recommend": make_requests,
        "complete-basket": make_basket_requests,
        "search": make_search_requests,
    }[a.method]
    payloads = [r.SerializeToString() for r in make(ds, a.users, a.seed)]
    servers: list[subprocess.Popen[bytes]] = []
    triton = None
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    base_runs: list[dict[str, Any]] = []
    sets: list[tuple[str, str, list[int], list[dict[str, Any]]]] = []  # target, key, pids, rows
    try:
        if a.target:
            sets.append((a.target, a.api_key or "", [], runs))
        else:
            for code, tag, rows in (
                (a.server_code, "", runs),
                (a.baseline_code, "-base", base_runs),
            ):
                if tag and not code:
                    continue
                target, key, procs, tri = start_servers(a, ds, work, code, tag)
                servers += procs
                triton = triton or tri
                pids = [p.pid for p in procs]
                if tri is not None and getattr(tri, "proc", None) is not None:
                    pids.append(tri.proc.pid)
                sets.append((target, key, pids, rows))
            for _target, _, pids, _ in sets:
                log.info("server idle after %.0f s of start-up work", wait_idle(pids))

        customers = ds.users.external_ids
        products = ds.item_ids.external_ids

        def with_events(target: str, key: str, measure: Any) -> dict[str, Any]:
            ctx = mp.get_context("spawn")
            stop, q = ctx.Event(), ctx.Queue()
            sender = ctx.Process(
                target=events_sender,
                args=(target, key, customers, products, a.events_rate, 50, stop, q),
            )
            sender.start()
            try:
                row: dict[str, Any] = measure()
            finally:
                stop.set()
                sent, failed = q.get(timeout=60)
                sender.join(30)
            row["events_acknowledged"] = sent
            row["events_failed_calls"] = failed
            row["events_rate"] = a.events_rate
            return row

        def point(mode: str, amount: float, rnd: int) -> dict[str, Any]:
            if a.events_rate:  # one server set; with and without events, alternating
                target, key, pids, _ = sets[0]
                arms = [("this", runs), ("baseline", base_runs)]
                for name, rows in arms if rnd % 2 == 0 else arms[::-1]:

                    def measure(target: str = target, key: str = key, pids: Any = pids) -> Any:
                        return run_point(
                            target, key, payloads, mode, amount, a.seconds, a.warmup,
                            a.client_procs, pids, a.channels, METHODS[a.method],
                        )  # fmt: skip

                    row = with_events(target, key, measure) if name == "this" else measure()
                    row["round"] = rnd
                    row["server_set"] = name
                    rows.append(row)
                return runs[-1]
            order = sets if rnd % 2 == 0 else sets[::-1]  # alternate who goes first
            for target, key, pids, rows in order:
                row = run_point(
                    target,
                    key,
                    payloads,
                    mode,
                    amount,
                    a.seconds,
                    a.warmup,
                    a.client_procs,
                    pids,
                    a.channels,
                    METHODS[a.method],
                )
                row["round"] = rnd
                row["server_set"] = "baseline" if rows is base_runs else "this"
                rows.append(row)
            return runs[-1]

        for rnd in range(a.rounds):
            for c in [int(x) for x in a.concurrency.split(",") if x.strip()]:
                point("closed", c, rnd)
            if a.offered == "auto":
                rate = 100.0
                while rate <= 5000:
                    row = point("open", rate, rnd)
                    if row["rps"] < 0.9 * rate or row["p99_ms"] > 1000 or row["errors"] > 0:
                        break  # saturated
                    rate += 100.0 if rate < 600 else 200.0
            else:
                for r in [float(x) for x in a.offered.split(",") if x.strip()]:
                    point("open", r, rnd)
    finally:
        for s in servers:
            if s.poll() is None:
                s.send_signal(signal.SIGTERM)
        for s in servers:
            try:
                s.wait(30)
            except subprocess.TimeoutExpired:
                s.kill()
        if triton is not None:
            triton.stop()
    head = next(
        (r for r in runs if r["mode"] == "closed" and r["concurrency"] == 8),
        runs[0] if runs else {},
    )
    res: dict[str, Any] = {
        **{
            k: head.get(k)
            for k in (
                "requests",
                "errors",
                "rps",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "cpu_ms_per_request",
                "stages",
                "concurrency",
                "load_avg",
            )
        },
        "dataset": a.dataset,
        "method": a.method,
        "encoder": a.encoder,
        "server_procs": a.server_procs,
        "client_procs": a.client_procs,
        "channels": a.channels,
        "server_config": dict(kv.split("=", 1) for kv in a.set),
        "catalogue": a.catalogue or None,
        "index": a.index or None,
        "seconds": a.seconds,
        "users_in_mix": len(payloads),
        "machine": {"cpus": os.cpu_count()},
        "offered_load": [
            {
                k: r[k]
                for k in ("offered_rps", "rps", "p50_ms", "p95_ms", "p99_ms", "errors", "load_avg")
            }
            for r in runs
            if r["mode"] == "open"
        ],
        "runs": runs,
    }
    if a.rounds > 1 or base_runs:
        res["paired"] = paired_summary(runs, base_runs)
        res["baseline_code"] = a.baseline_code
        res["events_rate"] = a.events_rate or None
        res["baseline_runs"] = base_runs
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    write_table(res, out.with_suffix(".md"))
    if plot_open_loop(res, out.with_suffix(".png")):
        log.info("plot: %s", out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0 if all(r["errors"] == 0 for r in runs + base_runs) else 1


if __name__ == "__main__":
    sys.exit(main())
