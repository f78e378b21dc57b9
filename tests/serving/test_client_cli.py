"""The Python client, the CLI commands and int8 quantisation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import API_KEY, Served

pytestmark = pytest.mark.slow  # a trained model / a served process per module: seconds


def test_client_round_trip(served: Served, parts: Any) -> None:
    from serving.client import RecommendClient

    ext = parts.dataset.users.to_external(int(parts.history.users()[0]))
    with RecommendClient(served.handle.target, api_key=API_KEY, timeout_s=5.0, retries=2) as c:
        assert c.wait_ready(5)
        r = c.recommend(
            ext, 4, events=[(parts.catalog.external_ids[1], "view", 1_700_000_000)], price_max=1e6
        )
        assert len(r.items) == 4 and r.model_version == parts.model.model_version
        assert len(c.similar_items(parts.catalog.external_ids[2], 3).items) == 3
        assert c.user_profile(ext).user_id == ext
        assert c.list_segments().segments
        assert c.get_segment("Champions").segment_id == "Champions"
        assert c.find_audience(item_ids=[parts.catalog.external_ids[2]], k=3).members


def test_cli_recommend_prints_reasons(
    served: Served, parts: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.cli import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    ext = parts.dataset.users.to_external(int(parts.history.users()[0]))
    args = ap.parse_args(
        [
            "recommend",
            "--target",
            served.handle.target,
            "--user",
            ext,
            "-k",
            "3",
            "--api-key",
            API_KEY,
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert parts.model.model_version in out and out.count("RELEVANT") >= 1 and " 3. " in out


def test_cli_recommend_reports_rpc_errors(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.cli import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(
        ["recommend", "--target", served.handle.target, "-k", "3", "--api-key", "wrong"]
    )
    assert args.func(args) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_cli_export_triton(run_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from serving.export_cli import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(
        ["export", "triton", "--model", str(run_dir), "--out", str(tmp_path), "--instances", "2"]
    )
    assert args.func(args) == 0
    assert "count: 2 kind: KIND_CPU" in (tmp_path / "user_tower" / "config.pbtxt").read_text()
    # the ONNX graph equals the eager tower, also at another sequence length than exported
    from serving.history import History, to_batch
    from towers.inference import load_run

    tm = load_run(run_dir)
    sess = ort.InferenceSession(
        str(tmp_path / "user_tower" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    h = History(np.array([3, 4, 5, 6, 7]), np.arange(5) * 86400, np.full(5, 3))
    b = to_batch([h, History(np.array([9]), np.array([0]), np.array([1]))], tm.max_len)
    (got,) = sess.run(
        None, {"items": b.items, "event_type": b.event_type, "gap": b.gap, "lengths": b.lengths}
    )
    np.testing.assert_allclose(got, tm.user_encoder().encode(b), atol=1e-5)


def test_int8_quantised_tower_close_to_fp32(parts: Any) -> None:
    from serving.encoders import quantize_int8
    from serving.history import to_batch

    users = parts.history.users()[:64]
    b = to_batch([parts.history.get(int(u)) for u in users], parts.model.max_len)
    full = parts.model.user_encoder().encode(b)
    q = quantize_int8(parts.model).encode(b)
    cos = (full * q).sum(1)
    assert cos.min() > 0.98, cos.min()
    assert not np.allclose(full, q)  # it really is a different (quantised) network


def test_tls_round_trip(parts: Any, index_dir: Path, tmp_path: Path) -> None:
    """Optional TLS: a self-signed localhost certificate, the client trusting it."""
    import dataclasses
    import shutil
    import subprocess

    import grpc

    from serving.client import RecommendClient
    from serving.server import start_server
    from serving.service import RecommendServicer
    from tests.serving.conftest import make_engine, open_reader

    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make the test certificate"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    reader = open_reader(index_dir)
    engine = make_engine(parts, reader)
    engine.cfg = dataclasses.replace(
        engine.cfg, tls_cert=str(cert), tls_key=str(key), api_keys=(API_KEY,)
    )
    handle = start_server(engine.cfg, RecommendServicer(engine))
    handle.set_ready(True)
    try:
        ext = parts.dataset.users.to_external(int(parts.history.users()[0]))
        with RecommendClient(
            f"localhost:{handle.port}", api_key=API_KEY, tls_ca=cert, timeout_s=5
        ) as c:
            assert len(c.recommend(ext, 3).items) == 3
        with grpc.insecure_channel(f"localhost:{handle.port}") as ch:  # plaintext is refused
            from serving._generated.ecomrec.v1 import recommend_pb2 as pb
            from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

            with pytest.raises(grpc.RpcError) as e:
                pbg.RecommendServiceStub(ch).Recommend(
                    pb.RecommendRequest(k=3), metadata=(("x-api-key", API_KEY),), timeout=3
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop(0.5)
        reader.close()


def test_format_response_names_the_segment_or_says_there_is_none() -> None:
    """A customer in no segment: the header says so and popularity is "POPULAR" (over all
    customers), never "segment -" beside POPULAR_IN_SEGMENT."""
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving.client import format_response

    item = pb.ScoredItem(item_id="85123A", score=0.5, reasons=["POPULAR_IN_SEGMENT"])
    none = format_response(pb.RecommendResponse(items=[item], model_version="m1"))
    head, line = none.splitlines()
    assert head.startswith("segment none (popular = over all customers)  model m1")
    assert line.split()[3] == "POPULAR" and "segment -" not in none
    seg = format_response(pb.RecommendResponse(items=[item], segment="Champions"))
    assert seg.startswith("segment Champions") and "POPULAR_IN_SEGMENT" in seg


def test_formatted_answers_carry_the_recommendation_id_and_variant() -> None:
    """What `ecomrec recommend` / `basket` / `search` print names the answer's id and A/B
    variant, so a developer can send a click with that id by hand (docs/outcomes.md)."""
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving.client import format_products, format_response

    item = pb.ScoredItem(item_id="85123A", score=0.5, reasons=["COLLABORATIVE"])
    rec = format_response(
        pb.RecommendResponse(items=[item], recommendation_id="r-42", variant="treatment")
    ).splitlines()
    assert rec[1] == "recommendation_id r-42  variant treatment" and "85123A" in rec[2]
    prod = format_products(pb.SearchProductsResponse(items=[item], recommendation_id="r-7"))
    assert prod.splitlines()[1] == "recommendation_id r-7  variant default"
    # an answer without an id (an old server): no attribution line
    assert len(format_response(pb.RecommendResponse(items=[item])).splitlines()) == 2
