"""Promotion by online result: stage a refresh candidate as an A/B variant, decide later.

With ``[refresh] promote = "online"`` a candidate that passes the offline checks (shadow
evaluation) is not made live.  :func:`stage` instead keeps its run in ``STATE/runs/`` and
its index version built but unpublished (the alias does not move), and writes

* ``STATE/staged.json``: the candidate's deploy record, the experiment name, the start
  time, the offline numbers (the record ``deploy.json`` gets if it wins);
* ``STATE/experiment.json`` (:mod:`outcomes.experiment`): ``control`` = the live engine
  (no run: what the service follows), ``candidate`` = the staged run and pinned index
  version with ``online_share`` of the customers.  ``ecomrec serve --follow-refresh STATE``
  routes customers by it without a restart.

A later ``ecomrec refresh --decide --online-report online.json`` (or the next scheduled
``ecomrec refresh``, given the report) applies :func:`outcomes.promotion.decide` to the
online report of ``ecomrec report online``: **promote** = ``deploy.json`` commits the
staged record and the alias moves (then the experiment file goes: every customer gets the
new live model); **reject** = the experiment file goes first (every customer back on the
live model), then the staged index version and run are dropped; **wait** = nothing
changes (exit :data:`EXIT_STAGED`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ecomrec.errors import NotFoundError
from indexing.deploy import DeployState, Record, write_json_atomic
from outcomes.experiment import Experiment, Variant, write_experiment
from outcomes.promotion import PromotionRule, Verdict, decide

log = logging.getLogger(__name__)

STAGED_FILE = "staged.json"
EXPERIMENT_FILE = "experiment.json"
#: Exit code of a refresh that staged a candidate, or whose online test is still running.
EXIT_STAGED = 6
CONTROL, CANDIDATE = "control", "candidate"


def read_staged(state: Path) -> dict[str, Any] | None:
    """The staged candidate of ``state`` (None when no online test runs)."""
    import json

    p = Path(state) / STAGED_FILE
    if not p.exists():
        return None
    return dict(json.loads(p.read_text()))


def stage(
    state: Path, rec: Record, cfg: Any, dec: dict[str, Any], *, now: float | None = None
) -> dict[str, Any]:
    """Stage ``rec`` (run moved into the state, index version built, unpublished) as the
    candidate of an A/B test with ``cfg.online_share`` of the customers."""
    started = time.time() if now is None else now
    exp = Experiment(
        name=f"refresh-{rec.name}",
        variants=(
            Variant(name=CONTROL, share=round(1.0 - cfg.online_share, 12)),
            Variant(
                name=CANDIDATE,
                share=cfg.online_share,
                run=rec.run,
                dataset=rec.dataset or "",
                index=rec.index_location,
                index_alias=rec.index_alias,
                index_version=rec.index_version,
            ),
        ),
    )
    staged = {
        "record": asdict(rec),
        "experiment": exp.name,
        "candidate": CANDIDATE,
        "baseline": CONTROL,
        "share": cfg.online_share,
        "started_at": started,
        "rule": asdict(rule_of(cfg)),
        "offline": {"ndcg@10": dec.get("ndcg@10"), "churn_auc": dec.get("churn_auc")},
    }
    write_json_atomic(Path(state) / STAGED_FILE, staged)  # first: the test's own record
    write_experiment(Path(state) / EXPERIMENT_FILE, exp)  # then: traffic moves
    log.info(
        "staged %s (index %s) for an online test: %.0f%% of customers",
        rec.run,
        rec.index_version,
        100 * cfg.online_share,
    )
    return staged


def rule_of(cfg: Any) -> PromotionRule:
    """The promotion rule of a RefreshConfig's ``online_*`` keys."""
    return PromotionRule(
        metric=cfg.online_metric,
        min_impressions=cfg.online_min_impressions,
        margin=cfg.online_margin,
        max_age_days=cfg.online_max_days,
    )


def decide_staged(
    state: Path,
    store: Any,
    cfg: Any,
    report: dict[str, Any],
    *,
    now: float | None = None,
) -> tuple[Verdict, Record | None]:
    """Apply the rule to the staged candidate (caller holds the refresh lock): promote,
    reject or wait. Returns the verdict and, when promoted, the new live record."""
    from indexing.build import publish_version
    from lifecycle.state import link_current

    staged = read_staged(state)
    if staged is None:
        raise NotFoundError(f"no staged candidate in {state} (nothing to decide)")
    now = time.time() if now is None else now
    rule = rule_of(cfg)
    verdict = decide(
        report,
        rule,
        candidate=staged["candidate"],
        baseline=staged["baseline"],
        age_s=now - float(staged["started_at"]),
    )
    rec = Record.from_dict(staged["record"])
    deploy = DeployState(state)
    if deploy.exists() and deploy.live().index_version == rec.index_version:
        end_test(state)  # a decision killed after its commit: finish it
        return Verdict(
            variant=verdict.variant,
            baseline=verdict.baseline,
            action="promote",
            reason="already promoted (finishing an interrupted decision)",
            metric=verdict.metric,
        ), deploy.live()
    if verdict.action == "promote":
        rec = Record(**{**asdict(rec), "metrics": {**rec.metrics, "online": verdict.to_dict()}})
        deploy.promote(rec)  # THE commit point
        publish_version(store, rec.index_version, rec.index_alias)
        link_current(state, Path(rec.run))
        end_test(state)
        log.info("online test: promoted %s (%s)", rec.run, verdict.reason)
        return verdict, rec
    if verdict.action == "reject":
        end_test(state)
        with store.build_lock(rec.index_alias):
            if rec.index_version in {m.version for m in store.versions(rec.index_alias)}:
                store.drop_version(rec.index_version)
        shutil.rmtree(rec.run, ignore_errors=True)
        log.info("online test: rejected %s (%s)", rec.run, verdict.reason)
    return verdict, None


def end_test(state: Path) -> None:
    """Remove the experiment file (services route everyone to their own engine), then the
    staged record."""
    for name in (EXPERIMENT_FILE, STAGED_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(state) / name)
