"""Embedded backend: Qdrant's engine in-process (``qdrant-edge-py``), persisted in a directory.

Layout of ``IndexConfig.location``::

    aliases/<alias>.json          {"version": "<alias>_v..."}: swapped with os.replace
    versions/<version>/shard/     one EdgeShard (WAL disabled: durable at flush, and
                                  openable by several reader processes at once)
    versions/<version>/base.json  delta versions only: {"base": <full version>, "delta_points": n}
    versions/<version>/tombstones.npy  delta versions only: ids of the base hidden by this version
    versions/<version>/checksums.json  size + SHA-256 of every shard file, written at commit
    versions/<version>/manifest.json   written last: its presence marks the version complete
    .<alias>.lock                 flock held by a build/upsert/delete/rollback

A reader re-reads the alias file (one ``stat`` per query, parsed only when it
changed) when a query starts and runs the whole query on that version's shard.  Before
it loads a version it checks the version's checksums (:mod:`indexing.integrity`); with
``local_copy`` it first copies the version to a private directory and checks and loads
the copy, so a later truncation of the published files cannot SIGBUS the reader.

Updates of a large version are *delta versions* (no copy of the whole index): the new
version holds only a small shard with the changed points and the ids of the base it
hides (updated or deleted), and points at the full version it extends, which is never
written again.  A query searches the base with the hidden ids filtered out, searches the
delta, and merges the two by score.  Updates accumulate in the delta (each one copies
the previous delta, which is small) until it exceeds ``IndexConfig.delta_max_fraction``
of the base; the next update then writes a full, compacted copy.  Versions below
``IndexConfig.delta_min_base`` points are copied whole (cheap at that size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
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
from indexing.integrity import (
    CHECKSUMS_FILE,
    VERSION_FILES,
    IndexCorruptError,
    IntegrityReport,
    check_version_dir,
    require_intact,
    write_checksums,
)
from indexing.store import QdrantReader
from indexing.store import plain_payload as _plain

log = logging.getLogger(__name__)

_OPEN_SHARDS_KEPT = 3
BASE_FILE = "base.json"
TOMBSTONES_FILE = "tombstones.npy"
# A version that failed to open is retried after this many seconds (not on every query).
_RETRY_FAILED_S = 10.0


def _edge() -> Any:
    import qdrant_edge

    return qdrant_edge


def _schema(q: Any, kind: str) -> Any:
    return {
        "keyword": q.PayloadSchemaType.Keyword,
        "float": q.PayloadSchemaType.Float,
        "integer": q.PayloadSchemaType.Integer,
    }[kind]


def edge_filter(flt: SearchFilter | UserFilter | None, hidden: Any = None) -> Any:
    """Translate a SearchFilter/UserFilter into a ``qdrant_edge.Filter`` (None when empty).

    ``hidden``: a prebuilt ``HasIdCondition`` of ids to leave out as well (the base ids a
    delta version replaced or deleted).
    """
    if flt is None or flt.is_empty:
        return None if hidden is None else _edge().Filter(must_not=[hidden])
    q = _edge()
    must: list[Any] = []
    if isinstance(flt, UserFilter):
        if flt.segments:
            must.append(q.FieldCondition(key="segment", match=q.MatchAny(list(flt.segments))))
        if flt.rfm_segments:
            must.append(
                q.FieldCondition(key="rfm_segment", match=q.MatchAny(list(flt.rfm_segments)))
            )
        if flt.churn_min is not None or flt.churn_max is not None:
            must.append(
                q.FieldCondition(
                    key="churn_risk", range=q.RangeFloat(gte=flt.churn_min, lte=flt.churn_max)
                )
            )
        excl = [q.HasIdCondition({int(i) for i in flt.exclude_ids})] if flt.exclude_ids else []
        if hidden is not None:
            excl.append(hidden)
        return q.Filter(must=must or None, must_not=excl or None)
    if flt.categories:
        must.append(q.FieldCondition(key="category_path", match=q.MatchAny(list(flt.categories))))
    if flt.brands:
        must.append(q.FieldCondition(key="brand", match=q.MatchAny(list(flt.brands))))
    if flt.price_min is not None or flt.price_max is not None:
        rng = q.RangeFloat(
            gte=None if flt.price_min is None else float(flt.price_min),
            lte=None if flt.price_max is None else float(flt.price_max),
        )
        must.append(q.FieldCondition(key="price", range=rng))
    if flt.in_stock is not None:
        must.append(q.FieldCondition(key="in_stock", match=q.MatchValue(int(flt.in_stock))))
    if flt.only_ids:
        must.append(q.HasIdCondition({int(i) for i in flt.only_ids}))
    must_not = [q.HasIdCondition({int(i) for i in flt.exclude_ids})] if flt.exclude_ids else []
    if hidden is not None:
        must_not.append(hidden)
    return q.Filter(must=must or None, must_not=must_not or None)


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy a shard directory keeping files sparse.

    The engine preallocates its storage files (a 12k x 64 shard: 13 MB on disk, 130 MB
    apparent); a plain copy would write all the zeros out.
    """
    cp = shutil.which("cp")
    if cp is not None:
        res = subprocess.run(
            [cp, "-a", "--sparse=always", str(src), str(dst)], capture_output=True, text=True
        )
        if res.returncode == 0:
            return
        log.warning("cp --sparse failed (%s); falling back to a plain copy", res.stderr.strip())
        shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


