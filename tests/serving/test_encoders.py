"""In-process encoders: micro-batching and the eval-once tower equal the towers' own encoder."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


def test_tower_encoder_equals_user_encoder(parts: Any) -> None:
    from serving.encoders import TowerEncoder
    from serving.history import to_batch

    users = parts.history.users()[:50]
    b = to_batch([parts.history.get(int(u)) for u in users], parts.model.max_len)
    np.testing.assert_allclose(
        TowerEncoder(parts.model.model, parts.model.max_len).encode(b),
        parts.model.user_encoder().encode(b),
        atol=1e-6,
    )


def test_micro_batching_merges_and_matches(parts: Any) -> None:
    from serving.encoders import MicroBatchingEncoder, TowerEncoder
    from serving.history import to_batch

    tower = TowerEncoder(parts.model.model, parts.model.max_len)
    mb = MicroBatchingEncoder(tower, max_batch=8, max_wait_s=0.02)
    users = parts.history.users()[:32]
    singles = [to_batch([parts.history.get(int(u))], parts.model.max_len) for u in users]
    want = [tower.encode(b)[0] for b in singles]
    got: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        got[i] = mb.encode(singles[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(singles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    mb.close()
    assert len(got) == len(singles)
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[i], w, atol=1e-5)
    assert mb.requests == len(singles) and mb.batches < len(singles), (mb.batches, mb.requests)


def test_micro_batching_propagates_errors() -> None:
    import pytest

    from serving.encoders import MicroBatchingEncoder
    from towers.sequences import pad_batch

    class Broken:
        dim = 4

        def encode(self, batch: Any) -> Any:
            raise RuntimeError("tower failed")

    mb = MicroBatchingEncoder(Broken(), max_batch=4, max_wait_s=0.001)
    with pytest.raises(RuntimeError, match="tower failed"):
        mb.encode(pad_batch([np.array([1, 2])], 5))
    mb.close()


def test_onnx_encoder_matches_tower(parts: Any, run_dir: Any) -> None:
    from serving.encoders import OnnxEncoder
    from serving.history import History, to_batch

    enc = OnnxEncoder.from_run(str(run_dir), parts.model.dim)
    users = parts.history.users()[:40]
    hs = [parts.history.get(int(u)) for u in users] + [History.empty()]
    b = to_batch(hs, parts.model.max_len)
    got = enc.encode(b)
    want = parts.model.user_encoder().encode(b)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not got[-1].any()  # empty history -> zero vector, like the torch encoder


def test_service_on_onnx_encoder(parts: Any, index_dir: Any) -> None:
    from tests.serving.conftest import Served, make_engine, open_reader

    reader = open_reader(index_dir)
    a = Served(make_engine(parts, reader, encoder="onnx"))
    b = Served(make_engine(parts, reader))
    try:
        for u in parts.history.users()[:5]:
            req = a.pb.RecommendRequest(user_id=parts.dataset.users.to_external(int(u)), k=8)
            ra, rb = a.call("Recommend", req), b.call("Recommend", req)
            assert [i.item_id for i in ra.items] == [
                i.item_id for i in rb.items
            ] and not ra.degraded
    finally:
        a.close()
        b.close()
        reader.close()
