"""``ecomrec refresh``: new events in, a better model and index out, safely.

One refresh, under an exclusive lock of the state directory (:mod:`lifecycle.state`; the
deploy record is :mod:`indexing.deploy`):

1. ingest: load the dataset (the loaders' validation and drop report); the new data is
   every event at or after the live record's ``data_until``; none -> exit 4;
2. windows: the most recent ``eval_days`` (at most half of the new period) are the
   shadow-evaluation window ``[w0, now)``;
3. warm start (:mod:`lifecycle.warmstart`) from the live model onto the current
   catalogue; train on events before ``w0`` of the customers active since
   ``data_until`` plus a ``replay_fraction`` sample of the others (fixed epochs, seeded);
4. shadow evaluation (:mod:`lifecycle.shadow`) of candidate vs live on ``[w0, now)``:
   full-ranking NDCG@10 and churn ROC-AUC, both recorded; promote only if
   ``cand >= live * (1 - tolerance)`` and ``cand_auc >= live_auc - churn_tolerance``;
5. drift report (:mod:`lifecycle.drift`);
6. on promotion: refit the candidate on all events (``refit_epochs`` over customers active
   in the window), save run + dataset snapshot + ONNX, re-embed the catalogue, build and
   verify a new index version (unpublished), commit ``deploy.json`` (the commit point),
   then move the alias. Otherwise the live model stays: exit 3.

Killed at any step before the commit, nothing live changed (the run is in ``tmp/``, the
new index version is unpublished and removed by the next refresh); killed after it, the
next refresh moves the alias to the committed version first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecomrec.config import DEPLOY_TABLES, from_dict, read_config, to_dict
from ecomrec.errors import ConfigError, DataError
from indexing.base import IndexConfig
from indexing.build import (
    build_version,
    has_text,
    item_payloads,
    open_store,
    publish_version,
    without_untrained,
)
from indexing.deploy import DEPLOY_FILE, DeployState, Record, write_json_atomic
from intake.dataset import Dataset
from lifecycle.drift import DriftThresholds, drift_report, write_report
from lifecycle.shadow import DAY, churn_metrics, ranking_metrics, user_vectors, window_targets
from lifecycle.state import link_current as _link_current
from lifecycle.state import refresh_lock
from lifecycle.warmstart import transplant
from towers.inference import MANIFEST_FILE, MODEL_FILE, served_kind
from towers.model import load_checkpoint, save_checkpoint
from towers.sequences import Interactions
from training.trainer import RunConfig, Trainer, peak_rss_mb

log = logging.getLogger(__name__)

# Exit codes of ``ecomrec refresh`` (documented in docs/lifecycle.md).
EXIT_PROMOTED = 0
EXIT_ERROR = 2  # bad input / config (ecomrec.errors): nothing changed
EXIT_NOT_PROMOTED = 3  # candidate worse beyond the tolerance: live model kept
EXIT_NO_NEW_DATA = 4  # no event since the last refresh: nothing done
EXIT_DRIFT_ALERT = 5  # promoted, but a drift threshold was exceeded
EXIT_STAGED = 6  # candidate staged as an A/B variant, or its online test still running
EXIT_LOCKED = 75  # another refresh is running (EX_TEMPFAIL: retry later)


@dataclass(frozen=True)
class RefreshConfig:
    """Settings of a refresh (TOML ``[refresh]``; ``[drift]`` = thresholds, ``[index]``)."""

    eval_days: float = 7.0  # shadow window, capped at half of the new period
    epochs: int = 2  # warm-start epochs over the active customers
    lr: float = 1e-3
    refit_epochs: int = 1  # after promotion: epochs over the window's customers, all data
    replay_fraction: float = 0.2  # share of inactive customers replayed (forgetting)
    batch_size: int = 0  # 0 = the live run's
    new_item_neighbours: int = 5  # id init of new items from their nearest known items
    tolerance: float = 0.02  # relative NDCG@10 drop allowed
    churn_tolerance: float = 0.02  # absolute churn ROC-AUC drop allowed
    min_eval_users: int = 20  # fewer evaluated customers -> not promoted
    churn_max_users: int = 2000
    export_onnx: bool = True
    index_queries: int = 500  # real user vectors for the index recall check
    threads: int = 1
    seed: int = 0
    drift: DriftThresholds = field(default_factory=DriftThresholds)
    # the live event log to read before refreshing (docs/lifecycle.md "Reading the live
    # log"): a SQLite file or nats://host:4222[,nats://...]; "" = use --dataset as it is
    event_log: str = ""
    event_log_stream: str = "ECOMREC_EVENTS"  # JetStream stream of a nats:// event_log
    # Promotion (docs/outcomes.md, "Promotion by online result"): "offline" = on the shadow
    # evaluation above; "online" = a candidate that passes it is staged as an A/B variant
    # (online_share of the customers) and promoted later by `refresh --decide` on the online
    # report: each variant >= online_min_impressions, then the online_metric difference's
    # interval must exclude a loss beyond online_margin; hi < 0 or online_max_days -> reject.
    promote: str = "offline"
    online_share: float = 0.5
    online_metric: str = "ctr"
    online_min_impressions: int = 1000
    online_margin: float = 0.0
    online_max_days: float = 14.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.refit_epochs < 0:
            raise ConfigError("refresh.epochs must be >= 1 and refresh.refit_epochs >= 0")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ConfigError("refresh.replay_fraction must be in [0, 1]")
        if self.eval_days <= 0:
            raise ConfigError("refresh.eval_days must be > 0")
        if self.promote not in ("offline", "online"):
            raise ConfigError(f"refresh.promote must be offline or online, got {self.promote!r}")
        if not 0.0 < self.online_share < 1.0:
            raise ConfigError(f"refresh.online_share must be in (0, 1), got {self.online_share}")
        from lifecycle.online import rule_of

        rule_of(self)  # online_metric / _min_impressions / _margin / _max_days checked


def _decision(
    base: dict[str, Any],
    promote: bool,
    reason: str,
    metrics: dict[str, Any],
    cfg: Any,
    alerts: Any,
    **extra: Any,
) -> dict[str, Any]:
    """The decision record of a refresh (the same fields for warm start and refit)."""
    m_live, m_cand, churn = metrics["live"], metrics["candidate"], metrics["churn"]
    return {
        **base,
        "decision": "promoted" if promote else "not-promoted",
        "reason": reason,
        **extra,
        "window": metrics["window"],
        "ndcg@10": {"live": m_live.get("ndcg@10"), "candidate": m_cand.get("ndcg@10")},
        "churn_auc": {
            "live": churn.get("live", {}).get("auc"),
            "candidate": churn.get("candidate", {}).get("auc"),
        },
        "metrics": metrics,
        "tolerance": cfg.tolerance,
        "churn_tolerance": cfg.churn_tolerance,
        "alerts": alerts,
    }


def load_config(
    path: str | Path | None, sets: Sequence[str] = ()
) -> tuple[RefreshConfig, dict[str, Any]]:
    """(RefreshConfig, [index] table) from a TOML file (defaults without one) and
    ``--set refresh.KEY=VALUE`` / ``drift.KEY=VALUE`` overrides; the file may be the
    deployment's serve.toml (its ``[serve]`` table is ignored here)."""
    src = read_config(path, sets)
    src.check_tables(DEPLOY_TABLES)
    cfg = src.build(RefreshConfig, "refresh")
    if "drift" in src.data:
        cfg = dataclasses.replace(cfg, drift=src.build(DriftThresholds, "drift"))
    return cfg, src.table("index")


