"""``[refresh] promote = "online"`` on a tiny shop: the candidate is staged as an A/B
variant (nothing live moves), a real gRPC service routes customers to it, then the online
decision waits, rejects (staged version and run dropped) or promotes (deploy record and
alias move, the test ends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.lifecycle.conftest import Shop, alias_target, index_cfg, quick_config

pytestmark = pytest.mark.slow  # three refreshes and a served engine (~1 min)


def _report(n: int, diff: tuple[float, float, float]) -> dict[str, Any]:
    v, lo, hi = diff
    return {
        "variants": [
            {"variant": "control", "impressions": n},
            {"variant": "candidate", "impressions": n},
        ],
        "differences": [
            {"variant": "candidate", "baseline": "control", "metric": "ctr", "value": v,
             "lo": lo, "hi": hi}
        ],
    }  # fmt: skip


def _versions(index: Path) -> set[str]:
    from indexing.base import IndexConfig
    from indexing.build import open_store

    store = open_store(IndexConfig(location=str(index)))
    try:
        return {m.version for m in store.versions("items")}
    finally:
        store.close()


def test_stage_serve_wait_reject_then_promote(
    shop: Shop, live_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ecomrec.cli import main
    from indexing.deploy import DeployState
    from lifecycle.online import EXIT_STAGED
    from lifecycle.refresh import refresh
    from outcomes.experiment import load_experiment

    index, state = tmp_path / "index", tmp_path / "index.refresh"
    online = {"promote": "online", "online_share": 0.5, "online_min_impressions": 100}

    def run(ds: Any, **kw: Any) -> Any:
        return refresh(
            live_run,
            ds,
            index,
            config=quick_config(tolerance=1.0, churn_tolerance=1.0, **kw),
            index_cfg=index_cfg(),
            since=shop.t1,
        )

    first = run(shop.mid)  # offline promotion: the live deployment
    assert first.exit_code == 0 and first.record is not None
    live = first.record
    staged = run(shop.full, **online)
    assert (staged.exit_code, staged.decision) == (EXIT_STAGED, "staged")
    cand = staged.record
    assert cand is not None and cand.index_version != live.index_version
    # nothing live moved: deploy record and alias are the old ones
    assert DeployState(state).live().index_version == live.index_version
    assert alias_target(index) == live.index_version
    assert cand.index_version in _versions(index)  # built, unpublished
    exp = load_experiment(state / "experiment.json")
    assert exp.shares() == {"control": 0.5, "candidate": 0.5}
    assert exp.variants[1].run == cand.run and exp.variants[1].index_version == cand.index_version

    # a service following the state routes customers to the staged candidate
    _serve_and_check(live, state, shop, tmp_path / "events1.db")

    # a refresh while the test runs trains nothing: without a report it waits (exit 6)
    again = run(shop.full, **online)
    assert (again.exit_code, again.decision) == (EXIT_STAGED, "testing")
    args = ["refresh", "--decide", "--index", str(index), "--online-report"]
    cfg = tmp_path / "refresh.toml"
    cfg.write_text('[refresh]\npromote = "online"\nonline_min_impressions = 100\n')
    few = tmp_path / "few.json"
    few.write_text(json.dumps(_report(50, (0.1, 0.05, 0.15))))
    assert main([*args, str(few), "--config", str(cfg)]) == EXIT_STAGED  # too few: wait
    assert (state / "experiment.json").exists()
    loss = tmp_path / "loss.json"
    loss.write_text(json.dumps(_report(500, (-0.05, -0.08, -0.02))))
    assert main([*args, str(loss), "--config", str(cfg), "--json"]) == 3  # a loss: reject
    out = json.loads(_last_json(capsys))
    assert out["decision"] == "not-promoted"
    assert not (state / "experiment.json").exists() and not (state / "staged.json").exists()
    assert cand.index_version not in _versions(index)  # dropped
    assert not Path(cand.run).exists()
    assert DeployState(state).live().index_version == live.index_version
    assert main([*args, str(loss), "--config", str(cfg)]) == 2  # nothing staged any more

    # stage again; served traffic where the candidate's answers get clicked: the decision
    # computed from the service's own logs (--event-log) promotes it
    staged2 = run(shop.full, **online)
    assert staged2.exit_code == EXIT_STAGED and staged2.record is not None
    events = tmp_path / "events2.db"
    _serve_and_check(live, state, shop, events)
    cfg.write_text('[refresh]\npromote = "online"\nonline_min_impressions = 15\n')
    decide = ["refresh", "--decide", "--index", str(index), "--config", str(cfg), "--json"]
    assert main([*decide, "--event-log", str(events)]) == 0
    out = json.loads(_last_json(capsys))
    assert out["decision"] == "promoted"
    # from the logs: every candidate answer clicked, no control answer
    assert out["reason"].startswith("ctr candidate - control = +1.00000 ["), out["reason"]
    now_live = DeployState(state).live()
    assert now_live.index_version == staged2.record.index_version
    assert now_live.metrics["online"]["promoted"] is True
    assert alias_target(index) == staged2.record.index_version
    assert not (state / "experiment.json").exists() and not (state / "staged.json").exists()
    assert (state / "current").resolve() == Path(staged2.record.run).resolve()


def _last_json(capsys: pytest.CaptureFixture[str]) -> str:
    text = capsys.readouterr().out
    return text[text.index("{") :]


def _serve_and_check(live: Any, state: Path, shop: Shop, events: Path) -> None:
    """Serve the live record with the state's experiment over gRPC: each customer's answer
    comes from its variant's model; impressions for every answer, a click (with the
    answer's id) only on the candidate's answers; the server is then closed (logs flushed)."""
    import dataclasses

    from indexing.base import IndexConfig
    from lifecycle.online import read_staged
    from outcomes.experiment import load_experiment
    from serving.reload import engine_from_record
    from serving.variants import VariantRouter, variant_factory
    from tests.lifecycle.test_service_reload import _serve_cfg
    from tests.serving.conftest import Served

    engine = engine_from_record(live, dataclasses.replace(_serve_cfg(), event_log=str(events)))
    served = Served(engine)
    try:
        router = VariantRouter(
            state / "experiment.json",
            variant_factory(
                served.cfg, dataset=None, index_cfg=IndexConfig(location=live.index_location)
            ),
        )
        assert router.reload()
        served.servicer.router = router
        exp = load_experiment(state / "experiment.json")
        cand = read_staged(state)["record"]  # type: ignore[index]
        seen = set()
        pb = served.pb
        for u in shop.mid.users.external_ids[1:60]:
            r = served.call("Recommend", pb.RecommendRequest(user_id=u, k=5))
            assert r.variant == exp.assign(u).name
            want = cand["model_version"] if r.variant == "candidate" else live.model_version
            assert r.model_version == want
            seen.add(r.variant)
            evs = [
                pb.TrackedEvent(customer_id=u, product_id=i.item_id, event_type="impression",
                                recommendation_id=r.recommendation_id)
                for i in r.items
            ]  # fmt: skip
            if r.variant == "candidate":
                evs.append(
                    pb.TrackedEvent(customer_id=u, product_id=r.items[0].item_id,
                                    event_type="click", recommendation_id=r.recommendation_id)
                )  # fmt: skip
            ack = served.call("TrackEvents", pb.TrackEventsRequest(events=evs))
            assert ack.accepted == len(evs) and not ack.errors
        assert seen == {"control", "candidate"}
    finally:
        served.close()
