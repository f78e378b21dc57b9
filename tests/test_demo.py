"""The main-job pipeline end to end on the synthetic shop (train, index, segments, serve, call)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_pipeline_recommends_the_planted_taste(tmp_path: Path) -> None:
    from ecomrec.demo import run_demo
    from intake.synthetic import make_shop

    out = io.StringIO()
    responses = run_demo("synthetic", work=tmp_path, customers=3, k=5, out=out)
    text = out.getvalue()
    assert "service listening" in text and "done" in text
    shop = make_shop()
    planted = shop.extra["planted"]
    assert isinstance(planted, dict)
    fav = planted["favourite_category"]
    assert len(responses) == 3
    hits = 0
    for ext, resp in responses:
        assert (
            len(resp.items) == 5 and resp.model_version and resp.index_version and not resp.degraded
        )
        assert all(i.reasons for i in resp.items) and resp.segment
        u = shop.users.to_internal(ext)
        top = Counter(i.category for i in resp.items).most_common(1)[0][0]
        hits += top == fav[u - 1]
    # customers buy their favourite category ~85% of the time: the answer should mostly be it
    assert hits >= 2, text
