"""A running gRPC service picks up a promoted model + index (manifest change and SIGHUP)
and rolls back, with zero failed requests under concurrent load."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lifecycle.conftest import ROOT, Shop, index_cfg, quick_config


def _serve_cfg() -> Any:
    from serving.config import ServeConfig

    return ServeConfig(
        port=0, rerank_policies=str(ROOT / "ecomrec" / "configs" / "serving" / "rerank.toml")
    )


@pytest.mark.slow
def test_service_reloads_promoted_model_without_a_failed_request(
    shop: Shop, live_run: Path, tmp_path: Path
) -> None:
    from indexing.deploy import DeployState
    from lifecycle.refresh import refresh
    from serving.observability import Metrics
    from serving.reload import EngineReloader, engine_from_record
    from tests.serving.conftest import Served

    cfg = quick_config(tolerance=1.0, churn_tolerance=1.0)
    first = refresh(
        live_run, shop.mid, tmp_path / "index", config=cfg, index_cfg=index_cfg(), since=shop.t1
    )
    assert first.record is not None
    state = tmp_path / "index.refresh"
    metrics = Metrics()
    engine = engine_from_record(first.record, _serve_cfg(), metrics=metrics)
    served = Served(engine)
    reloader = EngineReloader(
        served.servicer,
        state,
        lambda rec: engine_from_record(
            rec, dataclasses.replace(_serve_cfg(), api_keys=served.cfg.api_keys), metrics=metrics
        ),
    )
    reloader.adopt()
    assert not reloader.check()  # nothing changed yet
    users = shop.mid.users.external_ids[:60]
    answers: list[tuple[float, float, str, str, bool]] = []  # (start, end, model, index, degraded)
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            t0 = time.monotonic()  # answers are attributed to when the request started
            try:
                r = served.call(
                    "Recommend", served.pb.RecommendRequest(user_id=users[i % len(users)], k=10)
                )
                answers.append((t0, time.monotonic(), r.model_version, r.index_version, r.degraded))
            except BaseException as e:  # collected, asserted below
                errors.append(e)
            i += 4

    def answered_since(t: float, n: int = 3, timeout: float = 60) -> None:
        """Wait (with a deadline, not a fixed sleep) for n answers to requests started after t."""
        end = time.monotonic() + timeout
        while sum(1 for a, *_ in list(answers) if a > t) < n:
            assert time.monotonic() < end and not errors, (errors[:3], len(answers))
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        answered_since(0.0)
        # a promotion while the service runs: the manifest changes, the watcher reloads
        second = refresh(live_run, shop.full, tmp_path / "index", config=cfg, index_cfg=index_cfg())
        assert second.record is not None and second.decision == "promoted"
        assert reloader.check()
        t_swap = time.monotonic()  # windows: from after one action to before the next
        answered_since(t_swap)
        # roll back in memory, then forward again on SIGHUP
        t_swap_end = time.monotonic()
        assert reloader.rollback()
        t_back = time.monotonic()
        answered_since(t_back)
        reloader.install_sighup()
        n_before = reloader.reloads
        t_back_end = time.monotonic()
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 60
        while reloader.reloads == n_before and time.monotonic() < deadline:
            time.sleep(0.05)
        t_hup = time.monotonic()
        answered_since(t_hup)
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        stop.set()
        for t in threads:
            t.join(10)
        served.close()
    assert not errors, errors[:3]
    assert reloader.reloads == 2 and reloader.failures == 0
    r1, r2 = first.record, second.record
    assert not any(d for *_, d in answers), "a degraded answer"
    pairs = {(m, v) for _, _, m, v, _ in answers}
    # every answer came from one consistent (model, index) pair, never a mix
    assert pairs <= {(r1.model_version, r1.index_version), (r2.model_version, r2.index_version)}
    # requests that started after one action and ended before the next
    after_swap = [(m, v) for a, b, m, v, _ in answers if t_swap < a and b < t_swap_end]
    after_back = [(m, v) for a, b, m, v, _ in answers if t_back < a and b < t_back_end]
    after_hup = [(m, v) for a, _, m, v, _ in answers if a > t_hup]
    assert after_swap and set(after_swap) == {(r2.model_version, r2.index_version)}
    assert after_back and set(after_back) == {(r1.model_version, r1.index_version)}
    assert after_hup and set(after_hup) == {(r2.model_version, r2.index_version)}
    assert DeployState(state).live().run == r2.run
