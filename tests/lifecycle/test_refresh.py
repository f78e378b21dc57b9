"""``ecomrec refresh`` end to end on a real embedded index: promotion with lineage, the
candidate-worse and no-new-data exits, bad data, the lock, SIGKILLs from outside at random
moments (index build, rename, deploy-record write)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.lifecycle.conftest import ROOT, Shop, alias_target, index_cfg, quick_config

pytestmark = pytest.mark.slow  # a trained model / a served process per module: seconds

CONFIG_TOML = """
[refresh]
eval_days = 60.0
export_onnx = false
index_queries = 100
tolerance = 1.0          # promote unless the candidate collapses (these tests are about safety)
churn_tolerance = 1.0

[index]
hnsw_m = 16
hnsw_ef_construct = 64
keep_versions = 5
"""


def _refresh(shop: Shop, live_run: Path, tmp: Path, ds: Any = None, **kw: Any) -> Any:
    from lifecycle.refresh import refresh

    return refresh(
        live_run,
        ds if ds is not None else shop.full,
        tmp / "index",
        config=quick_config(**kw),
        index_cfg=index_cfg(),
        since=shop.t1,
    )


def _deploy(tmp: Path) -> dict[str, Any]:
    return dict(json.loads((tmp / "index.refresh" / "deploy.json").read_text()))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up): (exit code, stderr)."""
    from ecomrec.cli import main

    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


def _cli_args(shop: Shop, live_run: Path, tmp: Path, dataset: Path) -> list[str]:
    cfg = tmp / "refresh.toml"
    cfg.write_text(CONFIG_TOML)
    return [
        "refresh",
        "--run", str(live_run), "--dataset", str(dataset), "--index", str(tmp / "index"),
        "--config", str(cfg), "--since", shop.since, "--json",
    ]  # fmt: skip


def test_promotion_writes_lineage_index_and_reports(
    shop: Shop, live_run: Path, tmp_path: Path
) -> None:
    from lifecycle.refresh import EXIT_DRIFT_ALERT, EXIT_NO_NEW_DATA, EXIT_PROMOTED

    res = _refresh(shop, live_run, tmp_path, tolerance=1.0, churn_tolerance=1.0, export_onnx=True)
    assert res.decision == "promoted" and res.exit_code in (EXIT_PROMOTED, EXIT_DRIFT_ALERT)
    live = _deploy(tmp_path)["live"]
    # lineage: parent run, data range, metrics of both models
    assert live["parent_run"] == str(live_run.resolve())
    assert live["data_from"] == shop.t1
    assert live["data_until"] == int(shop.full.events["ts"].max()) + 1
    assert set(live["metrics"]["ndcg@10"]) == {"live", "candidate"}
    mf = json.loads((Path(live["run"]) / "manifest.json").read_text())
    assert mf["lineage"]["parent_run"] == str(live_run.resolve())
    # the alias moved to the verified version built from the promoted model
    assert alias_target(tmp_path / "index") == live["index_version"]
    run = Path(live["run"])
    assert (run / "model.pt").exists() and (run / "onnx" / "user_tower.onnx").exists()
    assert (run / "dataset" / "dataset.json").exists()
    # the index holds the promoted model's item vectors
    import numpy as np

    from indexing.base import IndexConfig
    from indexing.build import open_store
    from towers.inference import load_run

    tm = load_run(run)
    store = open_store(IndexConfig(location=str(tmp_path / "index")))
    reader = store.open()
    try:
        got = reader.get_vectors([1, 2, 3])
        assert np.allclose(got, tm.item_vectors()[[1, 2, 3]], atol=1e-5)
    finally:
        reader.close()
        store.close()
    # reports: JSON + HTML with every section
    drift = json.loads((res.report_dir / "drift.json").read_text())
    for key in ("new_items", "new_users", "embedding_drift", "rfm_migration",
                "behaviour_migration", "churn_calibration", "alerts"):  # fmt: skip
        assert key in drift
    assert drift["embedding_drift"]["returning_customers"] > 0
    assert sum(map(sum, drift["rfm_migration"]["counts"])) == drift["rfm_migration"]["customers"]
    assert "segment migration" in (res.report_dir / "drift.html").read_text()
    dec = json.loads((res.report_dir / "decision.json").read_text())
    assert dec["ndcg@10"]["live"] is not None and dec["churn_auc"]["candidate"] is not None
    # nothing new since: distinct exit, nothing changed
    again = _refresh(shop, live_run, tmp_path)
    assert again.exit_code == EXIT_NO_NEW_DATA
    assert _deploy(tmp_path)["live"] == live


