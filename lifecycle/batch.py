"""Sharded batch jobs over all customers / all products, on Dask (or in-process).

Three jobs, each a list of independent shards whose results are written as one Parquet
file per shard (``OUT/part-NNNNN.parquet``, written to a temporary name and renamed, so
a file that exists is complete):

- ``embed-users``: user-tower vectors of every customer, from the per-user sequences of
  :func:`intake.ingest.ingest_event_log` (one shard per ``sequences/bucket-K.parquet``);
  columns ``customer_id, user_id, vector``.
- ``assign-segments``: the stable segment id of every customer from a saved
  ``segments_model.json`` (``segments.export``) and the ``embed-users`` output;
  columns ``customer_id, segment``.
- ``embed-items``: the item vector of every product of a catalogue (canonical items
  frame: trained vector for known products, content vector for new ones) or of the
  model's own catalogue; shards of ``shard_rows`` rows; columns ``product_id, vector``.

**Resume**: a job writes ``OUT/_job.json`` (job, inputs, model version) first; a rerun
with the same job skips every shard whose part file exists, so a crashed driver or a
killed cluster loses only the shards in flight. Inside one run, Dask reschedules the
tasks of a worker that dies (``retries`` more times) on the others; shards that were
already written are not redone. A rerun with another model or other inputs into the
same directory is refused (``ConfigError``) instead of mixing results.

``client=None`` runs the same shard function in this process, one shard after another
(the single-process path; the parity test compares the two).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ecomrec.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)

JOBS = ("embed-users", "assign-segments", "embed-items")
Job = Literal["embed-users", "assign-segments", "embed-items"]
JOB_FILE = "_job.json"


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: everything a worker needs, as plain data (pickled to Dask)."""

    job: str
    index: int
    out_file: str
    source: str  # input file of this shard (sequences / embeddings part / catalogue)
    run_dir: str = ""
    segments_model: str = ""
    row_start: int = 0
    row_end: int = 0
    products: str = ""  # ingest products.parquet (ingest item id -> product_id)
    customers: str = ""  # ingest customers.parquet
    batch_size: int = 512


@dataclass
class JobReport:
    """What a run did: shards computed now, shards found done, seconds."""

    job: str
    out_dir: str
    shards: int
    computed: int
    skipped: int
    seconds: float
    rows: int = 0
    workers: int = 0
    computed_shards: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- shard work
@lru_cache(maxsize=2)
def _model(run_dir: str) -> Any:
    """The trained model, loaded once per worker process."""
    import torch

    from towers.inference import load_run

    torch.set_num_threads(1)
    return load_run(run_dir)


def _remap(run_dir: str, products: str) -> np.ndarray:
    """ingest item id -> model item id (0 = unknown to the model)."""
    tm = _model(run_dir)
    prod = pl.read_parquet(products).sort("item_id")
    ids = [tm.item_ids.get(p) or 0 for p in prod["product_id"].to_list()]
    return np.asarray([0, *ids], dtype=np.int64)


def _write(df: pl.DataFrame, out_file: str) -> None:
    tmp = f"{out_file}.tmp-{os.getpid()}"
    df.write_parquet(tmp)
    os.replace(tmp, out_file)  # atomic: a part file that exists is complete


def _embed_users(s: ShardSpec) -> pl.DataFrame:
    from towers.sequences import pad_batch

    tm = _model(s.run_dir)
    enc = tm.user_encoder()
    remap = _remap(s.run_dir, s.products)
    seq = pl.read_parquet(s.source).sort("user_id")
    users = seq["user_id"].to_numpy()
    vecs = np.zeros((len(users), tm.dim), np.float32)
    items, ts, ets = seq["items"].to_list(), seq["ts"].to_list(), seq["event_type"].to_list()
    for a in range(0, len(users), s.batch_size):
        b = slice(a, a + s.batch_size)
        seqs, tss, etl = [], [], []
        for it, t, e in zip(items[b], ts[b], ets[b], strict=True):
            m = remap[np.asarray(it, np.int64)]
            keep = m > 0  # events of products the model does not know are dropped
            seqs.append(m[keep])
            tss.append(np.asarray(t, np.int64)[keep])
            etl.append(np.asarray(e, np.int64)[keep])
        batch = pad_batch(seqs, tm.max_len, ts=tss, event_types=etl)
        vecs[b] = enc.encode(batch)  # (b, D)
    cust = (
        pl.scan_parquet(s.customers)
        .filter(pl.col("user_id").is_in(users.tolist()))
        .collect()
        .sort("user_id")
    )
    return pl.DataFrame(
        {
            "customer_id": cust["customer_id"],
            "user_id": users.astype(np.int32),
            "vector": pl.Series(vecs, dtype=pl.Array(pl.Float32, tm.dim)),
        }
    )


