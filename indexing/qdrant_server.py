"""Server backend: ``qdrant-client`` against a Qdrant server/cluster, or its local mode.

``IndexConfig.location`` is a URL (``http://host:6333``, with ``api_key``), or
``":memory:"`` / a directory for qdrant-client's local mode (exact brute force, payload
indexes ignored: right for tests, wrong for serving).  Each version is a collection;
the alias is a real Qdrant collection alias, swapped with one atomic
``update_collection_aliases`` call.  The manifest lives in the collection's metadata
(``ecomrec_manifest``); a collection without it is an incomplete build.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ecomrec.errors import IndexUnavailableError, NotFoundError
from indexing.base import (
    Hit,
    IndexConfig,
    IndexManifest,
    SearchFilter,
    UserFilter,
    provisional_manifest,
)
from indexing.store import QdrantReader
from indexing.store import plain_payload as _plain

log = logging.getLogger(__name__)

_MANIFEST_KEY = "ecomrec_manifest"
_META_KEY = "ecomrec_meta"
# qdrant-client local mode keeps one client per storage; share it across stores/readers.
_LOCAL_CLIENTS: dict[str, Any] = {}
_LOCAL_LOCK = threading.Lock()


def make_client(cfg: IndexConfig) -> Any:
    """A QdrantClient for ``cfg.location``: a URL, or local mode: ``:memory:`` (``:memory:NAME``
    for separate in-memory stores within one process) or a directory."""
    from qdrant_client import QdrantClient

    loc = cfg.location
    if loc.startswith(("http://", "https://")):
        return QdrantClient(url=loc, api_key=cfg.resolved_api_key(), timeout=60)
    # Local mode warns on every query that search params and payload indexes have no
    # effect (it is exact brute force); known and documented, so silence it.
    warnings.filterwarnings("ignore", message=".*Local mode.*", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*local Qdrant.*", category=UserWarning)
    with _LOCAL_LOCK:
        client = _LOCAL_CLIENTS.get(loc)
        if client is None:
            if loc.startswith(":memory:"):
                client = QdrantClient(":memory:")
            else:
                client = QdrantClient(path=loc)
            _LOCAL_CLIENTS[loc] = client
        return client


def server_filter(flt: SearchFilter | UserFilter | None) -> Any:
    """Translate a SearchFilter/UserFilter into a ``qdrant_client.models.Filter`` (None when empty)."""
    from qdrant_client import models as m

    if flt is None or flt.is_empty:
        return None
    must: list[Any] = []
    if isinstance(flt, UserFilter):
        if flt.segments:
            must.append(m.FieldCondition(key="segment", match=m.MatchAny(any=list(flt.segments))))
        if flt.rfm_segments:
            must.append(
                m.FieldCondition(key="rfm_segment", match=m.MatchAny(any=list(flt.rfm_segments)))
            )
        if flt.churn_min is not None or flt.churn_max is not None:
            must.append(
                m.FieldCondition(
                    key="churn_risk", range=m.Range(gte=flt.churn_min, lte=flt.churn_max)
                )
            )
        excl: list[Any] | None = (
            [m.HasIdCondition(has_id=[int(i) for i in flt.exclude_ids])]
            if flt.exclude_ids
            else None
        )
        return m.Filter(must=must or None, must_not=excl)
    if flt.categories:
        must.append(
            m.FieldCondition(key="category_path", match=m.MatchAny(any=list(flt.categories)))
        )
    if flt.brands:
        must.append(m.FieldCondition(key="brand", match=m.MatchAny(any=list(flt.brands))))
    if flt.price_min is not None or flt.price_max is not None:
        must.append(
            m.FieldCondition(
                key="price",
                range=m.Range(
                    gte=None if flt.price_min is None else float(flt.price_min),
                    lte=None if flt.price_max is None else float(flt.price_max),
                ),
            )
        )
    if flt.in_stock is not None:
        must.append(m.FieldCondition(key="in_stock", match=m.MatchValue(value=int(flt.in_stock))))
    if flt.only_ids:
        must.append(m.HasIdCondition(has_id=[int(i) for i in flt.only_ids]))
    must_not: list[Any] | None = (
        [m.HasIdCondition(has_id=[int(i) for i in flt.exclude_ids])] if flt.exclude_ids else None
    )
    return m.Filter(must=must or None, must_not=must_not)


class ServerStore:
    """Versions (collections) and aliases on a Qdrant server or in qdrant-client local mode."""

    def __init__(self, cfg: IndexConfig, client: Any | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else make_client(cfg)
        self._locks: dict[str, threading.Lock] = {}
        self._open: set[str] = set()

    # -- helpers ------------------------------------------------------------------------
    def _metadata(self, version: str) -> dict[str, Any]:
        try:
            info = self.client.get_collection(version)
        except (ValueError, KeyError) as e:  # local mode raises ValueError for unknown names
            raise NotFoundError(f"collection {version} does not exist") from e
        except Exception as e:
            if "not found" in str(e).lower() or "404" in str(e):
                raise NotFoundError(f"collection {version} does not exist") from e
            raise IndexUnavailableError(f"cannot read collection {version}: {e}") from e
        return dict(info.config.metadata or {})

    def _names(self, alias: str) -> list[str]:
        prefix = f"{alias}_v"
        return sorted(
            c.name for c in self.client.get_collections().collections if c.name.startswith(prefix)
        )

    # -- writing ------------------------------------------------------------------------
    def create_version(self, version: str, dim: int, payload_indexes: dict[str, str]) -> None:
        from qdrant_client import models as m

        cfg = self.cfg
        if self.client.collection_exists(version):
            raise IndexUnavailableError(f"collection {version} already exists")
        quant = (
            m.ScalarQuantization(
                scalar=m.ScalarQuantizationConfig(
                    type=m.ScalarType.INT8, quantile=0.99, always_ram=True
                )
            )
            if cfg.quantization == "int8"
            else None
        )
        self.client.create_collection(
            version,
            vectors_config=m.VectorParams(
                size=dim,
                distance=m.Distance.COSINE if cfg.distance == "cosine" else m.Distance.DOT,
            ),
            hnsw_config=m.HnswConfigDiff(
                m=cfg.hnsw_m,
                ef_construct=cfg.hnsw_ef_construct,
                full_scan_threshold=cfg.full_scan_threshold_kb,
                max_indexing_threads=cfg.indexing_threads,
            ),
            optimizers_config=m.OptimizersConfigDiff(
                indexing_threshold=cfg.full_scan_threshold_kb,
                default_segment_number=cfg.segment_number or None,
            ),
            quantization_config=quant,
            on_disk_payload=not cfg.payload_in_ram,
            shard_number=cfg.shards,
            replication_factor=cfg.replicas,
            write_consistency_factor=cfg.write_consistency,
            metadata={_META_KEY: json.dumps({"dim": dim, "indexes": payload_indexes})},
        )
        kinds = {
            "keyword": m.PayloadSchemaType.KEYWORD,
            "float": m.PayloadSchemaType.FLOAT,
            "integer": m.PayloadSchemaType.INTEGER,
        }
        for key, kind in payload_indexes.items():
            self.client.create_payload_index(version, key, field_schema=kinds[kind], wait=True)
        self._open.add(version)

    def clone_version(self, src: str, dst: str) -> None:
        meta = json.loads(self._metadata(src).get(_META_KEY, "{}"))
        if _MANIFEST_KEY not in self._metadata(src):
            raise NotFoundError(f"version {src} is not a complete version")
        self.create_version(dst, int(meta["dim"]), dict(meta["indexes"]))
        for ids, vecs, payloads in self.scroll_all(src, with_vectors=True):
            assert vecs is not None
            self.upsert(dst, ids, vecs, payloads)

    def _check_open(self, version: str) -> None:
        if version not in self._open:
            raise IndexUnavailableError(
                f"version {version} is not open for writing (published versions are read-only)"
            )

    def upsert(
        self, version: str, ids: np.ndarray, vectors: np.ndarray, payloads: list[dict[str, Any]]
    ) -> None:
        from qdrant_client import models as m

        self._check_open(version)
        self.client.upsert(
            version,
            points=m.Batch(
                ids=[int(i) for i in ids.tolist()],
                vectors=vectors.tolist(),
                payloads=[_plain(p) for p in payloads],
            ),
            wait=True,
        )

    def delete(self, version: str, ids: Sequence[int]) -> None:
        from qdrant_client import models as m

        self._check_open(version)
        if len(ids):
            self.client.delete(
                version,
                points_selector=m.PointIdsList(points=[int(i) for i in ids]),
                wait=True,
            )

    def seal(self, version: str, timeout_s: float = 600.0) -> None:
        from qdrant_client import models as m

        self._check_open(version)
        deadline = time.monotonic() + timeout_s
        while True:  # a real server indexes in the background; wait until it is done
            info = self.client.get_collection(version)
            if info.status == m.CollectionStatus.GREEN:
                break
            if time.monotonic() > deadline:
                raise IndexUnavailableError(
                    f"collection {version} still optimizing after {timeout_s}s"
                )
            time.sleep(0.5)
        self._open.discard(version)

    def commit(self, version: str, manifest: IndexManifest) -> None:
        meta = self._metadata(version)
        meta[_MANIFEST_KEY] = manifest.to_json()
        self.client.update_collection(version, metadata=meta)

    # -- versions and aliases ----------------------------------------------------------------
    def manifest(self, version: str) -> IndexManifest:
        text = self._metadata(version).get(_MANIFEST_KEY)
        if text is None:
            raise NotFoundError(f"version {version} is not a complete version")
        return IndexManifest.from_json(text, source=f"collection {version} metadata")

    def base_of(self, version: str) -> str | None:
        """Server collections are always whole copies (no delta versions)."""
        return None

    def versions(self, alias: str) -> list[IndexManifest]:
        out = []
        for name in self._names(alias):
            text = self._metadata(name).get(_MANIFEST_KEY)
            if text is not None:
                out.append(IndexManifest.from_json(text, source=f"collection {name} metadata"))
        return out

    def incomplete_versions(self, alias: str) -> list[str]:
        return [n for n in self._names(alias) if _MANIFEST_KEY not in self._metadata(n)]

    def alias_target(self, alias: str) -> str | None:
        for a in self.client.get_aliases().aliases:
            if a.alias_name == alias:
                return str(a.collection_name)
        return None

    def set_alias(self, alias: str, version: str) -> None:
        from qdrant_client import models as m

        self.manifest(version)  # complete versions only
        ops: list[Any] = []
        if self.alias_target(alias) is not None:
            ops.append(m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=alias)))
        ops.append(
            m.CreateAliasOperation(
                create_alias=m.CreateAlias(collection_name=version, alias_name=alias)
            )
        )
        # One request: the server applies delete+create atomically.
        self.client.update_collection_aliases(change_aliases_operations=ops)

    def drop_version(self, version: str) -> None:
        self._open.discard(version)
        if self.client.collection_exists(version):
            self.client.delete_collection(version)

    @contextlib.contextmanager
    def build_lock(self, alias: str) -> Iterator[None]:
        # In-process only: builds against a shared server must be serialised by the
        # scheduler that runs them (Qdrant has no cross-client lock).
        lock = self._locks.setdefault(alias, threading.Lock())
        if not lock.acquire(blocking=False):
            raise IndexUnavailableError(f"another build/update of {alias!r} is running")
        try:
            yield
        finally:
            lock.release()

    def open(self, alias: str | None = None, version: str | None = None) -> ServerItemIndex:
        return ServerItemIndex(self.cfg, self.client, alias=alias, version=version, store=self)

    def open_for_update(
        self, alias: str | None = None, version: str | None = None, like: Any = None
    ) -> ServerItemIndex:
        """The server holds the data: nothing to share or skip."""
        return self.open(alias, version)

    def scroll_all(
        self, version: str, with_vectors: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]]:
        offset = None
        while True:
            recs, offset = self.client.scroll(
                version, limit=2048, offset=offset, with_payload=True, with_vectors=with_vectors
            )
            if recs:
                ids = np.array([int(r.id) for r in recs], dtype=np.int64)
                vecs = (
                    np.asarray([r.vector for r in recs], dtype=np.float32) if with_vectors else None
                )
                yield ids, vecs, [dict(r.payload or {}) for r in recs]
            if offset is None:
                break

    def close(self) -> None:
        return None


class ServerItemIndex(QdrantReader):
    """ItemIndex over qdrant-client: resolves the alias per query, then queries that collection."""

    def __init__(
        self,
        cfg: IndexConfig,
        client: Any,
        *,
        alias: str | None = None,
        version: str | None = None,
        store: ServerStore | None = None,
    ) -> None:
        super().__init__(cfg, alias, version)
        self.client = client
        self._store = store or ServerStore(cfg, client)
        self._manifests: dict[str, IndexManifest] = {}

    def _resolve(self) -> tuple[str, Any]:
        if self._pinned is not None:
            return self._pinned, self._pinned
        target = self._store.alias_target(self.alias)
        if target is None:
            raise IndexUnavailableError(
                f"index alias {self.alias!r} does not exist: build it first"
            )
        return target, target

    def _manifest(self, version: str) -> IndexManifest:
        m = self._manifests.get(version)
        if m is None:
            try:
                m = self._manifests[version] = self._store.manifest(version)
            except NotFoundError as e:
                if version != self._pinned:
                    raise IndexUnavailableError(str(e)) from e
                # sealed, not yet committed: being verified
                meta = json.loads(self._store._metadata(version).get(_META_KEY, "{}"))
                if "dim" not in meta:
                    raise IndexUnavailableError(str(e)) from e
                return provisional_manifest(version, self.alias, int(meta["dim"]), self.cfg)
        return m

    def _query(
        self,
        handle: Any,
        vectors: np.ndarray,
        limit: int,
        flts: list[Any],
        hnsw_ef: int,
        exact: list[bool],
        with_payload: bool,
    ) -> list[list[Hit]]:
        from qdrant_client import models as m

        quant = (
            m.QuantizationSearchParams(
                rescore=True, oversampling=self.cfg.quantization_oversampling
            )
            if self.cfg.quantization == "int8"
            else None
        )
        reqs = [
            m.QueryRequest(
                query=row,
                filter=server_filter(f),
                params=m.SearchParams(hnsw_ef=hnsw_ef, exact=ex, quantization=quant),
                limit=limit,
                with_payload=with_payload,
            )
            for row, f, ex in zip(vectors.tolist(), flts, exact)
        ]
        res = self.client.query_batch_points(handle, requests=reqs)
        return [
            [Hit(int(p.id), float(p.score), dict(p.payload or {})) for p in r.points] for r in res
        ]

    def _count(self, handle: Any, flt: Any, exact: bool = True) -> int:
        return int(self.client.count(handle, count_filter=server_filter(flt), exact=exact).count)

    def _retrieve(
        self, handle: Any, ids: list[int], with_vectors: bool
    ) -> dict[int, tuple[np.ndarray | None, dict[str, Any]]]:
        if not ids:
            return {}
        recs = self.client.retrieve(
            handle, ids, with_payload=not with_vectors, with_vectors=with_vectors
        )
        return {
            int(r.id): (
                np.asarray(r.vector, dtype=np.float32) if with_vectors else None,
                dict(r.payload or {}),
            )
            for r in recs
        }

    def close(self) -> None:
        return None
