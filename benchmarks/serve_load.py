"""Load test of the gRPC Recommend service (grpc.aio load generator).

Starts what it needs unless ``--target`` is given: trains the quick tower config (unless
``--model``), builds the embedded index, fits segments, optionally exports the tower
and starts a real Triton server (``--encoder triton``), starts ``ecomrec serve`` in a
subprocess, then drives it with ``--concurrency`` in-flight requests for ``--seconds``
from real users (80% by user id, 20% with their newest item as a session event).

    python benchmarks/serve_load.py --dataset beauty --encoder inprocess \
        --concurrency 8 --seconds 60 --out results/serve_load_inprocess.json

Writes JSON (p50_ms, p95_ms, p99_ms, rps, errors, requests, stages: per-stage p50/p99
from the server's ``ecomrec-stages`` trailer) and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("serve_load")


def _pct(x: list[float], q: float) -> float:
    return float(np.percentile(x, q)) if x else float("nan")


async def drive(
    target: str, key: str, requests: list[Any], concurrency: int, seconds: float, warmup_s: float
) -> dict[str, Any]:
    import grpc

    from serving._generated.ecomrec.v1 import recommend_pb2_grpc

    lat: list[float] = []
    stages: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    md = (("x-api-key", key),)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = recommend_pb2_grpc.RecommendServiceStub(ch)
        t_start = time.perf_counter()
        t_measure = t_start + warmup_s
        t_end = t_measure + seconds
        counter = 0

        async def worker(n: int) -> None:
            nonlocal counter
            i = n
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    return
                req = requests[i % len(requests)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    call = stub.Recommend(req, metadata=md, timeout=2.0)
                    await call
                    trailer = await call.trailing_metadata()
                    dt = time.perf_counter() - t0
                    if t0 >= t_measure:
                        lat.append(dt)
                        for k, v in trailer or ():
                            if k == "ecomrec-stages":
                                for kv in v.split(","):
                                    name, ms = kv.split("=")
                                    stages.setdefault(name, []).append(float(ms))
                except grpc.aio.AioRpcError as e:
                    if t0 >= t_measure:
                        errors[e.code().name] = errors.get(e.code().name, 0) + 1
                counter += 1

        await asyncio.gather(*[worker(n) for n in range(concurrency)])
    ms = [x * 1e3 for x in lat]
    n_err = sum(errors.values())
    return {
        "requests": len(ms) + n_err,
        "errors": n_err,
        "error_codes": errors,
        "rps": len(ms) / seconds,
        "p50_ms": _pct(ms, 50),
        "p95_ms": _pct(ms, 95),
        "p99_ms": _pct(ms, 99),
        "mean_ms": float(np.mean(ms)) if ms else float("nan"),
        "stages": {
            k: {"p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99)} for k, v in sorted(stages.items())
        },
    }


def make_requests(ds: Any, n: int, seed: int) -> list[Any]:
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


def _wait_health(target: str, timeout_s: float, proc: subprocess.Popen[bytes] | None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
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


def write_table(res: dict[str, Any], path: Path) -> None:
    st = res.get("stages", {})
    lines = [
        "| dataset | encoder | conc. | seconds | requests | errors | req/s | p50 ms | p95 ms | p99 ms | encode p50 | ann p50 | rerank p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {res['dataset']} | {res['encoder']} | {res['concurrency']} | {res['seconds']} | {res['requests']} | "
        f"{res['errors']} | {res['rps']:.0f} | {res['p50_ms']:.2f} | {res['p95_ms']:.2f} | {res['p99_ms']:.2f} | "
        + " | ".join(
            f"{st.get(s, {}).get('p50_ms', float('nan')):.2f}" for s in ("encode", "ann", "rerank")
        )
        + " |",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dataset", default="beauty")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--encoder", choices=["inprocess", "onnx", "triton"], default="inprocess")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument(
        "--model", default=None, help="trained run directory (default: train the quick config)"
    )
    ap.add_argument(
        "--work", default="artifacts/demo", help="where the run, index and segments live"
    )
    ap.add_argument(
        "--target", default=None, help="drive an already running service (needs --api-key)"
    )
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--workers", type=int, default=8, help="server thread pool")
    ap.add_argument(
        "--batch-max", type=int, default=16, help="in-process micro-batch size (1 = off)"
    )
    ap.add_argument("--users", type=int, default=2000, help="distinct users in the request mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from serving.gen_protos import OUT_DIR, generate
    from towers.loaders import load_dataset

    if not (OUT_DIR / "ecomrec" / "v1" / "recommend_pb2.py").exists():
        generate()
    ds = load_dataset(a.dataset, a.data_dir)
    requests = make_requests(ds, a.users, a.seed)
    server = None
    triton = None
    work = Path(a.work)
    try:
        if a.target:
            target, key = a.target, a.api_key or ""
        else:
            from serving.assemble import load_parts
            from serving.demo import build_item_index, train_quick

            run_dir = (
                Path(a.model)
                if a.model
                else train_quick(a.dataset, work / f"run-{ds.name}", data_dir=a.data_dir)
            )
            index_dir = work / f"index-{ds.name}"
            parts = None
            if not (index_dir / "aliases").exists():
                parts = load_parts(run_dir, ds)
                build_item_index(parts, index_dir)
            seg_path = work / f"segments-{ds.name}.parquet"
            if not seg_path.exists():
                parts = parts or load_parts(run_dir, ds)
                fit_segments_table(parts).save(seg_path)
            del parts
            port_cfg = work / "serve_load.toml"
            port_cfg.write_text(
                f'[serve]\nport = 0\nworkers = {a.workers}\nbatch_max = {a.batch_max}\nrerank_policies = "{ROOT / "configs/serving/rerank.toml"}"\n'
            )
            import socket

            with socket.socket() as so:
                so.bind(("127.0.0.1", 0))
                port = so.getsockname()[1]
            key = secrets.token_hex(8)
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
            if a.encoder == "triton":
                from serving.triton import TritonProcess, export_triton

                repo = work / f"triton-{ds.name}"
                export_triton(run_dir, repo)
                triton = TritonProcess(repo).start()
                cmd += ["--triton-url", triton.url]
            env = dict(os.environ, ECOMREC_API_KEYS=key, OMP_NUM_THREADS="1")
            server = subprocess.Popen(
                cmd,
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=open(work / "serve_load.server.log", "wb"),  # noqa: SIM115
            )
            target = f"127.0.0.1:{port}"
            _wait_health(target, 300, server)
        res = asyncio.run(drive(target, key, requests, a.concurrency, a.seconds, a.warmup))
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if triton is not None:
            triton.stop()
    st = res["stages"]
    base = st.get("encode", {}).get("p50_ms", float("nan")) + st.get("ann", {}).get(
        "p50_ms", float("nan")
    )
    res.update(
        {
            "dataset": a.dataset,
            "encoder": a.encoder,
            "batch_max": a.batch_max,
            "concurrency": a.concurrency,
            "seconds": a.seconds,
            "users_in_mix": len(requests),
            "encode_plus_ann_p50_ms": base,
            "p50_over_encode_plus_ann": res["p50_ms"] / base if base == base and base > 0 else None,
            "machine": {"cpus": os.cpu_count()},
        }
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    write_table(res, out.with_suffix(".md"))
    print(
        json.dumps(
            {k: res[k] for k in ("requests", "errors", "rps", "p50_ms", "p95_ms", "p99_ms")},
            indent=None,
        )
    )
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
