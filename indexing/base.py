"""The item-index contract: query types, config, manifest and the ``ItemIndex`` protocol.

Serving codes against :class:`ItemIndex` only; the embedded engine
(:mod:`indexing.qdrant_edge`) and the Qdrant server (:mod:`indexing.qdrant_server`)
both implement it, and one contract test suite runs against both.

Point ids are internal item ids (ints >= 1, 0 is padding).  Payload fields:

``external_id``   str, the shop's id (ASIN, StockCode)
``category``      str or None, the catalogue's category text as given
``category_path`` list[str], every prefix of every ``" | "``-separated ``" > "`` path
                  (``"Beauty"``, ``"Beauty > Makeup"``, ...): what ``SearchFilter.categories``
                  matches, so a filter on a parent category includes its children
``brand``         str or None
``price``         float or None (absent prices never match a price range)
``in_stock``      0/1 int (Qdrant's boolean match is unreliable; see DEVELOPERS.md)
``popularity``    int, interactions in the training data
``model_version`` str, the tower run that produced the vector
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ecomrec.config import from_dict, to_dict
from ecomrec.errors import ConfigError, DataError, IndexUnavailableError, InvalidArgumentError

#: Payload fields with a payload index, and their index type.
PAYLOAD_INDEXES: dict[str, Literal["keyword", "float", "integer"]] = {
    "category_path": "keyword",
    "brand": "keyword",
    "external_id": "keyword",
    "price": "float",
    "in_stock": "integer",
    "popularity": "integer",
}

#: Payload fields of the user-vector collection, and their index type.
USER_PAYLOAD_INDEXES: dict[str, Literal["keyword", "float", "integer"]] = {
    "external_id": "keyword",
    "segment": "keyword",
    "rfm_segment": "keyword",
    "churn_risk": "float",
}


class VerificationError(IndexUnavailableError):
    """A freshly built version failed verification (recall or counts); the alias was not moved."""


@dataclass(frozen=True)
class Hit:
    """One search result: internal item id, similarity score (higher is closer), payload."""

    item_id: int
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchFilter:
    """Conditions a hit must satisfy; every field left at its default is ignored.

    ``categories`` matches any of the given category paths (parents include children);
    ``brands`` any of the given brands; ``price_min``/``price_max`` are inclusive;
    ``in_stock=True`` keeps in-stock items only, ``False`` out-of-stock only;
    ``exclude_ids`` drops these item ids (e.g. the user's history); ``only_ids``, when
    set, keeps only these ids (the planner uses it; callers rarely need it).
    """

    categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()
    price_min: float | None = None
    price_max: float | None = None
    in_stock: bool | None = None
    exclude_ids: tuple[int, ...] = ()
    only_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("price_min", "price_max"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or math.isnan(v)):
                raise InvalidArgumentError(name, f"expected a number, got {v!r}")
        if (
            self.price_min is not None
            and self.price_max is not None
            and self.price_min > self.price_max
        ):
            raise InvalidArgumentError(
                "price_min", f"{self.price_min} is greater than price_max {self.price_max}"
            )

    @property
    def is_empty(self) -> bool:
        """True when the filter keeps every point."""
        return self == SearchFilter()

    def with_excluded(self, ids: Sequence[int]) -> SearchFilter:
        """A copy that also excludes ``ids``."""
        if not len(ids):
            return self
        merged = tuple(dict.fromkeys([*self.exclude_ids, *(int(i) for i in ids)]))
        return dataclasses.replace(self, exclude_ids=merged)

    def matches(self, payload: Mapping[str, Any], item_id: int) -> bool:
        """Reference semantics in plain Python (used by exact search and the tests)."""
        if item_id in self.exclude_ids:
            return False
        if self.only_ids and item_id not in self.only_ids:
            return False
        if self.categories:
            path = payload.get("category_path") or []
            if not any(c in path for c in self.categories):
                return False
        if self.brands and payload.get("brand") not in self.brands:
            return False
        if self.price_min is not None or self.price_max is not None:
            price = payload.get("price")
            if price is None:
                return False
            if self.price_min is not None and price < self.price_min:
                return False
            if self.price_max is not None and price > self.price_max:
                return False
        return not (
            self.in_stock is not None and int(payload.get("in_stock", 1)) != int(self.in_stock)
        )


@dataclass(frozen=True)
class UserFilter:
    """Conditions on the user-vector collection (audience queries); defaults are ignored."""

    segments: tuple[str, ...] = ()
    rfm_segments: tuple[str, ...] = ()
    churn_min: float | None = None
    churn_max: float | None = None
    exclude_ids: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return self == UserFilter()

    def matches(self, payload: Mapping[str, Any], user_id: int) -> bool:
        """Reference semantics in plain Python."""
        if user_id in self.exclude_ids:
            return False
        if self.segments and payload.get("segment") not in self.segments:
            return False
        if self.rfm_segments and payload.get("rfm_segment") not in self.rfm_segments:
            return False
        risk = payload.get("churn_risk")
        if self.churn_min is not None and (risk is None or risk < self.churn_min):
            return False
        return not (self.churn_max is not None and (risk is None or risk > self.churn_max))


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built and queried; saved in every manifest.

    ``location`` is a directory for the embedded backend, a URL (``http://host:6333``)
    or ``":memory:"`` / a local path for the server backend.
    """

    backend: Literal["edge", "server"] = "edge"
    location: str = "artifacts/index"
    api_key: str | None = None
    alias: str = "items"
    distance: Literal["cosine", "dot"] = "cosine"
    hnsw_m: int = 32
    hnsw_ef_construct: int = 256
    # Threads building the HNSW graph (0 = the engine's choice).
    indexing_threads: int = 0
    # Search width used when a query does not pass hnsw_ef.
    hnsw_ef: int = 256
    # Segments smaller than this many KB of vectors are searched exactly by Qdrant itself.
    full_scan_threshold_kb: int = 1000
    quantization: Literal["none", "int8"] = "none"
    # int8 queries fetch oversampling x limit candidates, then rescore with full vectors.
    quantization_oversampling: float = 2.0
    # Keep payloads in RAM (the engine's default is on disk: slower tails when a query
    # returns payloads).  ~300 bytes per item.
    payload_in_ram: bool = True
    # Segments per version (0 = the engine's default); fewer segments, faster queries.
    segment_number: int = 0
    shards: int = 1
    replicas: int = 1
    # Server backend: replicas that must acknowledge a write (1..replicas); the API key
    # comes from $api_key_env when api_key is empty (keys stay out of config files).
    write_consistency: int = 1
    api_key_env: str = "QDRANT_API_KEY"
    # Versions kept (the live one included) for rollback; the full versions that kept
    # delta versions extend are kept too.
    keep_versions: int = 3
    # Embedded backend: updates of a version with at least this many points are written
    # as a delta over it (no copy of the whole index) until the delta (changed points +
    # hidden base points) exceeds delta_max_fraction of the base; then a full copy.
    delta_min_base: int = 50_000
    delta_max_fraction: float = 0.1
    # A filtered query whose candidate set has fewer points than this is searched exactly.
    exact_threshold: int = 5000
    # Filters keeping at least this share of the points are served by unfiltered HNSW
    # over-fetching limit/selectivity*2 hits then filtering (if that is <= postfilter_max_fetch).
    postfilter_min_selectivity: float = 0.02
    postfilter_max_fetch: int = 2000
    # Search width cap for filtered HNSW (ef is scaled by 1/selectivity up to this).
    max_filtered_ef: int = 1024
    upsert_batch: int = 2048
    verify_k: int = 10
    verify_min_recall: float = 0.98
    verify_sample: int = 500
    # Queries checked after an upsert/delete (each is also searched exactly: at 1M points
    # ~20 ms apiece); the full verify_sample is used for builds.
    verify_sample_update: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        positive = (
            "hnsw_m",
            "hnsw_ef_construct",
            "hnsw_ef",
            "shards",
            "replicas",
            "write_consistency",
            "keep_versions",
            "upsert_batch",
            "verify_k",
            "verify_sample",
            "verify_sample_update",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.write_consistency > self.replicas:
            raise ConfigError(
                f"IndexConfig.write_consistency ({self.write_consistency}) cannot exceed "
                f"replicas ({self.replicas})"
            )
        if not 0.0 <= self.delta_max_fraction <= 1.0:
            raise ConfigError(
                f"IndexConfig.delta_max_fraction must be in [0, 1], got {self.delta_max_fraction}"
            )
        if not 0.0 <= self.verify_min_recall <= 1.0:
            raise ConfigError(
                f"IndexConfig.verify_min_recall must be in [0, 1], got {self.verify_min_recall}"
            )
        if not self.alias or "/" in self.alias or self.alias.startswith("."):
            raise ConfigError(f"IndexConfig.alias {self.alias!r} is not a valid name")

    def resolved_api_key(self) -> str | None:
        """``api_key``, else the value of ``$api_key_env`` (None when neither is set)."""
        import os

        return self.api_key or os.environ.get(self.api_key_env) or None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexConfig:
        """Build from a dict (TOML table); unknown keys raise ConfigError."""
        return from_dict(cls, data)


@dataclass(frozen=True)
class IndexManifest:
    """What a built index version holds and how it was made (``manifest.json``)."""

    version: str
    alias: str
    dim: int
    count: int
    distance: str
    model_version: str
    config_hash: str
    build_seconds: float
    created_at: float
    index_config: dict[str, Any]
    verify: dict[str, Any] = field(default_factory=dict)
    kind: Literal["items", "users"] = "items"
    parent: str | None = None
    # what the vectors were made from: model_version, model_items (hash of the model's item
    # id map), run_dir, dataset (Dataset.fingerprint); {} for versions from before issue 11
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest.json") -> IndexManifest:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"invalid index manifest: {e}", file=source) from e

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> IndexManifest:
        return cls.from_json(path.read_text(), source=str(path))


def provisional_manifest(version: str, alias: str, dim: int, cfg: IndexConfig) -> IndexManifest:
    """Stand-in manifest of a sealed version under verification (never saved)."""
    return IndexManifest(
        version=version,
        alias=alias,
        dim=dim,
        count=-1,
        distance=cfg.distance,
        model_version="",
        config_hash="",
        build_seconds=0.0,
        created_at=0.0,
        index_config={},
    )


def new_version_name(alias: str) -> str:
    """A sortable, unique version name: ``<alias>_v<UTC timestamp><microseconds>``."""
    t = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t))
    return f"{alias}_v{stamp}{int((t % 1) * 1e6):06d}"


