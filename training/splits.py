"""Evaluation splits: leave-one-out (two tie modes) and a global temporal split.

At test time every model sees the user's training AND validation interactions
(``Split.train_valid``); the validation item is excluded from the test ranking
like the training items.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ecomrec.errors import DataError
from intake.schema import EVENT_TYPE_IDS
from towers.sequences import Interactions

TieMode = Literal["file", "shuffle"]


@dataclass(frozen=True)
class Targets:
    """Held-out items per evaluated user (CSR): user ``users[i]`` has ``items[indptr[i]:indptr[i+1]]``."""

    users: np.ndarray  # (n,) int64
    indptr: np.ndarray  # (n + 1,) int64
    items: np.ndarray  # (m,) int32

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def single(cls, users: np.ndarray, items: np.ndarray) -> Targets:
        n = len(users)
        return cls(users.astype(np.int64), np.arange(n + 1, dtype=np.int64), items.astype(np.int32))

    def of(self, i: int) -> np.ndarray:
        return self.items[self.indptr[i] : self.indptr[i + 1]]

    def first(self) -> np.ndarray:
        """(n,) the first target of every user (the only one under leave-one-out)."""
        return self.items[self.indptr[:-1]]

    def subset(self, mask: np.ndarray) -> Targets:
        idx = np.flatnonzero(mask)
        lens = np.diff(self.indptr)[idx]
        indptr = np.zeros(len(idx) + 1, np.int64)
        indptr[1:] = np.cumsum(lens)
        items = (
            np.concatenate([self.of(int(i)) for i in idx]) if len(idx) else np.zeros(0, np.int32)
        )
        return Targets(self.users[idx], indptr, items.astype(np.int32))


@dataclass(frozen=True)
class Split:
    """Train history, validation and test targets, and the history seen at test time."""

    name: str
    train: Interactions
    valid: Targets
    test: Targets
    train_valid: Interactions
    protocol: dict[str, object] = field(default_factory=dict)


def _reorder_ties(inter: Interactions, seed: int) -> Interactions:
    """Shuffle events that share (user, timestamp) under a fixed seed; keeps time order."""
    rng = np.random.default_rng(seed)
    users = inter.user_of_row()
    key = rng.random(len(inter.items))
    order = np.lexsort((key, inter.ts, users))
    return Interactions(
        inter.n_users,
        inter.n_items,
        inter.indptr,
        inter.items[order],
        inter.ts[order],
        inter.event_type[order],
    )


def leave_one_out(
    inter: Interactions, ties: TieMode = "file", seed: int = 42, min_len: int = 3
) -> Split:
    """Last event of each user = test, second-to-last = validation, the rest = train.

    Users with fewer than ``min_len`` events stay in training with no targets.
    ``ties="shuffle"`` first shuffles same-timestamp events of a user with ``seed``
    (within a day the S3-Rec file order is by item id, not by real time).
    """
    if ties not in ("file", "shuffle"):
        raise DataError(f"ties must be 'file' or 'shuffle', got {ties!r}")
    if ties == "shuffle":
        inter = _reorder_ties(inter, seed)
    lens = inter.lengths()
    evaluated = np.flatnonzero(lens >= min_len)
    evaluated = evaluated[evaluated > 0]
    last = inter.indptr[evaluated + 1] - 1
    test = Targets.single(evaluated, inter.items[last])
    valid = Targets.single(evaluated, inter.items[last - 1])
    drop_test = np.zeros(len(inter.items), bool)
    drop_test[last] = True
    drop_both = drop_test.copy()
    drop_both[last - 1] = True
    return Split(
        name=f"loo-{ties}",
        train=_without(inter, drop_both),
        valid=valid,
        test=test,
        train_valid=_without(inter, drop_test),
        protocol={
            "split": "leave-one-out",
            "ties": ties,
            "seed": seed if ties == "shuffle" else None,
            "min_len": min_len,
            "evaluated_users": len(evaluated),
        },
    )


def _without(inter: Interactions, drop: np.ndarray) -> Interactions:
    return inter.filter(~drop)


def window_targets(
    inter: Interactions, lo: int, hi: int, history: Interactions, exclude_seen: bool = True
) -> Targets:
    """The distinct items purchased in ``[lo, hi)`` by users with ``history``; with
    ``exclude_seen`` items already in their history are not targets."""
    users = inter.user_of_row()
    m = (inter.ts >= lo) & (inter.ts < hi) & (inter.event_type == EVENT_TYPE_IDS["purchase"])
    u, it = users[m], inter.items[m].astype(np.int64)
    has_hist = history.lengths()[u] > 0
    u, it = u[has_hist], it[has_hist]
    if exclude_seen and len(u):
        seen = history.to_csr()
        keep = np.asarray(seen[u, it]).ravel() == 0
        u, it = u[keep], it[keep]
    pairs = np.unique(np.stack([u, it], 1), axis=0) if len(u) else np.zeros((0, 2), np.int64)
    tu, start = np.unique(pairs[:, 0], return_index=True)
    indptr = np.append(start, len(pairs)).astype(np.int64)
    return Targets(tu.astype(np.int64), indptr, pairs[:, 1].astype(np.int32))


def temporal_split(
    inter: Interactions,
    test_start: str | int,
    valid_days: int = 30,
    test_days: int | None = None,
    exclude_seen: bool = True,
) -> Split:
    """Global temporal split: train < valid_start <= valid < test_start <= test.

    Targets are the distinct purchased items in each window of users who have
    history before it; with ``exclude_seen`` items already in that history are not
    targets (they are excluded from the ranking too).
    """
    t0 = _to_ts(test_start)
    v0 = t0 - valid_days * 86400
    t1 = t0 + test_days * 86400 if test_days else int(inter.ts.max(initial=0)) + 1
    train = _without(inter, inter.ts >= v0)
    train_valid = _without(inter, inter.ts >= t0)
    valid = window_targets(inter, v0, t0, train, exclude_seen)
    test = window_targets(inter, t0, t1, train_valid, exclude_seen)
    if len(valid) == 0 or len(test) == 0:
        raise DataError(
            f"temporal split at {test_start} leaves {len(valid)} validation and {len(test)} "
            "test users; choose another cutoff"
        )
    return Split(
        name="temporal",
        train=train,
        valid=valid,
        test=test,
        train_valid=train_valid,
        protocol={
            "split": "temporal",
            "valid_start": _fmt(v0),
            "test_start": _fmt(t0),
            "test_end": _fmt(t1),
            "exclude_seen": exclude_seen,
            "valid_users": len(valid),
            "test_users": len(test),
        },
    )


def default_test_start(inter: Interactions, test_days: int = 30) -> int:
    """The data-driven temporal cutoff: the start (00:00 UTC) of the day ``test_days`` days
    before the last event, so the last ~``test_days`` days are the test window.

    Depends on nothing but the timestamps (no dataset ids, countries or dates)."""
    if len(inter.ts) == 0:
        raise DataError("cannot choose a temporal cutoff: the log has no events")
    last = int(inter.ts.max())
    t0 = last - test_days * 86400
    return t0 - t0 % 86400


def _to_ts(x: str | int) -> int:
    if isinstance(x, int):
        return x
    try:
        d = dt.datetime.fromisoformat(x)
    except ValueError as e:
        raise DataError(f"cannot parse cutoff date {x!r} (want YYYY-MM-DD)") from e
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return int(d.timestamp())


def _fmt(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def sample_validation(split: Split, fraction: float, min_users: int, seed: int = 42) -> Split:
    """Validate on a seeded sample of users; train on the others' validation events.

    Leave-one-out only (other splits are returned unchanged). A sample of the evaluated
    users (``fraction`` of them, at least ``min_users``) keeps the classic protocol: their
    validation item is held out and is what early stopping and model choice see. Every
    other user's training sequence is their train+validation sequence, so the model also
    learns from the most recent transition of most users (what the CF baselines get from
    their refit on train+validation) in one training run. Test targets and the test-time
    history (``train_valid``) are unchanged, so no test event reaches training.
    ``fraction >= 1`` or a sample covering every user returns ``split`` itself.
    """
    if (
        fraction >= 1.0
        or split.protocol.get("split") != "leave-one-out"
        or not len(split.valid)
        or "valid_sample" in split.protocol  # already sampled: the same split again
    ):
        return split
    if fraction <= 0.0:
        raise DataError(f"valid_users must be in (0, 1], got {fraction}")
    n = len(split.valid)
    k = min(n, max(round(fraction * n), min_users))
    if k >= n:
        return split
    rng = np.random.default_rng(seed)
    held = np.zeros(n, bool)
    held[rng.choice(n, size=k, replace=False)] = True
    tv, tr = split.train_valid, split.train
    lens_tv, lens_tr = tv.lengths(), tr.lengths()
    if np.any(lens_tr > lens_tv):
        raise DataError("sample_validation: train is not a prefix of train_valid")
    # per user: the train_valid sequence, except held-out users keep their train prefix
    keep_len = lens_tv.copy()
    keep_len[split.valid.users[held]] = lens_tr[split.valid.users[held]]
    train = tv.filter(tv.positions() < np.repeat(keep_len, lens_tv))
    return Split(
        name=split.name,
        train=train,
        valid=split.valid.subset(held),
        test=split.test,
        train_valid=split.train_valid,
        protocol={
            **split.protocol,
            "valid_sample": {"users": k, "of": n, "fraction": fraction, "seed": seed},
        },
    )
