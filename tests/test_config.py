"""One way to configure every command: a TOML file (a path or a built-in name), then
``--set SECTION.KEY=VALUE``, then the command's flags; errors name the file and the key."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from ecomrec.cli import build_parser
from ecomrec.config import (
    BUILTIN_DIR,
    builtin_names,
    load_config,
    parse_sets,
    read_config,
    resolve_config,
)
from ecomrec.errors import ConfigError
from indexing.base import IndexConfig


def test_set_values_are_toml_literals_in_nested_tables() -> None:
    got = parse_sets(
        [
            "user.dropout=0.3",
            "seed=1",
            "fallback.enabled=false",
            "serve.host=0.0.0.0",
            "a.b.c=[1, 2]",
        ]
    )
    assert got == {
        "user": {"dropout": 0.3},
        "seed": 1,
        "fallback": {"enabled": False},
        "serve": {"host": "0.0.0.0"},  # not a TOML literal: kept as text
        "a": {"b": {"c": [1, 2]}},
    }
    for bad in ("seed", "=3", "user..dropout=1"):
        with pytest.raises(ConfigError, match=r"SECTION\.KEY=VALUE"):
            parse_sets([bad])
    with pytest.raises(ConfigError, match="seed is a value, not a table"):
        parse_sets(["seed=1", "seed.x=2"])


def test_file_then_set_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "index.toml"
    f.write_text('[index]\nlocation = "from-file"\nhnsw_m = 8\nalias = "a"\nshards = 3\n')
    cfg = load_config(
        IndexConfig,
        f,
        ["index.hnsw_m=16", "index.alias=b"],
        {"alias": "c", "location": None},  # a flag given (alias) and one not given (None)
        table="index",
    )
    assert (cfg.location, cfg.hnsw_m, cfg.alias, cfg.shards) == ("from-file", 16, "c", 3)
    # no file: --set alone
    assert load_config(IndexConfig, None, ["index.replicas=2"], table="index").replicas == 2


def test_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    f = tmp_path / "index.toml"
    f.write_text("[index]\nhnsw_mm = 8\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(f))}: .*index\.hnsw_mm"):
        load_config(IndexConfig, f, table="index")
    f.write_text("[index]\nhnsw_m = 8\n")
    with pytest.raises(
        ConfigError, match=r"--set index.hnsw_m=many: index\.hnsw_m: expected an integer"
    ):
        load_config(IndexConfig, f, ["index.hnsw_m=many"], table="index")
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        load_config(IndexConfig, tmp_path / "nope.toml", table="index")
    f.write_text("[index]\nhnsw_m = \n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(f))}"):
        read_config(f)
    # a misspelt table in a deployment file
    f.write_text("[serve]\nport = 1\n[indexx]\nalias = 'a'\n")
    with pytest.raises(ConfigError, match=r"unknown table.*indexx"):
        read_config(f).check_tables(("serve", "index", "refresh", "drift"))


def test_built_in_names_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert builtin_names("towers") == ["default", "gpu_minilm", "quick"]
    assert resolve_config("quick", "towers") == BUILTIN_DIR / "towers" / "quick.toml"
    assert resolve_config("quick.toml", "towers") == BUILTIN_DIR / "towers" / "quick.toml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").write_text("seed = 3\n")
    assert resolve_config("quick", "towers") == Path("quick")  # an existing path wins
    with pytest.raises(ConfigError, match=r"not one of the built-in \['default', 'gpu_minilm'"):
        resolve_config("quik", "towers")
    with pytest.raises(ConfigError, match=r"configs/quik\.toml does not exist"):
        resolve_config("configs/quik.toml", "towers")
    assert read_config("default", kind="towers").data["valid_users"] == 0.2


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every leaf command of ``ecomrec`` by its name ("index build")."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[" ".join(path)] = p
        for a in subs:
            for name, sp in a.choices.items():
                walk(sp, [*path, name])

    walk(build_parser(), [])
    return out


def test_every_configurable_command_takes_config_and_set() -> None:
    cmds = _commands()
    configurable = [
        "train",
        "serve",
        "refresh",
        "data import",
        *[c for c in cmds if c.split()[0] in ("index", "segments", "campaign", "churn")],
        "customers show",
    ]
    assert len(configurable) > 12
    for name in configurable:
        opts = {o for a in cmds[name]._actions for o in a.option_strings}
        assert {"--config", "--set"} <= opts, name


def test_segments_config_file_set_and_flags(tmp_path: Path) -> None:
    from segments.cli import _config

    f = tmp_path / "segments.toml"
    f.write_text("[churn]\nhorizon_days = 60\nepochs = 7\n[segments]\nk = 5\n")
    base = ["segments", "export", "--dataset", "shop", "--out", "o", "--config", str(f)]
    cfg = _config(build_parser().parse_args(base))
    assert (cfg.churn.horizon_days, cfg.churn.epochs, cfg.segments.k) == (60, 7, 5)
    assert (cfg.dataset, cfg.source, cfg.segments.with_rfm) == ("shop", "text", False)
    args = build_parser().parse_args(
        [*base, "--set", "churn.epochs=9", "--horizon-days", "30", "--with-rfm", "--run", "r"]
    )
    cfg = _config(args)
    assert (cfg.churn.horizon_days, cfg.churn.epochs, cfg.segments.k) == (30, 9, 5)
    assert (cfg.source, cfg.segments.with_rfm) == ("tower", True)
    # without a file: the defaults of before (horizon 90)
    plain = _config(build_parser().parse_args(["churn", "evaluate", "--dataset", "shop"]))
    assert plain.churn.horizon_days == 90 and plain.segments.k is None


def test_data_import_config_set_and_flags(tmp_path: Path) -> None:
    from intake.cli import contract_options

    f = tmp_path / "mapping.toml"
    f.write_text('timezone = "Europe/Berlin"\n[columns]\ncustomer_id = "Customer"\n')
    base = ["data", "import", "--events", "e.csv", "--out", str(tmp_path / "shop")]

    def opts(*extra: str) -> Any:
        return contract_options(build_parser().parse_args([*base, *extra]), "shop")

    got = opts("--config", str(f))
    assert (got.timezone, dict(got.columns)) == ("Europe/Berlin", {"customer_id": "Customer"})
    got = opts("--mapping", str(f), "--set", "timezone=Asia/Tokyo", "--set", "name=mine")
    assert (got.timezone, got.name) == ("Asia/Tokyo", "mine")
    got = opts("--config", str(f), "--set", "timezone=Asia/Tokyo", "--timezone", "UTC")
    assert got.timezone == "UTC"  # the flag wins
    assert opts("--set", "currency=GBP").currency == "GBP"
    with pytest.raises(ConfigError, match=r"--set columns.nobody=X.*nobody"):
        opts("--set", "columns.nobody=X")


def test_serve_config_file_set_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.config import load_serve_config

    f = tmp_path / "serve.toml"
    f.write_text("[serve]\nport = 5000\nmax_k = 50\n")
    cfg = load_serve_config(f, sets=["serve.max_k=7", "serve.port=6000"], port=7000, host=None)
    assert (cfg.port, cfg.max_k, cfg.host) == (7000, 7, "127.0.0.1")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(f))}.*serve\.max_kk"):
        load_serve_config(f, sets=["serve.max_kk=1"])
    # a relative rerank_policies: from the file -> next to the file; from --set -> the cwd
    sub = tmp_path / "sub"
    sub.mkdir()
    for d in (tmp_path, sub):
        (d / "policies.toml").write_text("[default]\n")
    f.write_text('[serve]\nrerank_policies = "policies.toml"\n')
    monkeypatch.chdir(sub)
    assert load_serve_config(f).rerank_policies == str(tmp_path / "policies.toml")
    got = load_serve_config(f, sets=["serve.rerank_policies=policies.toml"]).rerank_policies
    assert got == "policies.toml" and Path(got).resolve() == sub / "policies.toml"


def test_train_config_errors_name_the_file(tmp_path: Path) -> None:
    from training.trainer import load_run_config

    f = tmp_path / "run.toml"
    f.write_text("[user]\nhiden = 3\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(f))}: .*user\.hiden"):
        load_run_config(f)
    assert load_run_config(resolve_config("quick", "towers"), user={"hidden": 48}).user.hidden == 48


def test_train_refuses_a_bad_config_before_loading_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ecomrec.cli import main

    argv = ["train", "--dataset", str(tmp_path / "no-such-shop"), "--out", str(tmp_path / "r")]
    assert main([*argv, "--config", "quick", "--set", "user.hiden=3"]) == 2
    err = capsys.readouterr().err
    assert "towers/quick.toml + --set user.hiden=3: unknown key(s) user.hiden" in err, err
    assert main([*argv, "--config", "configs/towers/quick.toml"]) == 2
    err = capsys.readouterr().err
    assert "configs/towers/quick.toml does not exist (built-in towers configs by name" in err
    assert not (tmp_path / "r").exists()
