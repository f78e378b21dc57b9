"""The segments pipeline's results saved once, read by the analyst commands.

``ecomrec segments report|export --out DIR`` score every customer
(:func:`segments.export.score_customers`) and check the models on the held-out cutoff
(:func:`segments.churn.compare`); both are minutes of fitting. They are saved in
``DIR/scores/`` so that ``customers show|similar``, ``campaign ...`` and a rerun of the
report read them in about a second instead of refitting:

=========================  ===============================================================
``meta.json``              version, dataset name + fingerprint, config + hash, embedding
                           base (text model or tower run version), as-of, spend choice,
                           cutoffs of the evaluation
``customers.parquet``      the scored table (internal ``user_id``, features, RFM, segment,
                           probabilities, predicted and recent spend)
``embeddings.npy``         (n, D) float32 user embeddings, rows as in the table
``segments_model.json``    the behavioural segment model (centroids, stable ids)
``profiles.json``          one profile per behavioural segment
``evaluation.parquet``     held-out cutoff: ``user_id``, the labels and each model's
                           probabilities (``<model>:<task>``), for the report's charts
``evaluation.json``        cutoffs and the spend check of the held-out cutoff
=========================  ===============================================================

Freshness: the saved ``dataset_fingerprint`` (``Dataset.fingerprint()["id"]``), the config
hash and the embedding base must equal the current ones; anything else is *stale*
(:func:`check`). What to do with stale results is the caller's choice: the report refits
and replaces them, the read-only commands refuse (``MismatchError``). The folder is written
atomically (temporary sibling, then renamed over the old one).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from ecomrec.config import to_dict
from ecomrec.errors import MismatchError, NotFoundError
from intake.dataset import Dataset
from segments.behaviour import SegmentModel
from segments.churn import TASKS, Predictions
from segments.export import MarketingConfig, ScoredCustomers

log = logging.getLogger(__name__)

ARTIFACT_VERSION = 1
SCORES = "scores"
Status = Literal["fresh", "missing", "stale"]


@dataclass
class Evaluation:
    """The models on the held-out cutoff, as the report draws them."""

    train_cutoff_ts: int
    test_cutoff_ts: int
    users: np.ndarray  # (n,) internal user ids at the test cutoff
    labels: dict[str, np.ndarray]  # churn / high_value / future_spend -> (n,)
    predictions: dict[str, Predictions]  # model -> probabilities on the test cutoff
    spend: dict[str, Any] = field(default_factory=dict)  # Comparison.spend

    def by_task(self) -> dict[str, tuple[np.ndarray, dict[str, Predictions]]]:
        """``write_report``'s ``evaluation`` argument."""
        return {t: (self.labels[t], self.predictions) for t in TASKS}


def scores_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / SCORES


def _identity(ds: Dataset, cfg: MarketingConfig, base: str) -> dict[str, Any]:
    from ecomrec.config import config_hash

    return {
        "dataset": ds.name,
        "dataset_fingerprint": str(ds.fingerprint()["id"]),
        "config_hash": config_hash(cfg),
        "embedding_base": base,
    }


def check(out_dir: str | Path, ds: Dataset, cfg: MarketingConfig, base: str) -> tuple[Status, str]:
    """("fresh" | "missing" | "stale", why) of the saved scores in ``out_dir``."""
    meta_p = scores_dir(out_dir) / "meta.json"
    if not meta_p.is_file():
        return "missing", f"no saved scores in {scores_dir(out_dir)}"
    meta = json.loads(meta_p.read_text())
    if meta.get("version") != ARTIFACT_VERSION:
        return "stale", f"saved scores have format {meta.get('version')}, not {ARTIFACT_VERSION}"
    want = _identity(ds, cfg, base)
    names = {
        "dataset_fingerprint": "dataset",
        "config_hash": "config",
        "embedding_base": "embeddings",
    }
    for key, what in names.items():
        if meta.get(key) != want[key]:
            return "stale", (
                f"{scores_dir(out_dir)} was computed on another {what}: {key} "
                f"{meta.get(key)!r} (dataset {meta.get('dataset')!r}), now {want[key]!r} "
                f"(dataset {ds.name!r})"
            )
    return "fresh", "up to date"


def save(
    out_dir: str | Path,
    scored: ScoredCustomers,
    ds: Dataset,
    base: str,
    evaluation: Evaluation | None = None,
) -> Path:
    """Write ``out_dir/scores/`` (atomically, replacing an older one); returns its path."""
    final = scores_dir(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{SCORES}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        scored.table.write_parquet(tmp / "customers.parquet")
        np.save(tmp / "embeddings.npy", np.ascontiguousarray(scored.embeddings, np.float32))
        (tmp / "segments_model.json").write_text(json.dumps(scored.segment_model.to_dict()))
        (tmp / "profiles.json").write_text(json.dumps(scored.profiles, default=_jsonable))
        meta = {
            "version": ARTIFACT_VERSION,
            **_identity(ds, scored.cfg, base),
            "config": to_dict(scored.cfg),
            "now_ts": int(scored.now_ts),
            "model_version": scored.model_version,
            "spend_choice": scored.spend_choice,
            "customers": scored.table.height,
            "evaluation": evaluation is not None,
        }
        if evaluation is not None:
            cols: dict[str, Any] = {"user_id": evaluation.users.astype(np.int64)}
            cols.update({k: np.asarray(v, np.float64) for k, v in evaluation.labels.items()})
            for name, p in evaluation.predictions.items():
                for t in TASKS:
                    cols[f"{name}:{t}"] = np.asarray(p.of(t), np.float64)
            pl.DataFrame(cols).write_parquet(tmp / "evaluation.parquet")
            (tmp / "evaluation.json").write_text(
                json.dumps(
                    {
                        "train_cutoff_ts": int(evaluation.train_cutoff_ts),
                        "test_cutoff_ts": int(evaluation.test_cutoff_ts),
                        "models": list(evaluation.predictions),
                        "spend": evaluation.spend,
                    },
                    default=_jsonable,
                )
            )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_jsonable))
        old = None
        if final.exists():
            old = final.parent / f".{SCORES}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved segment scores of %d customers to %s", scored.table.height, final)
    return final