def test_candidate_worse_is_not_promoted(shop: Shop, live_run: Path, tmp_path: Path) -> None:
    """A wrecked candidate (huge learning rate): not promoted, exit 3, both numbers recorded,
    live model and index untouched; the same input twice gives the same decision."""
    from lifecycle.refresh import EXIT_NOT_PROMOTED

    res = _refresh(shop, live_run, tmp_path, lr=3.0, epochs=3)
    before = _deploy(tmp_path)
    alias = alias_target(tmp_path / "index")
    assert res.exit_code == EXIT_NOT_PROMOTED and res.decision == "not-promoted"
    live_ndcg, cand_ndcg = res.metrics["live"]["ndcg@10"], res.metrics["candidate"]["ndcg@10"]
    assert cand_ndcg < live_ndcg * 0.98, (cand_ndcg, live_ndcg)
    assert before["live"]["name"] == "bootstrap" and not before["history"]
    assert not (tmp_path / "index.refresh" / "runs").exists()
    res2 = _refresh(shop, live_run, tmp_path, lr=3.0, epochs=3)

    def numbers(m: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in m.items() if k != "eval_seconds"}

    assert res2.decision == res.decision
    assert numbers(res2.metrics["candidate"]) == numbers(res.metrics["candidate"])
    assert numbers(res2.metrics["live"]) == numbers(res.metrics["live"])
    assert _deploy(tmp_path) == before and alias_target(tmp_path / "index") == alias