@dataclass
class RefreshResult:
    """What a refresh decided and where its report is."""

    decision: str  # promoted | not-promoted | no-new-data
    exit_code: int
    reason: str
    report_dir: Path | None
    record: Record | None
    metrics: dict[str, Any]
    timings: dict[str, float]
    alerts: list[str]


def default_state_dir(index: str | Path) -> Path:
    p = Path(index)
    return p.with_name(p.name + ".refresh")


def _step(step: str) -> None:
    log.info("refresh step: %s", step)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def refresh(
    run: str | Path,
    dataset: Dataset,
    index: str | Path,
    *,
    config: RefreshConfig | None = None,
    index_cfg: dict[str, Any] | None = None,
    state_dir: str | Path | None = None,
    since: int | None = None,
    online_report: dict[str, Any] | None = None,
) -> RefreshResult:
    """Run one refresh (see the module docstring). ``run``: the live run directory used to
    bootstrap the state (later refreshes follow ``deploy.json``); ``since``: bootstrap
    only, the first event time not in the live model's training data."""
    cfg = config or RefreshConfig()
    state = Path(state_dir) if state_dir else default_state_dir(index)
    icfg = IndexConfig.from_dict({**(index_cfg or {}), "location": str(index)})
    with refresh_lock(state):
        if (state / "staged.json").exists():  # an online test runs: decide it, train nothing
            return decide_online(state, icfg, cfg, online_report)
        return _refresh_locked(Path(run), dataset, icfg, cfg, state, since)


