"""``ecomrec serve --follow-refresh STATE``: the service process picks up a promotion made
by ``ecomrec refresh`` without a restart and without a failed request."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tests.lifecycle.conftest import Shop, index_cfg, quick_config
from tests.serving.conftest import API_KEY
from tests.serving.test_serve_process import Proc


@pytest.mark.slow
def test_serve_process_follows_refresh_promotions(
    shop: Shop, live_run: Path, tmp_path: Path
) -> None:
    from lifecycle.refresh import refresh
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg
    from serving.triton import free_port

    cfg = quick_config(tolerance=1.0, churn_tolerance=1.0)
    index = tmp_path / "index"
    first = refresh(live_run, shop.mid, index, config=cfg, index_cfg=index_cfg(), since=shop.t1)
    r1 = first.record
    assert r1 is not None and r1.dataset
    port = free_port()
    proc = Proc(
        [
            "--model",
            str(r1.run),
            "--dataset",
            str(r1.dataset),
            "--index",
            str(index),
            "--follow-refresh",
            str(tmp_path / "index.refresh"),
            "--follow-interval",
            "0.2",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ]
    )
    users = shop.mid.users.external_ids[:20]
    try:
        proc.wait_for(r"serving \S+ \(index ", timeout=180)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.RecommendServiceStub(ch)

            def ask(user: str) -> pb.RecommendResponse:
                return stub.Recommend(
                    pb.RecommendRequest(user_id=user, k=5),
                    metadata=(("x-api-key", API_KEY),),
                    timeout=10,
                )

            first_answer = ask(users[0])
            assert (first_answer.model_version, first_answer.index_version) == (
                r1.model_version,
                r1.index_version,
            )
            second = refresh(live_run, shop.full, index, config=cfg, index_cfg=index_cfg())
            r2 = second.record
            assert second.decision == "promoted" and r2 is not None
            seen: set[tuple[str, str]] = set()
            deadline = time.monotonic() + 120
            i = 0
            while time.monotonic() < deadline:
                r = ask(users[i % len(users)])  # any failed request raises here
                i += 1
                assert not r.degraded
                seen.add((r.model_version, r.index_version))
                if (r.model_version, r.index_version) == (r2.model_version, r2.index_version):
                    break
            # every answer came from one consistent deployment; the new one was reached
            assert (r2.model_version, r2.index_version) in seen, (seen, proc.text[-2000:])
            assert seen <= {
                (r1.model_version, r1.index_version),
                (r2.model_version, r2.index_version),
            }
        assert proc.p.poll() is None  # no restart
    finally:
        proc.kill()
