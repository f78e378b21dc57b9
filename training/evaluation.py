"""Full-ranking evaluation: Recall@K (= HR@K for one target), NDCG@K, MRR@K, coverage@K.

Every item of the catalogue is ranked; the user's history items (and padding) are
excluded unless ``exclude_seen=False``.  Batched and vectorised with torch.topk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from towers.sequences import Interactions
from training.splits import Targets

Scorer = Callable[[np.ndarray, Interactions], np.ndarray]


def rank_topk(
    scores: np.ndarray | torch.Tensor,
    users: np.ndarray,
    history: Interactions | None,
    k: int,
    exclude_seen: bool = True,
) -> np.ndarray:
    """(B, k) top item ids after masking padding and (optionally) each user's history."""
    s = torch.as_tensor(scores, dtype=torch.float32).clone()  # (B, N+1)
    s[:, 0] = -torch.inf
    if exclude_seen and history is not None:
        rows, cols = [], []
        for r, u in enumerate(users):
            h = history.seq(int(u))
            rows.append(np.full(len(h), r))
            cols.append(h)
        if rows:
            s[
                torch.from_numpy(np.concatenate(rows)),
                torch.from_numpy(np.concatenate(cols).astype(np.int64)),
            ] = -torch.inf
    return torch.topk(s, k, dim=1).indices.numpy()


def metrics_from_topk(
    top: np.ndarray, targets: Targets, ks: Sequence[int], n_items: int
) -> dict[str, float]:
    """Metrics from (n, max_k) ranked ids and the targets (aligned row by row)."""
    n = len(targets)
    out: dict[str, float] = {}
    lens = np.diff(targets.indptr)
    # hit matrix (n, max_k): is the ranked item a target of that user?
    rows = np.repeat(np.arange(n), lens)
    kmax = top.shape[1]
    hit = np.zeros((n, kmax), bool)
    if n:
        # for each target find its rank in the top list
        eq = top[rows] == targets.items[:, None]  # (m, kmax)
        r, c = np.nonzero(eq)
        hit[rows[r], c] = True
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    for k in ks:
        h = hit[:, :k]
        nh = h.sum(1)
        out[f"recall@{k}"] = float(np.mean(nh / np.maximum(lens, 1))) if n else 0.0
        dcg = (h * disc[:k]).sum(1)
        idcg = np.cumsum(disc[:k])[np.minimum(lens, k) - 1]
        out[f"ndcg@{k}"] = float(np.mean(dcg / idcg)) if n else 0.0
        first = np.where(h.any(1), h.argmax(1) + 1, 0)
        out[f"mrr@{k}"] = (
            float(np.mean(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0))) if n else 0.0
        )
        out[f"coverage@{k}"] = float(len(np.unique(top[:, :k])) / n_items) if n else 0.0
    return out


def evaluate(
    scorer: Scorer,
    targets: Targets,
    history: Interactions,
    ks: Sequence[int] = (5, 10, 20),
    exclude_seen: bool = True,
    batch_size: int = 1024,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Full-ranking metrics of ``scorer(users, history)`` on ``targets``.

    With ``exclude_seen`` the history items of each user are removed from its ranking
    (the held-out target is never in the history by construction of the splits).
    """
    t0 = time.perf_counter()
    kmax = max(ks)
    tops = []
    users = targets.users
    for start in tqdm(
        range(0, len(users), batch_size), disable=not progress, desc=desc, leave=False
    ):
        u = users[start : start + batch_size]
        s = scorer(u, history)
        if s.shape != (len(u), history.n_items + 1):
            raise ValueError(
                f"scorer returned shape {s.shape}, want {(len(u), history.n_items + 1)}"
            )
        tops.append(rank_topk(s, u, history, kmax, exclude_seen))
    top = np.concatenate(tops) if tops else np.zeros((0, kmax), np.int64)
    out = metrics_from_topk(top, targets, ks, history.n_items)
    out["users"] = float(len(users))
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def sampled_metrics(
    scorer: Scorer,
    targets: Targets,
    history: Interactions,
    n_negatives: int = 100,
    k: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """SAMPLED-negative HR@k/NDCG@k (target vs ``n_negatives`` random unseen items).

    Reported only as an extra, always labelled ``sampled_*``: 5-10x higher than full
    ranking and able to reverse model comparisons.
    """
    rng = np.random.default_rng(seed)
    tgt = targets.first()
    ranks = []
    for start in range(0, len(targets), 1024):
        u = targets.users[start : start + 1024]
        s = scorer(u, history)
        neg = rng.integers(1, history.n_items + 1, size=(len(u), n_negatives))
        t = tgt[start : start + 1024]
        ts = s[np.arange(len(u)), t][:, None]
        ranks.append((s[np.arange(len(u))[:, None], neg] > ts).sum(1))
    r = np.concatenate(ranks)
    return {
        f"sampled_hr@{k}": float(np.mean(r < k)),
        f"sampled_ndcg@{k}": float(np.mean(np.where(r < k, 1 / np.log2(r + 2), 0))),
    }
