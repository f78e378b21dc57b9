"""``SearchProducts``: a shopper's text query answered with products.

:func:`search_products` ranks the catalogue with the engine's
:class:`towers.product_search.ProductSearch` (``engine.product_search``: BM25 over the item
text + the item tower's MiniLM, ``lexical_weight`` 0.6 chosen on Beauty's validation queries),
applies the request's filters with the engine's catalogue, and, for a known customer
with a history, re-ranks the hybrid's top ``candidates`` (100) with the user vector::

    final(j) = hybrid(j) + personal_weight * cos(user vector, item vector j)

``personal_weight`` (``ServeConfig.search_personal_weight``, 0.5) was chosen on Beauty's
validation customers by ``benchmarks/search.py --personal-run`` (known-item searches for
their held-out items) with the same re-rank (:func:`towers.product_search.personal_order`).  The user vector comes from the engine's user encoder (same features as
Recommend), the item vectors from the live index.  When either is unavailable the
answer is the unpersonalised one, marked degraded.

Reasons: ``TEXT_MATCH`` (BM25 > 0) with ``word:<w>`` for each query word in the item's
text, ``brand:<brand>`` / ``category:<level>`` when the query names them,
``SEMANTIC_MATCH`` (cosine of query and item text >= 0.3), ``FOR_YOU`` when the user
vector moved the item up.

The vector leg reads the index's text collection (:mod:`indexing.text_index`, versioned
with the item collection): its exact in-memory copy below ``exact_max_items`` (one
dense (N+1, 384) matrix per version, :class:`serving.discovery.TextLeg`), else its HNSW
graph with the request's filters; without a text collection, the catalogue's cached
text vectors in memory.  The hybrid is computed over candidates only
(:meth:`towers.product_search.ProductSearch.rank`: the ``2 * candidates`` nearest texts
plus the best lexical matches, exact by a bound, else one full pass), and a repeated
query's nearest texts come from an LRU (``search_query_cache``).

A customer's user vector comes from an LRU keyed by the stored history's content
(:class:`UserVectorCache`, ``search_user_cache``): their next search skips the user-tower
forward.  :func:`answers_from_memory` says when no forward is needed (the service then
answers on its event loop).

Cost (Beauty, 12,101 items, in process, busy machine): ~0.6 ms of CPU a request over the
serve_load request mix with its caches warm (0.4 ms anonymous, 0.9 ms personalised; was
2.0 ms before the user-vector cache and ``explain_many``, ~5.5 ms before the candidates);
a query not in the encoder's LRU adds the MiniLM forward (~4 ms, ONNX Runtime) and a pass
over the text vectors (~1 ms, memory-bound); a customer not in the user cache adds the
user-tower forward (~2.5 ms).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError
from indexing.base import SearchFilter
from serving import validation as val
from serving.batching import Batcher
from serving.complete import ProductsResult, result_item
from serving.config import ServeConfig
from serving.discovery import resolve, text_leg
from serving.encoders import EncoderUnavailableError, encode_with_status
from serving.history import to_batch
from serving.requests import (
    ENCODER_FALLBACK,
    INDEX_UNAVAILABLE,
    DeadlineExceededError,
    RequestContext,
    UnavailableError,
)
from serving.retrieval import versioned
from towers.product_search import SemanticCandidates, personal_order

K = TypeVar("K")
V = TypeVar("V")
log = logging.getLogger(__name__)

TEXT_MATCH = "TEXT_MATCH"
SEMANTIC_MATCH = "SEMANTIC_MATCH"
FOR_YOU = "FOR_YOU"
SEMANTIC_MIN = 0.3  # cosine of query and item text that counts as a semantic match
BATCH_MAX = 16  # queries per MiniLM forward


@dataclass(frozen=True)
class SearchQuery:
    """A validated SearchProducts request (internal ids)."""

    request_id: str
    text: str
    user: int | None
    k: int
    filters: SearchFilter
    exclude: tuple[int, ...]


def validate_search(req: Any, cfg: ServeConfig, users: Any, items: Any) -> SearchQuery:
    """Check a ``SearchProductsRequest``: a non-blank query of at most ``max_text_length``
    characters; an unknown customer is simply not personalised."""
    rid = val.check_request_id(req.request_id, cfg)
    text = req.query
    if len(text) > cfg.max_text_length:
        raise InvalidArgumentError("query", f"longer than {cfg.max_text_length} characters")
    if not text.strip():
        raise InvalidArgumentError("query", "is required (blank)")
    if not text.isprintable():
        raise InvalidArgumentError("query", "must be printable text")
    user_ext = val._check_id("user_id", req.user_id, cfg)
    return SearchQuery(
        request_id=rid,
        text=text.strip(),
        user=users.get(user_ext) if user_ext else None,
        k=val.check_k(req.k, cfg),
        filters=val.check_filters(req.filters, cfg),
        exclude=val.check_exclude(req.exclude_item_ids, items, cfg),
    )


@dataclass(frozen=True)
class Encoded:
    """A query's MiniLM vector and its nearest item texts.

    ``cands``: the ``2 * candidates`` nearest texts of the whole catalogue, from the text
    collection's exact copy (``source`` "index-exact") or, when the index has no text
    collection, the catalogue's cached text vectors ("memory"); ``base`` is that matrix
    (rows by item id) for the cosines of other items.  ``cands`` None: the text
    collection is searched by ANN per request with its filters ("index-ann", above
    ``exact_max_items`` or while the exact copy loads)."""

    vector: np.ndarray  # (384,)
    cands: SemanticCandidates | None
    base: np.ndarray | None  # (N+1, 384)
    source: str


class LruCache(Generic[K, V]):
    """A thread-safe LRU of at most ``size`` entries (``size`` <= 0: holds nothing), with
    hit and miss counts."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            got = self._d.get(key)
            if got is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return got

    def peek(self, key: K) -> bool:
        """Whether ``key`` is held (no LRU update, not counted)."""
        with self._lock:
            return key in self._d

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class QueryCache(LruCache[tuple[str, str], Encoded]):
    """LRU of recent queries' :class:`Encoded` (vector and nearest texts), keyed by (text,
    text version): a repeated query skips the MiniLM forward and the pass over the
    catalogue's text vectors (search traffic repeats its head queries); a new version
    (refresh) misses by key."""


