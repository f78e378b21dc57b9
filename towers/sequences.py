"""Behaviour sequences: the ONE feature path shared by training, export and serving.

:class:`Interactions` holds every user's events in time order as CSR arrays
(``indptr`` over users ``0..n_users``, user 0 is padding and always empty).
:func:`pad_batch` turns a list of sequences into the padded tensors the user
tower consumes; serving calls exactly the same function on one request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from ecomrec.errors import DataError
from intake.schema import EVENT_TYPE_IDS, PAD_ID

# Time-gap buckets (seconds since the previous event): 0 = padding, 1 = first event /
# same instant, then log-spaced up to a year and more.
_GAP_EDGES = np.array(
    [
        1,
        60,
        3600,
        6 * 3600,
        86400,
        2 * 86400,
        7 * 86400,
        14 * 86400,
        30 * 86400,
        60 * 86400,
        120 * 86400,
        240 * 86400,
        365 * 86400,
    ],
    dtype=np.int64,
)
N_GAP_BUCKETS = len(_GAP_EDGES) + 2  # padding + "first/same" + len(edges) buckets
N_EVENT_TYPES = len(EVENT_TYPE_IDS) + 1  # + padding


def gap_buckets(ts: np.ndarray) -> np.ndarray:
    """Bucket id (>= 1) of the time since the previous event in one user's sequence."""
    ts = np.asarray(ts, dtype=np.int64)
    gaps = np.diff(ts, prepend=ts[:1] if len(ts) else ts)
    return (np.searchsorted(_GAP_EDGES, np.maximum(gaps, 0), side="right") + 1).astype(np.int64)


