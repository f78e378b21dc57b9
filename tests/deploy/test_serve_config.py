"""One serve.toml: deploy/config/serve.toml is derived from the shipped
ecomrec/configs/serving/serve.toml and may differ from it only in the keys its
"deploy-specific" line documents; serve, index build and refresh all read it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from ecomrec.config import builtin_config, to_dict
from ecomrec.errors import ConfigError
from serving.config import load_index_config, load_serve_config

DEPLOY_TOML = Path(__file__).resolve().parents[2] / "deploy" / "config" / "serve.toml"
SHIPPED_TOML = builtin_config("serving", "serve")


def documented_keys(path: Path) -> set[str]:
    """The keys named on the file's ``# deploy-specific: a, b`` line."""
    m = re.search(r"^# deploy-specific: (.+)$", path.read_text(), re.M)
    assert m, f"{path} has no '# deploy-specific:' line"
    return {k.strip() for k in m.group(1).split(",")}


def differing_keys(deploy: Path, shipped: Path) -> set[str]:
    """ServeConfig fields whose effective values (file or default) differ."""
    a, b = to_dict(load_serve_config(deploy)), to_dict(load_serve_config(shipped))
    return {k for k in a if a[k] != b[k]}


def test_deploy_serve_toml_differs_only_in_its_documented_keys() -> None:
    documented = documented_keys(DEPLOY_TOML)
    # exactly: an undocumented difference is drift, a documented key that no longer
    # differs is a stale note
    assert differing_keys(DEPLOY_TOML, SHIPPED_TOML) == documented
    # and each deliberate difference is written in the deploy file, not a default
    import tomllib

    written = tomllib.loads(DEPLOY_TOML.read_text())["serve"]
    assert documented <= set(written), documented - set(written)
    # the metrics are reachable from Prometheus (scrapes the pod address) in deploy only
    assert load_serve_config(DEPLOY_TOML).metrics_host == "0.0.0.0"
    assert load_serve_config(SHIPPED_TOML).metrics_host == "127.0.0.1"


def test_the_drift_check_catches_a_changed_value_and_a_new_default(tmp_path: Path) -> None:
    text = DEPLOY_TOML.read_text()
    drifted = tmp_path / "serve.toml"
    drifted.write_text(text.replace("max_k = 200", "max_k = 100"))
    assert differing_keys(drifted, SHIPPED_TOML) - documented_keys(drifted) == {"max_k"}
    # a key set in the shipped file but left to its default in deploy's is drift too
    shipped = tmp_path / "shipped.toml"
    shipped.write_text(SHIPPED_TOML.read_text().replace("workers = 8", "workers = 6"))
    (tmp_path / "rerank.toml").write_text(builtin_config("serving", "rerank").read_text())
    assert "workers" in differing_keys(DEPLOY_TOML, shipped)


def test_serve_index_and_refresh_read_the_one_deploy_file() -> None:
    """The file compose/Kubernetes mount for serve, `index build` and `refresh`."""
    from indexing.cli import _config as index_cli_config
    from lifecycle.refresh import load_config as load_refresh_config

    index = load_index_config(DEPLOY_TOML)
    assert index is not None and (index.backend, index.shards) == ("server", 6)
    ns = argparse.Namespace(
        config=str(DEPLOY_TOML),
        set=["index.hnsw_m=16"],
        index=None,
        backend=None,
        api_key=None,
        alias=None,
    )
    built = index_cli_config(ns)
    assert (built.location, built.replicas, built.hnsw_m) == ("http://qdrant:6333", 2, 16)
    refresh_cfg, index_table = load_refresh_config(DEPLOY_TOML, ["refresh.epochs=3"])
    assert refresh_cfg.epochs == 3 and index_table["write_consistency"] == 2


def test_a_misspelt_table_in_the_deploy_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "serve.toml"
    bad.write_text(DEPLOY_TOML.read_text().replace("[index]", "[indx]"))
    for load in (load_serve_config, load_index_config):
        with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad))}.*indx"):
            load(bad)