def test_bad_new_data_changes_nothing(
    shop: Shop, live_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import polars as pl

    from intake.dataset import Dataset

    rc, err = _main(_cli_args(shop, live_run, tmp_path, shop.mid_dir), capsys)
    assert rc in (0, 5), err[-2000:]
    before, alias = _deploy(tmp_path), alias_target(tmp_path / "index")
    bad_dir = tmp_path / "bad"
    shop.full.save(bad_dir)
    ev = pl.read_parquet(bad_dir / "events.parquet")
    ev = ev.with_columns(
        pl.when(pl.int_range(pl.len()) == 17).then(pl.lit("teleport")).otherwise(pl.col("event_type")).alias("event_type")
    )  # fmt: skip
    ev.write_parquet(bad_dir / "events.parquet")
    from ecomrec.errors import DataError

    with pytest.raises(DataError):
        Dataset.load(bad_dir)
    rc, err = _main(_cli_args(shop, live_run, tmp_path, bad_dir), capsys)
    assert rc == 2
    assert "row 17" in err and "event_type" in err and "teleport" in err
    assert _deploy(tmp_path) == before and alias_target(tmp_path / "index") == alias


def test_lock_refuses_a_second_refresh(
    shop: Shop, live_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lifecycle.refresh import EXIT_LOCKED
    from lifecycle.state import refresh_lock

    with refresh_lock(tmp_path / "index.refresh"):  # a separate open file: flock conflicts
        rc, err = _main(_cli_args(shop, live_run, tmp_path, shop.full_dir), capsys)
    assert rc == EXIT_LOCKED, err[-2000:]
    assert "another refresh is running" in err
    assert not (tmp_path / "index.refresh" / "deploy.json").exists()


def _wait_then_kill(
    proc: subprocess.Popen[str], trigger: Any, delay: float, what: str, deadline: float = 600
) -> None:
    """SIGKILL ``proc`` ``delay`` s after ``trigger()`` first holds; fails if it ends first."""
    end = time.monotonic() + deadline
    while not trigger():
        assert proc.poll() is None, f"the refresh ended before {what}"
        assert time.monotonic() < end, f"never reached {what}"
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"the refresh ended before {what}"


def _assert_old_or_new_good(tmp: Path, before: dict[str, Any], alias: str) -> str:
    """After a kill: the deployment is the old one or a complete new one, and a reader of
    the alias answers.  Returns "old" or "new"."""
    from indexing.base import IndexConfig
    from indexing.build import open_index, open_store
    from indexing.deploy import DeployState

    live = asdict(DeployState(tmp / "index.refresh").live())  # parses, or DataError
    now_alias = alias_target(tmp / "index")
    if live == before["live"]:
        state = "old"
        assert now_alias == alias
    else:  # past the commit point: every part of the new record is complete
        state = "new"
        assert live["parent_run"] == before["live"]["run"]
        assert (Path(live["run"]) / "model.pt").exists()
        assert (Path(live["dataset"]) / "dataset.json").exists()
        store = open_store(IndexConfig(location=str(tmp / "index")))
        try:
            assert live["index_version"] in {m.version for m in store.versions("items")}
        finally:
            store.close()
        assert now_alias in (alias, live["index_version"])  # the alias moves after the commit
    reader = open_index(IndexConfig(location=str(tmp / "index")))
    try:
        assert reader.version == now_alias and reader.count() > 0
        assert reader.search(reader.get_vectors([1])[0], 3)[0].item_id == 1
    finally:
        reader.close()
    return state


def _new_version_building(index: Path, known: set[str]) -> Any:
    def trigger() -> bool:
        vdirs = [p for p in (index / "versions").iterdir() if p.name not in known]
        return any(not (p / "manifest.json").exists() for p in vdirs)

    return trigger


def _new_run(runs: Path) -> Any:
    old = {p.name for p in runs.iterdir()}
    return lambda: {p.name for p in runs.iterdir()} != old


def _new_version_committed(index: Path, known: set[str]) -> Any:
    def trigger() -> bool:
        vdirs = [p for p in (index / "versions").iterdir() if p.name not in known]
        return any((p / "manifest.json").exists() for p in vdirs)

    return trigger


# (what, trigger(tmp, known versions) -> condition, delay after it in seconds or None = random
# moment of a whole reference refresh)
KILLS: list[tuple[str, Any, Any]] = [
    (
        "during the index build",
        lambda t, known: _new_version_building(t / "index", known),
        lambda rng, ref: rng.uniform(0.0, 0.2),
    ),
    (
        "around the rename of the new run",  # refit done: manifest, dataset, rename follow
        lambda t, known: lambda: any((t / "index.refresh" / "tmp").glob("*/model.pt")),
        lambda rng, ref: rng.uniform(0.0, 0.3),
    ),
    (
        "right after the rename of the new run",
        lambda t, known: _new_run(t / "index.refresh" / "runs"),
        lambda rng, ref: 0.0,
    ),
    (
        # the new version is committed (its manifest written): the deploy-record write
        # (temporary file, fsync, rename) follows at once; a kill inside it leaves the
        # temporary file behind (checked below when it happens)
        "around the deploy-record write",
        lambda t, known: _new_version_committed(t / "index", known),
        lambda rng, ref: rng.uniform(0.0, 0.03),
    ),
    (
        "at a random moment",
        lambda t, known: lambda: True,
        lambda rng, ref: rng.uniform(0.0, ref),
    ),
]


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_old_or_new_state_and_rerun_completes(
    shop: Shop, live_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real ``ecomrec refresh`` process SIGKILLed from outside: during the index build,
    around and right after the rename of the new run, around the deploy-record write and
    at a random moment (random delays after each trigger).  After each kill the deployment is the old good one or
    the new good one (a reader of the alias answers), and the next refresh completes and
    leaves no debris."""
    from indexing.base import IndexConfig
    from indexing.build import open_store

    template = tmp_path / "template"
    template.mkdir()
    t0 = time.monotonic()
    rc, err = _main(_cli_args(shop, live_run, template, shop.mid_dir), capsys)
    ref_seconds = time.monotonic() - t0  # a refresh in this process: shorter than the CLI's
    assert rc in (0, 5), err[-2000:]
    rng = random.Random()
    states: dict[str, str] = {}
    inside: dict[str, str] = {}
    for i, (what, trigger, delay) in enumerate(KILLS):
        tmp = tmp_path / f"kill{i}"
        shutil.copytree(template, tmp, symlinks=True)
        before, alias = _deploy(tmp), alias_target(tmp / "index")
        assert alias == before["live"]["index_version"]
        known = {p.name for p in (tmp / "index" / "versions").iterdir()}
        args = _cli_args(shop, live_run, tmp, shop.full_dir)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ecomrec", *args], env=_env(), cwd=ROOT, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_then_kill(proc, trigger(tmp, known), delay(rng, ref_seconds), what)
        states[what] = _assert_old_or_new_good(tmp, before, alias)
        # killed inside the deploy-record write (its temporary file left behind): the old
        # deployment; killed inside the index build (a version without a manifest): too
        if list((tmp / "index.refresh").glob("deploy.json.tmp*")):
            inside[what] = "deploy-record write"
            assert states[what] == "old", what
        if _new_version_building(tmp / "index", known)():
            inside[what] = "index build"
            assert states[what] == "old", what
        rc, err = _main(args, capsys)
        final = _deploy(tmp)["live"]
        if states[what] == "new":
            assert rc == 4, err[-2000:]  # nothing new; the alias move was finished
        else:
            assert rc in (0, 5), (what, err[-2000:])
        assert final["parent_run"] == before["live"]["run"]
        assert alias_target(tmp / "index") == final["index_version"]
        state = tmp / "index.refresh"
        assert not (state / "tmp").exists() and not list(state.glob("deploy.json.tmp*"))
        runs = {p.name for p in (state / "runs").iterdir()}
        assert runs == {Path(before["live"]["run"]).name, Path(final["run"]).name}
        store = open_store(IndexConfig(location=str(tmp / "index")))
        try:
            assert not store.incomplete_versions("items")
            versions = {m.version for m in store.versions("items")}
            history = _deploy(tmp)["history"]
            known_now = {final["index_version"]} | {r["index_version"] for r in history}
            assert versions <= known_now, versions - known_now
        finally:
            store.close()
    # the new run in place, its index not built yet: nothing committed
    assert states["right after the rename of the new run"] == "old", (states, inside)
