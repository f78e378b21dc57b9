"""Boundary validation names the field; history merging uses the training feature code."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from serving._generated.ecomrec.v1 import recommend_pb2 as pb

from ecomrec.errors import ConfigError, InvalidArgumentError, NotFoundError
from intake.dataset import IdMap
from intake.schema import EVENT_TYPE_IDS
from serving.config import ServeConfig, load_serve_config
from serving.history import History, merge, to_batch
from serving.validation import RecentEvent, RecommendQuery, validate_recommend
from towers.sequences import pad_batch

CFG = ServeConfig(max_k=50, max_recent_events=3)
USERS = IdMap(["u1", "u2"])
ITEMS = IdMap(["a", "b", "c"])
NOW = 1_700_000_000


def _v(**kw: Any) -> RecommendQuery:
    return validate_recommend(pb.RecommendRequest(**kw), CFG, USERS, ITEMS, now=NOW)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"k": 51}, "k"),
        ({"k": -3}, "k"),
        ({"user_id": "x" * 200}, "user_id"),
        ({"user_id": " u1"}, "user_id"),
        ({"request_id": "a\nb"}, "request_id"),
        ({"filters": pb.Filters(price_min=-1)}, "filters.price_min"),
        ({"filters": pb.Filters(price_max=float("nan"))}, "filters.price_max"),
        ({"filters": pb.Filters(price_min=3, price_max=2)}, "filters.price_min"),
        ({"filters": pb.Filters(categories=[""])}, "filters.categories[0]"),
        ({"recent_events": [pb.Event(item_id="a")] * 4}, "recent_events"),
        (
            {"recent_events": [pb.Event(item_id="a", event_type="click")]},
            "recent_events[0].event_type",
        ),
        ({"recent_events": [pb.Event(item_id="a", ts=NOW + 10 * 86400)]}, "recent_events[0].ts"),
        ({"exclude_item_ids": ["a", ""]}, "exclude_item_ids[1]"),
    ],
)
def test_invalid_requests_name_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        _v(**kw)
    assert e.value.field == field


def test_valid_request_to_dataclass() -> None:
    q = _v(
        user_id="u2",
        k=0,
        request_id="r",
        recent_events=[
            pb.Event(item_id="c", event_type="view", ts=NOW - 5),
            pb.Event(item_id="a", ts=NOW - 10),
        ],
        filters=pb.Filters(categories=["X", "X"], price_max=9.5, in_stock_only=True),
        exclude_item_ids=["b", "unknown"],
    )
    assert q.user == 2 and q.k == 10
    assert [e.item_id for e in q.recent] == [1, 3]  # time order
    assert q.recent[1].event_type == EVENT_TYPE_IDS["view"]
    assert (
        q.filters.categories == ("X",) and q.filters.price_max == 9.5 and q.filters.in_stock is True
    )
    assert q.exclude == (2,)
    assert _v(user_id="nobody").user is None  # unknown user: cold start, not an error


def test_unknown_event_item_is_not_found() -> None:
    with pytest.raises(NotFoundError, match=r"recent_events\[0\]"):
        _v(recent_events=[pb.Event(item_id="zzz")])


def test_merge_goes_through_pad_batch() -> None:
    stored = History(np.array([1, 2]), np.array([100, 200]), np.array([3, 3]))
    recent = (
        RecentEvent(3, EVENT_TYPE_IDS["view"], 150),
        RecentEvent(2, 3, 200),
    )  # the 2nd duplicates
    h = merge(stored, recent)
    assert h.items.tolist() == [1, 3, 2] and h.ts.tolist() == [100, 150, 200]
    b = to_batch([h], max_len=2)
    ref = pad_batch(
        [np.array([1, 3, 2])], 2, ts=[np.array([100, 150, 200])], event_types=[np.array([3, 1, 3])]
    )
    for name in ("items", "event_type", "gap", "lengths"):
        np.testing.assert_array_equal(getattr(b, name), getattr(ref, name))


def test_serve_config_from_toml(tmp_path, monkeypatch) -> None:
    p = tmp_path / "s.toml"
    p.write_text('[serve]\nport = 0\nencoder = "triton"\napi_keys = ["a"]\n')
    monkeypatch.setenv("ECOMREC_API_KEYS", "b, c")
    cfg = load_serve_config(p, max_k=7)
    assert cfg.encoder == "triton" and cfg.max_k == 7 and cfg.resolved_api_keys() == ("a", "b", "c")
    p.write_text("[serve]\nportt = 1\n")
    with pytest.raises(ConfigError, match="portt"):
        load_serve_config(p)
    with pytest.raises(ConfigError):
        ServeConfig(tls_cert="x")


def test_shipped_serve_config_loads() -> None:
    from pathlib import Path

    cfg = load_serve_config(
        Path(__file__).resolve().parents[2] / "configs" / "serving" / "serve.toml"
    )
    assert cfg.encoder in ("inprocess", "onnx", "triton") and cfg.api_keys == ()


def test_segments_from_marketing_export(tmp_path) -> None:
    """The `ecomrec segments export --raw-ids` layout -> internal ids, segments, centroids."""
    import polars as pl

    from serving.segments import TableSegmentLookup

    pl.DataFrame(
        {
            "customer_id": ["u2", "u1", "ghost"],
            "rfm_segment": ["Champions", "At Risk", "New"],
            "segment_id": [0, 1, 1],
            "segment_name": ["Budget beauty", None, None],
            "churn_probability": [0.1, 0.8, 0.5],
            "high_value_probability": [0.9, 0.2, 0.1],
            "recency_days": [3.0, 200.0, 1.0],
            "frequency": [12, 2, 1],
            "monetary": [300.0, 20.0, 5.0],
        }
    ).write_parquet(tmp_path / "customers.parquet")
    pl.DataFrame(
        {"segment_id": [0, 1], "name": ["Budget beauty", "B1"], "centroid": [[1.0, 0.0], [0.0, 1.0]],
         "top_categories": [["Nails"], ["Hair"]]}
    ).write_parquet(tmp_path / "segments.parquet")  # fmt: skip
    look = TableSegmentLookup.from_marketing_export(tmp_path, USERS)
    u2 = look.user(2)
    assert u2 is not None and u2.rfm == "Champions" and u2.behavioural == "Budget beauty"
    assert u2.churn_probability == 0.1 and u2.frequency == 12
    u1 = look.user(1)
    assert u1 is not None and u1.behavioural == "B1"
    assert look.table.height == 2  # the unknown customer is dropped
    info = look.info("Budget beauty")
    assert info.kind == "behavioural" and info.top_categories == ("Nails",)
    assert info.centroid is not None and info.centroid.tolist() == [1.0, 0.0]
    assert look.members("At Risk").tolist() == [1]
