"""Scale benchmark of the embedded index (qdrant-edge): build, disk, memory, latency, recall.

    nice -n 10 .venv/bin/python benchmarks/index_scale.py \\
        --sizes 12000,100000,1000000 --dim 64 --out results/index_scale.json

One record per size: ``size, build_seconds, vectors_per_s, recall@10, p50_ms, p99_ms,
p50_ms_filtered, p99_ms_filtered, recall@10_filtered, disk_mb, peak_rss_mb`` plus an
``ef`` sweep and, up to ``--local-max`` points, qdrant-client local mode (exact brute
force) on the same data: its latency and top-10 agreement with the edge engine.
Each size runs in its own subprocess so ``peak_rss_mb`` is that size's peak.

Vectors: with ``--model RUN_DIR`` the trained item vectors (tiled with noise beyond the
catalogue size) and real user vectors as queries (``--dataset``); otherwise a
SYNTHETIC clustered set (a Gaussian mixture on the unit sphere, queries drawn the same
way) - the record's ``vectors`` field says which.  Filtered queries: one category that
holds ~20% of the items AND in stock (~90%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_CATEGORIES = 40


def synthetic(n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (n, dim) and queries (Q, dim): 1,000 centres, noise 0.5."""
    rng = np.random.default_rng(seed)
    n_centres = 1000
    centres = rng.normal(size=(n_centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 200_000):
        b = min(n, a + 200_000)
        c = rng.integers(0, n_centres, size=b - a)
        x = centres[c] + rng.normal(scale=1.0 / np.sqrt(dim), size=(b - a, dim)).astype(np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    cq = rng.integers(0, n_centres, size=n_queries)
    q = centres[cq] + rng.normal(scale=0.15, size=(n_queries, dim)).astype(np.float32)
    return out, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def from_model(
    run_dir: str, dataset: str | None, n: int, n_queries: int, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Trained item vectors tiled with noise to ``n``; real user vectors as queries."""
    from towers.inference import load_run

    model = load_run(run_dir)
    base = model.item_vectors()[1:]  # (n_items, D)
    rng = np.random.default_rng(seed)
    reps = -(-n // len(base))
    x = np.tile(base, (reps, 1))[:n]
    if n > len(base):
        x[len(base) :] += rng.normal(scale=0.05, size=(n - len(base), x.shape[1])).astype(
            np.float32
        )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if dataset:
        from indexing.build import user_query_vectors
        from intake.loaders import load_dataset

        q, _, _ = user_query_vectors(model, load_dataset(dataset), n_queries, seed)
        q = q[np.linalg.norm(q, axis=1) > 0]
        kind = f"trained item vectors of {run_dir} (tiled with noise 0.05 beyond {len(base)}), user vectors as queries"
    else:
        q = x[rng.choice(len(x), n_queries, replace=False)] + rng.normal(
            scale=0.05, size=(n_queries, x.shape[1])
        )
        kind = f"trained item vectors of {run_dir}, perturbed item vectors as queries"
    return x.astype(np.float32), q.astype(np.float32), kind


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """(Q, k) 1-based ids of the exact top-k by cosine (inputs unit-normalised)."""
    out = np.empty((len(q), k), np.int64)
    for a in range(0, len(q), 64):
        s = q[a : a + 64] @ x.T  # (b, N)
        if mask is not None:
            s[:, ~mask] = -np.inf
        part = np.argpartition(-s, k, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, axis=1)
        out[a : a + 64] = np.take_along_axis(part, np.argsort(-ps, axis=1), axis=1) + 1
    return out


def recall(ann: list[list[int]], exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e.tolist())) / len(e) for a, e in zip(ann, exact)]))


def timed_queries(
    reader: Any, q: np.ndarray, k: int, flt: Any, ef: int
) -> tuple[list[list[int]], np.ndarray]:
    lat = []
    ids = []
    for row in q:
        t = time.perf_counter()
        hits = reader.search(row, k, flt, hnsw_ef=ef, with_payload=False)
        lat.append((time.perf_counter() - t) * 1e3)
        ids.append([h.item_id for h in hits])
    return ids, np.asarray(lat)


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process, all its threads (the engine's too)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def dir_mb(p: Path) -> float:
    """Allocated size on disk (sparse preallocated files count only their written blocks)."""
    return sum(f.stat().st_blocks * 512 for f in p.rglob("*") if f.is_file()) / 2**20


def run_one(args: argparse.Namespace, size: int) -> dict[str, Any]:
    from indexing.base import PAYLOAD_INDEXES, IndexConfig, IndexManifest, SearchFilter
    from indexing.qdrant_edge import EdgeStore

    k = 10
    if args.model:
        x, q, kind = from_model(args.model, args.dataset, size, args.queries, args.seed)
    else:
        x, q = synthetic(size, args.dim, args.queries, args.seed)
        kind = (
            "SYNTHETIC clustered (1,000-centre Gaussian mixture on the unit sphere, noise norm ~1)"
        )
    dim = x.shape[1]
    rng = np.random.default_rng(args.seed + 1)
    cat = np.minimum(rng.zipf(1.6, size=size) - 1, N_CATEGORIES - 1)  # category 0 ~ 40% .. tail
    cat = np.where(rng.random(size) < 0.2, 1, np.where(cat == 1, 0, cat))  # category 1 ~ 20%
    in_stock = (rng.random(size) < 0.9).astype(np.int64)
    price = np.round(rng.uniform(1, 200, size), 2)
    ids = np.arange(1, size + 1, dtype=np.int64)

    tmp = Path(tempfile.mkdtemp(prefix="index_scale_", dir=args.workdir))
    if args.partial:
        Path(args.partial).write_text(json.dumps({"tmp": str(tmp)}))
    cfg = IndexConfig(
        location=str(tmp),
        hnsw_m=args.m,
        hnsw_ef_construct=args.ef_construct,
        hnsw_ef=args.ef,
        segment_number=args.segments,
        upsert_batch=4096,
        indexing_threads=args.indexing_threads,
        quantization=args.quantization,
    )
    store = EdgeStore(cfg)
    version = "items_vbench"
    t0 = time.perf_counter()
    c0 = _cpu_s()
    store.create_version(version, dim, dict(PAYLOAD_INDEXES))
    for a in range(0, size, cfg.upsert_batch):
        b = min(size, a + cfg.upsert_batch)
        pays = [
            {
                "category_path": [f"c{cat[i]}"],
                "price": float(price[i]),
                "in_stock": int(in_stock[i]),
                "popularity": 0,
            }
            for i in range(a, b)
        ]
        store.upsert(version, ids[a:b], x[a:b], pays)
    t_upsert = time.perf_counter() - t0
    c_upsert = _cpu_s() - c0
    if args.partial:
        Path(args.partial).write_text(
            json.dumps({"tmp": str(tmp), "upsert_seconds": round(t_upsert, 2)})
        )
    store.seal(version)
    build_s = time.perf_counter() - t0
    build_cpu = _cpu_s() - c0
    manifest = IndexManifest(
        version=version, alias="items", dim=dim, count=size, distance="cosine", model_version="bench",
        config_hash="", build_seconds=build_s, created_at=time.time(), index_config={},
    )  # fmt: skip
    store.commit(version, manifest)
    store.set_alias("items", version)
    reader = store.open()
    t = time.perf_counter()
    reader.search(q[0], k)  # load
    load_s = time.perf_counter() - t

    exact = exact_topk(x, q, k)
    flt = SearchFilter(categories=("c1",), in_stock=True)
    fmask = (cat == 1) & (in_stock == 1)
    exact_f = exact_topk(x, q, k, fmask)
    ann, lat = timed_queries(reader, q, k, None, args.ef)
    ann_f, lat_f = timed_queries(reader, q, k, flt, args.ef)
    sweep = []
    for ef in args.sweep:
        a2, l2 = timed_queries(reader, q[: min(300, len(q))], k, None, ef)
        sweep.append(
            {
                "ef": ef,
                "recall@10": recall(a2, exact[: len(a2)]),
                "p50_ms": float(np.percentile(l2, 50)),
                "p99_ms": float(np.percentile(l2, 99)),
            }
        )
    rec: dict[str, Any] = {
        "size": size,
        "dim": dim,
        "vectors": kind,
        "hnsw": {
            "m": args.m,
            "ef_construct": args.ef_construct,
            "ef": args.ef,
            "segments": args.segments,
            "indexing_threads": args.indexing_threads,
            "quantization": args.quantization,
        },
        "build_seconds": round(build_s, 2),
        "upsert_seconds": round(t_upsert, 2),
        "optimize_seconds": round(build_s - t_upsert, 2),
        "build_cpu_seconds": round(build_cpu, 1),
        "upsert_cpu_seconds": round(c_upsert, 1),
        "build_cpu_us_per_vector": round(build_cpu / size * 1e6, 1),
        "load_avg_after_build": [round(v, 2) for v in os.getloadavg()[:2]],
        "vectors_per_s": round(size / build_s, 1),
        "load_seconds": round(load_s, 3),
        "n_queries": len(q),
        "recall@10": round(recall(ann, exact), 4),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "recall@10_filtered": round(recall(ann_f, exact_f), 4),
        "p50_ms_filtered": round(float(np.percentile(lat_f, 50)), 3),
        "p99_ms_filtered": round(float(np.percentile(lat_f, 99)), 3),
        "filtered_fraction": round(float(fmask.mean()), 3),
        "disk_mb": round(dir_mb(tmp), 1),
        "ef_sweep": sweep,
    }
    if args.upserts:
        rec["upsert"] = upsert_step(args, store, reader, x, q, cat, in_stock, price, k)
    reader.close()
    if size <= args.local_max:
        rec["qdrant_client_local"] = local_mode(x, q[:50], exact[:50], ann[:50], k)
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    return rec


def upsert_step(
    args: argparse.Namespace,
    store: Any,
    reader: Any,
    x: np.ndarray,
    q: np.ndarray,
    cat: np.ndarray,
    in_stock: np.ndarray,
    price: np.ndarray,
    k: int,
) -> dict[str, Any]:
    """Upsert ``--upserts`` items (half moved, half new) through ``indexing.build.upsert_points``
    while a reader thread keeps querying the alias; then recall on the updated data."""
    import threading

    from indexing.build import upsert_points

    size = len(x)
    rng = np.random.default_rng(args.seed + 2)
    n_moved = args.upserts // 2
    moved = np.sort(rng.choice(size, n_moved, replace=False)) + 1
    new = np.arange(size + 1, size + 1 + args.upserts - n_moved, dtype=np.int64)
    ids = np.concatenate([moved, new])
    src = rng.choice(size, len(ids))  # each upserted item lands near a random existing one
    noise = rng.normal(scale=0.3 / np.sqrt(x.shape[1]), size=(len(ids), x.shape[1]))
    vecs = x[src] + noise
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    cats = np.concatenate([cat[moved - 1], rng.integers(0, N_CATEGORIES, len(new))])
    pays = [
        {
            "category_path": [f"c{c}"],
            "price": float(rng.uniform(1, 200)),
            "in_stock": 1,
            "popularity": 0,
        }
        for c in cats
    ]
    stop = threading.Event()
    lat: list[float] = []
    errors: list[str] = []

    def read_loop() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            try:
                hits = reader.search(q[i % len(q)], k, with_payload=False)
                if len(hits) != k:
                    errors.append(f"{len(hits)} hits")
            except Exception as e:  # counted, reported
                errors.append(repr(e))
            lat.append((time.perf_counter() - t) * 1e3)
            i += 1

    th = threading.Thread(target=read_loop, daemon=True)
    th.start()
    time.sleep(0.5)
    before = reader.version
    c0 = _cpu_s()
    t0 = time.perf_counter()
    m = upsert_points(store, ids, vecs, pays)
    secs = time.perf_counter() - t0
    cpu = _cpu_s() - c0
    time.sleep(0.5)
    stop.set()
    th.join()
    vdir = Path(store.cfg.location) / "versions" / m.version
    # recall on the updated points: exact answer over the updated matrix
    x2 = np.concatenate([x, vecs[n_moved:]])
    x2[moved - 1] = vecs[:n_moved]
    nq = min(300, len(q))
    exact = exact_topk(x2, q[:nq], k)
    ann, lat_after = timed_queries(reader, q[:nq], k, None, args.ef)
    self_top1 = np.mean(
        [
            reader.search(v, 1, with_payload=False)[0].item_id == i
            for v, i in zip(vecs[:200], ids[:200])
        ]
    )
    return {
        "points": len(ids),
        "moved": int(n_moved),
        "new": len(new),
        "seconds": round(secs, 2),
        "cpu_seconds": round(cpu, 2),
        "delta_version": store.base_of(m.version) is not None,
        "version_disk_mb": round(dir_mb(vdir), 2),
        "count_after": int(m.count),
        "verify": m.verify,
        "reader_queries_during": len(lat),
        "reader_errors_during": len(errors),
        "reader_error_examples": errors[:3],
        "reader_p99_ms_during": round(float(np.percentile(lat, 99)), 3) if lat else None,
        "served_before": before,
        "served_after": reader.version,
        "recall@10_after": round(recall(ann, exact), 4),
        "p99_ms_after": round(float(np.percentile(lat_after, 99)), 3),
        "upserted_found_top1": round(float(self_top1), 4),
    }


def local_mode(
    x: np.ndarray, q: np.ndarray, exact: np.ndarray, ann: list[list[int]], k: int
) -> dict[str, Any]:
    """qdrant-client local mode (exact brute force) on the same data: speed and agreement."""
    import warnings

    from qdrant_client import QdrantClient, models

    warnings.filterwarnings("ignore", category=UserWarning)
    c = QdrantClient(":memory:")
    c.create_collection(
        "b", vectors_config=models.VectorParams(size=x.shape[1], distance=models.Distance.COSINE)
    )
    t = time.perf_counter()
    for a in range(0, len(x), 8192):
        c.upsert(
            "b",
            points=models.Batch(
                ids=list(range(a + 1, min(len(x), a + 8192) + 1)), vectors=x[a : a + 8192].tolist()
            ),
            wait=True,
        )
    up = time.perf_counter() - t
    lat, got = [], []
    for row in q:
        t = time.perf_counter()
        r = c.query_points("b", query=row.tolist(), limit=k).points
        lat.append((time.perf_counter() - t) * 1e3)
        got.append([int(p.id) for p in r])
    c.close()
    return {
        "upsert_seconds": round(up, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "recall@10_vs_numpy_exact": recall(got, exact),
        "agreement@10_with_edge": recall(ann, np.asarray(got)),
        "n_queries": len(q),
    }


def table(records: list[dict[str, Any]]) -> str:
    head = "| size | build s | vectors/s | recall@10 | p50 ms | p99 ms | recall@10 filt | p50 ms filt | p99 ms filt | disk MB | peak RSS MB | local mode p50 ms |"
    lines = [head, "|" + "---|" * 12]
    for r in records:
        if "error" in r:
            up = f"upsert {r['upsert_seconds']} s; " if "upsert_seconds" in r else ""
            lines.append(f"| {r['size']:,} | {up}{r['error']} |" + " |" * 10)
            continue
        lm = r.get("qdrant_client_local", {}).get("p50_ms", "-")
        lines.append(
            f"| {r['size']:,} | {r['build_seconds']} | {r['vectors_per_s']:,} | {r['recall@10']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['recall@10_filtered']} | {r['p50_ms_filtered']} | {r['p99_ms_filtered']} | {r['disk_mb']} | {r['peak_rss_mb']} | {lm} |"
        )
    done = [r for r in records if "error" not in r]
    notes = sorted({r["vectors"] for r in done})
    hn = done[0]["hnsw"] if done else {}
    return "\n".join([*lines, "", f"Vectors: {'; '.join(notes)}. HNSW {hn}."]) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter  # shows each default once

    class _Fmt(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Fmt)
    ap.add_argument("--sizes", default="12000,100000,1000000", help="comma-separated index sizes")
    ap.add_argument("--dim", type=int, default=64, help="vector dimension (synthetic vectors)")
    ap.add_argument("--out", required=True, help="JSON output (a .md table is written beside it)")
    ap.add_argument("--queries", type=int, default=1000, help="queries per size")
    ap.add_argument("--m", type=int, default=16, help="HNSW m (graph degree)")
    ap.add_argument("--ef-construct", type=int, default=100, help="HNSW ef_construct (build width)")
    ap.add_argument("--ef", type=int, default=128, help="search width for the main numbers")
    ap.add_argument(
        "--sweep", default="32,64,128,256", help="ef values for the recall/latency sweep"
    )
    ap.add_argument(
        "--segments", type=int, default=2, help="segments per version (0 = engine default)"
    )
    ap.add_argument(
        "--indexing-threads", type=int, default=0, help="HNSW build threads (0 = engine default)"
    )
    ap.add_argument(
        "--quantization",
        choices=["none", "int8"],
        default="none",
        help="vector quantization (int8: queries rescore with the full vectors)",
    )
    ap.add_argument(
        "--upserts",
        type=int,
        default=0,
        help="after the build, upsert this many items (half moved, half new) through "
        "indexing.build.upsert_points with a reader querying meanwhile (0 = skip)",
    )
    ap.add_argument(
        "--local-max",
        type=int,
        default=100_000,
        help="largest size also run in qdrant-client local mode",
    )
    ap.add_argument("--model", default=None, help="training run dir: real item vectors")
    ap.add_argument(
        "--dataset", default=None, help="dataset for real user-vector queries (with --model)"
    )
    ap.add_argument(
        "--workdir", default=None, help="where the temporary index lives (default: system temp)"
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed for vectors and queries")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds per size; on timeout the partial record is kept",
    )
    ap.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--partial", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.sweep = [int(s) for s in args.sweep.split(",") if s]
    if args.single is not None:
        print(json.dumps(run_one(args, args.single)))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for size in [int(s) for s in args.sizes.split(",")]:
        partial = out.with_suffix(f".partial-{size}.json")
        partial.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        cmd += ["--single", str(size), "--partial", str(partial)]
        t = time.perf_counter()
        try:
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                timeout=args.time_limit,
            )
        except subprocess.TimeoutExpired:
            rec: dict[str, Any] = {
                "size": size,
                "error": f"did not finish within --time-limit {args.time_limit:.0f}s",
            }
            if partial.exists():
                info = json.loads(partial.read_text())
                shutil.rmtree(info.pop("tmp"), ignore_errors=True)  # the killed child's index
                rec.update(info)
                partial.unlink()
            records.append(rec)
            print(json.dumps(rec), flush=True)
            out.write_text(json.dumps(records, indent=2))
            continue
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            records.append(
                {
                    "size": size,
                    "error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed",
                }
            )
            continue
        rec = json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-redef]
        rec["wall_seconds"] = round(time.perf_counter() - t, 1)
        partial.unlink(missing_ok=True)
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "ef_sweep"}), flush=True)
        out.write_text(json.dumps(records, indent=2))
    out.write_text(json.dumps(records, indent=2))
    out.with_suffix(".md").write_text(table(records))
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
