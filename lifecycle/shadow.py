"""Shadow evaluation of a candidate vs the live model on the most recent window.

Ranking: the full-ranking protocol of the benchmarks (``training.evaluation.evaluate``,
every item ranked, the user's history excluded): targets are the distinct items each
customer with history before the window purchased in it, minus items already in that
history (the temporal protocol of ``training.splits.temporal_split``).

Churn: a logistic head on [user vector, log recency, log frequency] is fitted at the
cutoff one window earlier (label: no purchase in the following window) and scored at the
window start; ROC-AUC, log loss and calibration (ECE) on the latest window, for each model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from intake.schema import EVENT_TYPE_IDS
from towers.inference import score_users
from towers.model import TwoTower
from towers.sequences import Interactions, batch_for_users
from training import splits
from training.evaluation import evaluate
from training.splits import Targets

DAY = 86400


def window_targets(inter: Interactions, lo: int, hi: int) -> tuple[Targets, Interactions]:
    """(targets, history): purchases in ``[lo, hi)`` of users with history before ``lo``,
    items already in that history removed (the temporal split's window,
    :func:`training.splits.window_targets`); history = every event before ``lo``."""
    history = inter.filter(inter.ts < lo)
    return splits.window_targets(inter, lo, hi, history), history


def ranking_metrics(
    model: TwoTower, targets: Targets, history: Interactions, max_len: int
) -> dict[str, float]:
    """Full-ranking Recall/NDCG/MRR@{5,10,20} of ``model`` on ``targets``."""
    model.eval()

    def scorer(users: np.ndarray, hist: Interactions) -> np.ndarray:
        return score_users(model, np.asarray(users, np.int64), hist, max_len)

    if len(targets) == 0:
        return {"users": 0.0}
    return evaluate(scorer, targets, history, ks=(5, 10, 20))


def user_vectors(
    model: TwoTower, inter: Interactions, users: np.ndarray, max_len: int, batch: int = 512
) -> np.ndarray:
    """(n, D) user vectors of ``users`` from their sequences in ``inter``."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        table = model.item_table()
        for s in range(0, len(users), batch):
            b = batch_for_users(inter, users[s : s + batch], max_len)
            t = {
                k: torch.as_tensor(getattr(b, k), dtype=torch.long)
                for k in ("items", "event_type", "gap", "lengths")
            }
            out.append(
                model.encode(t["items"], t["event_type"], t["gap"], t["lengths"], table=table)
                .float()
                .numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)


@dataclass
class ChurnData:
    users: np.ndarray  # (n,)
    rf: np.ndarray  # (n, 2) log recency days, log frequency
    label: np.ndarray  # (n,) 1 = no purchase in the window


def churn_data(
    inter: Interactions, cutoff: int, length: int, max_users: int, seed: int
) -> ChurnData:
    """Customers with a purchase before ``cutoff``; label churn = no purchase in
    ``[cutoff, cutoff + length)``."""
    users = inter.user_of_row()
    buy = inter.event_type == EVENT_TYPE_IDS["purchase"]
    before = buy & (inter.ts < cutoff)
    after = buy & (inter.ts >= cutoff) & (inter.ts < cutoff + length)
    cust = np.unique(users[before])
    if len(cust) > max_users:
        cust = np.sort(np.random.default_rng(seed).choice(cust, max_users, replace=False))
    last = np.zeros(inter.n_users + 1, np.int64)
    np.maximum.at(last, users[before], inter.ts[before])
    freq = np.bincount(users[before], minlength=inter.n_users + 1)
    active = np.zeros(inter.n_users + 1, bool)
    active[users[after]] = True
    rf = np.stack(
        [np.log1p((cutoff - last[cust]) / DAY), np.log1p(freq[cust].astype(np.float64))], 1
    )
    return ChurnData(cust, rf, (~active[cust]).astype(np.int64))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Mean |observed rate - mean prediction| over equal-width bins, weighted by bin size."""
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    err = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            err += m.mean() * abs(float(y[m].mean()) - float(p[m].mean()))
    return float(err)


def churn_metrics(
    models: dict[str, TwoTower],
    inter: Interactions,
    window_start: int,
    window_len: int,
    max_len: int,
    max_users: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """Churn ROC-AUC / log loss / ECE of each model's user vectors on the latest window
    (head fitted one window earlier). Empty dict when a cutoff has a single class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score

    c0 = window_start - window_len
    tr = churn_data(inter, c0, window_len, max_users, seed)
    te = churn_data(inter, window_start, window_len, max_users, seed)
    if len(np.unique(tr.label)) < 2 or len(np.unique(te.label)) < 2:
        return {}
    h0, h1 = inter.filter(inter.ts < c0), inter.filter(inter.ts < window_start)
    out: dict[str, Any] = {"train_customers": len(tr.users), "test_customers": len(te.users)}
    for name, model in models.items():
        xtr = np.concatenate([user_vectors(model, h0, tr.users, max_len), tr.rf], 1)
        xte = np.concatenate([user_vectors(model, h1, te.users, max_len), te.rf], 1)
        clf = LogisticRegression(max_iter=1000, C=1.0).fit(xtr, tr.label)
        p = clf.predict_proba(xte)[:, 1]
        edges = np.linspace(0, 1, 11)
        idx = np.minimum((p * 10).astype(int), 9)
        out[name] = {
            "auc": float(roc_auc_score(te.label, p)),
            "log_loss": float(log_loss(te.label, p, labels=[0, 1])),
            "ece": expected_calibration_error(te.label, p),
            "base_rate": float(te.label.mean()),
            "calibration": {
                "bin_lo": edges[:-1].tolist(),
                "mean_predicted": [
                    float(p[idx == b].mean()) if (idx == b).any() else None for b in range(10)
                ],
                "observed": [
                    float(te.label[idx == b].mean()) if (idx == b).any() else None
                    for b in range(10)
                ],
                "count": [int((idx == b).sum()) for b in range(10)],
            },
        }
    return out
