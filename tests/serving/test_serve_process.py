"""``ecomrec serve`` as its own process (issue 14): a damaged index at start-up, a vector
file truncated while serving (before: SIGBUS), SIGTERM (NOT_SERVING before the port
closes), and start-up errors as one line (missing TLS file, port in use)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.serving.conftest import API_KEY, build_index
from tests.serving.test_hardening import damage


def _vector_file(root: Path) -> Path:
    live = json.loads((root / "aliases" / "items.json").read_text())["version"]
    return sorted((root / "versions" / live).rglob("vector_storage/vectors/chunk_*.mmap"))[0]


class Proc:
    """A ``ecomrec serve`` subprocess; its log lines are collected in the background."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "ecomrec", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "ECOMREC_API_KEYS": API_KEY, **(env or {})},
        )
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.text)
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the server log (rc={self.p.poll()}):\n{self.text}")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture(scope="module")
def dataset_dir(serve_shop: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shop")
    serve_shop.save(d)
    return d


def _health(target: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        return int(h.Check(health_pb2.HealthCheckRequest(service=""), timeout=3).status)


def _recommend(target: str, user: str) -> Any:
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

    with grpc.insecure_channel(target) as ch:
        return pbg.RecommendServiceStub(ch).Recommend(
            pb.RecommendRequest(user_id=user, k=5), metadata=(("x-api-key", API_KEY),), timeout=5
        )


@pytest.mark.slow
def test_serve_process_damaged_index_truncation_and_sigterm(
    run_dir: Path, dataset_dir: Path, parts: Any, tmp_path: Path
) -> None:
    from grpc_health.v1 import health_pb2

    serving_st = health_pb2.HealthCheckResponse.SERVING
    d = tmp_path / "idx"
    build_index(d, parts)
    damage(_vector_file(d), "truncate")  # broken before start-up
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        "[serve]\nport = 0\nindex_check_s = 0.5\nshutdown_delay_s = 4.0\ngrace_s = 1.0\n"
        f'index_copy_dir = "{tmp_path / "copies"}"\n'
    )
    user = parts.dataset.users.to_external(int(parts.history.users()[0]))
    proc = Proc(
        [
            "--model",
            str(run_dir),
            "--dataset",
            str(dataset_dir),
            "--index",
            str(d),
            "--config",
            str(cfg),
        ]
    )
    try:
        port = proc.wait_for(r"listening on [\d.]+:(\d+)").group(1)
        target = f"127.0.0.1:{port}"
        proc.wait_for(r"index could not be opened: index version \S+ is damaged")
        proc.wait_for(r"serving \S+ \(index UNAVAILABLE")
        assert _health(target) != serving_st
        r = _recommend(target, user)
        assert r.degraded and list(r.degraded_reasons) == ["INDEX_UNAVAILABLE"]
        # a good version is published: the monitor brings health back
        build_index(d, parts)
        end = time.monotonic() + 20
        while _health(target) != serving_st and time.monotonic() < end:
            time.sleep(0.2)
        assert _health(target) == serving_st
        good = _recommend(target, user)
        assert not good.degraded
        # truncating the live vector file while serving: no SIGBUS, same answers
        damage(_vector_file(d), "truncate")
        again = _recommend(target, user)
        assert proc.p.poll() is None
        assert [i.item_id for i in again.items] == [i.item_id for i in good.items]
        proc.wait_for(r"restart will refuse")
        # SIGTERM: NOT_SERVING while still answering for shutdown_delay_s, then exit 0
        proc.p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 3.0  # NOT_SERVING well inside the 4 s delay
        while _health(target) == serving_st and time.monotonic() < end:
            time.sleep(0.02)
        assert _health(target) != serving_st
        assert len(_recommend(target, user).items) == 5
        assert proc.p.wait(20) == 0
        assert "Traceback" not in proc.text
        assert not any((tmp_path / "copies").iterdir()), "private index copies left behind"
    finally:
        proc.kill()


@pytest.mark.slow
def test_start_up_errors_are_one_line(run_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    base = ["--model", str(run_dir), "--dataset", str(dataset_dir), "--index", str(tmp_path)]
    cfg = tmp_path / "tls.toml"
    cfg.write_text(
        f'[serve]\nport = 0\ntls_cert = "{tmp_path}/nope.crt"\ntls_key = "{tmp_path}/nope.key"\n'
    )
    tls = Proc([*base, "--config", str(cfg)])
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        so.listen(1)
        busy = so.getsockname()[1]
        used = Proc([*base, "--port", str(busy)])
        try:
            assert used.p.wait(120) == 2
            assert tls.p.wait(120) == 2
        finally:
            used.kill()
            tls.kill()
    assert "Traceback" not in tls.text and "Traceback" not in used.text
    assert re.search(r"ecomrec: error: ServeConfig\.tls_key: cannot read .*nope\.key", tls.text)
    assert re.search(rf"ecomrec: error: cannot listen on 127\.0\.0\.1:{busy}", used.text)