def load(
    out_dir: str | Path, ds: Dataset, cfg: MarketingConfig, base: str
) -> tuple[ScoredCustomers, Evaluation | None]:
    """The saved scores of ``out_dir``; ``NotFoundError`` when there are none and
    ``MismatchError`` when they were made from other data, config or embeddings."""
    status, why = check(out_dir, ds, cfg, base)
    if status == "missing":
        raise NotFoundError(why)
    if status == "stale":
        raise MismatchError(
            f"{why}. Recompute them with `ecomrec segments report --out {out_dir}` on this "
            "dataset and options (or pass --refit)"
        )
    return _read(out_dir, cfg)


def _read(out_dir: str | Path, cfg: MarketingConfig) -> tuple[ScoredCustomers, Evaluation | None]:
    d = scores_dir(out_dir)
    meta = json.loads((d / "meta.json").read_text())
    table = pl.read_parquet(d / "customers.parquet")
    scored = ScoredCustomers(
        now_ts=int(meta["now_ts"]),
        table=table,
        embeddings=np.load(d / "embeddings.npy"),
        segment_model=SegmentModel.from_dict(json.loads((d / "segments_model.json").read_text())),
        profiles=json.loads((d / "profiles.json").read_text()),
        model_version=str(meta["model_version"]),
        config_hash=str(meta["config_hash"]),
        cfg=cfg,
        spend_choice=dict(meta.get("spend_choice") or {}),
    )
    evaluation = None
    if (d / "evaluation.json").is_file():
        ej = json.loads((d / "evaluation.json").read_text())
        ev = pl.read_parquet(d / "evaluation.parquet")
        users = ev["user_id"].to_numpy().astype(np.int64)
        preds = {
            m: Predictions(users, ev[f"{m}:churn"].to_numpy(), ev[f"{m}:high_value"].to_numpy())
            for m in ej["models"]
        }
        labels = {
            c: ev[c].to_numpy()
            for c in ev.columns
            if c != "user_id" and ":" not in c  # the label columns
        }
        evaluation = Evaluation(
            int(ej["train_cutoff_ts"]),
            int(ej["test_cutoff_ts"]),
            users,
            labels,
            preds,
            dict(ej.get("spend") or {}),
        )
    return scored, evaluation


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot save {type(o).__name__} in the segment scores")


def evaluate(ds: Dataset, cfg: MarketingConfig, run_dir: str | Path | None) -> Evaluation:
    """BG/NBD, GBDT and the frozen heads on the held-out cutoff (:func:`segments.churn.compare`)."""
    from segments.churn import compare

    comp = compare(
        ds,
        cfg.churn,
        source=cfg.source,
        run_dir=str(run_dir) if run_dir is not None else None,
        modes=("frozen",),
    )
    test = comp.test
    return Evaluation(
        comp.train.cutoff_ts,
        test.cutoff_ts,
        test.users,
        {t: test.label(t) for t in (*TASKS, "future_spend")},
        {k: v for k, v in comp.predictions.items() if k != "ours"},
        comp.spend,
    )


def obtain(
    ds: Dataset,
    cfg: MarketingConfig,
    *,
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    on_stale: Literal["refit", "refuse"] = "refuse",
    refit: bool = False,
    with_evaluation: bool = False,
    previous: SegmentModel | None = None,
) -> tuple[ScoredCustomers, Evaluation | None]:
    """The scored customers (and the held-out evaluation when asked) of ``ds``: read from
    ``out_dir/scores`` when they are up to date, else computed and saved there.

    Stale scores (other dataset fingerprint, config or embeddings) are refitted with
    ``on_stale="refit"`` and refused (``MismatchError``) with ``"refuse"``; ``refit=True``
    (or a ``previous`` segment model to follow) always recomputes.
    """
    from segments.export import embedding_base, score_customers

    base = embedding_base(run_dir)
    if out_dir is not None and not refit and previous is None:
        status, why = check(out_dir, ds, cfg, base)
        if status == "fresh":
            scored, ev = _read(out_dir, cfg)
            if ev is None and with_evaluation:
                ev = evaluate(ds, cfg, run_dir)
                save(out_dir, scored, ds, base, ev)
            return scored, ev
        if status == "stale" and on_stale == "refuse":
            load(out_dir, ds, cfg, base)  # raises the MismatchError naming both
        if status == "stale":
            log.warning("%s: refitting", why)
    scored = score_customers(ds, cfg, run_dir=run_dir, previous=previous)
    ev = evaluate(ds, cfg, run_dir) if with_evaluation else None
    if out_dir is not None:
        save(out_dir, scored, ds, base, ev)
    return scored, ev
