"""A/B assignment across real ``ecomrec serve`` processes: two servers (replicas) and a
restarted one give each of 1,000 customers the same variant; the file's new shares reach a
running process without a restart (serve.experiment, SIGHUP-free polling)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from outcomes.experiment import Experiment, Variant, write_experiment
from tests.serving.conftest import API_KEY, build_index
from tests.serving.test_serve_process import Proc

pytestmark = pytest.mark.slow  # three server processes (~30-60 s)


def _variants(target: str, customers: list[str]) -> list[str]:
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

    with grpc.insecure_channel(target) as ch:
        stub = pbg.RecommendServiceStub(ch)
        req = pb.RecommendBatchRequest(
            requests=[pb.RecommendRequest(user_id=c, k=3) for c in customers]
        )
        got = list(stub.RecommendBatch(req, metadata=(("x-api-key", API_KEY),), timeout=120))
    assert all(g.error_code == 0 for g in got), [g.error_message for g in got][:3]
    return [g.response.variant for g in got]


def _start(run_dir: Path, dataset: Path, index: Path, cfg: Path) -> tuple[Proc, str]:
    p = Proc(
        ["--model", str(run_dir), "--dataset", str(dataset), "--index", str(index),
         "--config", str(cfg)]
    )  # fmt: skip
    port = p.wait_for(r"listening on [\d.]+:(\d+)").group(1)
    p.wait_for(r"serving \S+ \(index ")
    return p, f"127.0.0.1:{port}"


def test_replicas_and_a_restart_assign_the_same_variants(
    run_dir: Path, parts: Any, serve_shop: Any, tmp_path: Path
) -> None:
    dataset = tmp_path / "shop"
    serve_shop.save(dataset)
    index = tmp_path / "idx"
    v_a = build_index(index, parts)
    build_index(index, parts)
    exp_file = tmp_path / "experiment.json"
    exp = Experiment(
        "replicas",
        (Variant("control", 0.5), Variant("cand", 0.5, run=str(run_dir), index_version=v_a)),
    )
    write_experiment(exp_file, exp)
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        f'[serve]\nport = 0\nexperiment = "{exp_file}"\nexperiment_poll_s = 0.2\n'
        "complements = false\nproduct_search = false\nindex_local_copy = false\n"
    )
    known = list(serve_shop.users.external_ids)[:300]
    customers = known + [f"new-{i}" for i in range(1000 - len(known))]  # cold starts too
    want = [exp.assign(c).name for c in customers]
    assert 400 < want.count("cand") < 600
    p1, t1 = _start(run_dir, dataset, index, cfg)
    p2, t2 = _start(run_dir, dataset, index, cfg)
    try:
        assert _variants(t1, customers) == want
        assert _variants(t2, customers) == want
        p1.p.terminate()
        assert p1.p.wait(30) == 0
        p3, t3 = _start(run_dir, dataset, index, cfg)  # the restart
        try:
            assert _variants(t3, customers) == want
            # 50/50 -> 100/0 while running: no restart, everyone on the control
            write_experiment(
                exp_file,
                Experiment(
                    "replicas",
                    (
                        Variant("control", 1.0),
                        Variant("cand", 0.0, run=str(run_dir), index_version=v_a),
                    ),
                ),
            )
            end = time.monotonic() + 20
            while set(_variants(t3, customers[:50])) != {"control"}:
                assert time.monotonic() < end, "new shares not applied"
                time.sleep(0.2)
            assert set(_variants(t3, customers)) == {"control"}
            assert "Traceback" not in p3.text
        finally:
            p3.kill()
        assert "Traceback" not in p1.text + p2.text
    finally:
        p1.kill()
        p2.kill()
