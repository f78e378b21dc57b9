"""Engine-level behaviour: deadlines between stages, error mapping, pseudonymised access logs."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grpc
import pytest

from tests.serving.conftest import Served, wait_for


def test_deadline_checked_between_stages(served: Served, parts: Any) -> None:
    from serving import validation as val
    from serving.requests import DeadlineExceededError, RequestContext

    ext = parts.dataset.users.to_external(int(parts.history.users()[0]))
    q = val.validate_recommend(
        served.pb.RecommendRequest(user_id=ext, k=5),
        served.cfg,
        parts.dataset.users,
        parts.dataset.item_ids,
    )
    ctx = RequestContext(deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceededError, match="history"):
        served.engine.recommend(q, ctx)
    cancelled = RequestContext(deadline=time.monotonic() + 5, is_active=lambda: False)
    from serving.requests import CancelledError

    with pytest.raises(CancelledError):
        served.engine.recommend(q, cancelled)


def test_status_mapping_never_leaks_internals() -> None:
    from ecomrec.errors import IndexUnavailableError, InvalidArgumentError, NotFoundError
    from serving.requests import DeadlineExceededError, UnavailableError
    from serving.status import status_for

    assert status_for(InvalidArgumentError("k", "bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(NotFoundError("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(IndexUnavailableError("x"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(UnavailableError("x"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(DeadlineExceededError("x"))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    code, msg = status_for(RuntimeError("secret /etc/passwd"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in msg


def test_access_log_pseudonymises_user_ids(
    served: Served, parts: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from serving.observability import JsonFormatter, pseudonymise

    ext = parts.dataset.users.to_external(int(parts.history.users()[1]))
    with caplog.at_level(logging.INFO, logger="ecomrec.serving.access"):
        served.call("Recommend", served.pb.RecommendRequest(user_id=ext, k=3, request_id="req-42"))
    recs = [r for r in caplog.records if r.name == "ecomrec.serving.access"]
    assert recs
    line = json.loads(JsonFormatter().format(recs[-1]))
    assert line["request_id"] == "req-42" and line["code"] == "OK" and line["method"] == "Recommend"
    assert line["user"] == pseudonymise(ext, served.cfg.pseudonym_salt) and ext not in json.dumps(
        line
    )


class _SlowEncoder:
    """The real tower, 0.4 s slower: keeps requests in flight while the server stops."""

    def __init__(self, inner: Any) -> None:
        import threading

        self.inner = inner
        self.dim = inner.dim
        self.rows = 0  # users that entered encode()
        self._lock = threading.Lock()

    def encode(self, batch: Any) -> Any:
        with self._lock:
            self.rows += len(batch.lengths)
        time.sleep(0.4)
        return self.inner.encode(batch)


def test_graceful_stop_finishes_in_flight(parts: Any, index_dir: Any) -> None:
    """Requests already running when stop() is called complete; later ones are refused."""
    import threading

    from serving.encoders import TowerEncoder
    from tests.serving.conftest import make_engine, open_reader

    reader = open_reader(index_dir)
    engine = make_engine(parts, reader)
    engine.encoder = slow = _SlowEncoder(TowerEncoder(parts.model.model, parts.model.max_len))
    s = Served(engine)
    ext = parts.dataset.users.to_external(int(parts.history.users()[0]))
    s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))  # connected and warm
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5)))
        except grpc.RpcError as e:
            results.append(e.code())

    threads = [threading.Thread(target=call) for _ in range(4)]
    warm = slow.rows
    for t in threads:
        t.start()
    assert wait_for(lambda: slow.rows >= warm + 4, timeout=30)  # all four inside the encoder
    s.handle.stop(grace_s=5.0)
    for t in threads:
        t.join(10)
    assert len(results) == 4
    assert all(not isinstance(r, grpc.StatusCode) and len(r.items) == 5 for r in results), results
    with pytest.raises(grpc.RpcError) as e:
        s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5), timeout=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    s.channel.close()
    reader.close()