def decide_online(
    state: Path,
    icfg: IndexConfig,
    cfg: RefreshConfig,
    report: dict[str, Any] | None,
    *,
    now: float | None = None,
) -> RefreshResult:
    """The online decision on the staged candidate (caller holds the lock): exit 0
    promoted, 3 rejected, 6 still testing (also when no report was given)."""
    from lifecycle.online import decide_staged, read_staged

    staged = read_staged(state) or {}
    name = f"decide-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    report_dir = state / "reports" / name
    report_dir.mkdir(parents=True, exist_ok=True)
    if report is None:
        reason = (
            f"online test {staged.get('experiment')} running: give --online-report "
            "(`ecomrec report online`) to decide"
        )
        write_json_atomic(report_dir / "decision.json", {"decision": "testing", "reason": reason})
        return RefreshResult("testing", EXIT_STAGED, reason, report_dir, None, {}, {}, [])
    store = open_store(icfg)
    try:
        verdict, rec = decide_staged(state, store, cfg, report, now=now)
    finally:
        store.close()
    decision, code = {
        "promote": ("promoted", EXIT_PROMOTED),
        "reject": ("not-promoted", EXIT_NOT_PROMOTED),
        "wait": ("testing", EXIT_STAGED),
    }[verdict.action]
    dec = {
        "decision": decision,
        "reason": verdict.reason,
        "online": verdict.to_dict(),
        "staged": staged,
        "report_window": {k: report.get(k) for k in ("since", "until", "generated_at")},
    }
    write_json_atomic(report_dir / "decision.json", dec)
    return RefreshResult(decision, code, verdict.reason, report_dir, rec, dec, {}, [])


