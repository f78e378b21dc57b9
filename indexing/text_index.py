"""Product text vectors in the index: a companion collection versioned with the items.

``SearchProducts`` searches the catalogue's MiniLM text vectors (384-d, the item tower's
frozen language model over ``title | brand | category``).  They live in a second
collection per item version, not in named vectors of the item collection: the item
collection keeps its one unnamed vector (every reader, verifier, delta version and the
server back end stay as they are), and the text collection has the same payloads (the
same filters) and its own HNSW graph.

**One version, two collections, one alias.**  The text collection of item version
``<alias>_v<stamp>`` is ``<alias>-text_v<stamp>`` (:func:`text_version_of`).  Builds
and updates (``indexing.build``: ``build_version(text=...)``, ``upsert_points``,
``delete_points``) write and commit it BEFORE the item alias moves, and prune drops it
with its item version; there is no alias of its own.  A reader (:class:`TextIndex`)
reads the item alias and opens the text collection of the version it names, so a
refresh or a rollback swaps both at once, and a query never mixes item vectors of one
version with text vectors of another.  An item version without text collection (built
before issue 28, or with ``--no-text``) answers ``IndexUnavailableError`` here; the
service then searches the catalogue's cached text vectors in memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecomrec.errors import IndexUnavailableError, NotFoundError
from indexing.base import Hit, IndexConfig, IndexManifest, ItemIndex, SearchFilter

log = logging.getLogger(__name__)

TEXT_SUFFIX = "-text"
TEXT_DIM = 384  # all-MiniLM-L6-v2 (towers.text_encoder.TEXT_DIM, without importing torch)
_KEPT = 3  # text readers kept open (a query may still run on the previous version)


def text_alias(alias: str) -> str:
    """The name prefix of ``alias``'s text collections (``items`` -> ``items-text``)."""
    return f"{alias}{TEXT_SUFFIX}"


def text_version_of(item_version: str, alias: str) -> str:
    """The text collection of an item version: ``items_v2026...`` -> ``items-text_v2026...``."""
    prefix = f"{alias}_v"
    if not item_version.startswith(prefix):
        raise NotFoundError(f"{item_version!r} is not a version of alias {alias!r}")
    return f"{text_alias(alias)}_v{item_version[len(prefix) :]}"


@dataclass(frozen=True)
class TextPoints:
    """Text vectors to index: item ids ``(N,)``, unit vectors ``(N, 384)``, payloads (the
    item points' payloads: the same filters apply)."""

    ids: np.ndarray
    vectors: np.ndarray
    payloads: list[dict[str, Any]]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.vectors) == len(self.payloads)):
            raise ValueError(
                f"TextPoints: {len(self.ids)} ids, {len(self.vectors)} vectors, "
                f"{len(self.payloads)} payloads"
            )

    def with_text(self) -> TextPoints:
        """Without the rows whose vector is zero (no text to search)."""
        keep = np.abs(np.asarray(self.vectors)).sum(axis=1) > 0
        if keep.all():
            return self
        return TextPoints(
            np.asarray(self.ids)[keep],
            np.asarray(self.vectors)[keep],
            [p for p, k in zip(self.payloads, keep.tolist(), strict=True) if k],
        )


def catalogue_text_points(
    items: Any, ids: np.ndarray, payloads: Sequence[dict[str, Any]]
) -> TextPoints:
    """Text vectors of a canonical items frame (rows aligned with ``ids``/``payloads``, as
    :func:`indexing.build.item_payloads` returns them): the tower's cached catalogue
    embeddings (``towers.text_encoder.catalogue_text_embeddings``)."""
    from towers.text_encoder import catalogue_text_embeddings

    vecs = catalogue_text_embeddings(items)  # (N, 384)
    return TextPoints(np.asarray(ids, np.int64), vecs, list(payloads)).with_text()


class TextIndex(ItemIndex):
    """The text collection of whatever version the item alias names, as an ItemIndex.

    ``items``: the item reader (its ``version`` is the alias target now); ``opener``:
    opens a reader pinned to one text version.  Every query resolves the item version
    once and runs on that version's text collection.
    """

    def __init__(self, items: ItemIndex, alias: str, opener: Callable[[str], ItemIndex]) -> None:
        self.items = items
        self.alias = alias
        self._open = opener
        self._readers: dict[str, ItemIndex] = {}
        self._lock = threading.Lock()

    def _reader(self) -> ItemIndex:
        tv = text_version_of(self.items.version, self.alias)
        r = self._readers.get(tv)
        if r is not None:
            return r
        with self._lock:
            r = self._readers.get(tv)
            if r is None:
                try:
                    r = self._open(tv)
                    r.manifest()  # complete, readable
                except IndexUnavailableError:
                    raise
                except Exception as e:
                    raise IndexUnavailableError(f"text vectors {tv}: {e}") from e
                self._readers[tv] = r
                for old in list(self._readers)[:-_KEPT]:
                    self._readers.pop(old).close()
                log.info("text index now serving %s", tv)
            return r

    @property
    def dim(self) -> int:
        return self._reader().dim

    @property
    def version(self) -> str:
        return text_version_of(self.items.version, self.alias)

    def manifest(self) -> IndexManifest:
        return self._reader().manifest()

    def count(self, flt: SearchFilter | None = None) -> int:
        return self._reader().count(flt)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        exclude_ids: Sequence[int] = (),
        hnsw_ef: int | None = None,
        *,
        with_payload: bool = True,
    ) -> list[Hit]:
        return self._reader().search(
            vector, k, flt, exclude_ids, hnsw_ef, with_payload=with_payload
        )

    def search_batch(
        self,
        vectors: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        exclude_ids: Sequence[Sequence[int]] | None = None,
        hnsw_ef: int | None = None,
        *,
        with_payload: bool = True,
    ) -> list[list[Hit]]:
        return self._reader().search_batch(
            vectors, k, flt, exclude_ids, hnsw_ef, with_payload=with_payload
        )

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        return self._reader().get_vectors(ids)

    def get_payloads(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        return self._reader().get_payloads(ids)

    def existing_ids(self, ids: Sequence[int]) -> set[int]:
        return self._reader().existing_ids(ids)

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()


def open_text_index(cfg: IndexConfig, items: ItemIndex, alias: str | None = None) -> TextIndex:
    """The text collections that follow ``items`` (a reader of ``alias``), read with the
    same back end and settings (the embedded back end: checksums checked at load; with
    ``local_copy`` when ``items`` serves private copies)."""
    alias = alias or cfg.alias
    if cfg.backend == "edge":
        from indexing.qdrant_edge import EdgeStore

        store: Any = EdgeStore(cfg)
        local = getattr(items, "_copy_root", None)
        local_copy: Any = local.parent if local is not None else False

        def opener(v: str) -> ItemIndex:
            r: ItemIndex = store.open(version=v, local_copy=local_copy)
            return r

    else:
        from indexing.qdrant_server import ServerStore

        store = ServerStore(cfg)

        def opener(v: str) -> ItemIndex:
            r: ItemIndex = store.open(version=v)
            return r

    return TextIndex(items, alias, opener)