_batchers: weakref.WeakKeyDictionary[Any, tuple[Batcher[str, Encoded], QueryCache]] = (
    weakref.WeakKeyDictionary()
)
_batchers_lock = threading.Lock()


def _semantic_batcher(engine: Any, ps: Any) -> Batcher[str, Encoded]:
    """The query-encoding batcher of one engine: concurrent requests' queries go through
    one MiniLM forward and one pass over the text vectors (requests that arrive while a
    batch runs form the next one; nobody waits for company)."""
    got = _batchers.get(engine)
    if got is None:
        with _batchers_lock:
            got = _batchers.get(engine)
            if got is None:
                cache = QueryCache(ps.cfg.query_cache)

                def run(texts: Sequence[str]) -> list[Encoded]:
                    vecs = np.asarray(ps.encode(list(texts)), np.float32)  # (B, 384)
                    return semantic_rows(engine, ps, vecs, list(texts), cache)

                # coming() = 0: a lone query runs in its caller's thread (no hand-over);
                # queries arriving while a batch runs queue up and form the next one
                batcher = Batcher(run, BATCH_MAX, 0.0, "ecomrec-search-encode", coming=lambda: 0)
                got = _batchers[engine] = (batcher, cache)
    return got[0]


def semantic_rows(
    engine: Any,
    ps: Any,
    vecs: np.ndarray,
    texts: Sequence[str] | None = None,
    cache: QueryCache | None = None,
) -> list[Encoded]:
    """The nearest texts of B query vectors (B, 384): from the text collection's exact copy
    when loaded, else None per query (ANN per request) when the collection answers, else
    from the catalogue's cached text vectors in memory.  ``texts`` + ``cache``: repeated
    queries skip the pass."""
    leg = text_leg(engine)
    state, m = leg.state() if leg is not None else ("none", None)
    n1 = ps.n_items + 1
    if m is not None and leg is not None:
        base, version, source = leg.dense(m, n1), str(m.version), "index-exact"
    elif state == "ann":
        return [Encoded(v, None, None, "index-ann") for v in vecs]
    else:
        base, version, source = ps.vectors, "memory", "memory"
    n = 2 * ps.cfg.candidates
    out: list[Encoded | None] = [None] * len(vecs)
    if texts is not None and cache is not None:
        out = [cache.get((t, version)) for t in texts]
    need = [i for i, c in enumerate(out) if c is None]
    if need:
        rows = vecs[need] @ base.T  # (B', N+1) one pass for the queries not cached
        rows[:, 0] = -np.inf  # padding
        for i, row in zip(need, rows, strict=True):
            e = Encoded(vecs[i], SemanticCandidates.from_row(row, n), base, source)
            out[i] = e
            if texts is not None and cache is not None:
                cache.put((texts[i], version), e)
    return [e for e in out if e is not None]