def _refresh_locked(
    run: Path,
    ds: Dataset,
    icfg: IndexConfig,
    cfg: RefreshConfig,
    state: Path,
    since: int | None,
    live_log: dict[str, Any] | None = None,
) -> RefreshResult:
    import torch

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    tmp = state / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed refresh
    for stale in state.glob(DEPLOY_FILE + ".tmp*"):  # a deploy.json write it never renamed
        stale.unlink(missing_ok=True)
    tmp.mkdir(parents=True)
    deploy = DeployState(state)
    store = open_store(icfg)
    try:
        live = deploy.live() if deploy.exists() else _bootstrap(run, ds, store, icfg, deploy, since)
        _reconcile(store, icfg, deploy, live)
        _step("ingested")
        ev = ds.events
        if ev.height == 0:
            raise DataError("the dataset has no events", file=ds.name)
        now = int(ev["ts"].max()) + 1  # type: ignore[arg-type]
        new_ev = ev.filter(pl.col("ts") >= live.data_until)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"refresh-{stamp}"
        report_dir = state / "reports" / name
        # where the events came from (a file or the live log) is not part of the input
        cfg_fp = {k: v for k, v in to_dict(cfg).items() if not k.startswith("event_log")}
        fp = _fingerprint(live.model_version, live.data_until, now, ev.height, ds.n_items, cfg_fp)
        base: dict[str, Any] = {
            "live_run": live.run,
            "live_model_version": live.model_version,
            "data_until": live.data_until,
            "now": now,
            "new_events": new_ev.height,
            "fingerprint": fp,
            "drop_report": ds.report.to_dict(),
        }
        if live_log is not None:  # ecomrec refresh --event-log: the log positions consumed
            base["live_log"] = live_log
        if new_ev.height == 0:
            dec: dict[str, Any] = {
                **base,
                "decision": "no-new-data",
                "reason": "no event since the last refresh",
            }
            report_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(report_dir / "decision.json", dec)
            return RefreshResult(
                "no-new-data", EXIT_NO_NEW_DATA, dec["reason"], report_dir, None, {}, timings, []
            )
        span = now - live.data_until
        w0 = int(now - min(cfg.eval_days * DAY, span / 2))
        inter = Interactions.from_events(ev, ds.n_users, ds.n_items)
        targets, history = window_targets(inter, w0, now)
        if served_kind(live.run) != "two-tower":  # basket / ALS / EASE: refit, not warm start
            return _refresh_refit(
                ds, inter, targets, history, cfg, store, icfg, deploy, live, state, tmp,
                name, report_dir, base, w0, now, timings, t_all,
            )  # fmt: skip
        ck = load_checkpoint(Path(live.run) / MODEL_FILE)[0]
        rcfg = _train_config(ck.meta.get("run_config", {}), cfg, epochs=cfg.epochs)
        ids = ds.item_ids.external_ids
        live_tp = transplant(ck, ds.items, ids, np.zeros(ds.n_items + 1), init_new_ids=False)
        cand_tp = transplant(
            ck, ds.items, ids, history.item_counts(), neighbours=cfg.new_item_neighbours
        )
        # 3. warm start on the customers active since the last refresh (+ replay)
        t = time.perf_counter()
        train = _active(history, live.data_until, cfg.replay_fraction, cfg.seed)
        trainer = Trainer(
            rcfg, ds.items, ids, tmp / "probe", init_model=cand_tp.model, vocab=ck.vocab
        )
        cand, _ = trainer.fit(train, None, resume=False)
        timings["train_seconds"] = time.perf_counter() - t
        _step("trained")
        # 4. shadow evaluation on [w0, now)
        t = time.perf_counter()
        max_len = ck.user_cfg.max_len
        m_live = ranking_metrics(live_tp.model, targets, history, max_len)
        m_cand = ranking_metrics(cand, targets, history, max_len)
        churn = churn_metrics(
            {"live": live_tp.model, "candidate": cand},
            inter,
            w0,
            now - w0,
            max_len,
            cfg.churn_max_users,
            cfg.seed,
        )
        timings["eval_seconds"] = time.perf_counter() - t
        promote, reason = decide(m_live, m_cand, churn, cfg)
        metrics = {"live": m_live, "candidate": m_cand, "churn": churn, "window": [w0, now]}
        _step("evaluated")
        t = time.perf_counter()
        drift = drift_report(
            events=ev,
            items=ds.items,
            inter=inter,
            live_items=set(ck.item_ids),
            since=live.data_until,
            now=now,
            live=live_tp.model,
            candidate=cand,
            max_len=max_len,
            churn=churn,
            thresholds=cfg.drift,
            seed=cfg.seed,
        )
        timings["drift_seconds"] = time.perf_counter() - t
        dec = _decision(base, promote, reason, metrics, cfg, drift["alerts"])
        record = None
        if promote:
            record = _promote(
                ds, inter, cand, ck, rcfg, cfg, store, icfg, deploy, live, state, tmp, name,
                w0, now, dec, timings,
            )  # fmt: skip
            dec["promoted_run"] = record.run
            dec["index_version"] = record.index_version
        timings["total_seconds"] = time.perf_counter() - t_all
        dec["timings"] = timings
        dec["peak_rss_mb"] = peak_rss_mb()
        write_report(drift, dec, report_dir)
        write_json_atomic(report_dir / "decision.json", dec)
        if promote:
            code = EXIT_DRIFT_ALERT if drift["alerts"] else EXIT_PROMOTED
        else:
            code = EXIT_NOT_PROMOTED
        if dec["decision"] == "staged":
            code = EXIT_STAGED
        log.info("refresh %s: %s (%s)", name, dec["decision"], reason)
        return RefreshResult(
            dec["decision"], code, reason, report_dir, record, metrics, timings, drift["alerts"]
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        store.close()


def _live_view(inter: Interactions, live_ids: list[str], ds: Dataset) -> Interactions:
    """``inter`` in the live model's item ids (events of products it does not know are
    dropped): how the live model sees the same customers when the catalogue grew."""
    if live_ids == ds.item_ids.external_ids:
        return inter
    pos = {e: i + 1 for i, e in enumerate(live_ids)}
    to_live = np.zeros(ds.n_items + 1, np.int64)
    for i, e in enumerate(ds.item_ids.external_ids, start=1):
        to_live[i] = pos.get(e, 0)
    mapped = to_live[inter.items]
    keep = mapped > 0
    view = Interactions(
        inter.n_users, len(live_ids), inter.indptr, mapped.astype(np.int32), inter.ts,
        inter.event_type,
    )  # fmt: skip
    return view.filter(keep)


def _refresh_refit(
    ds: Dataset,
    inter: Interactions,
    targets: Any,
    history: Interactions,
    cfg: RefreshConfig,
    store: Any,
    icfg: IndexConfig,
    deploy: DeployState,
    live: Record,
    state: Path,
    tmp: Path,
    name: str,
    report_dir: Path,
    base: dict[str, Any],
    w0: int,
    now: int,
    timings: dict[str, float],
    t_all: float,
) -> RefreshResult:
    """Refresh of a run serving the basket tower or ALS/EASE (no warm start): the served
    model's recipe (:func:`training.protocol.refit_served`) refit on every event before the
    window, shadow-evaluated against the live model on ``[w0, now)`` with the same
    decision rule, and on promotion refit on every event and published like a warm-started
    candidate. Model drift (live vs candidate vectors) is not comparable across refits
    (another vector space): the drift report measures the candidate against itself."""
    from towers.inference import load_run
    from training.protocol import refit_served

    tm_live = load_run(live.run)
    t = time.perf_counter()
    cand = refit_served(Path(live.run), history)
    timings["train_seconds"] = time.perf_counter() - t
    _step("trained")
    t = time.perf_counter()
    live_ids = tm_live.item_ids.external_ids
    inter_live = _live_view(inter, live_ids, ds)
    t_live, h_live = window_targets(inter_live, w0, now)
    m_live = ranking_metrics(tm_live.model, t_live, h_live, tm_live.max_len)
    cm = cand.served_model()
    max_len = int(getattr(cm, "max_len", 0) or getattr(getattr(cm, "cfg", None), "max_len", 200))
    m_cand = ranking_metrics(cm, targets, history, max_len)
    span = (inter, w0, now - w0)
    churn = churn_metrics({"candidate": cm}, *span, max_len, cfg.churn_max_users, cfg.seed)
    churn_live = churn_metrics(
        {"live": tm_live.model}, inter_live, w0, now - w0, tm_live.max_len,
        cfg.churn_max_users, cfg.seed,
    )  # fmt: skip
    if "live" in churn_live and churn:
        churn["live"] = churn_live["live"]
    timings["eval_seconds"] = time.perf_counter() - t
    promote, reason = decide(m_live, m_cand, churn, cfg)
    metrics = {"live": m_live, "candidate": m_cand, "churn": churn, "window": [w0, now]}
    _step("evaluated")
    t = time.perf_counter()
    drift = drift_report(
        events=ds.events, items=ds.items, inter=inter, live_items=set(live_ids),
        since=live.data_until, now=now, live=cm, candidate=cm, max_len=max_len, churn=churn,
        thresholds=cfg.drift, seed=cfg.seed,
    )  # fmt: skip
    timings["drift_seconds"] = time.perf_counter() - t
    dec = _decision(
        base,
        promote,
        reason,
        metrics,
        cfg,
        drift["alerts"],
        refresh=f"refit ({served_kind(live.run)}: no warm start)",
        model_drift="not comparable across refits (candidate vs itself)",
    )
    record = None
    if promote:
        t = time.perf_counter()
        work = tmp / name
        full = refit_served(Path(live.run), inter) if cfg.refit_epochs > 0 else cand
        timings["refit_seconds"] = time.perf_counter() - t
        mf = json.loads((Path(live.run) / MANIFEST_FILE).read_text())
        from training.protocol import write_served

        write_served(
            work,
            served_kind(live.run),
            full,
            ds.item_ids.external_ids,
            {"params": mf["served"].get("params", {}), "refit_on": "all events"},
            {
                "lineage": {
                    "parent_run": live.run,
                    "parent_model_version": live.model_version,
                    "data_from": live.data_until,
                    "data_until": now,
                    "window": [w0, now],
                    "ndcg@10": dec["ndcg@10"],
                    "churn_auc": dec["churn_auc"],
                    "fingerprint": dec["fingerprint"],
                    **({"live_log": dec["live_log"]} if "live_log" in dec else {}),
                },
                "selection": mf.get("selection", {}),
            },
            model_version=f"{name}-{dec['fingerprint'][:8]}",
        )
        ds.save(work / "dataset")
        record = _publish(ds, inter, cfg, store, icfg, deploy, live, state, work, name, w0, now,
                          dec, timings)  # fmt: skip
        dec["promoted_run"] = record.run
        dec["index_version"] = record.index_version
    timings["total_seconds"] = time.perf_counter() - t_all
    dec["timings"] = timings
    dec["peak_rss_mb"] = peak_rss_mb()
    write_report(drift, dec, report_dir)
    write_json_atomic(report_dir / "decision.json", dec)
    code = (
        (EXIT_DRIFT_ALERT if drift["alerts"] else EXIT_PROMOTED) if promote else EXIT_NOT_PROMOTED
    )
    if dec["decision"] == "staged":
        code = EXIT_STAGED
    log.info("refresh %s (refit): %s (%s)", name, dec["decision"], reason)
    return RefreshResult(
        dec["decision"], code, reason, report_dir, record, metrics, timings, drift["alerts"]
    )


def decide(
    live: dict[str, float], cand: dict[str, float], churn: dict[str, Any], cfg: RefreshConfig
) -> tuple[bool, str]:
    """Promote only if the candidate is not worse beyond the tolerances (both recorded)."""
    n = int(live.get("users", 0))
    if n < cfg.min_eval_users:
        return False, f"only {n} customers in the evaluation window (< {cfg.min_eval_users})"
    lv, cv = live["ndcg@10"], cand["ndcg@10"]
    if cv < lv * (1.0 - cfg.tolerance):
        return False, f"NDCG@10 {cv:.4f} < live {lv:.4f} x (1 - {cfg.tolerance})"
    if "live" in churn and "candidate" in churn:
        la, ca = churn["live"]["auc"], churn["candidate"]["auc"]
        if ca < la - cfg.churn_tolerance:
            return False, f"churn AUC {ca:.4f} < live {la:.4f} - {cfg.churn_tolerance}"
        return True, f"NDCG@10 {cv:.4f} vs live {lv:.4f}; churn AUC {ca:.4f} vs {la:.4f}"
    return True, f"NDCG@10 {cv:.4f} vs live {lv:.4f} (churn not measurable)"


def _train_config(run_config: dict[str, Any], cfg: RefreshConfig, epochs: int) -> RunConfig:
    base = from_dict(RunConfig, run_config) if run_config else RunConfig()
    pre = dataclasses.replace(
        base.pretrain,
        enabled=True,
        epochs=max(1, epochs),
        lr=cfg.lr,
        warmup_ratio=0.0,
        patience=max(1, epochs) + 1,
        batch_size=cfg.batch_size or base.pretrain.batch_size,
    )
    con = dataclasses.replace(base.contrastive, enabled=False)
    return dataclasses.replace(
        base,
        pretrain=pre,
        contrastive=con,
        threads=cfg.threads,
        seed=cfg.seed,
        tensorboard=False,
        progress=False,
        init_checkpoint="",
    )


def _active(inter: Interactions, since: int, replay: float, seed: int) -> Interactions:
    """``inter`` restricted to customers with an event at/after ``since`` plus a seeded
    ``replay`` share of the others."""
    users = inter.user_of_row()
    active = np.zeros(inter.n_users + 1, bool)
    active[users[inter.ts >= since]] = True
    others = np.flatnonzero(~active & (inter.lengths() > 0))
    rng = np.random.default_rng(seed)
    take = rng.random(len(others)) < replay
    active[others[take]] = True
    return inter.filter(active[users])


def _promote(
    ds: Dataset,
    inter: Interactions,
    cand: Any,
    ck: Any,
    rcfg: RunConfig,
    cfg: RefreshConfig,
    store: Any,
    icfg: IndexConfig,
    deploy: DeployState,
    live: Record,
    state: Path,
    tmp: Path,
    name: str,
    w0: int,
    now: int,
    dec: dict[str, Any],
    timings: dict[str, float],
) -> Record:
    t = time.perf_counter()
    work = tmp / name
    ids = ds.item_ids.external_ids
    if cfg.refit_epochs > 0:  # refit on all data: the window's customers, from the candidate
        cand.item_tower.set_known(np.maximum(cand.item_tower.known.numpy(), inter.item_counts()))
        rc = _train_config(to_dict(rcfg), cfg, epochs=cfg.refit_epochs)
        tr = Trainer(rc, ds.items, ids, work, init_model=cand, vocab=ck.vocab)
        model, _ = tr.fit(_active(inter, w0, 0.0, cfg.seed), None, resume=False)
    else:
        model = cand
        save_checkpoint(work / MODEL_FILE, model, ids, ck.vocab, {"run_config": to_dict(rcfg)})
    timings["refit_seconds"] = time.perf_counter() - t
    mf_path = work / MANIFEST_FILE
    mf = json.loads(mf_path.read_text()) if mf_path.exists() else {}
    mf["model_version"] = f"{name}-{dec['fingerprint'][:8]}"
    mf["lineage"] = {
        "parent_run": live.run,
        "parent_model_version": live.model_version,
        "data_from": live.data_until,
        "data_until": now,
        "window": [w0, now],
        "ndcg@10": dec["ndcg@10"],
        "churn_auc": dec["churn_auc"],
        "fingerprint": dec["fingerprint"],
    }
    if "live_log" in dec:
        mf["lineage"]["live_log"] = dec["live_log"]
    write_json_atomic(mf_path, mf)
    ds.save(work / "dataset")
    if cfg.export_onnx:
        from towers.export import export_onnx

        t = time.perf_counter()
        export_onnx(work, work / "onnx")
        timings["export_seconds"] = time.perf_counter() - t
    _step("exported")
    return _publish(
        ds, inter, cfg, store, icfg, deploy, live, state, work, name, w0, now, dec, timings
    )


def _publish(
    ds: Dataset,
    inter: Interactions,
    cfg: RefreshConfig,
    store: Any,
    icfg: IndexConfig,
    deploy: DeployState,
    live: Record,
    state: Path,
    work: Path,
    name: str,
    w0: int,
    now: int,
    dec: dict[str, Any],
    timings: dict[str, float],
) -> Record:
    """Move the finished run ``work`` into the state, build its index version (unpublished),
    commit ``deploy.json``, then move the alias."""
    final = state / "runs" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, final)  # same filesystem: atomic
    # re-embed the catalogue and build the next index version (unpublished)
    t = time.perf_counter()
    from towers.inference import load_run

    tm = load_run(final)
    vecs = tm.item_vectors()  # (N+1, D)
    item_ids, payloads = item_payloads(ds.items, tm.model_version, inter.item_counts())
    ok = np.linalg.norm(vecs[item_ids], axis=1) > 0
    if not ok.all():
        log.warning(
            "%d item(s) have no vector (no id, text, brand, category or price): not indexed",
            int((~ok).sum()),
        )
    item_ids = item_ids[ok]
    payloads = [p for p, k in zip(payloads, ok) if k]
    users = np.flatnonzero(inter.lengths() > 0)
    rng = np.random.default_rng(cfg.seed)
    users = np.sort(rng.choice(users, min(cfg.index_queries, len(users)), replace=False))
    queries = user_vectors(tm.model, inter, users, tm.max_len)
    text = None
    live_target = store.alias_target(icfg.alias)
    if live_target is not None and has_text(store, icfg.alias, live_target):
        # the live version has a text collection (SearchProducts): the new one gets its own
        from indexing.text_index import catalogue_text_points

        all_ids, all_payloads = item_payloads(ds.items, tm.model_version, inter.item_counts())
        text = catalogue_text_points(ds.items, all_ids, all_payloads)
    man = build_version(
        store,
        item_ids,
        vecs[item_ids],
        payloads,
        model_version=tm.model_version,
        queries=queries,
        alias=icfg.alias,
        publish=False,
        text=text,
    )
    timings["index_seconds"] = time.perf_counter() - t
    timings["index_build_seconds"] = float(man.build_seconds)
    _step("index-built")
    rec = Record(
        run=str(final.resolve()),
        model_version=tm.model_version,
        index_location=icfg.location,
        index_alias=icfg.alias,
        index_version=man.version,
        dataset=str((final / "dataset").resolve()),
        data_from=live.data_until,
        data_until=now,
        n_events=ds.events.height,
        parent_run=live.run,
        metrics={"ndcg@10": dec["ndcg@10"], "churn_auc": dec["churn_auc"], "window": [w0, now]},
        created_at=time.time(),
        name=name,
        live_log=dec.get("live_log"),
    )
    if cfg.promote == "online":  # an A/B test decides (lifecycle/online.py)
        from lifecycle.online import stage

        dec["staged"] = stage(state, rec, cfg, dec)
        dec["decision"] = "staged"
        _step("staged")
        return rec
    deploy.promote(rec)  # THE commit point
    _step("committed")
    publish_version(store, man.version, icfg.alias)
    _link_current(state, final)
    return rec


