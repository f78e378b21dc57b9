"""deploy/: the NATS JetStream cluster of the live event log. The config compose and
Kubernetes pass is one file, the real nats-server accepts it (and refuses a typo), its
routes name the 3 StatefulSet pods / compose aliases, and the stream's replicas fit."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from intake.live_log_nats import NatsLogConfig
from intake.nats_local import nats_server_binary
from tests.deploy.test_manifests import DEPLOY, resources

CONF = DEPLOY / "config" / "nats.conf"


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SERVER_NAME": "nats-0"}
    cmd = [nats_server_binary(), "-t", "-c", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)


def test_nats_server_accepts_the_config_and_refuses_a_typo(tmp_path: Path) -> None:
    ok = _check(CONF)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text(CONF.read_text().replace("max_file_store", "max_file_stor"))
    res = _check(bad)
    assert res.returncode != 0 and "max_file_stor" in res.stderr + res.stdout


def test_kubernetes_and_compose_run_the_same_three_node_cluster() -> None:
    text = CONF.read_text()
    res = resources()
    assert res[("ConfigMap", "nats-config")]["data"]["nats.conf"].strip() == text.strip()
    sts = res[("StatefulSet", "nats")]["spec"]
    nodes = sts["replicas"]
    assert nodes == 3 and NatsLogConfig().replicas == nodes
    headless = sts["serviceName"]
    routes = re.findall(r"nats://([\w.-]+):(\d+)", text)
    assert routes == [(f"nats-{i}.{headless}", "6222") for i in range(nodes)]
    c = sts["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"client": 4222, "cluster": 6222, "monitor": 8222}
    assert "listen: 0.0.0.0:4222" in text and "http: 0.0.0.0:8222" in text
    assert c["env"][0]["name"] == "SERVER_NAME" and "$SERVER_NAME" in text
    mount = next(m for m in c["volumeMounts"] if m["name"] == "data")
    assert "store_dir: " + mount["mountPath"] in text
    svc = res[("Service", "nats")]["spec"]["ports"][0]
    assert svc["port"] == 4222
    assert res[("PodDisruptionBudget", "nats")]["spec"]["maxUnavailable"] == 1

    comp = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for i in range(nodes):
        svc_c = comp["services"][f"nats-{i}"]
        assert svc_c["environment"]["SERVER_NAME"] == f"nats-{i}"
        assert f"nats-{i}.{headless}" in svc_c["networks"]["default"]["aliases"]
        assert "./config/nats.conf:/etc/nats/nats.conf:ro" in svc_c["volumes"]
        assert f"nats-{i}:{mount['mountPath']}" in svc_c["volumes"]


def test_the_service_config_serves_on_the_nats_cluster() -> None:
    """deploy/config/serve.toml (= the Recommend ConfigMap) names the 3 nodes by the names
    both Kubernetes (headless Service) and compose (network aliases) resolve, on the client
    port; compose starts the service after the nodes."""
    from serving.config import load_serve_config

    cfg = load_serve_config(DEPLOY / "config" / "serve.toml")
    assert cfg.event_backend == "nats"
    res = resources()
    headless = res[("StatefulSet", "nats")]["spec"]["serviceName"]
    assert cfg.nats_servers == tuple(f"nats://nats-{i}.{headless}:4222" for i in range(3))
    assert cfg.nats_stream == NatsLogConfig().stream
    comp = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    after = comp["services"]["recommend"]["depends_on"]
    assert all(after[f"nats-{i}"]["condition"] == "service_healthy" for i in range(3))
