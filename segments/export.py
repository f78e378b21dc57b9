"""Score every customer and write the analyst export (Parquet).

:func:`score_customers` is the one marketing pipeline used by the export, the HTML
report and the campaign commands:

1. features and RFM segments of every customer at ``now`` (the day after the last
   event: no labels exist yet);
2. churn / high-value heads ("ours", frozen user embeddings + RFM features) trained at
   the latest *labelled* cutoff (its window ends at ``now``), then applied at ``now``;
   predicted spend = the GBDT regressor trained there or "same as the last H days",
   whichever had the lower MAE on the window ending at that cutoff
   (:func:`segments.churn.choose_spend`);
3. user embeddings at ``now`` clustered into behavioural segments (ids stable w.r.t.
   a previous export's ``segments_model.json``) and profiled.

:func:`write_export` writes ``customers.parquet`` (one row per customer),
``segments.parquet`` (one row per behavioural segment, with its centroid embedding and
profile), ``segments_model.json`` (for the next refresh) and ``manifest.json``.
Customer ids are pseudonymised with HMAC-SHA256 under a key (``--salt`` /
``$ECOMREC_EXPORT_SALT``) by default; raw external ids
only with ``raw_ids=True``. The salt is never written to the export.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecomrec.config import config_hash, to_dict
from ecomrec.errors import ConfigError, NotFoundError
from intake.dataset import Dataset
from segments.behaviour import (
    EmbeddingSource,
    SegmentConfig,
    SegmentModel,
    cluster_inputs,
    fit_segments,
    profile_segments,
    user_embeddings,
)
from segments.churn import (
    ChurnConfig,
    TowerHeads,
    choose_spend,
    limited_threads,
    predict_spend,
    prepare,
    recent_spend,
)
from segments.labels import cutoff_for

log = logging.getLogger(__name__)

DAY = 86400
SALT_ENV = "ECOMREC_EXPORT_SALT"
EXPORT_VERSION = 1

CUSTOMER_COLUMNS: tuple[str, ...] = (
    "customer_id",
    "recency_days",
    "frequency",
    "monetary",
    "tenure_days",
    "r_score",
    "f_score",
    "m_score",
    "rfm_code",
    "rfm_segment",
    "segment_id",
    "segment_name",
    "churn_probability",
    "high_value_probability",
    "predicted_spend",
    "embedding",
    "model_version",
    "config_hash",
)
SEGMENT_COLUMNS: tuple[str, ...] = (
    "segment_id",
    "name",
    "size",
    "share",
    "churn_rate",
    "mean_monetary",
    "price_tier",
    "top_products",
    "top_words",
    "top_categories",
    "centroid",
    "profile_json",
    "model_version",
)


@dataclass(frozen=True)
class MarketingConfig:
    """Everything that defines a scoring run (hashed into the export)."""

    dataset: str = "online-retail"
    source: EmbeddingSource = "text"
    churn: ChurnConfig = field(default_factory=ChurnConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)


@dataclass
class ScoredCustomers:
    """Every customer at ``now`` with features, segments, probabilities and embeddings."""

    now_ts: int
    table: pl.DataFrame  # user_id, features, RFM, segment_id/name, probabilities, spend
    embeddings: np.ndarray  # (n, D) aligned with table rows
    segment_model: SegmentModel
    profiles: list[dict[str, Any]]
    model_version: str
    config_hash: str
    cfg: MarketingConfig
    # how ``predicted_spend`` was made: segments.churn.SpendChoice.to_dict()
    spend_choice: dict[str, Any] = field(default_factory=dict)

    @property
    def users(self) -> np.ndarray:
        return self.table["user_id"].to_numpy().astype(np.int64)


def embedding_base(run_dir: str | Path | None) -> str:
    """What the user embeddings come from: ``text:all-MiniLM-L6-v2`` or ``tower:<version>``."""
    if run_dir is None:
        return "text:all-MiniLM-L6-v2"
    from towers.inference import load_run

    return f"tower:{load_run(run_dir).model_version}"


def score_customers(
    ds: Dataset,
    cfg: MarketingConfig = MarketingConfig(),
    *,
    run_dir: str | Path | None = None,
    previous: SegmentModel | None = None,
    now_ts: int | None = None,
    embed: Callable[[Dataset, int, np.ndarray], np.ndarray] | None = None,
) -> ScoredCustomers:
    """Run the marketing pipeline (see the module docstring) on ``ds``.

    ``embed(ds, cutoff_ts, users) -> (n, D)`` replaces the configured embedding source
    (e.g. a precomputed or custom user representation).
    """
    with limited_threads(cfg.churn.threads):
        return _score_customers(
            ds, cfg, run_dir=run_dir, previous=previous, now_ts=now_ts, embed=embed
        )


def _score_customers(
    ds: Dataset,
    cfg: MarketingConfig,
    *,
    run_dir: str | Path | None,
    previous: SegmentModel | None,
    now_ts: int | None,
    embed: Callable[[Dataset, int, np.ndarray], np.ndarray] | None,
) -> ScoredCustomers:
    ccfg = cfg.churn
    now = int(now_ts) if now_ts is not None else (int(ds.events["ts"].max()) // DAY + 1) * DAY  # type: ignore[arg-type]
    label_cut = cutoff_for(ds.events.filter(pl.col("ts") < now), ccfg.horizon_days)
    train, _ = prepare(ds, label_cut, ccfg)
    cur, _ = prepare(ds, now, ccfg, scorer=None, with_labels=False)
    if embed is None:

        def embed(d: Dataset, c: int, u: np.ndarray) -> np.ndarray:
            return user_embeddings(d, c, u, source=cfg.source, run_dir=run_dir)

    emb_tr = embed(ds, label_cut, train.users)
    emb_now = embed(ds, now, cur.users)
    heads = TowerHeads(ccfg).fit_frozen(emb_tr, train)
    pred = heads.predict_frozen(emb_now, cur)
    # predicted spend: GBDT or "same as the last H days", chosen on the window that ends
    # at the training cutoff (regressor fitted one horizon earlier), never on ``now``
    choice = choose_spend(ds, ccfg, train)
    spend = predict_spend(ds, ccfg, choice, train, cur)
    recent = recent_spend(ds, now, cur.users, ccfg.horizon_days)
    x, stats = cluster_inputs(
        emb_now, cur.table, cfg.segments, previous.rfm_stats if previous else None
    )
    sm = fit_segments(x, cfg.segments, previous=previous, rfm_stats=stats)
    seg = sm.assign(x)
    profiles = profile_segments(ds, now, cur.users, seg, cur.table, pred.churn)
    names = {p["segment"]: p["name"] for p in profiles}
    base_version = embedding_base(run_dir)
    chash = config_hash(cfg)
    version = f"{base_version}+heads-frozen@{dt.datetime.fromtimestamp(label_cut, dt.UTC):%Y-%m-%d}"
    table = cur.table.with_columns(
        pl.Series("segment_id", seg, dtype=pl.Int64),
        pl.Series("segment_name", [names[int(s)] for s in seg], dtype=pl.Utf8),
        pl.Series("churn_probability", pred.churn, dtype=pl.Float64),
        pl.Series("high_value_probability", pred.high_value, dtype=pl.Float64),
        pl.Series("predicted_spend", spend, dtype=pl.Float64),
        pl.Series("recent_spend", recent, dtype=pl.Float64),
    )
    log.info("scored %d customers at %d into %d segments", table.height, now, len(profiles))
    return ScoredCustomers(now, table, emb_now, sm, profiles, version, chash, cfg, choice.to_dict())


# --------------------------------------------------------------------------- ids
def resolve_salt(salt: str | None) -> tuple[str, bool]:
    """(salt, persistent): the given salt, else ``$ECOMREC_EXPORT_SALT``, else a random one
    (pseudonyms are then not joinable across exports; a warning says so)."""
    if salt:
        return salt, True
    env = os.environ.get(SALT_ENV)
    if env:
        return env, True
    log.warning(
        "no salt given and %s unset: using a random one-off salt; pseudonymous ids will "
        "not match between exports",
        SALT_ENV,
    )
    return secrets.token_hex(16), False


def pseudonymise(external_ids: list[str], salt: str) -> list[str]:
    """HMAC-SHA256 pseudonyms (20 hex chars) of external ids keyed by ``salt`` (the export
    key): deterministic per key, so exports with the same key join; not recomputable
    without it."""
    if not salt:
        raise ConfigError("pseudonymisation needs a non-empty key")
    key = salt.encode()
    return [hmac.new(key, str(e).encode(), hashlib.sha256).hexdigest()[:20] for e in external_ids]


# --------------------------------------------------------------------------- tables
def customers_frame(
    scored: ScoredCustomers, ds: Dataset, *, raw_ids: bool = False, salt: str | None = None
) -> pl.DataFrame:
    """The per-customer export table (CUSTOMER_COLUMNS), ids pseudonymised unless ``raw_ids``."""
    ext = [ds.users.to_external(int(u)) for u in scored.users]
    if raw_ids:
        ids = ext
    else:
        s, _ = resolve_salt(salt)
        ids = pseudonymise(ext, s)
    d = scored.embeddings.shape[1]
    emb = pl.Series("embedding", scored.embeddings.astype(np.float32)).cast(pl.Array(pl.Float32, d))
    return scored.table.with_columns(
        pl.Series("customer_id", ids, dtype=pl.Utf8),
        emb,
        pl.lit(scored.model_version).alias("model_version"),
        pl.lit(scored.config_hash).alias("config_hash"),
    ).select(list(CUSTOMER_COLUMNS))


def segments_frame(scored: ScoredCustomers) -> pl.DataFrame:
    """One row per behavioural segment: profile fields, the profile as JSON and the centroid
    in the embedding space (mean of the members' normalised embeddings)."""
    e = scored.embeddings.astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    seg = scored.table["segment_id"].to_numpy()
    rows = []
    for p in scored.profiles:
        c = e[seg == p["segment"]].mean(0)
        rows.append(
            {
                "segment_id": int(p["segment"]),
                "name": str(p["name"]),
                "size": int(p["size"]),
                "share": float(p["share"]),
                "churn_rate": float(p.get("churn_rate", float("nan"))),
                "mean_monetary": float(p.get("mean_monetary", float("nan"))),
                "price_tier": p.get("price_tier"),
                "top_products": list(p.get("top_products", [])),
                "top_words": list(p.get("top_words", [])),
                "top_categories": list(p.get("top_categories", [])),
                "centroid": c.astype(np.float32).tolist(),
                "profile_json": json.dumps(p, default=str),
                "model_version": scored.model_version,
            }
        )
    d = e.shape[1]
    schema = {
        "segment_id": pl.Int64(),
        "name": pl.Utf8(),
        "size": pl.Int64(),
        "share": pl.Float64(),
        "churn_rate": pl.Float64(),
        "mean_monetary": pl.Float64(),
        "price_tier": pl.Utf8(),
        "top_products": pl.List(pl.Utf8()),
        "top_words": pl.List(pl.Utf8()),
        "top_categories": pl.List(pl.Utf8()),
        "centroid": pl.Array(pl.Float32(), d),
        "profile_json": pl.Utf8(),
        "model_version": pl.Utf8(),
    }
    return pl.DataFrame(rows, schema=schema).select(list(SEGMENT_COLUMNS))  # type: ignore[arg-type]


def write_export(
    out_dir: str | Path,
    scored: ScoredCustomers,
    ds: Dataset,
    *,
    raw_ids: bool = False,
    salt: str | None = None,
) -> dict[str, Any]:
    """Write the export files into ``out_dir``; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if raw_ids:
        persistent = True
        log.warning("exporting RAW customer ids (explicitly requested)")
    else:
        salt, persistent = resolve_salt(salt)
    cust = customers_frame(scored, ds, raw_ids=raw_ids, salt=salt)
    segs = segments_frame(scored)
    cust.write_parquet(out / "customers.parquet")
    segs.write_parquet(out / "segments.parquet")
    (out / "segments_model.json").write_text(json.dumps(scored.segment_model.to_dict()))
    manifest = {
        "export_version": EXPORT_VERSION,
        "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(),
        "as_of": dt.datetime.fromtimestamp(scored.now_ts, dt.UTC).isoformat(),
        "customers": cust.height,
        "segments": segs.height,
        "ids": "raw" if raw_ids else "hmac-sha256",
        "ids_stable_across_exports": persistent,
        "model_version": scored.model_version,
        "config_hash": scored.config_hash,
        "config": to_dict(scored.cfg),
        "embedding_dim": int(scored.embeddings.shape[1]),
        "files": ["customers.parquet", "segments.parquet", "segments_model.json"],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_previous_segments(export_dir: str | Path) -> SegmentModel:
    """The segment model of a previous export, to keep segment ids stable on refresh."""
    p = Path(export_dir) / "segments_model.json"
    if not p.exists():
        raise NotFoundError(f"no segments_model.json in {export_dir}")
    return SegmentModel.from_dict(json.loads(p.read_text()))
