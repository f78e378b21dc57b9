"""What an outside client found (issue 14), against a real gRPC server and real index.

Streams holding workers, metric label cardinality, garbage protobuf bytes, a damaged
vector file at start and while serving, the version metric after a CLI build, NOT_FOUND
naming the shop's id, NOT_SERVING before the port closes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.serving.conftest import Served, build_index, make_engine, open_reader, wait_for


def damage(path: Path, how: str) -> None:
    """Truncate a file or overwrite it in place with random bytes of the same size."""
    if how == "truncate":
        path.write_bytes(b"")
        return
    n = path.stat().st_size
    rng = np.random.default_rng(7)
    with path.open("r+b") as fh:
        for a in range(0, n, 1 << 20):
            fh.write(rng.bytes(min(1 << 20, n - a)))


def _ext_user(parts: Any, i: int = 0) -> str:
    return parts.dataset.users.to_external(int(parts.history.users()[i]))


def _vector_file(root: Path) -> Path:
    import json

    live = json.loads((root / "aliases" / "items.json").read_text())["version"]
    return sorted((root / "versions" / live).rglob("vector_storage/vectors/chunk_*.mmap"))[0]


def _health(channel: grpc.Channel, timeout: float = 3.0) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = health_pb2_grpc.HealthStub(channel)
    return int(h.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status)


def _serving() -> int:
    from grpc_health.v1 import health_pb2

    return int(health_pb2.HealthCheckResponse.SERVING)


class _Stream:
    """A reflection stream that stays open until ``close()`` (the client never half-closes)."""

    def __init__(self, channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        self._gate = threading.Event()
        req = reflection_pb2.ServerReflectionRequest(list_services="")

        def requests() -> Iterator[Any]:
            yield req
            self._gate.wait(30)

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.call = stub.ServerReflectionInfo(requests(), metadata=md, timeout=30)
        try:
            next(self.call)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code = e.code()

    def close(self) -> None:
        self._gate.set()
        self.call.cancel()


@pytest.fixture()
def fresh(parts: Any, index_dir: Path, segments: Any) -> Iterator[Served]:
    reader = open_reader(index_dir)
    s = Served(make_engine(parts, reader, segments, index_check_s=0), metrics_port=0)
    yield s
    s.close()
    reader.close()


# -- 1. streams must not starve unary calls ------------------------------------------------
def test_keyless_streams_never_hold_a_worker(fresh: Served, parts: Any) -> None:
    """One open reflection stream per worker thread, without a key: each is refused at
    once and Recommend + health still answer (before: every call timed out)."""
    n = fresh.cfg.workers
    streams = [_Stream(fresh.channel, ()) for _ in range(n)]
    try:
        # (before: every call timed out while the streams were open, here for 30 s)
        r = fresh.call("Recommend", fresh.pb.RecommendRequest(user_id=_ext_user(parts), k=5), 10)
        assert len(r.items) == 5 and _health(fresh.channel, 10) == _serving()
        assert [s.code for s in streams] == [grpc.StatusCode.UNAUTHENTICATED] * n
    finally:
        for s in streams:
            s.close()


def test_keyed_streams_are_bounded_and_watch_holds_no_worker(fresh: Served, parts: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    n = fresh.cfg.workers
    streams = [_Stream(fresh.channel, fresh.md) for _ in range(n)]
    h = health_pb2_grpc.HealthStub(fresh.channel)
    watches = [h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(20)]
    try:
        codes = [s.code for s in streams]
        limit = fresh.cfg.max_reflection_streams
        assert codes.count(grpc.StatusCode.OK) == limit
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == n - limit
        assert all(next(w).status == _serving() for w in watches)
        for i in range(3):  # unary calls still find workers
            r = fresh.call(
                "Recommend", fresh.pb.RecommendRequest(user_id=_ext_user(parts, i), k=5), 10
            )
            assert len(r.items) == 5
        assert _health(fresh.channel) == _serving()
    finally:
        for s in streams:
            s.close()
        for w in watches:
            w.cancel()
    # closed streams give their slots back (once the server has seen the cancellations)
    end = time.monotonic() + 10
    while True:
        again = _Stream(fresh.channel, fresh.md)
        again.close()
        if again.code == grpc.StatusCode.OK or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert again.code == grpc.StatusCode.OK


# -- 2. metric label cardinality -------------------------------------------------------------
def _metrics_text(s: Served) -> str:
    url = f"http://127.0.0.1:{s.handle.metrics_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=5).read().decode())


def test_random_method_names_do_not_grow_metrics(fresh: Served) -> None:
    rng = np.random.default_rng(0)
    fresh.call("ListSegments", fresh.pb.ListSegmentsRequest())
    base = len(_metrics_text(fresh))
    codes = set()
    for i in range(2000):
        name = f"/{rng.integers(1 << 62):x}.Svc/M{i}"
        md = fresh.md if i % 2 else ()  # with and without a key
        try:
            fresh.channel.unary_unary(name)(b"", metadata=md, timeout=5)
        except grpc.RpcError as e:
            codes.add(e.code())
    assert codes == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED}
    text = _metrics_text(fresh)
    assert len(text) - base < 1000, len(text) - base
    assert 'ecomrec_requests_total{code="UNAUTHENTICATED",method="unknown"} 1000.0' in text
    methods = {
        line.split('method="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("ecomrec_requests_total{")
    }
    assert methods <= {"unknown", "ListSegments"}, methods


# -- garbage protobuf bytes ------------------------------------------------------------------
def test_garbage_protobuf_is_invalid_argument_with_one_log_line(
    fresh: Served, caplog: pytest.LogCaptureFixture
) -> None:
    call = fresh.channel.unary_unary("/ecomrec.v1.RecommendService/Recommend")
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as e:
        call(b"\xff\xff\xff\xff\x0f", metadata=fresh.md, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (e.value.details() or "")
    recs = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(recs) == 1 and recs[0].exc_info is None, [r.getMessage() for r in recs]


# -- 3 + 4. a damaged index at start-up ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "scramble"])
def test_damaged_index_at_start_degrades_every_method(
    parts: Any, segments: Any, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "idx"
    build_index(d, parts)
    damage(_vector_file(d), how)
    reader = open_reader(d)
    s = Served(make_engine(parts, reader, segments, index_check_s=0))
    try:
        with caplog.at_level(logging.ERROR):
            problem, _ = s.handle.check_index()
        assert problem is not None and "damaged" in problem
        assert any("index could not be opened" in r.getMessage() for r in caplog.records)
        assert _health(s.channel) != _serving()
        assert s.handle.metrics.registry.get_sample_value("ecomrec_index_ok") == 0.0
        ext = _ext_user(parts)
        r = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert r.degraded and list(r.degraded_reasons) == ["INDEX_UNAVAILABLE"]
        assert len(r.items) == 5 and all(np.isfinite(i.score) for i in r.items)
        assert all(i.reasons == ["POPULAR_FALLBACK"] for i in r.items)
        sim = s.call(
            "SimilarItems", s.pb.SimilarItemsRequest(item_id=parts.catalog.external_ids[3], k=3)
        )
        assert sim.degraded and all(np.isfinite(i.score) for i in sim.items)
        with pytest.raises(grpc.RpcError) as e:  # no fallback: UNAVAILABLE, not INTERNAL
            s.call(
                "FindAudience",
                s.pb.FindAudienceRequest(item_ids=[parts.catalog.external_ids[3]], k=3),
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert s.call("GetUserProfile", s.pb.GetUserProfileRequest(user_id=ext)).user_id == ext
        assert len(s.call("ListSegments", s.pb.ListSegmentsRequest()).segments) > 0
        # a good version published: the next check brings health back, answers recover
        build_index(d, parts)
        assert s.handle.check_index() == (None, None)
        assert _health(s.channel) == _serving()
        assert not s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5)).degraded
    finally:
        s.close()
        reader.close()


# -- 3. damaged while serving ----------------------------------------------------------------
def test_scrambled_while_serving_without_copy_degrades(
    parts: Any, segments: Any, tmp_path: Path
) -> None:
    """Serving the published files directly: random bytes under the live version give
    degraded popularity answers (before: OK answers with garbage scores, degraded=false).
    The index path is under test, so exact search is off (its in-memory matrix, read and
    checked before the damage, would keep answering correctly)."""
    d = tmp_path / "idx"
    build_index(d, parts)
    reader = open_reader(d)
    s = Served(make_engine(parts, reader, segments, index_check_s=0, exact_max_items=0))
    try:
        ext = _ext_user(parts)
        ok = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5, skip_rerank=True))
        assert not ok.degraded and all(-1 <= i.relevance <= 1 for i in ok.items)
        damage(_vector_file(d), "scramble")
        r = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5, skip_rerank=True))
        assert r.degraded and "INDEX_UNAVAILABLE" in r.degraded_reasons
        assert all(np.isfinite(i.score) and abs(i.relevance) <= 1 for i in r.items)
        problem, _ = s.handle.check_index()
        assert problem is not None and _health(s.channel) != _serving()
    finally:
        s.close()
        reader.close()


@pytest.mark.parametrize("how", ["truncate", "scramble"])
def test_damage_while_serving_a_private_copy_keeps_answers(
    parts: Any, segments: Any, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The default (``index_local_copy``): the server answers from a checked private copy,
    so a truncated published file is no SIGBUS and garbage never reaches an answer; the
    damage is logged and exported (a restart would refuse the version)."""
    from indexing.base import IndexConfig
    from indexing.build import open_index

    d = tmp_path / "idx"
    build_index(d, parts)
    reader = open_index(IndexConfig(location=str(d)), local_copy=str(tmp_path / "copy"))
    s = Served(make_engine(parts, reader, segments, index_check_s=0))
    try:
        ext = _ext_user(parts)
        req = s.pb.RecommendRequest(user_id=ext, k=5)
        before = s.call("Recommend", req)
        damage(_vector_file(d), how)
        after = s.call("Recommend", req)
        assert not after.degraded
        assert [i.item_id for i in after.items] == [i.item_id for i in before.items]
        assert [i.score for i in after.items] == [i.score for i in before.items]
        with caplog.at_level(logging.ERROR):
            problem, published = s.handle.check_index()
        assert problem is None and published is not None
        assert any("restart will refuse" in r.getMessage() for r in caplog.records)
        reg = s.handle.metrics.registry
        assert reg.get_sample_value("ecomrec_index_published_ok") == 0.0
        assert _health(s.channel) == _serving()
    finally:
        s.close()
        reader.close()