def _reconcile(store: Any, icfg: IndexConfig, deploy: DeployState, live: Record) -> None:
    """Alias -> the committed live version; drop complete versions no deployment knows
    (built by a refresh killed before its commit)."""
    from lifecycle.online import read_staged

    staged = read_staged(deploy.root)
    staged_rec = Record.from_dict(staged["record"]) if staged else None
    known = (
        {live.index_version} | {r.index_version for r in deploy.history()}
        if deploy.exists()
        else {live.index_version}
    )
    if staged_rec is not None:  # an online test serves it: keep it
        known.add(staged_rec.index_version)
    versions = [m.version for m in store.versions(icfg.alias)]
    if live.index_version in versions and store.alias_target(icfg.alias) != live.index_version:
        log.warning(
            "alias %s -> %s (finishing an interrupted promotion)", icfg.alias, live.index_version
        )
        publish_version(store, live.index_version, icfg.alias)
    target = store.alias_target(icfg.alias)
    with store.build_lock(icfg.alias):
        for v in versions:
            if v not in known and v != target and v > live.index_version:
                log.warning("dropping unpublished index version %s of an interrupted refresh", v)
                store.drop_version(v)
    run = Path(live.run)
    if (state_runs := deploy.root / "runs").exists():
        keep = {Path(r.run).name for r in [live, *deploy.history()]} if deploy.exists() else set()
        if staged_rec is not None:
            keep.add(Path(staged_rec.run).name)
        for d in state_runs.iterdir():
            if d.name not in keep and d.resolve() != run.resolve():
                log.warning("removing run %s of an interrupted refresh", d)
                shutil.rmtree(d, ignore_errors=True)


