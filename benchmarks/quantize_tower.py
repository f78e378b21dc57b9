"""int8 dynamic quantisation of the user tower (CPU path) vs full precision:
NDCG@10 / Recall@10 (full ranking, leave-one-out test users) and encode latency at
batch 1 (p50/p99) and throughput at batch 64.

    python benchmarks/quantize_tower.py --dataset beauty --out results/quantize_beauty.json

With a GPU (``torch.cuda.is_available()``) the same script also measures fp32 and fp16
on the GPU (batch-1 latency, batch-64 throughput, NDCG@10 cost of fp16): the prepared
GPU check.  fp16 is the GPU/Triton path; it is not measured on a CPU-only machine.
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


def measure(
    enc: Any, vn: np.ndarray, hs: list[Any], targets: np.ndarray, max_len: int
) -> dict[str, float]:
    from serving.history import to_batch

    ndcg, hit = [], []
    for s in range(0, len(hs), 256):
        u = enc.encode(to_batch(hs[s : s + 256], max_len))  # (b, D)
        sc = u @ vn.T  # (b, N+1)
        sc[:, 0] = -np.inf
        for r, h in enumerate(hs[s : s + 256]):
            sc[r, np.unique(h.items)] = -np.inf
        top = np.argsort(-sc, axis=1)[:, :10]
        for r in range(len(top)):
            pos = np.flatnonzero(top[r] == targets[s + r])
            ndcg.append(1.0 / np.log2(pos[0] + 2) if len(pos) else 0.0)
            hit.append(1.0 if len(pos) else 0.0)
    one = [to_batch([h], max_len) for h in hs[:300]]
    for b in one[:20]:
        enc.encode(b)
    lat = []
    for b in one:
        t0 = time.perf_counter()
        enc.encode(b)
        lat.append((time.perf_counter() - t0) * 1e3)
    b64 = [to_batch(hs[i : i + 64], max_len) for i in range(0, min(len(hs), 64 * 20), 64)]
    t0 = time.perf_counter()
    n = 0
    for b in b64:
        enc.encode(b)
        n += len(b.lengths)
    thr = n / (time.perf_counter() - t0)
    return {
        "ndcg@10": float(np.mean(ndcg)),
        "recall@10": float(np.mean(hit)),
        "batch1_p50_ms": float(np.percentile(lat, 50)),
        "batch1_p99_ms": float(np.percentile(lat, 99)),
        "batch64_users_per_s": thr,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dataset", default="beauty")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--work", default="artifacts/demo")
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from ecomrec.demo import train_quick
    from intake.loaders import load_dataset
    from serving.encoders import quantize_int8
    from serving.history import History
    from towers.inference import load_run
    from towers.sequences import Interactions
    from training.splits import leave_one_out

    ds = load_dataset(a.dataset, a.data_dir)
    run_dir = (
        Path(a.model)
        if a.model
        else train_quick(a.dataset, Path(a.work) / f"run-{ds.name}", data_dir=a.data_dir)
    )
    tm = load_run(run_dir)
    tm.model.eval()
    split = leave_one_out(Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids)))
    hist = split.train_valid
    users = np.asarray(split.test.users)
    targets = np.asarray(split.test.items)[np.asarray(split.test.indptr)[:-1]]
    pick = np.random.default_rng(0).choice(len(users), size=min(a.users, len(users)), replace=False)
    hs = [
        History(
            hist.seq(int(u)).astype(np.int64),
            hist.seq_ts(int(u)),
            hist.seq_event_type(int(u)).astype(np.int64),
        )
        for u in users[pick]
    ]
    vn = tm.item_vectors()
    res: dict[str, Any] = {
        "dataset": a.dataset,
        "users": len(hs),
        "threads": a.threads,
        "model_version": tm.model_version,
    }
    from serving.encoders import TowerEncoder

    res["fp32"] = measure(TowerEncoder(tm.model, tm.max_len), vn, hs, targets[pick], tm.max_len)
    res["int8"] = measure(quantize_int8(tm), vn, hs, targets[pick], tm.max_len)
    if torch.cuda.is_available():
        import copy

        gpu = copy.deepcopy(tm.model).cuda().eval()
        res["fp32-cuda"] = measure(TowerEncoder(gpu, tm.max_len), vn, hs, targets[pick], tm.max_len)
        res["fp16-cuda"] = measure(
            TowerEncoder(gpu.half(), tm.max_len), vn, hs, targets[pick], tm.max_len
        )
    f, q = res["fp32"], res["int8"]
    res["ndcg_change_pct"] = 100 * (q["ndcg@10"] / f["ndcg@10"] - 1) if f["ndcg@10"] else 0.0
    res["batch1_speedup"] = f["batch1_p50_ms"] / q["batch1_p50_ms"]
    res["batch64_speedup"] = q["batch64_users_per_s"] / f["batch64_users_per_s"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    rows = [
        "| precision | NDCG@10 | Recall@10 | batch-1 p50 ms | batch-1 p99 ms | batch-64 users/s |",
        "|---|---|---|---|---|---|",
    ] + [
        f"| {k} | {v['ndcg@10']:.4f} | {v['recall@10']:.4f} | {v['batch1_p50_ms']:.2f} | {v['batch1_p99_ms']:.2f} | {v['batch64_users_per_s']:.0f} |"
        for k, v in [("fp32", f), ("int8 dynamic", q)]
        + [(g, res[g]) for g in ("fp32-cuda", "fp16-cuda") if g in res]
    ]
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
