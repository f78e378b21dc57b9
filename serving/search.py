"""``SearchProducts``: a shopper's text query answered with products.

:func:`search_products` ranks the catalogue with the engine's
:class:`towers.product_search.ProductSearch` (``engine.product_search``: BM25 over the item
text + the item tower's MiniLM, ``lexical_weight`` 0.6 chosen on Beauty's validation queries),
applies the request's filters with the engine's catalogue, and, for a known customer
with a history, re-ranks the hybrid's top ``candidates`` (100) with the user vector::

    final(j) = hybrid(j) + personal_weight * cos(user vector, item vector j)

``personal_weight`` is 0.1 (``SearchConfig``): hybrid scores of a query's good matches
differ by ~0.05-0.2, so the customer's taste reorders near-ties without burying what the
text asked for.  The user vector comes from the engine's user encoder (same features as
Recommend), the item vectors from the live index.  When either is unavailable the
answer is the unpersonalised one, marked degraded.

Reasons: ``TEXT_MATCH`` (BM25 > 0) with ``word:<w>`` for each query word in the item's
text, ``brand:<brand>`` / ``category:<level>`` when the query names them,
``SEMANTIC_MATCH`` (cosine of query and item text >= 0.3), ``FOR_YOU`` when the user
vector moved the item up.

Cost (Beauty, 12,101 items, this machine under load ~9): ~5 ms of CPU for the MiniLM
query forward (ONNX Runtime), ~2.5 ms for the exact cosine over the (N+1, 384) text
vectors (memory-bound), under 1 ms for BM25, the blend and the reasons.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError
from indexing.base import SearchFilter
from serving import validation as val
from serving.batching import Batcher
from serving.complete import ProductsResult, result_item, top_k
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
    """A query's MiniLM vector and its cosine row over the catalogue.

    ``sem`` (N+1,): from the text collection's exact copy (``source`` "index-exact"), or
    from the catalogue's cached text vectors when the index has no text collection
    ("memory"); None: the text collection is searched by ANN per request ("index-ann",
    above ``exact_max_items`` or while the exact copy loads)."""

    vector: np.ndarray  # (384,)
    sem: np.ndarray | None
    source: str


_batchers: weakref.WeakKeyDictionary[Any, Batcher[str, Encoded]] = weakref.WeakKeyDictionary()
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

                def run(texts: Sequence[str]) -> list[Encoded]:
                    vecs = np.asarray(ps.encode(list(texts)), np.float32)  # (B, 384)
                    return semantic_rows(engine, ps, vecs)

                # coming() = 0: a lone query runs in its caller's thread (no hand-over);
                # queries arriving while a batch runs queue up and form the next one
                got = _batchers[engine] = Batcher(
                    run, BATCH_MAX, 0.0, "ecomrec-search-encode", coming=lambda: 0
                )
    return got


def semantic_rows(engine: Any, ps: Any, vecs: np.ndarray) -> list[Encoded]:
    """Cosine rows of B query vectors (B, 384): the text collection's exact copy when
    loaded, else None per query (ANN per request) when the collection answers, else the
    catalogue's cached text vectors in memory."""
    leg = text_leg(engine)
    state, m = leg.state() if leg is not None else ("none", None)
    n1 = ps.n_items + 1
    if m is not None:
        ids = m.ids
        keep = ids < n1
        s = vecs @ m.vectors[keep].T  # (B, Nt) one pass for the batch
        rows = np.zeros((len(vecs), n1), np.float64)
        rows[:, ids[keep]] = s
        return [Encoded(v, r, "index-exact") for v, r in zip(vecs, rows, strict=True)]
    if state == "ann":
        return [Encoded(v, None, "index-ann") for v in vecs]
    return [Encoded(v, r, "memory") for v, r in zip(vecs, ps.semantic_many(vecs), strict=True)]


