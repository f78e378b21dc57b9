"""SearchProducts for a customer when the index lacks some products (left out of it: no
trained vector, e.g. first sold after training; the README's invoice walk has 240 such).
Those candidates get no personal boost; the others keep theirs, and the answer is
personalised, not degraded (it was: one missing candidate failed the whole lookup)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import build_index, make_engine, open_reader

pytestmark = pytest.mark.slow  # engines with their text vectors and query encoder


@pytest.fixture(scope="module")
def partial(parts: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    n = len(parts.dataset.item_ids)
    keep = np.array([i for i in range(1, n + 1) if i % 3], np.int64)  # every third left out
    loc: Path = tmp_path_factory.mktemp("partial_index")
    build_index(loc, parts, keep)
    reader = open_reader(loc)
    yield {"reader": reader, "keep": keep, "n": n}
    reader.close()


@pytest.mark.parametrize("exact_max_items", [100_000, 0])  # exact copy / index lookups
def test_left_out_candidates_get_no_boost_and_the_answer_stays_personal(
    parts: Any, partial: dict[str, Any], exact_max_items: int
) -> None:
    from indexing.base import SearchFilter
    from serving.discovery import warm
    from serving.requests import RequestContext
    from serving.search import SearchQuery, _item_vectors, search_products

    reader, keep = partial["reader"], partial["keep"]
    engine = make_engine(parts, reader, exact_max_items=exact_max_items)
    warm(engine)
    ids = np.arange(1, partial["n"] + 1, dtype=np.int64)
    got = _item_vectors(engine, reader, ids)  # (N, D)
    inside = np.isin(ids, keep)
    np.testing.assert_allclose(got[inside], reader.get_vectors(ids[inside].tolist()), atol=1e-6)
    assert not got[~inside].any()  # left out: zero rows, no boost

    titles = parts.dataset.items["title"].to_list()
    user = int(parts.history.users()[0])
    degraded = []
    for title in [t for t in titles if t][:20]:
        q = SearchQuery("t", " ".join(title.split()[:2]), user, 10, SearchFilter(), ())
        r = search_products(engine, q, RequestContext.with_timeout(30.0))
        degraded.append(r.degraded)
    assert not any(degraded)
