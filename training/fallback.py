"""Never worse than the best baseline: compare the tower with ALS and EASE on validation
and serve the winner.

``ecomrec train`` fits the two-tower model, then each baseline of ``[fallback]`` on the
same training sequences, and scores every candidate *in the form it would be served*
(:class:`towers.factor.FactorTower`: ALS fold-in, EASE at rank ``ease_rank``) on the
validation targets (full ranking, NDCG@10). A winning baseline is refit on train +
validation (as in the benchmark protocol) and saved as ``served/<kind>.pt``; the run's
manifest records ``served = {kind, path, params}`` and the whole comparison, and
:func:`towers.inference.load_run` opens whichever retriever is served, so index build,
serving and segments work unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ecomrec.config import from_dict
from towers.factor import FactorTower, factor_tower_from_baseline, save_factor_tower
from towers.sequences import Interactions
from training.memory import release_free_memory
from training.splits import Split, Targets
from training.trainer import FallbackConfig, fast_evaluate

__all__ = [
    "FactorRetriever",
    "FallbackConfig",
    "compare_and_select",
    "evaluate_factor",
    "factor_family",
    "factor_scorer",
]

log = logging.getLogger(__name__)


def _grid(cfg: FallbackConfig, name: str) -> list[dict[str, Any]]:
    if name == "als":
        return [
            {"factors": cfg.als_factors, "regularization": cfg.als_regularization, "alpha": a}
            for a in cfg.als_alphas
        ]
    if name == "ease":
        return [{"l2": lam} for lam in cfg.ease_l2]
    raise ValueError(f"unknown fallback baseline {name!r} (als, ease)")


def _fit(
    name: str, params: dict[str, Any], train: Interactions, cfg: FallbackConfig
) -> FactorTower:
    from training.baselines import BASELINES

    cls, cfg_cls = BASELINES[name]
    m = cls(from_dict(cfg_cls, params))
    m.fit(train)
    return factor_tower_from_baseline(m, max_len=cfg.max_len, ease_rank=cfg.ease_rank)


def evaluate_factor(
    model: FactorTower, targets: Targets, history: Interactions, ks: tuple[int, ...] = (10, 20)
) -> dict[str, float]:
    """Full-ranking metrics of a factor tower (same code as the tower's early stopping)."""
    return fast_evaluate(model, targets, history, model.cfg.max_len, ks=ks)  # type: ignore[arg-type]


def compare_and_select(
    cfg: FallbackConfig,
    split: Split,
    tower_valid: dict[str, float],
    item_ids: list[str],
    run_dir: Path,
    model_version: str,
) -> tuple[dict[str, Any], FactorTower | None]:
    """Fit the baselines, compare on validation NDCG@10, save the winner if it is one.

    Returns (manifest record, the served factor tower refit on train+valid or None when
    the tower wins). The record holds every candidate's validation metrics, parameters
    and fit time, and ``served``.
    """
    cands: dict[str, dict[str, Any]] = {
        "two-tower": {"valid": tower_valid, "params": {}, "fit_seconds": None}
    }
    n = split.train.n_items
    for name in cfg.baselines:
        if name == "ease" and n + 1 > cfg.ease_max_items:
            cands[name] = {"skipped": f"catalogue of {n:,} items > ease_max_items"}
            continue
        best: dict[str, Any] | None = None
        tried = []
        for params in _grid(cfg, name):
            t0 = time.perf_counter()
            fm = _fit(name, params, split.train, cfg)
            fit_s = time.perf_counter() - t0
            v = evaluate_factor(fm, split.valid, split.train)
            del fm  # one candidate's matrices alive at a time (EASE: N x N floats)
            release_free_memory()
            tried.append({"params": params, "valid_ndcg@10": v["ndcg@10"], "fit_seconds": fit_s})
            log.info("fallback %s %s valid ndcg@10 %.4f (%.1fs)", name, params, v["ndcg@10"], fit_s)
            if best is None or v["ndcg@10"] > best["valid"]["ndcg@10"]:
                best = {"valid": v, "params": params, "fit_seconds": fit_s}
        assert best is not None
        cands[name] = {**best, "grid": tried}
    scored = {k: c for k, c in cands.items() if "valid" in c}
    winner = max(scored, key=lambda k: (scored[k]["valid"]["ndcg@10"], k == "two-tower"))
    record: dict[str, Any] = {
        "candidates": cands,
        "select_metric": "valid ndcg@10",
        "served": {"kind": "two-tower", "path": "model.pt"},
    }
    served: FactorTower | None = None
    if winner != "two-tower":
        t0 = time.perf_counter()
        served = _fit(winner, scored[winner]["params"], split.train_valid, cfg)
        rel = f"served/{winner}.pt"
        save_factor_tower(
            run_dir / rel,
            served,
            item_ids,
            {
                "kind": winner,
                "params": scored[winner]["params"],
                "valid_metrics": scored[winner]["valid"],
                "refit_on": "train+valid",
                "model_version": model_version,
            },
        )
        record["served"] = {
            "kind": winner,
            "path": rel,
            "params": scored[winner]["params"],
            "refit_seconds": time.perf_counter() - t0,
        }
    log.info(
        "served retriever: %s (valid ndcg@10 %s)",
        winner,
        ", ".join(f"{k} {c['valid']['ndcg@10']:.4f}" for k, c in scored.items()),
    )
    return record, served


class FactorRetriever:
    """ALS or EASE in the form it is served (:class:`FactorTower`: ALS fold-in, EASE at
    rank ``ease_rank``) behind the :class:`training.retriever.Retriever` protocol, so
    :func:`training.protocol.select_model` measures what a shop would get."""

    refit_on_train_valid = True

    def __init__(self, name: str, params: dict[str, Any], cfg: FallbackConfig) -> None:
        self.name = name
        self.params = dict(params)
        self.cfg = cfg
        self.model: FactorTower | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.params

    def fit(self, train: Interactions, valid: Targets | None = None) -> None:
        self.model = _fit(self.name, self.params, train, self.cfg)

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        assert self.model is not None, "fit first"
        return factor_scorer(self.model)(users, history)  # type: ignore[no-any-return]

    def served_model(self) -> FactorTower:
        """The model ``load_run`` would return."""
        assert self.model is not None, "fit first"
        return self.model

    def save(self, path: Path) -> None:
        raise NotImplementedError("use save_served (needs the external item ids)")

    def save_served(self, path: Path, item_ids: list[str], meta: dict[str, Any]) -> None:
        """``served/<kind>.pt`` (:func:`towers.factor.save_factor_tower`)."""
        assert self.model is not None, "fit first"
        save_factor_tower(path, self.model, item_ids, {"kind": self.name, **meta})


def factor_family(cfg: FallbackConfig, name: str, n_items: int) -> Any:
    """(factory, grid) of :class:`FactorRetriever` for ``name`` (``als`` / ``ease``), or
    the reason it is skipped (EASE over ``ease_max_items``)."""
    if name == "ease" and n_items + 1 > cfg.ease_max_items:
        return f"catalogue of {n_items:,} items > ease_max_items"
    return (lambda p: FactorRetriever(name, p, cfg)), _grid(cfg, name)


def factor_scorer(model: FactorTower) -> Any:
    """``score(users, history) -> (B, N+1)`` of a factor tower (for ``evaluate``)."""
    import torch

    from towers.inference import batch_tensors
    from towers.sequences import batch_for_users

    @torch.no_grad()
    def score(users: np.ndarray, history: Interactions) -> np.ndarray:
        vn = model.item_vectors()
        t = batch_tensors(batch_for_users(history, np.asarray(users), model.cfg.max_len))
        u = model.encode(t["items"], t["event_type"], t["gap"], t["lengths"])
        return (u @ vn.T).numpy()

    return score