def cached(engine: Any, text: str) -> Encoded | None:
    """``text``'s vector and nearest texts when a recent query left them in the engine's
    cache for the live text version (then answering needs ~1 ms of numpy, no MiniLM)."""
    got = _batchers.get(engine)
    if got is None:
        return None
    leg = text_leg(engine)
    state, m = leg.state() if leg is not None else ("none", None)
    if state == "ann":
        return None
    return got[1].get((text, str(m.version) if m is not None else "memory"))


def answers_from_memory(engine: Any, q: SearchQuery) -> bool:
    """True when answering ``q`` needs no model forward: product search built, the query's
    vector and nearest texts in the query cache, and no customer, one without a history,
    or one whose user vector is in the user cache (then ~0.5 ms of numpy: the service
    answers on its event loop, no hand-over to the worker pool)."""
    from serving.discovery import is_ready

    if not is_ready(getattr(engine, "product_search", None)) or cached(engine, q.text) is None:
        return False
    if q.user is None:
        return True
    hist = engine.history.get(q.user)
    if len(hist) == 0:
        return True
    cache = _user_caches.get(engine)
    return cache is not None and cache.peek(UserVectorCache.key(hist))


def _ann_candidates(
    engine: Any, leg: Any, q: SearchQuery, vec: np.ndarray, n: int
) -> tuple[SemanticCandidates, Any]:
    """The ``n`` nearest texts under the request's filters from the text collection's HNSW
    graph, and the cosine of any other item (its vector fetched from the same version)."""
    index = leg.index
    hits, _ = versioned(
        index,
        lambda: index.search(
            vec, n, q.filters, exclude_ids=q.exclude, hnsw_ef=engine.cfg.hnsw_ef,
            with_payload=False,
        ),
    )  # fmt: skip
    ids = np.array([h.item_id for h in hits], np.int64)
    scores = np.array([h.score for h in hits], np.float64)
    bound = float(scores[-1]) if len(hits) >= n else -np.inf

    def sem_of(extra: np.ndarray) -> np.ndarray:
        out = np.zeros(len(extra), np.float64)
        if not len(extra):
            return out
        have = sorted(index.existing_ids(extra.tolist()))
        if have:
            v = np.asarray(index.get_vectors(have), np.float32)  # (L, 384)
            pos = np.searchsorted(extra, np.asarray(have, np.int64))
            out[pos] = v @ vec
        return out

    return SemanticCandidates(ids, scores, bound), sem_of