@runtime_checkable
class VectorSearch(Protocol):
    """The search part of an index: what every back end answers, the exact in-memory one
    (:class:`indexing.exact.ExactIndex`) included.

    ``version`` names the one version a query runs on; the serving engine reads it before
    and after a query to report the version that answered (:mod:`serving.retrieval`).
    """

    @property
    def dim(self) -> int:
        """Vector dimension."""
        ...

    @property
    def version(self) -> str:
        """Name of the version queries run on now (the alias target for a follower)."""
        ...

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
        """Top-``k`` hits for one query vector ``(D,)``, best first; ``with_payload=False``
        leaves ``Hit.payload`` empty (the caller has the metadata: faster)."""
        ...

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
        """Top-``k`` hits for each row of ``vectors`` ``(B, D)``, all on one version;
        ``exclude_ids`` one list per row; each row's answer equals :meth:`search`'s."""
        ...


@runtime_checkable
class ItemIndex(VectorSearch, Protocol):
    """Read side of a vector index, as serving uses it: every operation the engine calls.

    ``version`` is read from the alias when a query starts, and the whole query runs
    on that one version: a refresh never mixes two versions in one answer.
    """

    def manifest(self) -> IndexManifest:
        """Manifest of the live version."""
        ...

    def count(self, flt: SearchFilter | None = None) -> int:
        """Number of points (matching ``flt``) in the live version."""
        ...

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors ``(N, D)`` for ``ids`` in order; unknown ids raise NotFoundError."""
        ...

    def get_payloads(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Payloads for ``ids`` in order; unknown ids raise NotFoundError."""
        ...

    def existing_ids(self, ids: Sequence[int]) -> set[int]:
        """The subset of ``ids`` the live version holds (one round trip, no error)."""
        ...

    def close(self) -> None:
        """Release files and connections."""
        ...