@dataclass(frozen=True)
class Interactions:
    """Per-user event sequences in time order (CSR). Ids: users 1..n_users, items 1..n_items."""

    n_users: int
    n_items: int
    indptr: np.ndarray  # (n_users + 2,) int64; user u owns [indptr[u], indptr[u+1])
    items: np.ndarray  # (nnz,) int32
    ts: np.ndarray  # (nnz,) int64 unix seconds
    event_type: np.ndarray  # (nnz,) int8 ids from EVENT_TYPE_IDS

    def __post_init__(self) -> None:
        if self.indptr.shape != (self.n_users + 2,):
            raise DataError(f"indptr must have n_users + 2 = {self.n_users + 2} entries")
        if not (len(self.items) == len(self.ts) == len(self.event_type) == self.indptr[-1]):
            raise DataError("items/ts/event_type lengths disagree with indptr")

    # --- construction -------------------------------------------------------------
    @classmethod
    def from_events(cls, events: pl.DataFrame, n_users: int, n_items: int) -> Interactions:
        """Build from a canonical events frame; order is (user, ts, source order)."""
        ev = events.sort(["user_id", "ts", "order"])
        users = ev["user_id"].to_numpy().astype(np.int64)
        counts = np.bincount(users, minlength=n_users + 1)[: n_users + 1]
        indptr = np.zeros(n_users + 2, dtype=np.int64)
        indptr[1:] = np.cumsum(counts)
        et = ev["event_type"].replace_strict(EVENT_TYPE_IDS, return_dtype=pl.Int8).to_numpy()
        return cls(
            n_users=n_users,
            n_items=n_items,
            indptr=indptr,
            items=ev["item_id"].to_numpy().astype(np.int32),
            ts=ev["ts"].to_numpy().astype(np.int64),
            event_type=et.astype(np.int8),
        )

    @classmethod
    def from_lists(
        cls,
        seqs: Sequence[Sequence[int]],
        n_items: int,
        ts: Sequence[Sequence[int]] | None = None,
    ) -> Interactions:
        """From Python lists: ``seqs[u-1]`` is user u's items (all purchases)."""
        n_users = len(seqs)
        lens = np.array([len(s) for s in seqs], dtype=np.int64)
        indptr = np.zeros(n_users + 2, dtype=np.int64)
        indptr[2:] = np.cumsum(lens)
        items = (
            np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
            if n_users
            else np.zeros(0, np.int32)
        )
        if ts is None:
            t = (
                np.concatenate([np.arange(len(s), dtype=np.int64) * 86400 for s in seqs])
                if n_users
                else np.zeros(0, np.int64)
            )
        else:
            t = np.concatenate([np.asarray(x, dtype=np.int64) for x in ts])
        et = np.full(len(items), EVENT_TYPE_IDS["purchase"], dtype=np.int8)
        return cls(n_users, n_items, indptr, items, t, et)

    # --- access -------------------------------------------------------------------
    def lengths(self) -> np.ndarray:
        """(n_users + 1,) sequence length per user id."""
        return np.diff(self.indptr)

    def seq(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def seq_ts(self, user: int) -> np.ndarray:
        return self.ts[self.indptr[user] : self.indptr[user + 1]]

    def seq_event_type(self, user: int) -> np.ndarray:
        return self.event_type[self.indptr[user] : self.indptr[user + 1]]

    def positions(self) -> np.ndarray:
        """(nnz,) position of every stored event inside its user's sequence (0 = oldest)."""
        return np.arange(len(self.items), dtype=np.int64) - np.repeat(
            self.indptr[:-1], self.lengths()
        )

    def user_of_row(self) -> np.ndarray:
        """(nnz,) user id of every stored event."""
        return np.repeat(np.arange(self.n_users + 1, dtype=np.int64), self.lengths())

    def to_csr(self, weights: np.ndarray | None = None, binary: bool = True) -> sp.csr_matrix:
        """users x items matrix, shape (n_users + 1, n_items + 1); row/col 0 are padding."""
        data = (
            np.ones(len(self.items), np.float32) if weights is None else weights.astype(np.float32)
        )
        m = sp.csr_matrix(
            (data, (self.user_of_row(), self.items.astype(np.int64))),
            shape=(self.n_users + 1, self.n_items + 1),
        )
        m = m.tocsr()
        m.sum_duplicates()
        if binary:
            m.data[:] = 1.0
        return m

    def filter(self, keep: np.ndarray) -> Interactions:
        """A copy holding only the events where the boolean mask ``keep`` (nnz,) is True."""
        users = self.user_of_row()[keep]
        counts = np.bincount(users, minlength=self.n_users + 1)[: self.n_users + 1]
        indptr = np.zeros(self.n_users + 2, np.int64)
        indptr[1:] = np.cumsum(counts)
        return Interactions(
            self.n_users,
            self.n_items,
            indptr,
            self.items[keep],
            self.ts[keep],
            self.event_type[keep],
        )

    def item_counts(self) -> np.ndarray:
        """(n_items + 1,) number of events per item (index 0 is padding, always 0)."""
        c = np.bincount(self.items, minlength=self.n_items + 1).astype(np.int64)
        c[PAD_ID] = 0
        return c

    def append(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> Interactions:
        """A copy with one extra event appended to each listed user (others unchanged)."""
        order = np.argsort(users, kind="stable")
        users, items, ts = users[order], items[order], ts[order]
        add = np.bincount(users, minlength=self.n_users + 1)[: self.n_users + 1]
        lens = self.lengths() + add
        indptr = np.zeros(self.n_users + 2, dtype=np.int64)
        indptr[1:] = np.cumsum(lens)
        n = int(indptr[-1])
        new_items = np.empty(n, np.int32)
        new_ts = np.empty(n, np.int64)
        new_et = np.empty(n, np.int8)
        old_len = self.lengths()
        # positions of old events in the new layout
        old_pos = self.positions() + np.repeat(indptr[:-1], old_len)
        new_items[old_pos] = self.items
        new_ts[old_pos] = self.ts
        new_et[old_pos] = self.event_type
        tail = indptr[1:][users] - 1
        # several appended events for one user: place them in order
        if len(users):
            dup_rank = np.zeros(len(users), np.int64)
            _, first = np.unique(users, return_index=True)
            starts = np.repeat(first, np.diff(np.append(first, len(users))))
            dup_rank = np.arange(len(users)) - starts
            cnt = add[users]
            tail = indptr[1:][users] - cnt + dup_rank
        new_items[tail] = items
        new_ts[tail] = ts
        new_et[tail] = EVENT_TYPE_IDS["purchase"]
        return Interactions(self.n_users, self.n_items, indptr, new_items, new_ts, new_et)


@dataclass(frozen=True)
class SequenceBatch:
    """Padded, LEFT-aligned-to-the-end inputs of the user tower (numpy; the tower makes tensors).

    Sequences are truncated to the most recent ``max_len`` events and RIGHT-padded with 0,
    so position 0 is the oldest kept event and ``lengths-1`` the newest.
    """

    items: np.ndarray  # (B, T) int64, 0 = padding
    event_type: np.ndarray  # (B, T) int64, 0 = padding
    gap: np.ndarray  # (B, T) int64 time-gap bucket, 0 = padding
    lengths: np.ndarray  # (B,) int64, >= 0


def pad_batch(
    seqs: Sequence[np.ndarray],
    max_len: int,
    ts: Sequence[np.ndarray] | None = None,
    event_types: Sequence[np.ndarray] | None = None,
    pad_to: int | None = None,
) -> SequenceBatch:
    """Truncate each sequence to its most recent ``max_len`` events and right-pad.

    The batch is padded to its own longest sequence (``pad_to`` forces a width), so CPU
    time goes to real positions.
    """
    b = len(seqs)
    kept = [np.asarray(s)[-max_len:] for s in seqs]
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    t = int(pad_to if pad_to is not None else max(1, int(lengths.max(initial=1))))
    items = np.zeros((b, t), dtype=np.int64)
    et = np.zeros((b, t), dtype=np.int64)
    gap = np.zeros((b, t), dtype=np.int64)
    for i, s in enumerate(kept):
        n = len(s)
        if n == 0:
            continue
        items[i, :n] = s
        if event_types is not None:
            et[i, :n] = np.asarray(event_types[i])[-max_len:]
        else:
            et[i, :n] = EVENT_TYPE_IDS["purchase"]
        if ts is not None:
            # the gap of the first kept event uses its real predecessor when truncated
            full = np.asarray(ts[i], dtype=np.int64)
            g = gap_buckets(full)[-max_len:]
            gap[i, :n] = g
        else:
            gap[i, :n] = 1
    return SequenceBatch(items=items, event_type=et, gap=gap, lengths=lengths)


def batch_for_users(inter: Interactions, users: np.ndarray, max_len: int) -> SequenceBatch:
    """:func:`pad_batch` over the stored sequences of ``users``."""
    return pad_batch(
        [inter.seq(int(u)) for u in users],
        max_len,
        ts=[inter.seq_ts(int(u)) for u in users],
        event_types=[inter.seq_event_type(int(u)) for u in users],
    )


# --- transaction-log features: the customer's basket of own items ---------------------
# Age buckets reuse the gap edges (seconds since the item was last bought); count buckets
# 1, 2, 3-4, 5-8, 9-16, > 16 purchases (distinct invoices) of the item.
_COUNT_EDGES = np.array([2, 3, 5, 9, 17], dtype=np.int64)
N_AGE_BUCKETS = len(_GAP_EDGES) + 2  # padding + len(edges) + 1
N_COUNT_BUCKETS = len(_COUNT_EDGES) + 2  # padding + len(edges) + 1


@dataclass(frozen=True)
class ItemBag:
    """Each user's distinct purchased items as of a moment ``now`` (CSR over the batch rows).

    Row ``r`` owns ``items[indptr[r]:indptr[r+1]]``; for every (user, item) pair: how many
    distinct invoices (timestamps) held it, and how long ago it was last bought. This is
    the one feature path of the transaction-log user tower (training, evaluation, serving).
    """

    indptr: np.ndarray  # (B + 1,) int64
    items: np.ndarray  # (nnz,) int64 item ids >= 1
    count: np.ndarray  # (nnz,) int64 number of invoices with the item
    age_s: np.ndarray  # (nnz,) int64 seconds since the item was last bought (>= 0)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def age_bucket(self) -> np.ndarray:
        """(nnz,) bucket id >= 1 of :attr:`age_s` (0 is padding)."""
        return (np.searchsorted(_GAP_EDGES, self.age_s, side="right") + 1).astype(np.int64)

    def count_bucket(self) -> np.ndarray:
        """(nnz,) bucket id >= 1 of :attr:`count` (0 is padding)."""
        return (np.searchsorted(_COUNT_EDGES, self.count, side="right") + 1).astype(np.int64)

    def rows(self) -> np.ndarray:
        """(nnz,) batch row of every stored pair."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))

    def recency_frequency(self, half_life_days: float) -> np.ndarray:
        """(nnz,) count x 2^(-age / half-life): the personal-top score of each own item."""
        return self.count * np.exp2(-self.age_s / (half_life_days * 86400.0))


def item_bag(
    seqs: Sequence[np.ndarray], ts: Sequence[np.ndarray], now: Sequence[int] | np.ndarray
) -> ItemBag:
    """:class:`ItemBag` of the events of each sequence strictly before its ``now``.

    Items bought at one timestamp form one invoice (a basket): a repeat inside one invoice
    counts once. ``now`` is the scoring time (serving: the request time; evaluation: the
    latest event of the log).
    """
    indptr = [0]
    out_items, out_count, out_age = [], [], []
    for s, t, n in zip(seqs, ts, now, strict=True):
        s = np.asarray(s, np.int64)
        t = np.asarray(t, np.int64)
        keep = (t < int(n)) & (s > 0)
        s, t = s[keep], t[keep]
        if len(s):
            # distinct (item, invoice) pairs, then per item: count and last time
            pair = np.unique(np.stack([s, t], 1), axis=0)  # sorted by item, then time
            it, first, cnt = np.unique(pair[:, 0], return_index=True, return_counts=True)
            last_t = pair[first + cnt - 1, 1]
            out_items.append(it)
            out_count.append(cnt.astype(np.int64))
            out_age.append(np.maximum(int(n) - last_t, 0))
        indptr.append(indptr[-1] + (len(out_items[-1]) if len(s) else 0))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return ItemBag(
        np.asarray(indptr, np.int64),
        cat(out_items).astype(np.int64),
        cat(out_count).astype(np.int64),
        cat(out_age).astype(np.int64),
    )


def bag_for_users(inter: Interactions, users: np.ndarray, now: int | None = None) -> ItemBag:
    """:func:`item_bag` of the stored purchases of ``users`` as of ``now`` (default: just
    after the latest event of the log)."""
    pur = EVENT_TYPE_IDS["purchase"]
    t_now = int(inter.ts.max(initial=0)) + 1 if now is None else int(now)
    seqs, tss = [], []
    for u in users:
        m = inter.seq_event_type(int(u)) == pur
        seqs.append(inter.seq(int(u))[m])
        tss.append(inter.seq_ts(int(u))[m])
    return item_bag(seqs, tss, np.full(len(users), t_now, np.int64))


def load_sequences(out_dir: str | Path) -> Interactions:
    """The sequences of :func:`intake.ingest.ingest_event_log`'s output as
    :class:`Interactions` (all users in memory)."""
    out = Path(out_dir)
    n_users = pl.scan_parquet(out / "customers.parquet").select(pl.len()).collect().item()
    n_items = pl.scan_parquet(out / "products.parquet").select(pl.len()).collect().item()
    seq = pl.read_parquet(out / "sequences" / "*.parquet").sort("user_id")
    lens = np.zeros(n_users + 1, np.int64)
    lens[seq["user_id"].to_numpy()] = seq["items"].list.len().to_numpy()
    indptr = np.zeros(n_users + 2, np.int64)
    indptr[1:] = np.cumsum(lens)
    return Interactions(
        n_users=n_users,
        n_items=n_items,
        indptr=indptr,
        items=seq["items"].explode().to_numpy().astype(np.int32),
        ts=seq["ts"].explode().to_numpy().astype(np.int64),
        event_type=seq["event_type"].explode().to_numpy().astype(np.int8),
    )
