"""Where exact numpy search stops paying: CPU per query of ``indexing.exact`` vs catalogue size.

For each size N, unit vectors (N, D) and queries: CPU microseconds per query of the exact
path the engine uses (one matrix product for a batch, the sampled top-n cut, the final
sort) at batch 1 and at batch 16; with ``--index`` also the HNSW query of an embedded
index (qdrant-edge, ids only) on that index's own vectors, for comparison.  The crossover
is the size where exact costs as much as HNSW; ``ServeConfig.exact_max_items`` defaults
to it (docs/serving.md).

    python benchmarks/exact_crossover.py --sizes 12000,50000,100000,200000,400000 --dim 32 \
        --index artifacts/demo/index-beauty --out results/exact_crossover.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_per_call(fn: Any, min_s: float = 0.5) -> float:
    """CPU seconds per call of ``fn`` (repeated for at least ``min_s`` of CPU)."""
    fn()
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < min_s:
        fn()
        n += 1
    return (time.process_time() - t0) / n


def exact_cost(n_items: int, dim: int, n: int, batch: int, seed: int = 0) -> float:
    """CPU microseconds per query of the engine's exact search at this size."""
    from indexing.base import SearchFilter
    from indexing.exact import ExactMatrix, ExactSearch

    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n_items, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(1, n_items + 1)
    row_of = np.concatenate([[-1], np.arange(n_items)])
    m = ExactMatrix("bench", ids, vecs, row_of)
    ex = ExactSearch(None, n_items)  # type: ignore[arg-type]  # no filters: no catalogue
    q = rng.standard_normal((batch, dim)).astype(np.float32)
    flts, excl = [SearchFilter()] * batch, [np.arange(1, 20)] * batch
    return _cpu_per_call(lambda: ex.search(m, q, [n] * batch, flts, excl)) / batch * 1e6


def hnsw_cost(location: str, n: int, queries: int = 200) -> tuple[int, float, float]:
    """(items, CPU us per query at batch 1, at batch 16) of the index's HNSW search."""
    from indexing.base import IndexConfig
    from indexing.build import open_index

    idx: Any = open_index(IndexConfig(location=location))  # the embedded reader (with_payload)
    try:
        count = idx.manifest().count
        rng = np.random.default_rng(1)
        q = rng.standard_normal((queries, idx.dim)).astype(np.float32)
        it = iter(range(10**9))

        def one() -> None:
            idx.search(q[next(it) % queries], n, None, exclude_ids=range(1, 20), with_payload=False)

        def batch() -> None:
            i = next(it) % (queries - 16)
            idx.search_batch(
                q[i : i + 16], n, None, exclude_ids=[range(1, 20)] * 16, with_payload=False
            )

        return count, _cpu_per_call(one) * 1e6, _cpu_per_call(batch) / 16 * 1e6
    finally:
        idx.close()


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter  # shows each default once

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--sizes", default="12000,50000,100000,200000,400000", help="catalogue sizes")
    ap.add_argument("--dim", type=int, default=32, help="vector dimension")
    ap.add_argument("--n", type=int, default=50, help="candidates per query")
    ap.add_argument("--index", default=None, help="embedded index location for the HNSW row")
    ap.add_argument("--out", required=True, help="JSON output")
    a = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for size in [int(x) for x in a.sizes.split(",")]:
        r = {
            "backend": "exact numpy",
            "items": size,
            "dim": a.dim,
            "us_per_query_b1": exact_cost(size, a.dim, a.n, 1),
            "us_per_query_b16": exact_cost(size, a.dim, a.n, 16),
        }
        print(r, flush=True)
        rows.append(r)
    if a.index:
        count, b1, b16 = hnsw_cost(a.index, a.n)
        r = {
            "backend": "hnsw (qdrant-edge)",
            "items": count,
            "dim": None,
            "us_per_query_b1": b1,
            "us_per_query_b16": b16,
        }
        print(r, flush=True)
        rows.append(r)
    import os

    out = {"rows": rows, "n": a.n, "load_avg": os.getloadavg()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    lines = ["| backend | items | dim | CPU us/query batch 1 | batch 16 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['items']:,} | {r['dim'] or ''} | "
            f"{r['us_per_query_b1']:.0f} | {r['us_per_query_b16']:.0f} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