def check_query_vector(vector: np.ndarray, dim: int, field_name: str = "vector") -> np.ndarray:
    """Validate one query vector: shape ``(dim,)``, finite; returns float32."""
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1 or v.shape[0] != dim:
        raise InvalidArgumentError(field_name, f"expected shape ({dim},), got {tuple(v.shape)}")
    if not np.isfinite(v).all():
        raise InvalidArgumentError(field_name, "contains NaN or infinite values")
    return v


def check_vectors(vectors: np.ndarray, dim: int | None, *, source: str = "vectors") -> np.ndarray:
    """Validate a vector matrix ``(N, D)``: 2-d, expected dim, finite, non-zero rows."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise DataError(f"expected a 2-d (N, D) array, got shape {tuple(v.shape)}", file=source)
    if dim is not None and v.shape[1] != dim:
        raise DataError(f"vectors have dimension {v.shape[1]}, the index has {dim}", file=source)
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} vector(s) contain NaN or infinite values",
            file=source,
            row=int(np.flatnonzero(bad)[0]),
        )
    return v


def config_dict(cfg: IndexConfig) -> dict[str, Any]:
    """The config as saved in a manifest, with the API key blanked."""
    d = to_dict(cfg)
    if d.get("api_key"):
        d["api_key"] = "***"
    return d