def search_products(engine: Any, q: SearchQuery, ctx: RequestContext) -> ProductsResult:
    """The top ``q.k`` products for ``q.text`` (see the module docstring)."""
    ps = resolve(getattr(engine, "product_search", None))
    if ps is None:
        raise UnavailableError("this deployment has no product search")
    t = time.perf_counter()
    ctx.check("encode")
    enc = cached(engine, q.text)
    if enc is None:
        try:
            enc = _semantic_batcher(engine, ps).run(q.text, max(ctx.remaining(), 0.001))
        except TimeoutError:
            raise DeadlineExceededError("deadline exceeded in the query encoder") from None
    t = ctx.timed("encode", t)
    ctx.check("score")
    mask = engine.catalog.mask(q.filters)
    if q.exclude:
        mask[np.asarray(q.exclude, np.int64)] = False
    hist = engine.history.get(q.user) if q.user is not None else None
    personalise = hist is not None and len(hist) > 0
    n_top = max(ps.cfg.candidates, q.k) if personalise else q.k
    vec = enc.vector
    base = enc.base
    cands = enc.cands
    sem_of: Any = None
    if cands is None:  # the text collection's HNSW graph, with the request's filters
        try:
            cands, sem_of = _ann_candidates(engine, text_leg(engine), q, vec, 2 * n_top)
            t = ctx.timed("ann", t)
        except IndexUnavailableError as e:
            log.warning("SearchProducts: text collection unavailable, in memory: %s", e)
            base = ps.vectors
    if cands is None:
        assert base is not None
        row = base @ vec
        row[0] = -np.inf
        cands = SemanticCandidates.from_row(row, 2 * n_top)
    if sem_of is None:
        mat = base

        def sem_of(ids: np.ndarray) -> np.ndarray:
            return np.asarray(mat[ids] @ vec, np.float64)  # type: ignore[index]

    ranked = ps.rank(q.text, cands, sem_of, mask, n_top)
    if not ranked.exact and base is not None:  # rare: the candidates were not enough
        row = base @ vec
        everything = SemanticCandidates(np.arange(1, len(row), dtype=np.int64), row[1:], -np.inf)
        ranked = ps.rank(q.text, everything, sem_of, mask, n_top)
    degraded: list[str] = []
    if personalise:
        cands_ids = ranked.ids[:n_top]
        t = ctx.timed("score", t)
        personal = np.zeros(0)
        try:
            personal = _user_relevance(engine, hist, cands_ids, ctx, degraded)
            t = time.perf_counter()
        except (IndexUnavailableError, EncoderUnavailableError, UnavailableError) as e:
            log.warning("SearchProducts: not personalised: %s", e)
            degraded.append(
                INDEX_UNAVAILABLE if isinstance(e, IndexUnavailableError) else ENCODER_FALLBACK
            )
        if len(personal):
            order, boosted = personal_order(
                cands_ids, ranked.hybrid[:n_top], personal, ps.cfg.personal_weight
            )
            order = order[: q.k]
            t = ctx.timed("rerank", t)
            lift = {int(cands_ids[r]): int(r) > i for i, r in enumerate(order)}
            return _result(
                engine, ps, q, cands_ids[order], boosted[order], ranked.lex[order],
                ranked.sem[order], lift, degraded,
            )  # fmt: skip
    ctx.timed("score", t)
    k = q.k
    return _result(
        engine, ps, q, ranked.ids[:k], ranked.hybrid[:k], ranked.lex[:k], ranked.sem[:k], {},
        degraded,
    )  # fmt: skip


def _user_relevance(
    engine: Any, hist: Any, cands: np.ndarray, ctx: RequestContext, degraded: list[str]
) -> np.ndarray:
    """(C,) cosine of the customer's user vector and each candidate's item vector."""
    t = time.perf_counter()
    vec = _user_vector(engine, hist, ctx, degraded)  # (1, D)
    t = ctx.timed("encode", t)
    index = engine.index
    if index is None:
        raise IndexUnavailableError("no index loaded")
    items = _item_vectors(engine, index, cands)  # (C, D)
    ctx.timed("ann", t)
    if not np.isfinite(items).all():
        raise IndexUnavailableError("the index returned non-finite vectors")
    u = np.asarray(vec, np.float32)[0]
    return (items @ u).astype(np.float64)


class UserVectorCache(LruCache[bytes, np.ndarray]):
    """LRU of recent customers' user vectors, keyed by their history's content (items, times,
    event types): a customer's next search with the same stored history skips the
    user-tower forward (~2.5 ms of CPU on Beauty, most of a personalised request); a new
    event changes the key.  Only the engine's own encoder's vectors are kept (a fallback's,
    marked degraded, never); one cache per engine, so a new model starts empty."""

    @staticmethod
    def key(hist: Any) -> bytes:
        """The history's content (what the user tower reads), as one bytes key."""
        parts = [
            np.ascontiguousarray(hist.items, np.int64),
            np.ascontiguousarray(hist.ts, np.int64),
            np.ascontiguousarray(hist.event_type, np.int64),
        ]
        return len(hist.items).to_bytes(8, "little") + b"".join(p.tobytes() for p in parts)


_user_caches: weakref.WeakKeyDictionary[Any, UserVectorCache] = weakref.WeakKeyDictionary()


