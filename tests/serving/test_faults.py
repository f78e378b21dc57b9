"""Faults give degraded answers, never INTERNAL: index down, Triton unreachable, alias swaps under load."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.serving.conftest import Served, build_index, make_engine, open_reader


def _ext_user(parts: Any, i: int = 0) -> str:
    return parts.dataset.users.to_external(int(parts.history.users()[i]))


def test_index_missing_serves_segment_popularity(parts: Any, segments: Any, tmp_path: Path) -> None:
    """An index whose alias does not exist: degraded answers from the segment's best sellers."""
    reader = open_reader(tmp_path / "empty")
    s = Served(make_engine(parts, reader, segments))
    try:
        ext = _ext_user(parts)
        cat = parts.catalog.categories[2]
        r = s.call(
            "Recommend",
            s.pb.RecommendRequest(user_id=ext, k=5, filters=s.pb.Filters(categories=[cat])),
        )
        assert r.degraded and list(r.degraded_reasons) == ["INDEX_UNAVAILABLE"]
        assert len(r.items) == 5
        assert all(i.category == cat and i.reasons == ["POPULAR_FALLBACK"] for i in r.items)
        # the answer is the segment's popularity order among the allowed items
        u = parts.dataset.users.get(ext)
        seg = segments.user(u).rfm
        mask = parts.catalog.mask(None)
        mask &= np.array([c == cat for c in parts.catalog.categories])
        mask[parts.history.get(u).purchased()] = False
        want = s.engine.popularity.top(seg, 5, mask)
        assert [i.item_id for i in r.items] == [parts.catalog.external_ids[int(i)] for i in want]
        sim = s.call(
            "SimilarItems", s.pb.SimilarItemsRequest(item_id=parts.catalog.external_ids[3], k=3)
        )
        assert sim.degraded and len(sim.items) == 3
        text = s.handle.metrics.registry.get_sample_value(
            "ecomrec_degraded_total", {"method": "Recommend", "reason": "INDEX_UNAVAILABLE"}
        )
        assert text == 1.0
    finally:
        s.close()
        reader.close()


@pytest.mark.slow
def test_index_lost_while_serving_then_recovers(parts: Any, tmp_path: Path) -> None:
    d = tmp_path / "idx"
    build_index(d, parts)
    reader = open_reader(d)
    s = Served(make_engine(parts, reader))
    try:
        ext = _ext_user(parts)
        ok = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert not ok.degraded
        alias = d / "aliases"
        shutil.move(alias, tmp_path / "aliases.bak")
        down = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert down.degraded and "INDEX_UNAVAILABLE" in down.degraded_reasons
        shutil.move(tmp_path / "aliases.bak", alias)
        back = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert not back.degraded and [i.item_id for i in back.items] == [
            i.item_id for i in ok.items
        ]
    finally:
        s.close()
        reader.close()


def _dead_port() -> int:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return int(so.getsockname()[1])


def test_unreachable_triton_falls_back(parts: Any, index_dir: Path) -> None:
    reader = open_reader(index_dir)
    url = f"127.0.0.1:{_dead_port()}"
    s = Served(make_engine(parts, reader, encoder="triton", triton_url=url, triton_timeout_s=0.3))
    ref = Served(make_engine(parts, reader))
    try:
        ext = _ext_user(parts, 3)
        r = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert r.degraded and list(r.degraded_reasons) == ["ENCODER_FALLBACK"]
        want = ref.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert [i.item_id for i in r.items] == [i.item_id for i in want.items]
        # the circuit breaker: the next call goes straight to the local tower
        enc = s.engine.encoder
        assert enc.primary_failures == 1
        again = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert again.degraded and enc.primary_failures == 1 and enc.primary_skipped == 1
    finally:
        s.close()
        ref.close()
        reader.close()


def test_unreachable_triton_without_fallback_is_unavailable(parts: Any, index_dir: Path) -> None:
    reader = open_reader(index_dir)
    url = f"127.0.0.1:{_dead_port()}"
    s = Served(
        make_engine(
            parts,
            reader,
            encoder="triton",
            triton_url=url,
            triton_timeout_s=0.3,
            fallback_to_inprocess=False,
        )
    )
    try:
        with pytest.raises(grpc.RpcError) as e:
            s.call("Recommend", s.pb.RecommendRequest(user_id=_ext_user(parts), k=5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()
        reader.close()


@pytest.mark.slow
def test_alias_swap_under_load(parts: Any, tmp_path: Path) -> None:
    """Rebuild the index (v2 holds only even item ids) while 4 clients call: no failed
    request, and every answer is wholly from the version it reports."""
    d = tmp_path / "idx"
    v1 = build_index(d, parts)
    reader = open_reader(d)
    s = Served(make_engine(parts, reader))
    users = [parts.dataset.users.to_external(int(u)) for u in parts.history.users()[:40]]
    results: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    internal = {e: i for i, e in enumerate(parts.catalog.external_ids)}

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            try:
                r = s.call(
                    "Recommend",
                    s.pb.RecommendRequest(user_id=users[i % len(users)], k=10),
                    timeout=10,
                )
                results.append((r.index_version, [internal[x.item_id] for x in r.items]))
            except BaseException as e:  # collected, asserted below
                errors.append(e)
            i += 4

    def answered(which: Any, n: int = 3, timeout: float = 60) -> None:
        """Wait (with a deadline, not a fixed sleep) for n answers from versions ``which``."""
        end = time.monotonic() + timeout
        while sum(1 for v, _ in list(results) if which(v)) < n:
            assert time.monotonic() < end and not errors, (errors[:3], len(results))
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        answered(lambda v: True)  # answers from v1 before the swap
        even = np.arange(2, parts.catalog.n_items + 1, 2)
        v2 = build_index(d, parts, keep=even)
        answered(lambda v: v == v2)  # and from v2 after it
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        s.close()
        reader.close()
    assert not errors, errors[:3]
    versions = {v for v, _ in results}
    assert versions == {v1, v2}, versions
    for v, items in results:
        if v == v2:
            assert all(i % 2 == 0 for i in items), "a v2 answer holds items only v1 has"
    assert any(any(i % 2 for i in items) for v, items in results if v == v1)
    assert results[-1][0] == v2