@dataclasses.dataclass(frozen=True)
class Layer:
    """What makes a version a delta version: its base and the base ids it hides."""

    base: str
    hidden: np.ndarray  # (H,) int64, sorted
    delta_points: int


def read_layer(vdir: Path) -> Layer | None:
    """The layer of the version in ``vdir`` (None for a full version)."""
    f = vdir / BASE_FILE
    if not f.exists():
        return None
    try:
        info = json.loads(f.read_text())
        tomb = vdir / TOMBSTONES_FILE
        hidden = np.load(tomb, allow_pickle=False) if tomb.exists() else np.zeros(0, np.int64)
        return Layer(str(info["base"]), hidden.astype(np.int64), int(info["delta_points"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexUnavailableError(
            f"index version {vdir.name}: unreadable delta layer ({e})"
        ) from e


@dataclasses.dataclass
class _DeltaWrite:
    base: str
    hidden: set[int]


def _scroll_shard(
    q: Any, shard: Any, with_vectors: bool, flt: Any = None
) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]]:
    offset = None
    while True:
        recs, offset = shard.scroll(
            q.ScrollRequest(
                offset=offset, limit=4096, filter=flt, with_payload=True, with_vector=with_vectors
            )
        )
        if recs:
            ids = np.array([int(r.id) for r in recs], dtype=np.int64)
            vecs = np.asarray([r.vector for r in recs], dtype=np.float32) if with_vectors else None
            yield ids, vecs, [dict(r.payload or {}) for r in recs]
        if offset is None:
            break


def check_with_base(vdir: Path, *, full: bool = True) -> IntegrityReport:
    """:func:`check_version_dir` of a version and, for a delta version, of its base too
    (the base's problems prefixed ``base <version>:``)."""
    rep = check_version_dir(vdir, full=full)
    layer = read_layer(vdir)
    if layer is None:
        return rep
    base = check_version_dir(vdir.parent / layer.base, full=full)
    return dataclasses.replace(
        rep,
        files=rep.files + base.files,
        bytes=rep.bytes + base.bytes,
        problems=rep.problems + tuple(f"base {base.version}: {p}" for p in base.problems),
        has_checksums=rep.has_checksums and base.has_checksums,
    )


class EdgeStore:
    """Versions and aliases of embedded Qdrant shards under one directory."""

    def __init__(self, cfg: IndexConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.location)
        (self.root / "aliases").mkdir(parents=True, exist_ok=True)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        self._writing: dict[str, Any] = {}
        self._deltas: dict[str, _DeltaWrite] = {}

    # -- paths -----------------------------------------------------------------------
    def _vdir(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise NotFoundError(f"invalid version name {version!r}")
        return self.root / "versions" / version

    def _alias_file(self, alias: str) -> Path:
        return self.root / "aliases" / f"{alias}.json"

    def _edge_config(self, dim: int) -> Any:
        q = _edge()
        cfg = self.cfg
        quant = (
            q.ScalarQuantizationConfig(q.ScalarType.Int8, quantile=0.99, always_ram=True)
            if cfg.quantization == "int8"
            else None
        )
        dist = q.Distance.Cosine if cfg.distance == "cosine" else q.Distance.Dot
        return q.EdgeConfig(
            vectors=q.EdgeVectorParams(size=dim, distance=dist),
            hnsw_config=q.HnswIndexConfig(
                m=cfg.hnsw_m,
                ef_construct=cfg.hnsw_ef_construct,
                full_scan_threshold=cfg.full_scan_threshold_kb,
                max_indexing_threads=cfg.indexing_threads,
            ),
            quantization_config=quant,
            optimizers=q.EdgeOptimizersConfig(
                indexing_threshold=cfg.full_scan_threshold_kb,
                default_segment_number=cfg.segment_number or None,
            ),
            payload_memory=q.Memory.Cached if cfg.payload_in_ram else None,
            wal_enabled=False,
        )

    # -- writing ---------------------------------------------------------------------
    def create_version(self, version: str, dim: int, payload_indexes: dict[str, str]) -> None:
        q = _edge()
        vdir = self._vdir(version)
        if vdir.exists():
            raise IndexUnavailableError(f"version {version} already exists in {self.root}")
        vdir.mkdir(parents=True)
        (vdir / "meta.json").write_text(json.dumps({"dim": dim, "indexes": payload_indexes}))
        shard = q.EdgeShard.create(str(vdir / "shard"), self._edge_config(dim))
        for key, kind in payload_indexes.items():
            shard.update(q.UpdateOperation.create_field_index(key, _schema(q, kind)))
        self._writing[version] = shard

    def clone_version(self, src: str, dst: str) -> None:
        """``dst`` holds ``src``'s points: a delta version over ``src``'s base when the base
        is large and the delta small (see the module doc), else a full copy."""
        q = _edge()
        if not (self._vdir(src) / "manifest.json").exists():
            raise NotFoundError(f"version {src} is not a complete version in {self.root}")
        ddir = self._vdir(dst)
        if ddir.exists():
            raise IndexUnavailableError(f"version {dst} already exists in {self.root}")
        layer = read_layer(self._vdir(src))
        base = layer.base if layer else src
        base_count = self.manifest(base).count
        delta_size = layer.delta_points + len(layer.hidden) if layer else 0
        ddir.mkdir(parents=True)
        shutil.copy2(self._vdir(src) / "meta.json", ddir / "meta.json")
        if (
            base_count >= self.cfg.delta_min_base
            and delta_size <= self.cfg.delta_max_fraction * base_count
        ):
            if layer is not None:  # carry the (small) delta forward
                _copy_sparse(self._vdir(src) / "shard", ddir / "shard")
                shard = q.EdgeShard.load(str(ddir / "shard"))
            else:
                meta = json.loads((ddir / "meta.json").read_text())
                shard = q.EdgeShard.create(str(ddir / "shard"), self._edge_config(meta["dim"]))
                for key, kind in meta["indexes"].items():
                    shard.update(q.UpdateOperation.create_field_index(key, _schema(q, kind)))
            self._writing[dst] = shard
            self._deltas[dst] = _DeltaWrite(
                base, set() if layer is None else set(layer.hidden.tolist())
            )
            return
        # a full copy of the base; a delta is folded into it (compaction)
        _copy_sparse(self._vdir(base) / "shard", ddir / "shard")
        shard = q.EdgeShard.load(str(ddir / "shard"))
        self._writing[dst] = shard
        if layer is not None:
            if len(layer.hidden):
                shard.update(q.UpdateOperation.delete_points(layer.hidden.tolist()))
            delta = q.EdgeShard.load(str(self._vdir(src) / "shard"))
            try:
                for ids, vecs, pays in _scroll_shard(q, delta, True):
                    assert vecs is not None
                    self.upsert(dst, ids, vecs, pays)
            finally:
                delta.close()
            log.info(
                "version %s: compacted %s (base %s + %d delta points, %d hidden)",
                dst, src, base, layer.delta_points, len(layer.hidden),
            )  # fmt: skip

    def base_of(self, version: str) -> str | None:
        """The full version a delta version extends (None for a full version)."""
        layer = read_layer(self._vdir(version))
        return None if layer is None else layer.base

    def _writer(self, version: str) -> Any:
        try:
            return self._writing[version]
        except KeyError:
            raise IndexUnavailableError(
                f"version {version} is not open for writing (published versions are read-only)"
            ) from None

    def upsert(
        self, version: str, ids: np.ndarray, vectors: np.ndarray, payloads: list[dict[str, Any]]
    ) -> None:
        q = _edge()
        shard = self._writer(version)
        rows = vectors.tolist()
        pts = [q.Point(int(i), row, _plain(p)) for i, row, p in zip(ids.tolist(), rows, payloads)]
        shard.update(q.UpdateOperation.upsert_points(pts))
        delta = self._deltas.get(version)
        if delta is not None:  # the base's copy of these ids (if any) is now stale
            delta.hidden.update(int(i) for i in ids.tolist())

    def delete(self, version: str, ids: Sequence[int]) -> None:
        q = _edge()
        if len(ids):
            self._writer(version).update(q.UpdateOperation.delete_points([int(i) for i in ids]))
            delta = self._deltas.get(version)
            if delta is not None:
                delta.hidden.update(int(i) for i in ids)

    def seal(self, version: str) -> None:
        q = _edge()
        shard = self._writer(version)
        shard.optimize()
        shard.flush()
        delta = self._deltas.pop(version, None)
        n = int(shard.count(q.CountRequest(exact=True))) if delta is not None else 0
        shard.close()
        del self._writing[version]
        if delta is not None:
            vdir = self._vdir(version)
            np.save(vdir / TOMBSTONES_FILE, np.array(sorted(delta.hidden), dtype=np.int64))
            (vdir / BASE_FILE).write_text(json.dumps({"base": delta.base, "delta_points": n}))

    def commit(self, version: str, manifest: IndexManifest) -> None:
        # Checksums now, not at seal: the first load (verification) still rewrites some
        # engine files (journals are folded in); later loads leave the contents alone.
        write_checksums(self._vdir(version))
        manifest.save(self._vdir(version) / "manifest.json")

    # -- versions and aliases --------------------------------------------------------------
    def _version_names(self, alias: str) -> list[str]:
        prefix = f"{alias}_v"
        return sorted(
            p.name for p in (self.root / "versions").iterdir() if p.name.startswith(prefix)
        )

    def versions(self, alias: str) -> list[IndexManifest]:
        out = []
        for name in self._version_names(alias):
            mf = self._vdir(name) / "manifest.json"
            if mf.exists():
                out.append(IndexManifest.load(mf))
        return out

    def incomplete_versions(self, alias: str) -> list[str]:
        return [
            n for n in self._version_names(alias) if not (self._vdir(n) / "manifest.json").exists()
        ]

    def manifest(self, version: str) -> IndexManifest:
        mf = self._vdir(version) / "manifest.json"
        if not mf.exists():
            raise NotFoundError(f"version {version} is not a complete version in {self.root}")
        return IndexManifest.load(mf)

    def alias_target(self, alias: str) -> str | None:
        f = self._alias_file(alias)
        if not f.exists():
            return None
        return str(json.loads(f.read_text())["version"])

    def set_alias(self, alias: str, version: str) -> None:
        self.manifest(version)  # complete versions only
        f = self._alias_file(alias)
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": version}))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, f)  # atomic on POSIX: readers see the old or the new pointer

    def drop_version(self, version: str) -> None:
        self._deltas.pop(version, None)
        shard = self._writing.pop(version, None)
        if shard is not None:
            shard.close()
        shutil.rmtree(self._vdir(version), ignore_errors=True)

    @contextlib.contextmanager
    def build_lock(self, alias: str) -> Iterator[None]:
        path = self.root / f".{alias}.lock"
        with path.open("a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexUnavailableError(
                    f"another build/update of {alias!r} holds {path}"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def open(
        self,
        alias: str | None = None,
        version: str | None = None,
        *,
        local_copy: bool | str | Path = False,
    ) -> EdgeItemIndex:
        return EdgeItemIndex(
            self.cfg, alias=alias, version=version, root=self.root, local_copy=local_copy
        )

    def open_for_update(
        self, alias: str | None = None, version: str | None = None, like: Any = None
    ) -> EdgeItemIndex:
        """A reader for an upsert/delete's own checks: files are checked by size only (their
        contents were hashed at commit and are by every serving reader at load) and shards
        reader ``like`` has loaded (the base of a delta version) are shared, not reloaded."""
        return EdgeItemIndex(
            self.cfg,
            alias=alias,
            version=version,
            root=self.root,
            full_check=False,
            share=like if isinstance(like, EdgeItemIndex) else None,
        )

    def check_integrity(self, version: str, full: bool = True) -> IntegrityReport:
        """Compare a version's files (and its base's) with the checksums written at commit."""
        return check_with_base(self._vdir(version), full=full)

    def scroll_all(
        self, version: str, with_vectors: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]]:
        """Every point of a sealed version (a delta version: its base's visible points,
        then its delta); of a version being written, what its own shard holds so far."""
        q = _edge()
        shard: Any = self._writing.get(version)
        if shard is not None:
            yield from _scroll_shard(q, shard, with_vectors)
            return
        layer = read_layer(self._vdir(version))
        if layer is not None:
            base = q.EdgeShard.load(str(self._vdir(layer.base) / "shard"))
            hide = q.Filter(must_not=[q.HasIdCondition(set(layer.hidden.tolist()))])
            try:
                yield from _scroll_shard(q, base, with_vectors, hide if len(layer.hidden) else None)
            finally:
                base.close()
        shard = q.EdgeShard.load(str(self._vdir(version) / "shard"))
        try:
            yield from _scroll_shard(q, shard, with_vectors)
        finally:
            shard.close()

    def close(self) -> None:
        self._deltas.clear()
        for v in list(self._writing):
            self._writing.pop(v).close()


def _remove_orphan_copies(parent: Path) -> None:
    """Delete private copies left by reader processes that died without closing."""
    for d in parent.glob("ecomrec-index-*-*"):
        try:
            pid = int(d.name.split("-")[2])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


class _Layered:
    """Query handle of a delta version: the base shard minus ``hidden`` plus the delta."""

    __slots__ = ("base", "base_version", "delta", "delta_points", "hidden", "hidden_ids")

    def __init__(self, q: Any, base_version: str, base: Any, delta: Any, layer: Layer) -> None:
        self.base_version = base_version
        self.base = base
        self.delta = delta
        self.hidden_ids = frozenset(layer.hidden.tolist())
        # built once: every base query and count carries it as a must_not condition
        self.hidden = q.HasIdCondition(set(self.hidden_ids)) if self.hidden_ids else None
        self.delta_points = layer.delta_points


class EdgeItemIndex(QdrantReader):
    """ItemIndex over the embedded engine: follows an alias file or is pinned to a version.

    Each version is checked against its checksums before it is loaded; a damaged or
    unloadable version raises :class:`IndexUnavailableError` (``IndexCorruptError``),
    logged once and retried every ``_RETRY_FAILED_S`` seconds, never a crash.
    ``local_copy`` (True = a private directory under the system temp dir, or a parent
    directory): serve from a checked private copy of each version, so damage to the
    published files (truncation, overwrite) cannot reach the memory-mapped data.
    """

    def __init__(
        self,
        cfg: IndexConfig,
        *,
        alias: str | None = None,
        version: str | None = None,
        root: Path | None = None,
        local_copy: bool | str | Path = False,
        full_check: bool = True,
        share: EdgeItemIndex | None = None,
    ) -> None:
        super().__init__(cfg, alias, version)
        self._full_check = full_check
        self._share = share
        self._borrowed: set[str] = set()  # bases loaded by ``share``: never closed here
        self.root = Path(cfg.location) if root is None else root
        self._alias_file = self.root / "aliases" / f"{self.alias}.json"
        self._alias_stamp: tuple[int, int] | None = None
        self._alias_version: str | None = None
        self._shards: dict[str, Any] = {}  # version -> EdgeShard, or _Layered (delta version)
        self._bases: dict[str, Any] = {}  # base version -> EdgeShard shared by delta versions
        self._manifests: dict[str, IndexManifest] = {}
        self._failed: dict[str, tuple[float, IndexUnavailableError]] = {}
        self._copy_root: Path | None = None
        if local_copy:
            parent = Path(tempfile.gettempdir()) if local_copy is True else Path(local_copy)
            parent.mkdir(parents=True, exist_ok=True)
            _remove_orphan_copies(parent)
            self._copy_root = Path(
                tempfile.mkdtemp(prefix=f"ecomrec-index-{os.getpid()}-", dir=parent)
            )
            weakref.finalize(self, shutil.rmtree, str(self._copy_root), True)

    def _current_version(self) -> str:
        if self._pinned is not None:
            return self._pinned
        try:
            st = os.stat(self._alias_file)
        except FileNotFoundError:
            raise IndexUnavailableError(
                f"index alias {self.alias!r} does not exist in {self.root}: build it first"
            ) from None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._alias_stamp or self._alias_version is None:
            try:
                self._alias_version = str(json.loads(self._alias_file.read_text())["version"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise IndexUnavailableError(f"index alias file {self._alias_file}: {e}") from e
            self._alias_stamp = stamp
        return self._alias_version

    def _resolve(self) -> tuple[str, Any]:
        q = _edge()
        with self._lock:
            version = self._current_version()
            shard = self._shards.get(version)
            if shard is None:
                path = self.root / "versions" / version / "shard"
                complete = (self.root / "versions" / version / "manifest.json").exists()
                if not complete and self._pinned is None:
                    raise IndexUnavailableError(f"index version {version} is not complete")
                if not path.exists():
                    raise IndexUnavailableError(
                        f"index version {version} has no data in {self.root}"
                    )
                shard, layer = self._load_checked(q, version)
                if layer is not None:
                    base = self._bases.get(layer.base)
                    if base is None and self._share is not None:
                        base = self._share.loaded_shard(layer.base)
                        if base is not None:
                            self._bases[layer.base] = base
                            self._borrowed.add(layer.base)
                    if base is None:
                        try:
                            base, _ = self._load_checked(q, layer.base)
                        except BaseException:
                            shard.close()
                            self._drop_copy(version)
                            raise
                        self._bases[layer.base] = base
                    shard = _Layered(q, layer.base, base, shard, layer)
                self._shards[version] = shard
                # Keep a few recent shards open: a query that resolved the old version a
                # moment before a swap still holds a live handle.
                for old in list(self._shards)[:-_OPEN_SHARDS_KEPT]:
                    self._close_handle(old, self._shards.pop(old))
                self._release_bases()
                log.info("index %s now serving version %s", self.alias, version)
            return version, shard

    def _close_handle(self, version: str, handle: Any) -> None:
        (handle.delta if isinstance(handle, _Layered) else handle).close()
        self._drop_copy(version)

    def _release_bases(self) -> None:
        used = {h.base_version for h in self._shards.values() if isinstance(h, _Layered)}
        for name in [b for b in self._bases if b not in used]:
            shard = self._bases.pop(name)
            if name in self._borrowed:
                self._borrowed.discard(name)
                continue
            shard.close()
            self._drop_copy(name)

    def loaded_shard(self, version: str) -> Any | None:
        """The engine shard of full version ``version`` if this reader has it loaded."""
        with self._lock:
            h = self._shards.get(version)
            if h is not None and not isinstance(h, _Layered):
                return h
            return self._bases.get(version)

    def _load_checked(self, q: Any, version: str) -> tuple[Any, Layer | None]:
        """Check (a private copy of) a version against its checksums, then load its shard."""
        failed = self._failed.get(version)
        if failed is not None and time.monotonic() - failed[0] < _RETRY_FAILED_S:
            raise failed[1]
        vdir = self.root / "versions" / version
        try:
            src = vdir
            if self._copy_root is not None:
                src = self._copy_root / version
                shutil.rmtree(src, ignore_errors=True)
                src.mkdir(parents=True)
                for name in (*VERSION_FILES, CHECKSUMS_FILE):
                    if (vdir / name).exists():
                        shutil.copy2(vdir / name, src / name)
                _copy_sparse(vdir / "shard", src / "shard")
            rep = require_intact(src, full=self._full_check)
            if not rep.has_checksums and (vdir / "manifest.json").exists():
                log.warning(
                    "index version %s has no checksums (built before they existed); "
                    "loading it unchecked",
                    version,
                )
            layer = read_layer(src)
            shard = q.EdgeShard.load(str(src / "shard"))
        except Exception as e:
            self._drop_copy(version)
            err = (
                e
                if isinstance(e, IndexUnavailableError)
                else IndexUnavailableError(f"index version {version} could not be opened: {e}")
            )
            self._failed[version] = (time.monotonic(), err)
            log.error("index %s: %s", self.alias, err)
            raise err from e
        self._failed.pop(version, None)
        return shard, layer

    def _drop_copy(self, version: str) -> None:
        if self._copy_root is not None:
            shutil.rmtree(self._copy_root / version, ignore_errors=True)

    def check_integrity(self, full: bool = True) -> IntegrityReport:
        """Check the PUBLISHED files of the live version against their checksums.

        Without ``local_copy`` those files are what this reader serves: a mismatch
        quarantines the version (queries raise IndexCorruptError until it is rebuilt or
        the alias moves).  With ``local_copy`` the checked private copy keeps serving;
        the damage is reported (a restart or another reader would refuse the version).
        """
        with self._lock:
            version = self._current_version()
        rep = check_with_base(self.root / "versions" / version, full=full)
        if not rep.ok and self._copy_root is None:
            err = IndexCorruptError(
                f"index version {version} is damaged: {'; '.join(rep.problems[:3])}"
            )
            self._quarantine(version, err)
        return rep

    def _quarantine(self, version: str, err: Exception) -> None:
        """Queries raise ``err`` for this version until the retry period passed (then
        it is copied/checked/loaded again).  The shard is dropped, not closed: a query
        in another thread may still hold it; it is released with the last reference."""
        if not isinstance(err, IndexUnavailableError):
            err = IndexCorruptError(str(err))
        with self._lock:
            self._failed[version] = (time.monotonic(), err)
            self._shards.pop(version, None)

    @property
    def serves_local_copy(self) -> bool:
        """True when queries run on private, checked copies of the versions."""
        return self._copy_root is not None

    def _manifest(self, version: str) -> IndexManifest:
        m = self._manifests.get(version)
        if m is None:
            path = self.root / "versions" / version / "manifest.json"
            if path.exists():
                try:
                    m = self._manifests[version] = IndexManifest.load(path)
                except (OSError, ValueError) as e:  # DataError is a ValueError
                    raise IndexUnavailableError(f"index version {version}: {e}") from e
            elif version == self._pinned and (path.parent / "meta.json").exists():
                # sealed, not yet committed: being verified
                meta = json.loads((path.parent / "meta.json").read_text())
                return provisional_manifest(version, self.alias, int(meta["dim"]), self.cfg)
            else:
                raise IndexUnavailableError(f"index version {version} is not complete")
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
        if not isinstance(handle, _Layered):
            return self._query_shard(handle, vectors, limit, flts, hnsw_ef, exact, with_payload)
        out = self._query_shard(
            handle.base, vectors, limit, flts, hnsw_ef, exact, with_payload, handle.hidden
        )
        if handle.delta_points:
            fresh = self._query_shard(
                handle.delta, vectors, limit, flts, hnsw_ef, exact, with_payload
            )
            out = [
                sorted(a + b, key=lambda h: (-h.score, h.item_id))[:limit]
                for a, b in zip(out, fresh)
            ]
        return out

    def _query_shard(
        self,
        shard: Any,
        vectors: np.ndarray,
        limit: int,
        flts: list[Any],
        hnsw_ef: int,
        exact: list[bool],
        with_payload: bool,
        hidden: Any = None,
    ) -> list[list[Hit]]:
        q = _edge()
        rows = vectors.tolist()
        quant = (
            q.QuantizationSearchParams(
                rescore=True, oversampling=self.cfg.quantization_oversampling
            )
            if self.cfg.quantization == "int8"
            else None
        )
        reqs = [
            q.QueryRequest(
                limit=limit,
                query=q.Query.Nearest(row),
                filter=edge_filter(f, hidden),
                params=q.SearchParams(hnsw_ef=hnsw_ef, exact=ex, quantization=quant),
                with_payload=with_payload,
            )
            for row, f, ex in zip(rows, flts, exact)
        ]
        if len(reqs) == 1:
            res = [shard.query(reqs[0])]
        else:
            res = shard.query_batch(q.QueryBatchRequest(reqs))
        if not with_payload:  # no payload object to convert per hit
            return [[Hit(int(p.id), float(p.score)) for p in hits] for hits in res]
        return [
            [Hit(int(p.id), float(p.score), dict(p.payload or {})) for p in hits] for hits in res
        ]

    def _count(self, handle: Any, flt: Any, exact: bool = True) -> int:
        q = _edge()
        if not isinstance(handle, _Layered):
            return int(handle.count(q.CountRequest(exact=exact, filter=edge_filter(flt))))
        n = int(
            handle.base.count(q.CountRequest(exact=exact, filter=edge_filter(flt, handle.hidden)))
        )
        if handle.delta_points:
            n += int(handle.delta.count(q.CountRequest(exact=exact, filter=edge_filter(flt))))
        return n

    def _retrieve(
        self, handle: Any, ids: list[int], with_vectors: bool
    ) -> dict[int, tuple[np.ndarray | None, dict[str, Any]]]:
        if not isinstance(handle, _Layered):
            return self._retrieve_shard(handle, ids, with_vectors)
        got = self._retrieve_shard(handle.delta, ids, with_vectors) if handle.delta_points else {}
        rest = [i for i in ids if i not in got and i not in handle.hidden_ids]
        got.update(self._retrieve_shard(handle.base, rest, with_vectors))
        return got

    def _retrieve_shard(
        self, shard: Any, ids: list[int], with_vectors: bool
    ) -> dict[int, tuple[np.ndarray | None, dict[str, Any]]]:
        if not ids:
            return {}
        recs = shard.retrieve(ids, with_payload=not with_vectors, with_vector=with_vectors)
        return {
            int(r.id): (
                np.asarray(r.vector, dtype=np.float32) if with_vectors else None,
                dict(r.payload or {}),
            )
            for r in recs
        }

    def close(self) -> None:
        with self._lock:
            for v in list(self._shards):
                handle = self._shards.pop(v)
                (handle.delta if isinstance(handle, _Layered) else handle).close()
            for b in list(self._bases):
                shard = self._bases.pop(b)
                if b not in self._borrowed:
                    shard.close()
            self._borrowed.clear()
            if self._copy_root is not None:
                shutil.rmtree(self._copy_root, ignore_errors=True)