def _user_cache(engine: Any, size: int) -> UserVectorCache:
    got = _user_caches.get(engine)
    if got is None:
        with _batchers_lock:
            got = _user_caches.get(engine)
            if got is None:
                got = _user_caches[engine] = UserVectorCache(size)
    return got


def _user_vector(engine: Any, hist: Any, ctx: RequestContext, degraded: list[str]) -> np.ndarray:
    """(1, D) the customer's user vector: from the engine's :class:`UserVectorCache` when
    this history was encoded recently, else one forward of the engine's encoder."""
    ps = resolve(getattr(engine, "product_search", None))
    size = int(getattr(getattr(ps, "cfg", None), "user_cache", 0))
    cache = _user_cache(engine, size) if size > 0 else None
    key = UserVectorCache.key(hist) if cache is not None else b""
    if cache is not None:
        got = cache.get(key)
        if got is not None:
            return got
    vec, was_degraded = encode_with_status(
        engine.encoder, to_batch([hist], engine.max_len), max(ctx.remaining(), 0.001)
    )  # (1, D)
    vec = np.asarray(vec, np.float32)
    if was_degraded:
        degraded.append(ENCODER_FALLBACK)
    elif cache is not None:
        vec.setflags(write=False)  # shared between requests
        cache.put(key, vec)
    return vec


def _item_vectors(engine: Any, index: Any, ids: np.ndarray) -> np.ndarray:
    """(C, D) item vectors of the live version: from the engine's exact-search copy when it
    is loaded, else from the index.  An item the index does not hold (left out of it: no
    trained vector, e.g. a product first sold after training) gets a zero row, so no
    personal boost, instead of the whole answer losing its personalisation."""
    exact = getattr(engine, "exact", None)
    try:
        m = exact.matrix(index, index.version) if exact is not None else None
        out: np.ndarray | None = None
        todo = ids
        if m is not None:
            out = np.zeros((len(ids), m.vectors.shape[1]), np.float32)
            rows = np.full(len(ids), -1, np.int64)
            inside = ids < len(m.row_of)
            rows[inside] = m.row_of[ids[inside]]
            out[rows >= 0] = m.vectors[rows[rows >= 0]]
            todo = ids[rows < 0]
            if not len(todo):
                return out
        have = sorted(index.existing_ids(todo.tolist()))
        if out is None:
            out = np.zeros((len(ids), int(index.dim)), np.float32)
        if have:
            pos = {int(j): r for r, j in enumerate(ids.tolist())}
            out[[pos[j] for j in have]] = np.asarray(index.get_vectors(have), np.float32)
        return out
    except IndexUnavailableError:
        raise
    except Exception as e:  # an engine fault
        raise IndexUnavailableError(f"index lookup failed: {e}") from e


def _result(
    engine: Any,
    ps: Any,
    q: SearchQuery,
    top: np.ndarray,
    scores: np.ndarray,
    lex: np.ndarray,
    sem: np.ndarray,
    lifted: dict[int, bool],
    degraded: list[str],
) -> ProductsResult:
    """The answer; ``scores`` / ``lex`` / ``sem`` are aligned with ``top``."""
    out = []
    ids = top.tolist()
    matches = ps.explain_many(q.text, ids)
    for j, sc, lx, se, m in zip(ids, scores.tolist(), lex.tolist(), sem.tolist(), matches):
        reasons: list[str] = []
        if lx > 0:
            reasons.append(TEXT_MATCH)
        if se >= SEMANTIC_MIN:
            reasons.append(SEMANTIC_MATCH)
        if lifted.get(j):
            reasons.append(FOR_YOU)
        reasons.extend(f"word:{w}" for w in m.words)
        if m.brand and ps.brands[j]:
            reasons.append(f"brand:{ps.brands[j]}")
        if m.category:
            reasons.append(f"category:{m.category}")
        out.append(result_item(engine.catalog, j, sc, se, reasons))
    if degraded and engine.metrics is not None:
        for r in degraded:
            engine.metrics.degraded.labels("SearchProducts", r).inc()
    return ProductsResult(
        q.request_id,
        tuple(out),
        engine.model_version,
        (),
        bool(degraded),
        tuple(dict.fromkeys(degraded)),
    )
