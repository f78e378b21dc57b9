"""The main-job pipeline end to end on the embedded default stack.

train the quick tower config -> build the embedded Qdrant index -> fit RFM and
behavioural segments -> start the gRPC service -> call it -> print recommendations with
their reasons for a few customers.  Each step reuses its output under ``work`` when
present (``--retrain`` starts over).  Called by ``ecomrec demo`` / ``make demo``.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
QUICK_CONFIG = ROOT / "configs" / "towers" / "quick.toml"


def _ecomrec(*args: str, log_file: Path | None = None) -> None:
    """Run an ``ecomrec`` subcommand in a subprocess (serving never imports ``training``)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ecomrec", *args]
    log.info("running %s", " ".join(cmd))
    if log_file is not None:
        with open(log_file, "wb") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    else:
        rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        from ecomrec.errors import ModelError

        raise ModelError(
            f"`ecomrec {args[0]}` failed with exit code {rc}"
            + (f"; see {log_file}" if log_file else "")
        )


def train_quick(
    dataset: str,
    run_dir: Path,
    retrain: bool = False,
    data_dir: str | None = None,
    sets: tuple[str, ...] = (),
) -> Path:
    """``ecomrec train`` with the quick config (leave-one-out split); skipped when ``run_dir``
    already holds a model and ``retrain`` is False."""
    if (run_dir / "model.pt").exists() and not retrain:
        log.info("reusing the trained model in %s", run_dir)
        return run_dir
    args = [
        "train",
        "--dataset",
        dataset,
        "--config",
        str(QUICK_CONFIG),
        "--out",
        str(run_dir),
        "--no-test",
    ]
    args += ["--no-resume"] if retrain else []
    args += ["--data-dir", data_dir] if data_dir else []
    for kv in sets:
        args += ["--set", kv]
    run_dir.mkdir(parents=True, exist_ok=True)
    _ecomrec(*args, log_file=run_dir.parent / f"{run_dir.name}.train.log")
    return run_dir


def export_segments(dataset: str, run_dir: Path, out: Path, data_dir: str | None = None) -> Path:
    """``ecomrec segments export --raw-ids``: RFM + behavioural segments, churn/high-value."""
    if (out / "customers.parquet").exists():
        return out
    args = [
        "segments",
        "export",
        "--dataset",
        dataset,
        "--run",
        str(run_dir),
        "--raw-ids",
        "--out",
        str(out),
    ]
    args += ["--data-dir", data_dir] if data_dir else []
    _ecomrec(*args, log_file=out.parent / f"{out.name}.log")
    return out


def build_item_index(parts: Any, location: Path) -> str:
    """Embed the catalogue with the item tower and publish a verified index version."""
    from indexing.base import IndexConfig
    from indexing.build import build_version, item_payloads, open_store, without_untrained

    store = open_store(IndexConfig(location=str(location)))
    try:
        items = parts.dataset.items
        m = parts.model
        vecs = np.concatenate(
            [m.embed_items(items[a : a + 4096]) for a in range(0, items.height, 4096)]
        )
        ids, payloads = item_payloads(items, m.model_version, parts.history.inter.item_counts())
        ids, vecs, payloads, _ = without_untrained(ids, vecs, payloads)  # never-seen, no content
        manifest = build_version(
            store, ids, vecs, payloads, model_version=m.model_version, config_hash=m.config_hash
        )
        return manifest.version
    finally:
        store.close()


def run_demo(
    dataset: str = "beauty",
    *,
    data_dir: str | None = None,
    work: Path = Path("artifacts/demo"),
    customers: int = 3,
    k: int = 5,
    retrain: bool = False,
    out: TextIO | None = None,
) -> list[tuple[str, Any]]:
    """Run the pipeline and print recommendations; returns (customer id, response) pairs."""
    import sys

    from indexing.base import IndexConfig
    from indexing.build import open_index
    from intake.loaders import load_dataset
    from serving.assemble import build_recommender, load_parts
    from serving.client import RecommendClient, format_response
    from serving.config import ServeConfig
    from serving.observability import Metrics
    from serving.segments import TableSegmentLookup
    from serving.server import start_server
    from serving.service import RecommendServicer

    out = out or sys.stdout
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=out, flush=True)

    ds = load_dataset(dataset, data_dir)
    step(f"loaded {ds.name}: {len(ds.users):,} customers, {len(ds.item_ids):,} items")
    run_dir = train_quick(dataset, work / f"run-{ds.name}", retrain, data_dir)
    parts = load_parts(run_dir, ds)
    step(f"model {parts.model.model_version} ready")
    index_dir = work / f"index-{ds.name}"
    if retrain or not (index_dir / "aliases").exists():
        version = build_item_index(parts, index_dir)
        step(f"index version {version} built and verified")
    seg_dir = export_segments(dataset, run_dir, work / f"segments-{ds.name}", data_dir)
    segments = TableSegmentLookup.from_marketing_export(seg_dir, ds.users)
    step(f"segments: {', '.join(f'{s.name} ({s.size})' for s in segments.segments()[:8])} ...")
    key = secrets.token_hex(8)
    cfg = ServeConfig(
        port=0, api_keys=(key,), rerank_policies=str(ROOT / "configs" / "serving" / "rerank.toml")
    )
    metrics = Metrics()
    index = open_index(IndexConfig(location=str(index_dir)))
    engine = build_recommender(cfg, parts, index, segments, metrics=metrics)
    servicer = RecommendServicer(engine)
    handle = start_server(cfg, servicer, metrics)
    handle.set_ready(True)
    step(f"service listening on {handle.target}")
    responses: list[tuple[str, Any]] = []
    try:
        with RecommendClient(handle.target, api_key=key, timeout_s=5.0) as client:
            lens = parts.history.inter.lengths()
            picks = np.flatnonzero(lens >= 5)[
                :: max(1, len(np.flatnonzero(lens >= 5)) // max(customers, 1))
            ][:customers]
            for u in picks:
                ext = ds.users.to_external(int(u))
                prof = client.user_profile(ext)
                resp = client.recommend(ext, k)
                responses.append((ext, resp))
                print(
                    f"\ncustomer {ext}: {prof.n_events} events, RFM {prof.rfm_segment or '-'}, "
                    f"behavioural {prof.behavioural_segment or '-'}",
                    file=out,
                )
                print(format_response(resp), file=out)
            item = engine.catalog.external_ids[int(np.argmax(engine.popularity.overall_counts))]
            sim = client.similar_items(item, k)
            print(
                f"\nsimilar to {item} ({engine.catalog.titles[engine.items.get(item) or 0][:50]}):",
                file=out,
            )
            for it in sim.items:
                print(f"  {it.item_id:<12} {it.score:6.3f}  {it.title[:60]}", file=out)
    finally:
        handle.stop(1.0)
        index.close()
    step("done")
    return responses
