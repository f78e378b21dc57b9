"""A/B experiments: file validation, stable assignment, shares (outcomes.experiment)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ecomrec.errors import ConfigError
from outcomes.experiment import Experiment, Variant, bucket, load_experiment, parse_experiment

ROOT = Path(__file__).resolve().parents[2]


def _exp(*shares: float, name: str = "t") -> Experiment:
    return Experiment(name, tuple(Variant(f"v{i}", s) for i, s in enumerate(shares)))


def test_bucket_is_the_documented_sha256_of_name_and_customer() -> None:
    h = hashlib.sha256(b"exp-1\x1fcustomer 17").digest()
    assert bucket("exp-1", "customer 17") == int.from_bytes(h[:8], "big") / 2**64
    assert 0.0 <= bucket("exp-1", "customer 17") < 1.0
    assert bucket("exp-2", "customer 17") != bucket("exp-1", "customer 17")  # name reshuffles


def test_shares_are_met_and_moving_them_moves_only_crossing_customers() -> None:
    ids = [f"c{i}" for i in range(20_000)]
    a = _exp(0.3, 0.7)
    got = [a.assign(c).name for c in ids]
    assert abs(got.count("v0") / len(ids) - 0.3) < 0.015
    b = _exp(0.6, 0.4)  # control grows: nobody leaves it
    moved = [c for c, g in zip(ids, got, strict=True) if b.assign(c).name != g]
    assert all(a.assign(c).name == "v1" and b.assign(c).name == "v0" for c in moved)
    assert abs(len(moved) / len(ids) - 0.3) < 0.015
    end = _exp(1.0, 0.0)  # the test ended: everyone gets the control
    assert {end.assign(c).name for c in ids} == {"v0"}
    three = _exp(0.2, 0.3, 0.5)
    frac = [sum(three.assign(c).name == f"v{i}" for c in ids) / len(ids) for i in range(3)]
    assert frac == pytest.approx([0.2, 0.3, 0.5], abs=0.015)


def test_anonymous_customers_get_the_control() -> None:
    assert _exp(0.0, 1.0).assign("").name == "v0"


def test_assignment_agrees_across_processes_and_restarts(tmp_path: Path) -> None:
    """Two interpreters with different hash seeds (and a rerun = a restart) assign 1,000
    customers identically, and as this process does."""
    (tmp_path / "run").mkdir()
    f = tmp_path / "exp.toml"
    f.write_text(
        'name = "sticky"\n[[variants]]\nname = "control"\nshare = 0.5\n'
        '[[variants]]\nname = "cand"\nrun = "run"\nshare = 0.5\n'
    )
    code = (
        "import json,sys; from outcomes.experiment import load_experiment; "
        "e = load_experiment(sys.argv[1]); "
        "print(json.dumps([e.assign(f'u{i}').name for i in range(1000)]))"
    )
    outs = []
    for seed in ("1", "2", "1"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}
        r = subprocess.run(
            [sys.executable, "-c", code, str(f)], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    here = [load_experiment(f).assign(f"u{i}").name for i in range(1000)]
    assert outs[0] == outs[1] == outs[2] == here
    assert 400 < here.count("control") < 600


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"variants": [{"name": "a", "share": 1}]}, "name: want a non-empty string"),
        ({"name": "x", "variants": []}, "variants: want a list"),
        ({"name": "x", "variants": [{"name": "a", "share": 0.5}]}, "shares must sum to 1"),
        (
            {"name": "x", "variants": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]},
            "names must be unique, repeated: ['a']",
        ),
        ({"name": "x", "variants": [{"name": "a", "share": 1.5}]}, "variants[0].share (a)"),
        ({"name": "x", "variants": [{"name": "a b", "share": 1}]}, "variants[0].name"),
        ({"name": "x", "variants": [{"name": "a", "share": "1"}]}, "want a number"),
        ({"name": "x", "variants": [{"name": "a", "share": 1, "runn": "r"}]}, "unknown key"),
        (
            {"name": "x", "variants": [{"name": "a", "share": 1, "run": "/nonexistent/run"}]},
            "variants[0].run (a): /nonexistent/run is not a run directory",
        ),
        (
            {"name": "x", "variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]},
            "at most one variant may omit run",
        ),
    ],
)
def test_bad_experiment_files_are_refused_naming_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_experiment(data, "experiment file ab.toml")
    assert message in str(e.value)
    assert str(e.value).startswith("experiment file ab.toml: ")


def test_load_resolves_relative_runs_and_reports_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    f = tmp_path / "exp.toml"
    f.write_text(
        'name = "x"\n[[variants]]\nname = "control"\nshare = 0.9\n'
        '[[variants]]\nname = "c"\nrun = "runs/r1"\nindex_version = "v7"\nshare = 0.1\n'
    )
    e = load_experiment(f)
    assert e.variants[1].run == str(tmp_path / "runs" / "r1")
    assert e.variants[1].index_version == "v7" and e.control.name == "control"
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match=r"missing\.json"):
        load_experiment(tmp_path / "missing.json")
