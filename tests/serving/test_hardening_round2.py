"""What an outside client found in the second round (issue 25), against a real gRPC server.

Cancelled RecommendBatch streams that kept their slot, keyless calls filling the RPC limit,
an unbounded FindAudience.segments, reflection starving batches, long values echoed into
status messages, a mismatched TLS pair reported as a busy port, a log line per garbage
call, a size-only check clearing real damage, a file path in an UNAVAILABLE message, and
health Watch streams holding up a graceful stop.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.serving.conftest import Served, build_index, make_engine, open_reader, wait_for
from tests.serving.test_hardening import _ext_user, _health, _serving, _Stream, _vector_file, damage


@pytest.fixture()
def fresh(parts: Any, index_dir: Path, segments: Any) -> Iterator[Served]:
    reader = open_reader(index_dir)
    s = Served(
        make_engine(parts, reader, segments, index_check_s=0, open_request_timeout_s=1.0),
        metrics_port=0,
    )
    yield s
    s.close()
    reader.close()


def _sample(s: Served, name: str, **labels: str) -> float:
    return s.handle.metrics.registry.get_sample_value(name, labels) or 0.0


def _batch(s: Served, parts: Any, n: int) -> Any:
    users = parts.history.users()
    reqs = [
        s.pb.RecommendRequest(
            user_id=parts.dataset.users.to_external(int(users[i % len(users)])), k=5
        )
        for i in range(n)
    ]
    return s.pb.RecommendBatchRequest(requests=reqs)


def _cancel_mid_stream(s: Served, req: Any) -> None:
    it = s.stub.RecommendBatch(req, metadata=s.md, timeout=30)
    first = next(it)  # the stream is open and answering
    assert first.index == 0
    it.cancel()


# -- 1. a cancelled RecommendBatch gives its slot back -------------------------------------
def test_cancelled_batches_free_their_slots(fresh: Served, parts: Any) -> None:
    big = _batch(fresh, parts, 1000)
    for _ in range(fresh.cfg.max_streams):  # before: every later batch RESOURCE_EXHAUSTED
        _cancel_mid_stream(fresh, big)
    small = _batch(fresh, parts, 20)
    got: list[Any] = []

    def third_batch() -> bool:  # the server frees the slots once it has seen the cancels
        try:
            got[:] = list(fresh.stub.RecommendBatch(small, metadata=fresh.md, timeout=30))
            return True
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return False

    assert wait_for(third_batch, 10)
    assert [i.index for i in got] == list(range(20)) and all(i.error_code == 0 for i in got)
    assert wait_for(
        lambda: (
            _sample(fresh, "ecomrec_requests_total", method="RecommendBatch", code="CANCELLED")
            == fresh.cfg.max_streams
        )
    )
    assert wait_for(lambda: fresh.handle.metrics.inflight.source()["batch_streams"] == 0)


# -- 2. callers without a key cannot stop keyed calls --------------------------------------
def _p99(s: Served, parts: Any, n: int = 150) -> float:
    ts = []
    for i in range(n):
        t = time.perf_counter()
        r = s.call("Recommend", s.pb.RecommendRequest(user_id=_ext_user(parts, i % 50), k=5), 10)
        ts.append(time.perf_counter() - t)
        assert len(r.items) == 5
    return float(np.percentile(ts, 99))


def test_keyless_flood_cannot_starve_keyed_calls(fresh: Served, parts: Any) -> None:
    """300 keyless calls held open (150 health Watch streams, 150 health Checks whose request
    never arrives): keyed Recommend stays OK within 2x its p99; the keyless ones beyond
    ``max_open_rpcs`` are refused and counted, the silent ones end after
    ``open_request_timeout_s``.  Before: every call RESOURCE_EXHAUSTED "Concurrent RPC
    limit exceeded!"."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    base = _p99(fresh, parts)
    flood = grpc.insecure_channel(fresh.handle.target)
    gate = threading.Event()
    h = health_pb2_grpc.HealthStub(flood)
    check_raw = flood.stream_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )

    def never() -> Iterator[Any]:  # the request message never comes
        gate.wait(60)
        yield from ()

    keyless = health_pb2_grpc.HealthStub(fresh.channel)

    def keyless_refused() -> bool:  # the flood has reached the server
        try:
            keyless.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return False
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    calls: list[Any] = []
    try:
        for _ in range(150):
            calls.append(h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60))
            calls.append(check_raw.future(never(), timeout=60))
        assert wait_for(keyless_refused, 20)
        flooded = _p99(fresh, parts)  # before: RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!"
        assert flooded <= 2 * base + 0.002, (base, flooded)
        limit = fresh.cfg.max_open_rpcs
        assert wait_for(
            lambda: (
                _sample(
                    fresh, "ecomrec_refused_total", method="health.Watch", reason="open_rpc_limit"
                )
                + _sample(
                    fresh, "ecomrec_refused_total", method="health.Check", reason="open_rpc_limit"
                )
                >= 300 - limit
            ),
            20,
        ), fresh.handle.metrics.inflight.source()
        assert 0 < fresh.handle.metrics.inflight.source()["open"] <= limit  # never above it
        # health with the key is a keyed call: answered even now
        keyed = health_pb2_grpc.HealthStub(fresh.channel)
        st = keyed.Check(health_pb2.HealthCheckRequest(service=""), metadata=fresh.md, timeout=5)
        assert st.status == _serving()
        # the silent Checks are ended after open_request_timeout_s and counted
        assert wait_for(
            lambda: (
                _sample(
                    fresh, "ecomrec_refused_total", method="health.Check", reason="request_timeout"
                )
                > 0
            ),
            10,
        )
    finally:
        gate.set()
        for c in calls:
            c.cancel()
        flood.close()
    assert wait_for(lambda: fresh.handle.metrics.inflight.source()["open"] == 0)
    assert _health(fresh.channel) == _serving()  # keyless health answers again