def _assign_segments(s: ShardSpec) -> pl.DataFrame:
    from segments.behaviour import cluster_inputs
    from segments.export import load_previous_segments

    sm = load_previous_segments(Path(s.segments_model).parent)
    part = pl.read_parquet(s.source)
    emb = part["vector"].to_numpy().astype(np.float32)  # (n, D)
    x, _ = cluster_inputs(emb, None, sm.cfg, sm.rfm_stats)
    return pl.DataFrame({"customer_id": part["customer_id"], "segment": sm.assign(x)})


def _embed_items(s: ShardSpec) -> pl.DataFrame:
    tm = _model(s.run_dir)
    if s.source:
        frame = pl.read_parquet(s.source)[s.row_start : s.row_end]
        vecs, ids = tm.embed_items(frame), frame["external_id"].cast(pl.Utf8)
    else:  # the model's own catalogue: its trained vectors
        vecs = tm.item_vectors()[s.row_start + 1 : s.row_end + 1]
        ids = pl.Series(tm.item_ids.external_ids[s.row_start : s.row_end])
    return pl.DataFrame(
        {
            "product_id": ids,
            "vector": pl.Series(vecs.astype(np.float32), dtype=pl.Array(pl.Float32, tm.dim)),
        }
    )


_WORK = {
    "embed-users": _embed_users,
    "assign-segments": _assign_segments,
    "embed-items": _embed_items,
}


def run_shard(spec: ShardSpec) -> tuple[int, int]:
    """Compute one shard and write its part file; returns (shard index, rows).

    A shard whose part file exists is not recomputed: Dask re-runs the tasks of a worker
    that died, including one that wrote its file but died before reporting it.
    """
    done = Path(spec.out_file)
    if done.exists():
        return spec.index, int(pl.scan_parquet(done).select(pl.len()).collect().item())
    df = _WORK[spec.job](spec)
    _write(df, spec.out_file)
    return spec.index, df.height


