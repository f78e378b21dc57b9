"""A loaded shop: validated events and items frames plus the id maps, saved and loaded as a unit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ecomrec.errors import DataError, NotFoundError
from intake.schema import PAD_ID, DropReport, validate_events, validate_items


class IdMap:
    """Dense integer ids for external ids; index 0 is padding (``"<pad>"``)."""

    PAD = "<pad>"

    def __init__(self, external_ids: Sequence[str]) -> None:
        self._ext: list[str] = [self.PAD, *[str(e) for e in external_ids]]
        self._index: dict[str, int] = {e: i for i, e in enumerate(self._ext)}
        if len(self._index) != len(self._ext):
            raise DataError("duplicate external ids in id map")

    def __len__(self) -> int:
        """Number of real ids (padding excluded)."""
        return len(self._ext) - 1

    def to_internal(self, external_id: str) -> int:
        try:
            i = self._index[str(external_id)]
        except KeyError:
            raise NotFoundError(f"unknown id {external_id!r}") from None
        if i == PAD_ID:
            raise NotFoundError("the padding id is not an entity")
        return i

    def get(self, external_id: str) -> int | None:
        i = self._index.get(str(external_id))
        return i or None

    def to_external(self, internal_id: int) -> str:
        if not 1 <= internal_id < len(self._ext):
            raise NotFoundError(f"unknown internal id {internal_id}")
        return self._ext[internal_id]

    @property
    def external_ids(self) -> list[str]:
        """External ids in internal-id order, padding excluded."""
        return self._ext[1:]

    def extend(self, new_external_ids: Sequence[str]) -> IdMap:
        """A new map with unseen ids appended (existing ids keep their numbers)."""
        add = [e for e in dict.fromkeys(str(x) for x in new_external_ids) if e not in self._index]
        return IdMap(self.external_ids + add)

    def to_frame(self, id_col: str) -> pl.DataFrame:
        return pl.DataFrame(
            {id_col: np.arange(1, len(self._ext), dtype=np.int32), "external_id": self.external_ids}
        )


@dataclass
class Dataset:
    """A loaded shop: events, items and the user/item id maps."""

    name: str
    events: pl.DataFrame
    items: pl.DataFrame
    users: IdMap
    item_ids: IdMap
    report: DropReport
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events = validate_events(self.events, source=f"{self.name} events")
        self.items = validate_items(self.items, source=f"{self.name} items")
        if self.events.height:
            if int(self.events["user_id"].max()) > len(self.users):  # type: ignore[arg-type]
                raise DataError("events reference a user id outside the user map")
            if int(self.events["item_id"].max()) > len(self.item_ids):  # type: ignore[arg-type]
                raise DataError("events reference an item id outside the item map")

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def fingerprint(self) -> dict[str, object]:
        """What this dataset is, for artifacts made from it to record and compare.

        ``items``: hash of the item id map (a model's item table follows it), ``users``:
        of the user id map, ``catalogue``: of the catalogue columns, ``events``: of the
        events; ``id``: all four together. Same data -> same fingerprint, on any machine.
        """
        cat = self.items.select(
            [
                c
                for c in ("external_id", "title", "brand", "category", "price")
                if c in self.items.columns
            ]
        )
        ev = self.events
        h = hashlib.sha256()
        for col in ("user_id", "item_id", "ts", "quantity"):
            h.update(ev[col].to_numpy().tobytes())
        h.update("\n".join(ev["event_type"].to_list()).encode())
        parts = {
            "items": id_map_hash(self.item_ids.external_ids),
            "users": id_map_hash(self.users.external_ids),
            "catalogue": hashlib.sha256(cat.write_csv().encode()).hexdigest()[:16],
            "events": h.hexdigest()[:16],
        }
        whole = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        return {
            "id": whole,
            **parts,
            "name": self.name,
            "n_items": self.n_items,
            "n_users": self.n_users,
            "n_events": ev.height,
        }

    def describe(self) -> dict[str, object]:
        """Counts, sequence-length quantiles and time range."""
        ev = self.events
        lens = ev.group_by("user_id").len()["len"].to_numpy()
        q = np.quantile(lens, [0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]) if len(lens) else []
        ts_min = int(ev["ts"].min()) if ev.height else 0  # type: ignore[arg-type]
        ts_max = int(ev["ts"].max()) if ev.height else 0  # type: ignore[arg-type]
        fmt = "%Y-%m-%d"
        import datetime as _dt

        return {
            "dataset": self.name,
            "users": self.n_users,
            "active_users": int(ev["user_id"].n_unique()),
            "items": self.n_items,
            "interactions": ev.height,
            "event_types": dict(ev.group_by("event_type").len().iter_rows()),
            "seq_len_quantiles": dict(
                zip(["min", "p25", "p50", "p75", "p90", "p99", "max"], [float(x) for x in q])
            ),
            "seq_len_mean": float(lens.mean()) if len(lens) else 0.0,
            "time_range": [
                _dt.datetime.fromtimestamp(ts_min, _dt.UTC).strftime(fmt),
                _dt.datetime.fromtimestamp(ts_max, _dt.UTC).strftime(fmt),
            ],
            "items_with_title": int(self.items["title"].is_not_null().sum()),
            "dropped": self.report.to_dict(),
        }

    def save(self, directory: str | Path) -> None:
        """Write events/items/id maps as Parquet plus ``dataset.json`` (with the fingerprint).

        Written into a temporary sibling folder first and moved into place at the end, so
        a crash never leaves a half-written dataset; an existing dataset folder is replaced.
        """
        import shutil
        import tempfile

        d = Path(directory)
        d.parent.mkdir(parents=True, exist_ok=True)
        not_dataset = d.exists() and not (d.is_dir() and (d / "dataset.json").exists())
        if not_dataset and (not d.is_dir() or any(d.iterdir())):
            raise DataError(f"{d} exists and is not a saved dataset; refusing to overwrite it")
        from intake.tombstones import FILE as TOMBSTONES
        from intake.tombstones import Tombstones

        # customers forgotten in this folder stay forgotten, whatever is written here now
        tombs = Tombstones.read(d) if d.is_dir() else Tombstones({})
        ds, _ = tombs.apply(self)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
        try:
            if tombs:
                shutil.copy2(d / TOMBSTONES, tmp / TOMBSTONES)
            ds._write(tmp)
            if d.exists():
                old = d.with_name(f".{d.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                d.rename(old)
                tmp.rename(d)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(d)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, tmp: Path) -> None:
        self.events.write_parquet(tmp / "events.parquet")
        self.items.write_parquet(tmp / "items.parquet")
        self.users.to_frame("user_id").write_parquet(tmp / "users.parquet")
        self.item_ids.to_frame("item_id").write_parquet(tmp / "item_ids.parquet")
        meta = {
            "name": self.name,
            "report": self.report.to_dict(),
            "extra": self.extra,
            "fingerprint": self.fingerprint(),
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, directory: str | Path) -> Dataset:
        d = Path(directory)
        if not (d / "dataset.json").exists():
            raise NotFoundError(f"no saved dataset in {d}")
        meta = json.loads((d / "dataset.json").read_text())
        rep = DropReport(meta["report"]["source"], meta["report"]["rows_in"])
        rep.dropped = dict(meta["report"]["dropped"])
        rep.notes = dict(meta["report"]["notes"])
        return cls(
            name=meta["name"],
            events=pl.read_parquet(d / "events.parquet"),
            items=pl.read_parquet(d / "items.parquet"),
            users=IdMap(pl.read_parquet(d / "users.parquet")["external_id"].to_list()),
            item_ids=IdMap(pl.read_parquet(d / "item_ids.parquet")["external_id"].to_list()),
            report=rep,
            extra=meta.get("extra", {}),
        )


def id_map_hash(external_ids: Sequence[str]) -> str:
    """Short stable hash of an ordered list of external ids (an :class:`IdMap`'s content)."""
    h = hashlib.sha256()
    for e in external_ids:
        h.update(str(e).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def densify(
    events: pl.DataFrame, user_col: str, item_col: str
) -> tuple[pl.DataFrame, IdMap, IdMap]:
    """Replace external user/item ids by dense ids 1..n (first-seen order is NOT used:
    ids are assigned in sorted external-id order so they are reproducible)."""
    users = IdMap(sorted(events[user_col].cast(pl.Utf8).unique().to_list()))
    items = IdMap(sorted(events[item_col].cast(pl.Utf8).unique().to_list()))
    return map_ids(events, user_col, item_col, users, items), users, items


def map_ids(
    events: pl.DataFrame, user_col: str, item_col: str, users: IdMap, items: IdMap
) -> pl.DataFrame:
    """Map external id columns to dense ``user_id``/``item_id`` with the given maps."""
    umap = users.to_frame("user_id").rename({"external_id": user_col})
    imap = items.to_frame("item_id").rename({"external_id": item_col})
    out = (
        events.with_columns(pl.col(user_col).cast(pl.Utf8), pl.col(item_col).cast(pl.Utf8))
        .join(umap, on=user_col, how="left")
        .join(imap, on=item_col, how="left")
    )
    return out
