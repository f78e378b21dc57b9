"""Cost of index integrity checks: checksum (full / sizes only), open in place vs a private copy.

    python benchmarks/index_integrity.py --items 12101 --dim 64 --out results/index_integrity.json

Builds one embedded version of random vectors in a temporary directory (HNSW built as
for a real catalogue), then times the checks serving runs (docs/indexing.md, Integrity).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexing.base import IndexConfig
from indexing.build import build_version, open_index, open_store
from indexing.integrity import check_version_dir


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(items: int, dim: int, queries: int, work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(items, dim)).astype(np.float32)  # (N, D)
    ids = np.arange(1, items + 1)
    pays = [{"external_id": f"I{i}", "category": "A", "in_stock": 1} for i in ids]
    loc = work / "index"
    store = open_store(IndexConfig(location=str(loc)))
    t = time.perf_counter()
    m = build_version(store, ids, vecs, pays, model_version="bench", progress=True)
    out: dict[str, Any] = {"items": items, "dim": dim, "build_s": time.perf_counter() - t}
    store.close()
    vdir = loc / "versions" / m.version
    for name, full in (("checksum_full", True), ("checksum_sizes", False)):
        c, t = _cpu(), time.perf_counter()
        rep = check_version_dir(vdir, full=full)
        out[name] = {"wall_s": time.perf_counter() - t, "cpu_s": _cpu() - c, "ok": rep.ok}
        out["files"], out["apparent_mb"] = rep.files, rep.bytes / 1e6
    du = subprocess.run(["du", "-sk", str(vdir)], capture_output=True, text=True).stdout
    out["disk_mb"] = int(du.split()[0]) / 1024 if du else None
    for name, local_copy in (("in_place", False), ("private_copy", str(work / "copies"))):
        idx = open_index(IndexConfig(location=str(loc)), local_copy=local_copy)
        c, t = _cpu(), time.perf_counter()
        idx.search(vecs[0], 10, with_payload=False)
        first = {"wall_s": time.perf_counter() - t, "cpu_s": _cpu() - c}
        lat = []
        for q in vecs[:queries]:
            t = time.perf_counter()
            idx.search(q, 50, with_payload=False)
            lat.append((time.perf_counter() - t) * 1e3)
        idx.close()
        out[name] = {
            "open_first_query": first,
            "query_p50_ms": float(np.percentile(lat, 50)),
            "query_p99_ms": float(np.percentile(lat, 99)),
        }
    return out


def main() -> None:
    from ecomrec.cli import HelpFormatter  # shows each default once

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--items", type=int, default=12101, help="points in the version")
    ap.add_argument("--dim", type=int, default=64, help="vector dimension")
    ap.add_argument("--queries", type=int, default=300, help="timed queries per reader")
    ap.add_argument("--out", default="results/index_integrity.json", help="JSON output")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ecomrec-integrity-bench-"))
    try:
        res = run(args.items, args.dim, args.queries, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