# --------------------------------------------------------------------------- planning
def plan_shards(
    job: Job,
    out_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    sequences: str | Path | None = None,
    embeddings: str | Path | None = None,
    segments_model: str | Path | None = None,
    items: str | Path | None = None,
    shard_rows: int = 50_000,
) -> tuple[list[ShardSpec], dict[str, Any]]:
    """The shards of a job and its identity (what ``_job.json`` records)."""
    out = Path(out_dir)
    ident: dict[str, Any] = {"job": job}
    if job not in JOBS:
        raise ConfigError(f"unknown batch job {job!r}; expected one of {JOBS}")
    if job in ("embed-users", "embed-items"):
        if run_dir is None:
            raise ConfigError(f"{job} needs --run (a trained run directory)")
        tm = _model(str(run_dir))
        ident.update(run_dir=str(Path(run_dir).resolve()), model_version=tm.model_version)
    specs: list[ShardSpec] = []
    if job == "embed-users":
        if sequences is None:
            raise ConfigError("embed-users needs --sequences (an ingest output directory)")
        root = Path(sequences)
        files = sorted((root / "sequences").glob("*.parquet"))
        if not files:
            raise NotFoundError(f"no sequences/*.parquet in {root} (run intake.ingest first)")
        ident["sequences"] = str(root.resolve())
        for i, f in enumerate(files):
            specs.append(
                ShardSpec(
                    job,
                    i,
                    str(out / f"part-{i:05d}.parquet"),
                    str(f),
                    run_dir=str(run_dir),
                    products=str(root / "products.parquet"),
                    customers=str(root / "customers.parquet"),
                )
            )
    elif job == "assign-segments":
        if embeddings is None or segments_model is None:
            raise ConfigError("assign-segments needs --embeddings and --segments-model")
        sm = Path(segments_model)
        if sm.is_dir():
            sm = sm / "segments_model.json"
        if not sm.exists():
            raise NotFoundError(f"no segment model at {sm}")
        files = sorted(Path(embeddings).glob("part-*.parquet"))
        if not files:
            raise NotFoundError(f"no part-*.parquet in {embeddings} (run embed-users first)")
        ident.update(embeddings=str(Path(embeddings).resolve()), segments_model=str(sm.resolve()))
        ident["segments_model_mtime"] = sm.stat().st_mtime_ns
        for i, f in enumerate(files):
            specs.append(
                ShardSpec(
                    job, i, str(out / f"part-{i:05d}.parquet"), str(f), segments_model=str(sm)
                )
            )
    else:
        assert run_dir is not None
        tm = _model(str(run_dir))
        if items is not None:
            n = pl.scan_parquet(items).select(pl.len()).collect().item()
            ident["items"] = str(Path(items).resolve())
        else:
            n = len(tm.item_ids)
        ident["shard_rows"] = shard_rows
        for i in range(math.ceil(n / shard_rows)):
            lo, hi = i * shard_rows, min(n, (i + 1) * shard_rows)
            specs.append(
                ShardSpec(
                    job,
                    i,
                    str(out / f"part-{i:05d}.parquet"),
                    str(items) if items is not None else "",
                    run_dir=str(run_dir),
                    row_start=lo,
                    row_end=hi,
                )
            )
    return specs, ident


def run_job(
    job: Job,
    out_dir: str | Path,
    client: Any = None,
    *,
    retries: int = 2,
    progress: bool = True,
    **inputs: Any,
) -> JobReport:
    """Run ``job`` into ``out_dir`` on a Dask ``client`` (None = in this process).

    ``inputs`` are :func:`plan_shards`'s keyword arguments. Shards already written by an
    earlier run of the same job are skipped.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    specs, ident = plan_shards(job, out, **inputs)
    out.mkdir(parents=True, exist_ok=True)
    jf = out / JOB_FILE
    if jf.exists():
        old = json.loads(jf.read_text())
        if old != ident:
            raise ConfigError(
                f"{out} holds another job's output ({old}); use a new directory or delete it"
            )
    else:
        jf.write_text(json.dumps(ident, indent=2))
    for stale in out.glob("*.tmp-*"):  # half-written by a killed worker
        stale.unlink()
    todo = [s for s in specs if not Path(s.out_file).exists()]
    log.info("%s: %d shards, %d already done", job, len(specs), len(specs) - len(todo))
    done: list[tuple[int, int]] = []
    workers = 0
    bar = tqdm(total=len(todo), desc=job, disable=not progress)
    if client is None:
        for s in todo:
            done.append(run_shard(s))
            bar.update()
    else:
        from distributed import as_completed

        workers = len(client.scheduler_info().get("workers", {}))
        futures = client.map(run_shard, todo, pure=False, retries=retries)
        for fut in as_completed(futures):
            done.append(fut.result())
            bar.update()
    bar.close()
    rows = sum(n for _, n in done)
    return JobReport(
        job=job,
        out_dir=str(out),
        shards=len(specs),
        computed=len(done),
        skipped=len(specs) - len(todo),
        seconds=time.perf_counter() - t0,
        rows=rows,
        workers=workers,
        computed_shards=sorted(i for i, _ in done),
    )


def read_output(out_dir: str | Path) -> pl.DataFrame:
    """All part files of a finished job, in shard order."""
    files = sorted(Path(out_dir).glob("part-*.parquet"))
    if not files:
        raise NotFoundError(f"no part files in {out_dir}")
    return pl.concat([pl.read_parquet(f) for f in files])


def report_dict(r: JobReport) -> dict[str, Any]:
    """The report as JSON-ready data."""
    return asdict(r)
