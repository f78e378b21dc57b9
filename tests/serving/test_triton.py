"""Triton: export, a REAL Triton server (nvidia-pytriton in .venv-triton), parity and the service on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import Served, make_engine, open_reader

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def repo(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serving.triton import export_triton

    out = tmp_path_factory.mktemp("triton-repo")
    export_triton(run_dir, out, max_batch_size=32, instances=1)
    return out


@pytest.fixture(scope="module")
def triton(repo: Path) -> Iterator[Any]:
    from serving.triton import TritonProcess

    with TritonProcess(repo) as tp:
        yield tp


def test_repository_layout(repo: Path, parts: Any) -> None:
    import onnx

    mdir = repo / "user_tower"
    cfg = (mdir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg
    assert "max_batch_size: 32" in cfg and "dynamic_batching" in cfg and "KIND_CPU" in cfg
    assert f"dims: [ {parts.model.dim} ]" in cfg
    m = onnx.load(str(mdir / "1" / "model.onnx"))
    assert [i.name for i in m.graph.input] == ["items", "event_type", "gap", "lengths"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in m.graph.input)


def test_triton_matches_inprocess(triton: Any, parts: Any) -> None:
    """Every user of the shop: Triton vectors equal the in-process tower's within 1e-4."""
    from serving.encoders import TritonEncoder
    from serving.history import to_batch

    enc = TritonEncoder(triton.url, "user_tower", parts.model.max_len)
    local = parts.model.user_encoder()
    users = parts.history.users()[:96]
    for s in range(0, len(users), 32):
        batch = to_batch(
            [parts.history.get(int(u)) for u in users[s : s + 32]], parts.model.max_len
        )
        a = enc.encode(batch)
        b = local.encode(batch)
        assert a.shape == b.shape == (len(batch.lengths), parts.model.dim)
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert enc.dim == parts.model.dim
    enc.close()


def test_service_end_to_end_on_triton(
    triton: Any, parts: Any, index_dir: Path, segments: Any
) -> None:
    reader = open_reader(index_dir)
    s = Served(make_engine(parts, reader, segments, encoder="triton", triton_url=triton.url))
    try:
        inproc = Served(make_engine(parts, reader, segments))
        try:
            lens = parts.history.inter.lengths()
            for u in np.flatnonzero(lens >= 5)[:10]:
                ext = parts.dataset.users.to_external(int(u))
                req = s.pb.RecommendRequest(user_id=ext, k=10)
                a = s.call("Recommend", req)
                b = inproc.call("Recommend", req)
                assert not a.degraded, a.degraded_reasons
                assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
                np.testing.assert_allclose(
                    [i.relevance for i in a.items], [i.relevance for i in b.items], atol=1e-4
                )
        finally:
            inproc.close()
    finally:
        s.close()
        reader.close()


def test_triton_down_falls_back_to_inprocess(repo: Path, parts: Any, index_dir: Path) -> None:
    """Kill the Triton server mid-service: answers continue from the local tower, marked degraded."""
    from serving.triton import TritonProcess

    tp = TritonProcess(repo).start()
    reader = open_reader(index_dir)
    s = Served(
        make_engine(parts, reader, None, encoder="triton", triton_url=tp.url, triton_timeout_s=0.5)
    )
    try:
        ext = parts.dataset.users.to_external(int(parts.history.users()[0]))
        ok = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert not ok.degraded
        tp.stop()
        down = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5))
        assert down.degraded and list(down.degraded_reasons) == ["ENCODER_FALLBACK"]
        assert [i.item_id for i in down.items] == [i.item_id for i in ok.items]
    finally:
        tp.stop()
        s.close()
        reader.close()


def test_triton_start_failure_is_reported(tmp_path: Path) -> None:
    """A repository without the model: a clear ModelError naming the kept log, no process left."""
    from ecomrec.errors import ModelError
    from serving.triton import TritonProcess

    tp = TritonProcess(tmp_path, ready_timeout_s=60)
    with pytest.raises(ModelError, match=r"see .*\.log"):
        tp.start()
    assert tp.proc is None
    assert tp._log_path is not None and tp._log_path.exists()
    tp._log_path.unlink()
