"""A/B tests over a real gRPC server: customers routed to their variant's engine by the
stable hash, the variant in every answer, shares changed and the test ended without a
restart (serving.variants, outcomes.experiment)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outcomes.experiment import Experiment, Variant, load_experiment, write_experiment
from tests.serving.conftest import Served, build_index, make_engine, open_reader, wait_for

pytestmark = pytest.mark.slow  # two index versions, a second engine, a running switch (~20 s)


@pytest.fixture(scope="module")
def ab(parts: Any, serve_shop: Any, run_dir: Path, tmp_path_factory: Any) -> Iterator[Any]:
    """A server whose own engine follows the alias (version B), an experiment file whose
    candidate is the same run pinned to version A: answers tell the variants apart."""
    from indexing.base import IndexConfig
    from serving.variants import VariantRouter, variant_factory

    d = tmp_path_factory.mktemp("ab_index")
    v_a = build_index(d, parts)
    v_b = build_index(d, parts)
    reader = open_reader(d)
    served = Served(make_engine(parts, reader))
    path = tmp_path_factory.mktemp("ab") / "experiment.json"
    exp = Experiment(
        "ab-test",
        (Variant("control", 0.5), Variant("candidate", 0.5, run=str(run_dir), index_version=v_a)),
    )
    write_experiment(path, exp)
    factory = variant_factory(
        served.cfg, dataset=serve_shop, index_cfg=IndexConfig(location=str(d))
    )
    router = VariantRouter(path, factory)
    assert router.reload()
    served.servicer.router = router

    class AB:
        pass

    ab = AB()
    ab.served, ab.router, ab.path, ab.exp, ab.v_a, ab.v_b = served, router, path, exp, v_a, v_b
    ab.users = list(serve_shop.users.external_ids[1:201])
    yield ab
    router.stop()
    served.close()
    reader.close()


def _rec(s: Served, user: str, **kw: Any) -> Any:
    return s.call("Recommend", s.pb.RecommendRequest(user_id=user, k=5, **kw))


def test_each_customer_gets_its_variant_in_every_answer(ab: Any) -> None:
    s = ab.served
    want = {u: ab.exp.assign(u).name for u in ab.users}
    assert 60 < list(want.values()).count("candidate") < 140  # both arms get traffic
    unary = {}
    for u in ab.users:
        r = _rec(s, u)
        assert r.variant == want[u]
        # the candidate's engine reads its pinned version, the control the alias' target
        assert r.index_version == (ab.v_a if want[u] == "candidate" else ab.v_b)
        unary[u] = [i.item_id for i in r.items]
    batch = s.pb.RecommendBatchRequest(
        requests=[s.pb.RecommendRequest(user_id=u, k=5) for u in ab.users]
    )
    got = list(s.stub.RecommendBatch(batch, metadata=s.md, timeout=20))
    assert [g.index for g in got] == list(range(len(ab.users)))
    for u, g in zip(ab.users, got, strict=True):
        assert g.error_code == 0 and g.response.variant == want[u]
        assert [i.item_id for i in g.response.items] == unary[u]  # batch == unary
    item = str(s.engine.items.external_ids[1])
    sim = s.call("SimilarItems", s.pb.SimilarItemsRequest(item_id=item, k=3))
    assert sim.variant == "control"  # no customer: the control (documented)
    anon = s.call(
        "Recommend",
        s.pb.RecommendRequest(k=3, recent_events=[s.pb.Event(item_id=item, event_type="view")]),
    )
    assert anon.variant == "control"
    again = {u: _rec(s, u).variant for u in ab.users[:50]}  # sticky within the process
    assert again == {u: want[u] for u in ab.users[:50]}
    # a second router over the same file (another replica) routes everyone the same way
    from serving.variants import VariantRouter

    other = VariantRouter(ab.path, lambda v: object())
    other.reload()
    assert {u: other.route(u, object)[0] for u in ab.users} == want


def test_access_log_names_the_variant(ab: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ecomrec.serving.access")
    for u in ab.users[:6]:
        r = _rec(ab.served, u)
        rec = [x for x in caplog.records if x.name == "ecomrec.serving.access"][-1]
        assert rec.fields["variant"] == r.variant == ab.exp.assign(u).name  # type: ignore[attr-defined]


def test_shares_change_and_test_ends_without_restart_or_failed_call(ab: Any) -> None:
    s, router = ab.served, ab.router
    stop = threading.Event()
    errors: list[str] = []
    seen: list[tuple[str, str]] = []

    def hammer(offset: int) -> None:
        i = offset
        while not stop.is_set():
            u = ab.users[i % len(ab.users)]
            try:
                seen.append((u, _rec(s, u).variant))
            except Exception as e:  # any failed call fails the test
                errors.append(repr(e))
            i += 7

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        router.watch(0.05)
        assert wait_for(lambda: len(seen) > 30, 20)
        # 50/50 -> 100/0: everyone on the control, the candidate's engine kept loaded
        end = Experiment(
            ab.exp.name, (Variant("control", 1.0), dataclasses.replace(ab.exp.variants[1], share=0))
        )
        write_experiment(ab.path, end)
        assert wait_for(lambda: router.experiment.shares()["control"] == 1.0, 10)
        n = len(seen)
        assert wait_for(lambda: len(seen) > n + 30, 20)
        assert {_rec(s, u).variant for u in ab.users} == {"control"}
        # an invalid file keeps the running routing (logged, counted)
        failures = router.failures
        ab.path.write_text('{"name": "ab-test", "variants": [{"name": "x", "share": 0.3}]}')
        assert wait_for(lambda: router.failures == failures + 1, 10)
        assert router.last_error.endswith("shares must sum to 1, got 0.3 (['x'])")
        assert {_rec(s, u).variant for u in ab.users[:40]} == {"control"}
        # the test ends (file removed): the service's own engine, variant "default"
        ab.path.unlink()
        assert wait_for(lambda: router.experiment is None, 10)
        r = _rec(s, ab.users[0])
        assert r.variant == "default" and r.index_version == ab.v_b
    finally:
        stop.set()
        for t in threads:
            t.join()
        router.stop()
    assert errors == []
    assert len(seen) > 60
    # before the switch each answer's variant was the customer's own
    first = [v for u, v in seen[:20]]
    assert all(v == ab.exp.assign(u).name for u, v in seen[:20]), first
    write_experiment(ab.path, ab.exp)  # restore for other tests of the module
    router.reload()
    assert load_experiment(ab.path).shares() == {"control": 0.5, "candidate": 0.5}