# -- 5. the version metric after CLI build / rollback -------------------------------------
def _versions_info(s: Served) -> str:
    for line in _metrics_text(s).splitlines():
        if line.startswith("ecomrec_versions_info{"):
            return line.split('index_version="')[1].split('"')[0]
    raise AssertionError("no ecomrec_versions_info")


@pytest.mark.slow
def test_version_metric_follows_cli_build_and_rollback(
    parts: Any, segments: Any, tmp_path: Path
) -> None:
    d = tmp_path / "idx"
    v1 = build_index(d, parts)
    reader = open_reader(d)
    s = Served(make_engine(parts, reader, segments, index_check_s=0), metrics_port=0)
    try:
        assert _versions_info(s) == v1
        ids = np.arange(1, parts.catalog.n_items + 1)
        np.save(tmp_path / "vecs.npy", parts.model.item_vectors()[ids])
        parts.dataset.items.write_parquet(tmp_path / "items.parquet")

        def cli(*args: str) -> None:
            res = subprocess.run(
                [sys.executable, "-m", "ecomrec", "index", *args, "--index", str(d)],
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert res.returncode == 0, res.stderr[-2000:]

        cli(
            "build",
            "--catalog",
            str(tmp_path / "items.parquet"),
            "--vectors",
            str(tmp_path / "vecs.npy"),
        )
        v2 = reader.version
        assert v2 != v1 and _versions_info(s) == v2
        r = s.call("Recommend", s.pb.RecommendRequest(user_id=_ext_user(parts), k=5))
        assert r.index_version == v2
        cli("rollback")
        assert _versions_info(s) == v1
    finally:
        s.close()
        reader.close()


# -- NOT_FOUND names the shop's id -----------------------------------------------------------
def test_not_found_after_delete_names_the_external_id(
    parts: Any, segments: Any, tmp_path: Path
) -> None:
    from indexing.base import IndexConfig
    from indexing.build import delete_points, open_store

    d = tmp_path / "idx"
    build_index(d, parts)
    reader = open_reader(d)
    s = Served(make_engine(parts, reader, segments, index_check_s=0))
    store = open_store(IndexConfig(location=str(d), hnsw_m=16, hnsw_ef_construct=64))
    try:
        delete_points(store, [7])
        ext = parts.catalog.external_ids[7]
        for method, req in (
            ("SimilarItems", s.pb.SimilarItemsRequest(item_id=ext, k=3)),
            ("FindAudience", s.pb.FindAudienceRequest(item_ids=[ext], k=3)),
        ):
            with pytest.raises(grpc.RpcError) as e:
                s.call(method, req)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, method
            assert ext in (e.value.details() or "") and "[7]" not in (e.value.details() or "")
    finally:
        store.close()
        s.close()
        reader.close()


# -- NOT_SERVING before the port closes -------------------------------------------------------
@pytest.mark.slow
def test_stop_reports_not_serving_before_closing_the_port(fresh: Served, parts: Any) -> None:
    stopper = threading.Thread(target=fresh.handle.stop, args=(0.5, 4.0))
    stopper.start()
    try:  # NOT_SERVING within the 4 s delay, then still answering
        assert wait_for(lambda: _health(fresh.channel) != _serving(), timeout=3.0)
        r = fresh.call("Recommend", fresh.pb.RecommendRequest(user_id=_ext_user(parts), k=5), 3)
        assert len(r.items) == 5  # still answering while load balancers drain
    finally:
        stopper.join(10)
    with pytest.raises(grpc.RpcError) as e:
        fresh.call("Recommend", fresh.pb.RecommendRequest(user_id=_ext_user(parts), k=5), 2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_bind_to_their_own_host(fresh: Served) -> None:
    assert fresh.cfg.metrics_host == "127.0.0.1"
    srv, _ = fresh.handle._metrics_server
    assert srv.server_address[0] == "127.0.0.1"


def test_health_watchers_keep_hearing_after_one_leaves(fresh: Served) -> None:
    """Three health Watch streams; one is cancelled; a later status change still reaches
    the other two (grpc_health's aio servicer dropped the shared condition when any
    watcher left, so the rest never heard of NOT_SERVING)."""
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = health_pb2_grpc.HealthStub(fresh.channel)
    watches = [h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(3)]
    try:
        assert all(next(w).status == _serving() for w in watches)
        watches[0].cancel()
        # the server sees the cancellation: two watchers left
        assert wait_for(lambda: fresh.handle.health._watching.get("") == 2, timeout=10)
        fresh.handle.set_ready(False)
        with ThreadPoolExecutor(2) as pool:
            got = [pool.submit(next, w) for w in watches[1:]]
            statuses = [f.result(timeout=10).status for f in got]
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    finally:
        for w in watches:
            w.cancel()
