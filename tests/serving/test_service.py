"""The Recommend service end to end: real gRPC server, real trained tower, real embedded Qdrant."""

from __future__ import annotations

import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest

from tests.serving.conftest import API_KEY, Served


def _user_with_history(parts: Any, min_len: int = 6) -> tuple[str, int]:
    lens = parts.history.inter.lengths()
    u = int(np.flatnonzero(lens >= min_len)[0])
    return parts.dataset.users.to_external(u), u


def test_health_serving_and_reflection(served: Served) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    h = health_pb2_grpc.HealthStub(served.channel)
    # no API key needed for health
    r = h.Check(health_pb2.HealthCheckRequest(service="ecomrec.v1.RecommendService"), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    resp = next(
        iter(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                timeout=5,
                metadata=served.md,
            )
        )
    )
    names = {s.name for s in resp.list_services_response.service}
    assert "ecomrec.v1.RecommendService" in names
    # reflection needs the API key (issue 14: keyless streams must not hold workers)
    with pytest.raises(grpc.RpcError) as e:
        next(
            iter(
                refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            )
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_not_serving_until_loaded(parts: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.config import ServeConfig
    from serving.server import start_server
    from serving.service import RecommendServicer

    cfg = ServeConfig(port=0, api_keys=("k",))
    servicer = RecommendServicer(None, cfg)
    handle = start_server(cfg, servicer)
    try:
        with grpc.insecure_channel(handle.target) as ch:
            h = health_pb2_grpc.HealthStub(ch)
            st = h.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert st == health_pb2.HealthCheckResponse.NOT_SERVING
            from serving._generated.ecomrec.v1 import recommend_pb2 as pb
            from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

            with pytest.raises(grpc.RpcError) as e:
                pbg.RecommendServiceStub(ch).Recommend(
                    pb.RecommendRequest(k=3), metadata=(("x-api-key", "k"),), timeout=5
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop(0.1)


@pytest.mark.parametrize("md", [(), (("x-api-key", "wrong"),), (("authorization", "Bearer nope"),)])
def test_unauthenticated_rejected(served: Served, md: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Recommend(served.pb.RecommendRequest(k=3), metadata=md, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bearer_token_accepted(served: Served) -> None:
    r = served.stub.Recommend(
        served.pb.RecommendRequest(k=3),
        metadata=(("authorization", f"Bearer {API_KEY}"),),
        timeout=5,
    )
    assert len(r.items) == 3


def test_recommend_known_user(served: Served, parts: Any) -> None:
    ext, u = _user_with_history(parts)
    r = served.call("Recommend", served.pb.RecommendRequest(user_id=ext, k=10, request_id="r-1"))
    assert r.request_id == "r-1"
    assert len(r.items) == 10
    assert r.model_version == parts.model.model_version
    assert r.index_version.startswith("items_v")
    assert not r.degraded
    ids = [i.item_id for i in r.items]
    assert len(set(ids)) == 10
    bought = {parts.dataset.item_ids.to_external(int(i)) for i in parts.history.get(u).purchased()}
    assert not bought & set(ids), "already-bought items must be excluded by default"
    assert all(i.reasons for i in r.items)
    # the segment comes from the RFM table
    assert r.segment == parts_segment(served, u)


def parts_segment(served: Served, u: int) -> str:
    s = served.engine.segments.user(u)
    return (s.rfm or "") if s else ""


def test_recommend_matches_exact_ranking_without_rerank(served: Served, parts: Any) -> None:
    """skip_rerank: the ANN order equals the exact cosine ranking of the same user vector."""
    from serving.history import to_batch

    ext, u = _user_with_history(parts)
    r = served.call("Recommend", served.pb.RecommendRequest(user_id=ext, k=5, skip_rerank=True))
    h = parts.history.get(u)
    vec = parts.model.user_encoder().encode(to_batch([h], parts.model.max_len))[0]
    scores = parts.model.item_vectors() @ vec
    scores[0] = -np.inf
    scores[h.purchased()] = -np.inf
    want = [parts.dataset.item_ids.to_external(int(i)) for i in np.argsort(-scores)[:5]]
    assert [i.item_id for i in r.items] == want
    np.testing.assert_allclose([i.relevance for i in r.items], np.sort(scores)[::-1][:5], atol=1e-4)


def test_include_purchased_and_exclusions(served: Served, parts: Any) -> None:
    ext, u = _user_with_history(parts)
    base = served.call("Recommend", served.pb.RecommendRequest(user_id=ext, k=5, skip_rerank=True))
    drop = [base.items[0].item_id, base.items[2].item_id]
    r = served.call(
        "Recommend",
        served.pb.RecommendRequest(user_id=ext, k=5, exclude_item_ids=drop, skip_rerank=True),
    )
    assert not set(drop) & {i.item_id for i in r.items}
    assert r.items[0].item_id == base.items[1].item_id
    inc = served.call(
        "Recommend", served.pb.RecommendRequest(user_id=ext, k=50, include_purchased=True)
    )
    bought = {parts.dataset.item_ids.to_external(int(i)) for i in parts.history.get(u).purchased()}
    assert bought & {i.item_id for i in inc.items}


def test_filters_honoured(served: Served, parts: Any) -> None:
    ext, _ = _user_with_history(parts)
    cat = parts.catalog.categories[1]
    f = served.pb.Filters(categories=[cat], price_min=5.0, price_max=60.0)
    r = served.call("Recommend", served.pb.RecommendRequest(user_id=ext, k=5, filters=f))
    assert r.items
    for it in r.items:
        assert it.category == cat
        assert 5.0 <= it.price <= 60.0


def test_recent_events_change_the_answer(served: Served, parts: Any) -> None:
    """An anonymous shopper with session events gets recommendations near those items."""
    cat = parts.catalog.categories[3]
    same = [i for i in range(1, parts.catalog.n_items + 1) if parts.catalog.categories[i] == cat][
        :6
    ]
    ev = [
        served.pb.Event(
            item_id=parts.catalog.external_ids[i], event_type="view", ts=1_700_000_000 + n
        )
        for n, i in enumerate(same)
    ]
    r = served.call(
        "Recommend", served.pb.RecommendRequest(recent_events=ev, k=10, skip_rerank=True)
    )
    assert len(r.items) == 10 and not r.degraded
    cold = served.call("Recommend", served.pb.RecommendRequest(k=10))
    assert [i.item_id for i in r.items] != [i.item_id for i in cold.items]
    assert cold.segment == "cold_start"
    assert all("POPULAR_IN_SEGMENT" in i.reasons for i in cold.items)


def test_similar_items(served: Served, parts: Any) -> None:
    ext = parts.catalog.external_ids[5]
    r = served.call("SimilarItems", served.pb.SimilarItemsRequest(item_id=ext, k=5))
    assert len(r.items) == 5 and ext not in {i.item_id for i in r.items}
    v = parts.model.item_vectors()
    s = v @ v[5]
    s[[0, 5]] = -np.inf
    assert r.items[0].item_id == parts.catalog.external_ids[int(np.argmax(s))]


def test_profiles_and_segments(served: Served, parts: Any) -> None:
    ext, u = _user_with_history(parts)
    p = served.call("GetUserProfile", served.pb.GetUserProfileRequest(user_id=ext))
    seg = served.engine.segments.user(u)
    assert p.rfm_segment == seg.rfm and p.n_events == len(parts.history.get(u))
    assert p.churn_probability == -1.0  # no churn model in this table
    segs = served.call("ListSegments", served.pb.ListSegmentsRequest(kind="rfm")).segments
    assert sum(s.size for s in segs) == served.engine.segments.table.height
    g = served.call(
        "GetSegment", served.pb.GetSegmentRequest(segment_id="Champions", include_centroid=True)
    )
    assert g.kind == "rfm" and list(g.centroid) == [0.5] * 4 and "mean_frequency" in g.profile
    with pytest.raises(grpc.RpcError) as e:
        served.call("GetSegment", served.pb.GetSegmentRequest(segment_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        served.call("GetUserProfile", served.pb.GetUserProfileRequest(user_id="no-such-user"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_find_audience_by_items(served: Served, parts: Any) -> None:
    ext = parts.catalog.external_ids[7]
    r = served.call(
        "FindAudience", served.pb.FindAudienceRequest(item_ids=[ext], k=5, segments=["Champions"])
    )
    assert 0 < len(r.members) <= 5
    assert all(m.segment == "Champions" for m in r.members)
    scores = [m.score for m in r.members]
    assert scores == sorted(scores, reverse=True)


def test_invalid_arguments_name_the_field(served: Served) -> None:
    cases = [
        (served.pb.RecommendRequest(k=-1), "k"),
        (served.pb.RecommendRequest(k=100000), "k"),
        (
            served.pb.RecommendRequest(k=3, filters=served.pb.Filters(price_min=5, price_max=1)),
            "filters.price_min",
        ),
        (
            served.pb.RecommendRequest(
                k=3, recent_events=[served.pb.Event(item_id="SKU00001", event_type="teleport")]
            ),
            "recent_events[0].event_type",
        ),
    ]
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            served.call("Recommend", req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field)
    with pytest.raises(grpc.RpcError) as e:
        served.call(
            "Recommend", served.pb.RecommendRequest(recent_events=[served.pb.Event(item_id="nope")])
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_message_size_limit(served: Served) -> None:
    big = served.pb.RecommendRequest(exclude_item_ids=["x" * 100] * 20000)
    with pytest.raises(grpc.RpcError) as e:
        served.call("Recommend", big)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_exceeded_is_reported(served: Served, parts: Any) -> None:
    ext, _ = _user_with_history(parts)
    with pytest.raises(grpc.RpcError) as e:
        served.call("Recommend", served.pb.RecommendRequest(user_id=ext, k=5), timeout=0.0001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_metrics_and_stage_trailers(served: Served, parts: Any) -> None:
    ext, _ = _user_with_history(parts)
    _, call = served.stub.Recommend.with_call(
        served.pb.RecommendRequest(user_id=ext, k=5), metadata=served.md, timeout=5
    )
    stages = dict(md for md in call.trailing_metadata())["ecomrec-stages"]
    assert {"history", "encode", "ann", "rerank"} <= {kv.split("=")[0] for kv in stages.split(",")}
    port = served.handle.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'ecomrec_requests_total{code="OK",method="Recommend"}' in text
    assert 'ecomrec_stage_seconds_bucket{le="0.001",stage="encode"}' in text
    assert "ecomrec_versions_info" in text and parts.model.model_version in text
