"""Customer histories for serving: a small protocol and an embedded store.

The stored sequence of a customer is merged with the request's recent events and then
padded by :func:`towers.sequences.pad_batch`, the same feature code as training, so
serving sees exactly what the tower was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import polars as pl

from intake.schema import EVENT_TYPE_IDS
from serving.validation import RecentEvent
from towers.sequences import Interactions, SequenceBatch, pad_batch

log = logging.getLogger(__name__)

_PURCHASE = EVENT_TYPE_IDS["purchase"]


@dataclass(frozen=True)
class History:
    """One customer's events in time order (internal item ids)."""

    items: np.ndarray  # (L,) int64
    ts: np.ndarray  # (L,) int64 unix seconds
    event_type: np.ndarray  # (L,) int64 event-type ids
    price: np.ndarray | None = None  # (L,) float64, NaN unknown

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def empty(cls) -> History:
        z = np.zeros(0, np.int64)
        return cls(z, z, z, np.zeros(0, np.float64))

    def purchased(self) -> np.ndarray:
        """Distinct item ids bought (purchase events)."""
        return np.unique(self.items[self.event_type == _PURCHASE])


@runtime_checkable
class HistoryStore(Protocol):
    """Read side of a history store (an embedded store here; Redis/Cassandra in production)."""

    def get(self, user: int) -> History:
        """The stored events of internal user ``user`` (empty when none)."""
        ...

    def users(self) -> np.ndarray:
        """Internal ids of every user with a history."""
        ...


class EmbeddedHistoryStore:
    """Every user's history in memory (CSR), loaded from a canonical events frame."""

    def __init__(self, inter: Interactions, price: np.ndarray | None = None) -> None:
        self.inter = inter
        # (nnz,) price of each stored event, aligned with inter.items; NaN when unknown
        self._price = price

    @classmethod
    def from_events(cls, events: pl.DataFrame, n_users: int, n_items: int) -> EmbeddedHistoryStore:
        """Build from a canonical events frame (``intake.schema``)."""
        ev = events.sort(["user_id", "ts", "order"])
        inter = Interactions.from_events(ev, n_users, n_items)
        price = ev["price"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        log.info("history store: %d users, %d events", n_users, len(inter.items))
        return cls(inter, price)

    def get(self, user: int) -> History:
        if not 1 <= user <= self.inter.n_users:
            return History.empty()
        lo, hi = int(self.inter.indptr[user]), int(self.inter.indptr[user + 1])
        return History(
            items=self.inter.items[lo:hi].astype(np.int64),
            ts=self.inter.ts[lo:hi],
            event_type=self.inter.event_type[lo:hi].astype(np.int64),
            price=None if self._price is None else self._price[lo:hi],
        )

    def users(self) -> np.ndarray:
        return np.flatnonzero(self.inter.lengths()[1:] > 0) + 1


def merge(stored: History, recent: Sequence[RecentEvent]) -> History:
    """Stored history followed by the request's events (time order, stored first on ties).

    Recent events that duplicate a stored event exactly (same item, type and time) are
    dropped, so a client re-sending its session does not count twice.
    """
    if not recent:
        return stored
    seen = set(
        zip(stored.items.tolist(), stored.event_type.tolist(), stored.ts.tolist(), strict=True)
    )
    add = [e for e in recent if (e.item_id, e.event_type, e.ts) not in seen]
    if not add:
        return stored
    items = np.concatenate([stored.items, np.array([e.item_id for e in add], np.int64)])
    ts = np.concatenate([stored.ts, np.array([e.ts for e in add], np.int64)])
    et = np.concatenate([stored.event_type, np.array([e.event_type for e in add], np.int64)])
    order = np.argsort(ts, kind="stable")  # stored events come first among equal times
    price = None
    if stored.price is not None:
        price = np.concatenate([stored.price, np.full(len(add), np.nan)])[order]
    return History(items[order], ts[order], et[order], price)


def to_batch(
    histories: Sequence[History], max_len: int, pad_to: int | None = None
) -> SequenceBatch:
    """The user-tower input for ``histories`` via :func:`towers.sequences.pad_batch`."""
    return pad_batch(
        [h.items for h in histories],
        max_len,
        ts=[h.ts for h in histories],
        event_types=[h.event_type for h in histories],
        pad_to=pad_to,
    )