def _ann_semantic(
    engine: Any, leg: Any, ps: Any, q: SearchQuery, vec: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(cosine row (N+1,), candidate mask (N+1,)) from the text collection's HNSW graph:
    the ``candidates`` nearest texts under the request's filters, plus the best lexical
    matches (their vectors fetched from the same version); other items are not ranked."""
    n1 = ps.n_items + 1
    n = max(ps.cfg.candidates, q.k)
    index = leg.index
    hits, _ = versioned(
        index,
        lambda: index.search(
            vec, n, q.filters, exclude_ids=q.exclude, hnsw_ef=engine.cfg.hnsw_ef,
            with_payload=False,
        ),
    )  # fmt: skip
    sem = np.zeros(n1, np.float64)
    cand = np.zeros(n1, bool)
    hid = np.array([h.item_id for h in hits if h.item_id < n1], np.int64)
    sem[hid] = [h.score for h in hits if h.item_id < n1]
    cand[hid] = True
    lex = ps.lexical(q.text)
    lex_ids = np.flatnonzero((lex > 0) & mask & ~cand)
    if len(lex_ids) > 4 * n:  # the best lexical matches only
        lex_ids = lex_ids[np.argpartition(-lex[lex_ids], 4 * n)[: 4 * n]]
    if len(lex_ids):
        have = sorted(index.existing_ids(lex_ids.tolist()))
        if have:
            v = np.asarray(index.get_vectors(have), np.float32)  # (L, 384)
            sem[np.asarray(have, np.int64)] = v @ vec
        cand[lex_ids] = True
    return sem, cand


def search_products(engine: Any, q: SearchQuery, ctx: RequestContext) -> ProductsResult:
    """The top ``q.k`` products for ``q.text`` (see the module docstring)."""
    ps = resolve(getattr(engine, "product_search", None))
    if ps is None:
        raise UnavailableError("this deployment has no product search")
    t = time.perf_counter()
    ctx.check("encode")
    try:
        enc = _semantic_batcher(engine, ps).run(q.text, max(ctx.remaining(), 0.001))
    except TimeoutError:
        raise DeadlineExceededError("deadline exceeded in the query encoder") from None
    t = ctx.timed("encode", t)
    ctx.check("score")
    mask = engine.catalog.mask(q.filters)
    if q.exclude:
        mask[np.asarray(q.exclude, np.int64)] = False
    sem_q = enc.sem
    if sem_q is None:  # the text collection's HNSW graph, with the request's filters
        try:
            sem_q, cand = _ann_semantic(engine, text_leg(engine), ps, q, enc.vector, mask)
            mask &= cand
            t = ctx.timed("ann", t)
        except IndexUnavailableError as e:
            log.warning("SearchProducts: text collection unavailable, in memory: %s", e)
            sem_q = ps.semantic(enc.vector)
    scores, lex, sem = ps.hybrid(q.text, semantic=sem_q)  # (N+1,) each
    degraded: list[str] = []
    personal = np.zeros(0)
    if q.user is not None:
        hist = engine.history.get(q.user)
        if len(hist):
            cands = top_k(scores, mask, max(ps.cfg.candidates, q.k))
            t = ctx.timed("score", t)
            try:
                personal = _user_relevance(engine, hist, cands, ctx, degraded)
                t = time.perf_counter()
            except (IndexUnavailableError, EncoderUnavailableError, UnavailableError) as e:
                log.warning("SearchProducts: not personalised: %s", e)
                degraded.append(
                    INDEX_UNAVAILABLE if isinstance(e, IndexUnavailableError) else ENCODER_FALLBACK
                )
            if len(personal):
                boosted = scores.copy()
                boosted[cands] += ps.cfg.personal_weight * personal
                plain_rank = {int(j): r for r, j in enumerate(cands)}
                cmask = np.zeros_like(mask)
                cmask[cands] = True
                top = top_k(boosted, cmask, q.k)
                t = ctx.timed("rerank", t)
                lift = {int(j): plain_rank[int(j)] > r for r, j in enumerate(top)}
                return _result(engine, ps, q, top, boosted, lex, sem, lift, degraded)
    top = top_k(scores, mask, q.k)
    ctx.timed("score", t)
    return _result(engine, ps, q, top, scores, lex, sem, {}, degraded)


def _user_relevance(
    engine: Any, hist: Any, cands: np.ndarray, ctx: RequestContext, degraded: list[str]
) -> np.ndarray:
    """(C,) cosine of the customer's user vector and each candidate's item vector."""
    t = time.perf_counter()
    vec, was_degraded = encode_with_status(
        engine.encoder, to_batch([hist], engine.max_len), max(ctx.remaining(), 0.001)
    )  # (1, D)
    if was_degraded:
        degraded.append(ENCODER_FALLBACK)
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


def _item_vectors(engine: Any, index: Any, ids: np.ndarray) -> np.ndarray:
    """(C, D) item vectors of the live version: from the engine's exact-search copy when it
    is loaded and holds them all (no index round trip), else from the index."""
    exact = getattr(engine, "exact", None)
    try:
        m = exact.matrix(index, index.version) if exact is not None else None
        if m is not None and int(ids.max(initial=0)) < len(m.row_of):
            rows = m.row_of[ids]
            if (rows >= 0).all():
                return np.asarray(m.vectors[rows], np.float32)
        return np.asarray(index.get_vectors(ids.tolist()), np.float32)
    except IndexUnavailableError:
        raise
    except Exception as e:  # items missing from the index or an engine fault
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
    out = []
    for j in top.tolist():
        reasons: list[str] = []
        if lex[j] > 0:
            reasons.append(TEXT_MATCH)
        if sem[j] >= SEMANTIC_MIN:
            reasons.append(SEMANTIC_MATCH)
        if lifted.get(j):
            reasons.append(FOR_YOU)
        m = ps.explain(q.text, j)
        reasons.extend(f"word:{w}" for w in m.words)
        if m.brand and ps.brands[j]:
            reasons.append(f"brand:{ps.brands[j]}")
        if m.category:
            reasons.append(f"category:{m.category}")
        out.append(result_item(engine.catalog, j, scores[j], sem[j], reasons))
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
