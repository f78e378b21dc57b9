"""Saved segment scores: the analyst commands read what `segments report` computed.

Through the real CLI on two small synthetic shops (A and B, different data): the saved
scores give the same answers as a refit (round trip), a load never refits, scores of
another dataset or config are refused by the read commands and refitted by the report,
and the spend prediction is chosen on a validation window.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ecomrec.cli import main

pytestmark = pytest.mark.slow  # its fixture trains a model and fits the scores: ~25 s


def _shop(root: Path, name: str, seed: int) -> Path:
    out = root / name
    assert main(["data", "synth", "--customers", "150", "--products", "40",
                 "--days", "300", "--seed", str(seed), "--out", str(out)]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segment_scores")
    a, b = _shop(root, "shop_a", 1), _shop(root, "shop_b", 2)
    rep = root / "report_a"
    assert main(["segments", "report", "--dataset", str(a), "--out", str(rep)]) == 0
    return {"root": root, "a": a, "b": b, "report": rep}


def _buyer(shop: Path) -> str:
    ev = pl.read_csv(shop / "events.csv", infer_schema_length=0)
    buyers = ev.filter(pl.col("event_type") == "purchase")["customer_id"].value_counts(sort=True)
    return str(buyers["customer_id"][0])


def _show(shop: Path, who: str, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    assert main(["customers", "show", who, "--dataset", str(shop), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_report_saves_scores_with_the_dataset_fingerprint(world: dict[str, Path]) -> None:
    from intake.loaders import load_dataset

    scores = world["report"] / "scores"
    meta = json.loads((scores / "meta.json").read_text())
    assert meta["dataset_fingerprint"] == load_dataset(str(world["a"])).fingerprint()["id"]
    assert (world["report"] / "report.html").is_file()
    table = pl.read_parquet(scores / "customers.parquet")
    emb = np.load(scores / "embeddings.npy")
    assert emb.shape[0] == table.height == meta["customers"] > 0
    ev = pl.read_parquet(scores / "evaluation.parquet")
    assert {"churn", "high_value", "future_spend", "gbdt:churn", "bgnbd:high_value"} <= set(
        ev.columns
    )
    html = (world["report"] / "report.html").read_text()
    assert "Predicted spend in the next 90 days" in html
    assert meta["spend_choice"]["method"] in ("gbdt", "last_window")


def test_saved_scores_answer_like_a_refit(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, rep = world["a"], world["report"]
    who = _buyer(a)
    refit = _show(a, who, capsys=capsys)  # no --scores: everything refitted in memory
    sim_refit = world["root"] / "sim_refit.csv"
    assert main(["customers", "similar", who, "--dataset", str(a), "--k", "5",
                 "--out", str(sim_refit)]) == 0  # fmt: skip
    capsys.readouterr()

    import segments.export

    def no_refit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the saved scores were up to date: nothing may be refitted")

    monkeypatch.setattr(segments.export, "score_customers", no_refit)
    saved = _show(a, who, "--scores", str(rep), capsys=capsys)
    assert saved == refit
    assert saved["churn_probability"] == refit["churn_probability"]
    sim_saved = world["root"] / "sim_saved.csv"
    assert main(["customers", "similar", who, "--dataset", str(a), "--k", "5",
                 "--scores", str(rep), "--out", str(sim_saved)]) == 0  # fmt: skip
    x, y = pl.read_csv(sim_saved), pl.read_csv(sim_refit)
    assert x["customer"].cast(pl.Utf8).to_list() == y["customer"].cast(pl.Utf8).to_list()
    assert np.allclose(x["similarity"].to_numpy(), y["similarity"].to_numpy(), atol=1e-6)
    # the human table: no column types, rounded values, percentages
    capsys.readouterr()
    assert main(["customers", "similar", who, "--dataset", str(a), "--k", "3",
                 "--scores", str(rep)]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["customer", "similarity"]
    assert not any(t in " ".join(out) for t in ("str", "f64", "┌", "shape:"))
    assert len(out) == 3 + 3 and out[3].split()[0] == str(y["customer"][0])
    assert out[3].rstrip().endswith(f"{float(y['predicted_spend'][0]):,.2f}")


def test_stale_scores_are_refused_then_refitted_by_the_report(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import shutil

    from intake.loaders import load_dataset

    rep = tmp_path / "report"
    shutil.copytree(world["report"], rep)
    b = world["b"]
    who = _buyer(b)
    capsys.readouterr()
    rc = main(["customers", "show", who, "--dataset", str(b), "--scores", str(rep)])
    err = capsys.readouterr().err
    assert rc == 2 and "another dataset" in err and "Traceback" not in err, err
    fp_a = json.loads((rep / "scores" / "meta.json").read_text())["dataset_fingerprint"]
    assert fp_a in err
    # another config (horizon) on the same data is stale too
    rc = main(["customers", "show", _buyer(world["a"]), "--dataset", str(world["a"]),
               "--scores", str(rep), "--horizon-days", "60"])  # fmt: skip
    assert rc == 2 and "another config" in capsys.readouterr().err
    # the report (the producer) refits and replaces them
    assert main(["segments", "report", "--dataset", str(b), "--out", str(rep)]) == 0
    meta = json.loads((rep / "scores" / "meta.json").read_text())
    assert meta["dataset_fingerprint"] == load_dataset(str(b)).fingerprint()["id"] != fp_a
    capsys.readouterr()
    info = _show(b, who, "--scores", str(rep), capsys=capsys)
    assert info["customer"] == who


def test_missing_scores_are_computed_and_saved(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a = world["a"]
    who = _buyer(a)
    where = tmp_path / "scores_here"
    first = _show(a, who, "--scores", str(where), capsys=capsys)
    assert (where / "scores" / "meta.json").is_file()
    meta = json.loads((where / "scores" / "meta.json").read_text())
    assert meta["evaluation"] is False  # show needs no held-out evaluation
    assert _show(a, who, "--scores", str(where), capsys=capsys) == first
