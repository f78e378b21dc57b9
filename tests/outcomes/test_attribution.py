"""The attribution rule on hand-made sequences: the id wins over the window, last touch,
window edges per type, the clock tolerance, each event at most once."""

from __future__ import annotations

from intake.live_log import LiveEvent
from outcomes.attribution import AttributionIndex, AttributionRule, attribute
from outcomes.served_log import Served

T0 = 1_790_000_000
DAY = 86400


def served(
    rid: str, ts: float, customer: str, items: tuple[str, ...], variant: str = "A"
) -> Served:
    return Served(rid, ts, customer, variant, "m1", "Recommend", items)


def ev(
    customer: str,
    product: str,
    et: str,
    ts: int,
    rec: str | None = None,
    price: float | None = None,
) -> LiveEvent:
    return LiveEvent(customer, product, et, ts, 1, price, None, None, rec)


ANSWERS = [
    served("ra", T0, "alice", ("p1", "p2")),
    served("rb", T0 + 100, "alice", ("p1", "p3")),
    served("rc", T0 + 50, "bob", ("p1",)),
]


def _match(e: LiveEvent, answers: list[Served] = ANSWERS) -> tuple[str, str] | None:
    idx = AttributionIndex()
    idx.add(answers)
    a = idx.match(e)
    return None if a is None else (a.served.recommendation_id, a.how)


def test_the_id_wins_over_the_window_and_the_window_is_last_touch() -> None:
    # both of alice's answers held p1; without an id the later one takes it
    assert _match(ev("alice", "p1", "click", T0 + 200)) == ("rb", "window")
    # with the id of the earlier one, the earlier one
    assert _match(ev("alice", "p1", "click", T0 + 200, rec="ra")) == ("ra", "id")
    # an id names its answer whatever the product (the shop asserted it)
    assert _match(ev("alice", "p9", "purchase", T0 + 200, rec="ra")) == ("ra", "id")
    # an id of another customer's answer still wins (a logged-out session that logged in)
    assert _match(ev("alice", "p1", "click", T0 + 200, rec="rc")) == ("rc", "id")


def test_the_window_needs_the_same_customer_and_a_recommended_product() -> None:
    assert _match(ev("alice", "p3", "cart", T0 + 200)) == ("rb", "window")
    assert _match(ev("alice", "p2", "cart", T0 + 200)) == ("ra", "window")  # only ra held p2
    assert _match(ev("alice", "p7", "cart", T0 + 200)) is None  # never recommended
    assert _match(ev("carol", "p1", "click", T0 + 200)) is None  # not carol's answer
    assert _match(ev("bob", "p1", "click", T0 + 200)) == ("rc", "window")


def test_unknown_or_expired_id_falls_back_to_the_window() -> None:
    assert _match(ev("alice", "p1", "click", T0 + 200, rec="r-nope")) == ("rb", "window")
    # ra's id, but two days later: outside the click window (24 h) -> no answer at all
    assert _match(ev("alice", "p1", "click", T0 + 2 * DAY, rec="ra")) is None


def test_window_edges_per_type() -> None:
    one = [served("r1", T0, "dan", ("p1",))]
    for et, w in (("impression", DAY), ("click", DAY), ("cart", DAY), ("purchase", 7 * DAY)):
        assert _match(ev("dan", "p1", et, T0 + w), one) == ("r1", "window"), et
        assert _match(ev("dan", "p1", et, T0 + w + 1), one) is None, et
        assert _match(ev("dan", "p1", et, T0 + w, rec="r1"), one) == ("r1", "id"), et
        assert _match(ev("dan", "p1", et, T0 + w + 1, rec="r1"), one) is None, et
    # views and returns are never attributed
    assert _match(ev("dan", "p1", "view", T0 + 10), one) is None
    assert _match(ev("dan", "p1", "return", T0 + 10, rec="r1"), one) is None


def test_clock_tolerance_before_the_answer() -> None:
    one = [served("r1", T0 + 0.7, "dan", ("p1",))]  # whole-second event times truncate
    rule = AttributionRule()
    assert _match(ev("dan", "p1", "click", T0), one) == ("r1", "window")
    assert _match(ev("dan", "p1", "click", T0 - rule.clock_skew_s + 1), one) == ("r1", "window")
    assert _match(ev("dan", "p1", "click", T0 - rule.clock_skew_s - 1), one) is None
    assert _match(ev("dan", "p1", "click", T0 - rule.clock_skew_s - 1, rec="r1"), one) is None


def test_each_event_is_attributed_at_most_once() -> None:
    answers = [served(f"r{i}", T0 + i, "eve", ("p1", "p2")) for i in range(5)]
    events = [ev("eve", "p1", "click", T0 + 10), ev("eve", "p2", "purchase", T0 + 20, price=5.0)]
    events += [ev("eve", "p1", "view", T0 + 30), ev("zed", "p1", "click", T0 + 30)]
    events += [ev("eve", "p1", "click", T0 + 40, rec="r-unknown")]
    got, stats = attribute(answers, events)
    assert [(a.served.recommendation_id, a.how) for a in got] == [
        ("r4", "window"),
        ("r4", "window"),
        ("r4", "window"),
    ]
    assert stats == {
        "events": 4,  # the view is not an attributed type
        "by_id": 0,
        "by_window": 3,
        "unattributed": 1,  # zed's click
        "unknown_ids": 1,
    }


def test_a_bounded_index_forgets_its_oldest_answers() -> None:
    idx = AttributionIndex(max_answers=2)
    idx.add([served(f"r{i}", T0 + i, "fay", (f"p{i}",)) for i in range(3)])
    assert len(idx) == 2
    assert idx.match(ev("fay", "p0", "click", T0 + 10)) is None  # evicted
    assert idx.match(ev("fay", "p2", "click", T0 + 10)) is not None
    idx.forget("fay")
    assert len(idx) == 0 and idx.match(ev("fay", "p2", "click", T0 + 10)) is None
