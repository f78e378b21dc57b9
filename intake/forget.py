"""Forget a customer: the live log, the dataset, derived files, then a search for traces.

:func:`forget_customer` (``ecomrec customers forget``):

1. the live event log: every event of the customer deleted (``EventLog.forget``);
2. the dataset folder: a tombstone (``intake.tombstones``) is recorded, then the dataset is
   rewritten through ``Dataset.save``, which drops the customer's events and replaces the
   id in the id map; every later write into that folder (import, ``data import-live``,
   refresh) applies the tombstone again, so nothing brings the customer back;
3. the derived folders named (segment exports, ``segments ... --out`` folders, batch job
   outputs): Parquet rows whose text columns hold the id or one of its pseudonyms (the
   segments export's and the service log's, under the keys given) are removed; the saved
   segment scores (``DIR/scores``, keyed by internal ids and now stale: the dataset's
   fingerprint changed) are deleted, to be refitted on next use;
4. a search of every file in the dataset and derived folders for the id's bytes and its
   pseudonyms: what is still found is listed in the receipt (``leftover``) and makes the
   command fail.

Model weights are not edited: retrain (``ecomrec refresh``) for the customer's influence on
the towers to go. The user-vector collection is cleaned by ``lifecycle.forget`` (a
``forgetter`` passed in here: this package does not import the indexing package).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ecomrec.errors import NotFoundError
from intake.dataset import Dataset
from intake.live_log import EventLog
from intake.tombstones import Tombstones, tombstone_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForgetReceipt:
    """What was removed, where; never the id itself (the tombstone hash stands for it)."""

    tombstone: str
    removed: tuple[tuple[str, int], ...] = ()
    deleted: tuple[str, ...] = ()
    leftover: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        out = [f"tombstone {self.tombstone[:16]}..."]
        out += [f"removed {n:>8,}  {what}" for what, n in self.removed]
        out += [f"deleted           {p}" for p in self.deleted]
        out += [f"STILL FOUND       {p}" for p in self.leftover]
        out += [f"note: {n}" for n in self.notes]
        return out


def pseudonyms(customer_id: str, keys: Sequence[str]) -> list[str]:
    """The forms the id takes in our outputs under ``keys``: the segments export's
    (HMAC-SHA256, 20 hex) and the service access log's (16 hex)."""
    out = []
    for k in keys:
        h = hmac.new(k.encode(), customer_id.encode(), hashlib.sha256).hexdigest()
        out += [h[:20], h[:16]]
    return out


def _scrub_parquet(path: Path, needles: set[str]) -> int:
    df = pl.read_parquet(path)
    text = [c for c, t in df.schema.items() if t == pl.Utf8]
    if not text or df.height == 0:
        return 0
    hit = pl.any_horizontal([pl.col(c).is_in(list(needles)) for c in text])
    n = int(df.select(hit.sum()).item() or 0)
    if n:
        tmp = path.with_name(f".{path.name}.forget")
        df.filter(~hit.fill_null(False)).write_parquet(tmp)
        os.replace(tmp, path)
    return n


def _contains(path: Path, needles: Sequence[bytes]) -> bool:
    """Whether the file holds a needle: Parquet decoded (its pages are compressed), any
    other file as bytes."""
    if path.suffix == ".parquet":
        df = pl.read_parquet(path)
        text = [n.decode() for n in needles]
        for c, t in df.schema.items():
            col = df[c]
            if t == pl.List(pl.Utf8):
                col = col.explode()
            elif t != pl.Utf8:
                continue
            if bool(col.is_in(text).any()):
                return True
        return False
    chunk = 1 << 20
    longest = max(len(n) for n in needles)
    tail = b""
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return False
            buf = tail + block
            if any(n in buf for n in needles):
                return True
            tail = buf[-longest:]


def forget_customer(
    customer_id: str,
    dataset_dir: str | Path,
    *,
    event_log: EventLog | None = None,
    artifacts: Sequence[str | Path] = (),
    keys: Sequence[str] = (),
    at: int | None = None,
    forgetters: Sequence[Callable[[str], Sequence[tuple[str, int]]]] = (),
    search: Sequence[str | Path] = (),
) -> ForgetReceipt:
    """Remove ``customer_id`` everywhere named (see the module docstring).

    ``forgetters``: more stores to forget the customer in, each called with the id before
    the trace search and answering ``(what, how many removed)`` lines (the user-vector
    collection: ``lifecycle.forget``, which may import the indexing package); ``search``:
    more folders whose every file is searched for traces (an embedded index directory).
    """
    if not customer_id:
        raise NotFoundError("no customer id given")
    d = Path(dataset_dir)
    ds = Dataset.load(d)
    removed: list[tuple[str, int]] = []
    deleted: list[str] = []
    notes: list[str] = []
    if event_log is not None:
        removed.append(("events in the live log", event_log.forget(customer_id)))
    known = ds.users.get(customer_id) is not None
    if not known:
        notes.append("the dataset does not know this customer (tombstone recorded anyway)")
    before = ds.events.height
    Tombstones.read(d).with_customer(customer_id, at).write(d)
    ds.save(d)  # applies the tombstone
    after = Dataset.load(d)
    removed.append((f"events in dataset {d}", before - after.events.height))
    removed.append((f"ids in the id map of {d}", int(known)))

    needles = {customer_id, *pseudonyms(customer_id, keys)}
    for root in map(Path, artifacts):
        if not root.exists():
            raise NotFoundError(f"{root}: no such folder")
        for meta in sorted(root.rglob("scores/meta.json")):
            shutil.rmtree(meta.parent)
            deleted.append(f"{meta.parent} (saved segment scores: refitted on next use)")
        for p in sorted(root.rglob("*.parquet")):
            n = _scrub_parquet(p, needles)
            if n:
                removed.append((f"rows of {p}", n))

    for forget in forgetters:
        removed += list(forget(customer_id))

    patterns = [needle.encode() for needle in needles]
    leftover = [
        str(p)
        for root in (d, *map(Path, artifacts), *map(Path, search))
        for p in sorted(root.rglob("*"))
        if p.is_file() and _contains(p, patterns)
    ]
    if leftover:
        log.warning("forget: the customer is still found in %d file(s)", len(leftover))
    return ForgetReceipt(
        tombstone=tombstone_hash(customer_id),
        removed=tuple(removed),
        deleted=tuple(deleted),
        leftover=tuple(leftover),
        notes=tuple(notes),
    )