# -- 3. request-size limits before work --------------------------------------------------
def test_one_mib_find_audience_is_invalid_fast_with_flat_memory(fresh: Served, parts: Any) -> None:
    req = fresh.pb.FindAudienceRequest(
        item_ids=[parts.catalog.external_ids[2]], k=5, segments=["Champions"] * 90_000
    )
    assert 900_000 < req.ByteSize() < fresh.cfg.max_message_bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t = time.perf_counter()
    with pytest.raises(grpc.RpcError) as e:  # before: ~60 s and ~9 GB (418 MB per 4,000)
        fresh.call("FindAudience", req, 10)
    took = time.perf_counter() - t
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (e.value.details() or "").startswith("segments: at most 50")
    assert took < 1.0, took
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50_000  # < 50 MB
    # repeats within the limit are one segment: the answer equals the single-name one
    one = fresh.pb.FindAudienceRequest(
        item_ids=[parts.catalog.external_ids[2]], k=5, segments=["Champions"]
    )
    many = fresh.pb.FindAudienceRequest(
        item_ids=[parts.catalog.external_ids[2]], k=5, segments=["Champions"] * 50
    )
    a, b = fresh.call("FindAudience", one), fresh.call("FindAudience", many)
    assert [m.user_id for m in a.members] == [m.user_id for m in b.members] and a.members


# -- 4. reflection cannot starve batches -------------------------------------------------
def test_idle_reflection_streams_cannot_starve_batches(fresh: Served, parts: Any) -> None:
    n = fresh.cfg.max_reflection_streams + 2
    streams = [_Stream(fresh.channel, fresh.md) for _ in range(n)]
    try:
        # every batch slot is still free (before: RESOURCE_EXHAUSTED "too many open streams")
        for _ in range(fresh.cfg.max_streams):
            items = list(
                fresh.stub.RecommendBatch(_batch(fresh, parts, 5), metadata=fresh.md, timeout=30)
            )
            assert len(items) == 5 and all(i.error_code == 0 for i in items)
        codes = [st.code for st in streams]
        assert codes.count(grpc.StatusCode.OK) == fresh.cfg.max_reflection_streams
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
        assert (
            _sample(
                fresh, "ecomrec_refused_total", method="reflection", reason="reflection_streams"
            )
            == 2
        )
    finally:
        for st in streams:
            st.close()