def _bootstrap(
    run: Path,
    ds: Dataset,
    store: Any,
    icfg: IndexConfig,
    deploy: DeployState,
    since: int | None,
) -> Record:
    """First refresh of a state directory: record the given live run (and its index)."""
    from towers.inference import load_run

    tm = load_run(run)
    mf = json.loads((run / MANIFEST_FILE).read_text()) if (run / MANIFEST_FILE).exists() else {}
    until = since if since is not None else mf.get("lineage", {}).get("data_until")
    if until is None:
        raise ConfigError(
            f"first refresh of {deploy.root}: pass --since DATE (the first event time the "
            f"live model {run} was not trained on)"
        )
    target = store.alias_target(icfg.alias)
    if target is None:  # no index yet: build it from the live model over its own catalogue
        known = set(tm.item_ids.external_ids)
        items = ds.items.filter(pl.col("external_id").is_in(list(known)))
        vecs = tm.embed_items(items)
        item_ids, payloads = item_payloads(items, tm.model_version)
        item_ids, vecs, payloads, _ = without_untrained(item_ids, vecs, payloads)
        target = build_version(
            store, item_ids, vecs, payloads, model_version=tm.model_version, alias=icfg.alias
        ).version
    rec = Record(
        run=str(run.resolve()),
        model_version=tm.model_version,
        index_location=icfg.location,
        index_alias=icfg.alias,
        index_version=target,
        dataset=None,
        data_from=None,
        data_until=int(until),
        n_events=int(ds.events.filter(pl.col("ts") < int(until)).height),
        parent_run=None,
        created_at=time.time(),
        name="bootstrap",
    )
    deploy.promote(rec)
    log.info("bootstrapped refresh state %s: live %s, index %s", deploy.root, run, target)
    return rec


def result_json(res: RefreshResult) -> dict[str, Any]:
    """A JSON-able summary of a refresh result (CLI output)."""
    return {
        "decision": res.decision,
        "exit_code": res.exit_code,
        "reason": res.reason,
        "report_dir": str(res.report_dir) if res.report_dir else None,
        "record": asdict(res.record) if res.record else None,
        "timings": res.timings,
        "alerts": res.alerts,
    }
