"""deploy/: every manifest validates offline against its schema, and the config the
manifests hand to the service is the config the service parses (ports, names, Qdrant)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ecomrec.errors import ConfigError
from indexing.base import IndexConfig
from indexing.qdrant_server import ServerStore
from serving.config import load_index_config, load_serve_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
K8S_VERSION = "1.37.0"  # schemas bundled with kubernetes-validate (no network)


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in K8S_FILES:
        if f.name == "kustomization.yaml":
            continue
        for d in docs(f):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


@pytest.mark.parametrize("path", [f for f in K8S_FILES if f.name != "kustomization.yaml"], ids=str)
def test_kubernetes_manifests_validate_strictly(path: Path) -> None:
    for d in docs(path):
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    bad = resources()[("Deployment", "recommend")]
    bad = {**bad, "spec": {**bad["spec"], "replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    typo = {**resources()[("Service", "qdrant")], "specs": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    k = docs(DEPLOY / "k8s" / "kustomization.yaml")[0]
    assert sorted(k["resources"]) == sorted(
        f.name for f in K8S_FILES if f.name != "kustomization.yaml"
    )


def _check_compose(*files: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)


def test_compose_files_validate_against_the_vendored_compose_schema(tmp_path: Path) -> None:
    ok = _check_compose(DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    broken["services"]["recommend"]["helthcheck"] = {"test": ["CMD", "true"]}  # a typo
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken))
    assert _check_compose(tmp_path / "bad.yaml").returncode != 0


def _container(kind: str, name: str) -> dict[str, Any]:
    spec = resources()[(kind, name)]["spec"]
    if kind == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"]["containers"][0])


def _arg(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))


def test_the_service_parses_the_config_the_manifests_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = resources()
    file_toml = (DEPLOY / "config" / "serve.toml").read_text()
    cm_toml = res[("ConfigMap", "recommend-config")]["data"]["serve.toml"]
    assert cm_toml.strip() == file_toml.strip()  # Kubernetes and compose pass the same file
    (tmp_path / "serve.toml").write_text(cm_toml)
    serve = load_serve_config(tmp_path / "serve.toml")
    index = load_index_config(tmp_path / "serve.toml")
    assert index is not None and index.backend == "server"

    # the Recommend pods: config path, ports, probes, secrets
    c = _container("Deployment", "recommend")
    assert _arg(c["args"], "--config") == "/etc/ecomrec/serve.toml"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/ecomrec"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": serve.port, "metrics": serve.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == serve.port
    env = {e["name"]: e for e in c["env"]}
    assert env[serve.api_keys_env]["valueFrom"]["secretKeyRef"]["name"] == "ecomrec-secrets"
    assert env[index.api_key_env]["valueFrom"]["secretKeyRef"]["key"] == index.api_key_env
    pod = res[("Deployment", "recommend")]["spec"]["template"]["metadata"]["annotations"]
    assert int(pod["prometheus.io/port"]) == serve.metrics_port
    svc = res[("Service", "recommend")]["spec"]
    assert svc["type"] == "LoadBalancer" and svc["ports"][0]["targetPort"] == serve.port
    assert res[("Deployment", "recommend")]["spec"]["replicas"] >= 2

    # Triton: the service's triton_url is the Triton Service's gRPC port
    host, port = serve.triton_url.rsplit(":", 1)
    tsvc = res[("Service", host)]["spec"]
    assert int(port) in [p["port"] for p in tsvc["ports"] if p["name"] == "grpc"]
    tc = _container("Deployment", "triton")
    assert int(port) in [p["containerPort"] for p in tc["ports"]]
    assert serve.encoder == "triton" and serve.fallback_to_inprocess

    # Qdrant: the URL is the cluster's Service; replicas fit the 3 nodes
    assert index.location == "http://qdrant:6333"
    assert 6333 in [p["port"] for p in res[("Service", "qdrant")]["spec"]["ports"]]
    nodes = res[("StatefulSet", "qdrant")]["spec"]["replicas"]
    assert nodes == 3 and index.replicas == 2 and index.write_consistency == 2
    assert index.shards % nodes == 0
    qenv = {e["name"]: e for e in _container("StatefulSet", "qdrant")["env"]}
    assert qenv["QDRANT__SERVICE__API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == (
        index.api_key_env
    )

    # the refresh CronJob reads the same ConfigMap and talks to the same cluster
    rc = _container("CronJob", "refresh")
    assert _arg(rc["args"], "--config") == "/etc/ecomrec/serve.toml"
    assert _arg(rc["args"], "--index") == index.location
    cron_vols = res[("CronJob", "refresh")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": "recommend-config"}} in cron_vols["volumes"]

    # the API key reaches the Qdrant client from the environment, not the file
    monkeypatch.setenv(index.api_key_env, "s3cret")
    assert index.api_key is None and index.resolved_api_key() == "s3cret"


def test_compose_passes_the_same_config_and_ports() -> None:
    comp = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    serve = load_serve_config(DEPLOY / "config" / "serve.toml")
    rec = comp["services"]["recommend"]
    base = comp["x-ecomrec"]
    assert "./config/serve.toml:/etc/ecomrec/serve.toml:ro" in base["volumes"]
    assert "--config=/etc/ecomrec/serve.toml" in rec["command"]
    assert f"127.0.0.1:{serve.port}" in rec["healthcheck"]["test"][-1]
    assert rec["deploy"]["replicas"] >= 2
    assert {"qdrant-0", "qdrant-1", "qdrant-2", "qdrant", "triton", "lb", "prometheus"} <= set(
        comp["services"]
    )
    prom = yaml.safe_load((DEPLOY / "config" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "recommend")
    assert job["dns_sd_configs"][0]["port"] == serve.metrics_port
    nginx = (DEPLOY / "config" / "nginx.conf").read_text()
    assert f"server recommend:{serve.port}" in nginx and "grpc_pass" in nginx


class _QdrantWire:
    """A localhost HTTP endpoint that answers the REST calls of creating a collection the
    way a Qdrant server does and records each request (method, path, JSON body).

    No Qdrant server runs on this machine, and qdrant-client's local mode drops shard and
    replica settings; so the real client is driven over HTTP and the test reads what a
    cluster would receive on the wire."""

    def __init__(self) -> None:
        import http.server
        import importlib.metadata
        import json
        import threading

        calls: list[tuple[str, str, Any]] = []
        self.calls = calls

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, result: Any) -> None:
                body = json.dumps({"result": result, "status": "ok", "time": 0.0}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _record(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                data = json.loads(self.rfile.read(n)) if n else None
                calls.append((self.command, self.path.split("?")[0], data))
                return data

            def do_GET(self) -> None:
                self._record()
                if self.path == "/":  # the client's version check
                    version = importlib.metadata.version("qdrant-client")
                    body = json.dumps({"title": "qdrant", "version": version}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.endswith("/exists"):
                    self._answer({"exists": False})
                else:
                    self.send_response(404)
                    self.end_headers()

            def do_PUT(self) -> None:
                self._record()
                if self.path.split("?")[0].endswith("/index"):
                    self._answer({"operation_id": 1, "status": "completed"})
                else:
                    self._answer(True)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        import time

        end = time.monotonic() + 10  # the client checks the server version in a thread
        while ("GET", "/", None) not in self.calls and time.monotonic() < end:
            time.sleep(0.01)
        self.server.shutdown()
        self.server.server_close()


def test_the_collection_gets_shards_replicas_and_write_consistency_from_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from indexing.base import PAYLOAD_INDEXES

    index = load_index_config(DEPLOY / "config" / "serve.toml")
    assert index is not None
    monkeypatch.delenv(index.api_key_env, raising=False)  # plain HTTP: no key to send
    wire = _QdrantWire()
    try:
        store = ServerStore(dataclasses.replace(index, location=wire.url))
        store.create_version("items_v1", 32, dict(PAYLOAD_INDEXES))
    finally:
        wire.close()
    created = [
        body for verb, path, body in wire.calls if (verb, path) == ("PUT", "/collections/items_v1")
    ]
    assert len(created) == 1
    assert created[0]["shard_number"] == 6
    assert created[0]["replication_factor"] == 2
    assert created[0]["write_consistency_factor"] == 2
    assert created[0]["vectors"] == {"size": 32, "distance": "Cosine"}
    indexed = {
        body["field_name"]: body["field_schema"]
        for verb, path, body in wire.calls
        if (verb, path) == ("PUT", "/collections/items_v1/index")
    }
    assert indexed == dict(PAYLOAD_INDEXES)
    with pytest.raises(ConfigError, match="write_consistency"):
        IndexConfig(backend="server", location="http://q:6333", replicas=1, write_consistency=2)