# -- 5. smaller findings -------------------------------------------------------------------
@pytest.mark.parametrize("where", ["mode", "event_type", "kind"])
def test_long_invalid_values_are_quoted_short(fresh: Served, parts: Any, where: str) -> None:
    bad = "x" * 16_384
    pb = fresh.pb
    if where == "kind":
        method, req = "ListSegments", pb.ListSegmentsRequest(kind=bad)
    elif where == "mode":
        method, req = "Recommend", pb.RecommendRequest(user_id=_ext_user(parts), k=5, mode=bad)
    else:
        ev = pb.Event(item_id=parts.catalog.external_ids[1], event_type=bad)
        method, req = "Recommend", pb.RecommendRequest(k=5, recent_events=[ev])
    with pytest.raises(grpc.RpcError) as e:  # before: RESOURCE_EXHAUSTED (metadata size)
        fresh.call(method, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details() or ""
    assert where in details and "16384 characters" in details and len(details) < 200, details


def _openssl_pair(d: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make the test certificates"
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_mismatched_tls_pair_says_what_is_wrong(
    parts: Any, index_dir: Path, tmp_path: Path
) -> None:
    from ecomrec.errors import ConfigError
    from serving.server import start_server
    from serving.service import RecommendServicer

    key_a, _ = _openssl_pair(tmp_path, "a")
    _, cert_b = _openssl_pair(tmp_path, "b")
    reader = open_reader(index_dir)
    try:
        engine = make_engine(parts, reader)
        cfg = dataclasses.replace(engine.cfg, tls_cert=str(cert_b), tls_key=str(key_a))
        with pytest.raises(
            ConfigError
        ) as e:  # before: "the port is in use or the host is not local"
            start_server(cfg, RecommendServicer(engine))
        assert "does not belong to the certificate" in str(e.value) and "port" not in str(e.value)
        not_pem = tmp_path / "x.crt"
        not_pem.write_text("hello")
        cfg = dataclasses.replace(engine.cfg, tls_cert=str(not_pem), tls_key=str(key_a))
        with pytest.raises(ConfigError, match="not a usable unencrypted PEM"):
            start_server(cfg, RecommendServicer(engine))
    finally:
        reader.close()


def test_keyless_garbage_to_health_is_logged_rarely(
    fresh: Served, caplog: pytest.LogCaptureFixture
) -> None:
    call = fresh.channel.unary_unary("/grpc.health.v1.Health/Check")
    with caplog.at_level(logging.WARNING):
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as e:
                call(b"\xff\xff\xff\xff\x0f", timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    recs = [r for r in caplog.records if "not a valid protobuf" in r.getMessage()]
    assert len(recs) == 1, len(recs)  # before: 200 WARNING lines
    assert (
        _sample(fresh, "ecomrec_refused_total", method="health.Check", reason="bad_protobuf") == 200
    )


def test_size_only_check_does_not_clear_same_size_damage(
    parts: Any, segments: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A published file overwritten with bytes of the same size: found by the full check;
    the size-only checks after it must not call the version intact (before: the next
    check set ``ecomrec_index_published_ok`` back to 1 with no log line).  Restoring the
    bytes is confirmed by the checksums and logged."""
    from indexing.base import IndexConfig
    from indexing.build import open_index

    d = tmp_path / "idx"
    build_index(d, parts)
    reader = open_index(IndexConfig(location=str(d)), local_copy=str(tmp_path / "copy"))
    s = Served(make_engine(parts, reader, segments, index_check_s=0, index_full_check_every=10))
    try:
        vf = _vector_file(d)
        original = vf.read_bytes()
        damage(vf, "scramble")
        published_ok = "ecomrec_index_published_ok"
        reg = s.handle.metrics.registry
        assert s.handle.check_index()[1] is not None  # check 1: full hashes find it
        for _ in range(3):  # checks 2-4: sizes only
            assert s.handle.check_index()[1] is not None
            assert reg.get_sample_value(published_ok) == 0.0
        vf.write_bytes(original)
        with caplog.at_level(logging.INFO, logger="serving.index_health"):
            assert s.handle.check_index() == (None, None)
        assert reg.get_sample_value(published_ok) == 1.0
        assert any("match their checksums again" in r.getMessage() for r in caplog.records)
    finally:
        s.close()
        reader.close()


def test_unavailable_find_audience_names_no_file(parts: Any, segments: Any, tmp_path: Path) -> None:
    d = tmp_path / "secret-place" / "idx"
    d.mkdir(parents=True)
    reader = open_reader(d)  # no alias: the index cannot be searched
    s = Served(make_engine(parts, reader, segments, index_check_s=0))
    try:
        with pytest.raises(grpc.RpcError) as e:
            s.call(
                "FindAudience",
                s.pb.FindAudienceRequest(item_ids=[parts.catalog.external_ids[3]], k=3),
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        details = e.value.details() or ""
        assert "secret-place" not in details and str(tmp_path) not in details, details
        assert "index unavailable" in details
    finally:
        s.close()
        reader.close()


def test_open_watch_does_not_hold_the_stop(fresh: Served) -> None:
    """Watchers hear NOT_SERVING, then their streams end: the stop does not wait grace_s."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = health_pb2_grpc.HealthStub(fresh.channel)
    watches = [h.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(3)]
    assert all(next(w).status == _serving() for w in watches)
    t = time.perf_counter()
    fresh.handle.stop(grace_s=8.0)
    took = time.perf_counter() - t
    assert took < 4.0, took  # before: the whole grace period (8 s)
    for w in watches:
        rest = [m.status for m in w]  # the stream ends (no exception: status OK)
        assert rest[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, rest


# -- a real `ecomrec serve` process: cancels, SIGHUP, SIGTERM, a typo'd --index -----------
@pytest.fixture(scope="module")
def shop_dir(serve_shop: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shop")
    serve_shop.save(d)
    return d


@pytest.mark.slow
def test_serve_process_survives_cancels_and_sighup_and_exits_on_sigterm(
    run_dir: Path, shop_dir: Path, parts: Any, tmp_path: Path
) -> None:
    import signal

    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

    from tests.serving.conftest import API_KEY
    from tests.serving.test_serve_process import Proc

    d = tmp_path / "idx"
    build_index(d, parts)
    copies = tmp_path / "copies"
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        "[serve]\nport = 0\nindex_check_s = 0\nshutdown_delay_s = 0.5\ngrace_s = 2.0\n"
        f'index_copy_dir = "{copies}"\n'
    )
    proc = Proc(
        [
            "--model",
            str(run_dir),
            "--dataset",
            str(shop_dir),
            "--index",
            str(d),
            "--config",
            str(cfg),
        ]
    )
    try:
        port = proc.wait_for(r"listening on [\d.]+:(\d+)").group(1)
        proc.wait_for(r"serving \S+ \(index")
        md = (("x-api-key", API_KEY),)
        users = [parts.dataset.users.to_external(int(u)) for u in parts.history.users()[:50]]
        big = pb.RecommendBatchRequest(
            requests=[pb.RecommendRequest(user_id=users[i % 50], k=5) for i in range(1000)]
        )
        small = pb.RecommendBatchRequest(
            requests=[pb.RecommendRequest(user_id=u, k=5) for u in users[:10]]
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.RecommendServiceStub(ch)
            for _ in range(2):  # cancel mid-stream twice
                it = stub.RecommendBatch(big, metadata=md, timeout=30)
                assert next(it).index == 0
                it.cancel()
            got: list[Any] = []

            def third() -> bool:
                try:
                    got[:] = list(stub.RecommendBatch(small, metadata=md, timeout=30))
                    return True
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    return False

            assert wait_for(third, 10)  # before: RESOURCE_EXHAUSTED until a restart
            assert [i.index for i in got] == list(range(10))
            # SIGHUP: logged and ignored (before: the process died, rc 129)
            proc.p.send_signal(signal.SIGHUP)
            proc.wait_for(r"SIGHUP ignored", 10)
            assert proc.p.poll() is None
            assert (
                len(
                    stub.Recommend(
                        pb.RecommendRequest(user_id=users[0], k=5), metadata=md, timeout=5
                    ).items
                )
                == 5
            )
            # one more cancelled batch in flight at SIGTERM must not hold the exit
            it = stub.RecommendBatch(big, metadata=md, timeout=30)
            assert next(it).index == 0
            it.cancel()
        t = time.monotonic()
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(20) == 0  # before: the port closed, the process never exited
        assert time.monotonic() - t < 0.5 + 2.0 + 5.0
        assert "Traceback" not in proc.text
        assert not any(copies.iterdir()), "private index copy left behind"
    finally:
        proc.kill()


@pytest.mark.slow
def test_serve_refuses_an_index_folder_that_is_not_one(
    run_dir: Path, shop_dir: Path, tmp_path: Path
) -> None:
    from tests.serving.test_serve_process import Proc

    typo = tmp_path / "idnex"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    base = ["--model", str(run_dir), "--dataset", str(shop_dir), "--port", "0"]
    missing = Proc([*base, "--index", str(typo)])
    wrong = Proc([*base, "--index", str(other)])
    try:
        assert missing.p.wait(120) == 2 and wrong.p.wait(120) == 2
    finally:
        missing.kill()
        wrong.kill()
    assert re.search(
        rf"ecomrec: error: serve: index {re.escape(str(typo))} does not exist", missing.text
    )
    assert re.search(rf"serve: index {re.escape(str(other))} is not an index", wrong.text)
    assert "Traceback" not in missing.text + wrong.text
    assert not typo.exists()  # before: aliases/ and versions/ created there
    assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]
