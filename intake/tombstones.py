"""Tombstones: customers who asked to be forgotten, honoured by every dataset write.

A dataset folder may hold ``forgotten.json``: one entry per forgotten customer, a keyed
hash of the id (never the id itself, nor the export or log pseudonym) and the time of the
request. :meth:`intake.dataset.Dataset.save` applies the folder's tombstones to whatever it
writes there, so a later import, ``data import-live`` or refresh into the same folder cannot
bring the customer back: their events up to the time of the request are dropped and their
id in the id map becomes ``forgotten:<hash prefix>`` (dense user ids stay stable, so
artifacts keyed by them still line up). Events the customer makes after the request (a new
consent, a new account) are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ecomrec.errors import DataError

FILE = "forgotten.json"
_PREFIX = b"ecomrec-tombstone\0"


def tombstone_hash(customer_id: str) -> str:
    """The stored form of a forgotten id (SHA-256 under a fixed domain prefix)."""
    return hashlib.sha256(_PREFIX + customer_id.encode()).hexdigest()


def placeholder(customer_id: str) -> str:
    """What replaces the id in the dataset's id map."""
    return "forgotten:" + tombstone_hash(customer_id)[:12]


@dataclass(frozen=True)
class Tombstones:
    """hash -> Unix time of the request."""

    entries: dict[str, int]

    @classmethod
    def read(cls, folder: str | Path) -> Tombstones:
        p = Path(folder) / FILE
        if not p.exists():
            return cls({})
        try:
            raw = json.loads(p.read_text())
            return cls({str(e["hash"]): int(e["at"]) for e in raw["forgotten"]})
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{p}: not a tombstone file ({e})") from e

    def with_customer(self, customer_id: str, at: int | None = None) -> Tombstones:
        at = int(time.time()) if at is None else at
        return Tombstones({**self.entries, tombstone_hash(customer_id): at})

    def write(self, folder: str | Path) -> None:
        """Atomically (temp file + rename)."""
        p = Path(folder) / FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{FILE}.tmp")
        body = {"forgotten": [{"hash": h, "at": t} for h, t in sorted(self.entries.items())]}
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, p)

    def __len__(self) -> int:
        return len(self.entries)

    def apply(self, ds: Any) -> tuple[Any, int]:
        """``ds`` without the forgotten customers' events (up to their request time) and
        with their ids replaced; returns it and the number of events removed."""
        # ``ds`` is an intake.dataset.Dataset (which calls this from ``save``)
        if not self.entries:
            return ds, 0

        ext = ds.users.external_ids
        cut: dict[int, int] = {}  # dense user id -> forget time
        new_ext = list(ext)
        for dense, e in enumerate(ext, start=1):
            at = self.entries.get(tombstone_hash(e))
            if at is not None:
                cut[dense] = at
                new_ext[dense - 1] = placeholder(e)
        if not cut:
            return ds, 0
        frame = pl.DataFrame(
            {"user_id": list(cut), "_forgotten_at": list(cut.values())},
            schema={"user_id": ds.events["user_id"].dtype, "_forgotten_at": pl.Int64()},
        )
        ev = ds.events.join(frame, on="user_id", how="left")
        drop = pl.col("_forgotten_at").is_not_null() & (pl.col("ts") <= pl.col("_forgotten_at"))
        kept = ev.filter(~drop).drop("_forgotten_at")
        removed = ds.events.height - kept.height
        out = dataclasses.replace(ds, events=kept, users=type(ds.users)(new_ext))
        return out, removed
