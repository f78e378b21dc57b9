"""The churn-warnings sink: JSONL round trip through ``read_warnings``, torn lines, webhook."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ecomrec.errors import DataError
from segments.alerts import (
    ChurnWarning,
    DeliveryError,
    JsonlSink,
    Reason,
    WebhookSink,
    read_warnings,
)


def _w(cid: str, ts: int, risk: float = 0.8) -> ChurnWarning:
    return ChurnWarning(
        customer_id=cid,
        ts=ts,
        risk=risk,
        threshold=0.7,
        reasons=(Reason("recency", "no purchase for 64 days (usual gap 21)"),),
        segment="At Risk",
        previous_segment="Loyal",
    )


def test_round_trip_newest_first_and_since(tmp_path):
    path = tmp_path / "warn" / "churn.jsonl"
    sink = JsonlSink(path)
    sink.publish([_w("a", 1_000_000), _w("b", 3_000_000)])
    sink.publish([_w("c", 2_000_000, 0.91)])
    got = read_warnings(path)
    assert [w["customer_id"] for w in got] == ["b", "c", "a"]
    assert got[1] == {
        "customer_id": "c",
        "ts": "1970-01-24T03:33:20+00:00",
        "risk": 0.91,
        "threshold": 0.7,
        "reasons": [{"kind": "recency", "text": "no purchase for 64 days (usual gap 21)"}],
        "segment": "At Risk",
        "previous_segment": "Loyal",
    }
    assert [w["customer_id"] for w in read_warnings(path, since=2_000_000)] == ["b", "c"]
    assert [w["customer_id"] for w in read_warnings(path, since="1970-01-24T03:33:20Z")] == [
        "b",
        "c",
    ]
    assert read_warnings(tmp_path / "missing.jsonl") == []


def test_torn_last_line_skipped_and_repaired(tmp_path):
    path = tmp_path / "churn.jsonl"
    sink = JsonlSink(path)
    sink.publish([_w("a", 10)])
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"customer_id": "tor')
    assert [w["customer_id"] for w in read_warnings(path)] == ["a"]
    sink.publish([_w("b", 20)])  # the next append starts on a new line
    assert [w["customer_id"] for w in read_warnings(path)] == ["b", "a"]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith('{"customer_id": "tor')


def test_bad_line_named(tmp_path):
    path = tmp_path / "churn.jsonl"
    path.write_text('{"customer_id": "a"}\n')
    with pytest.raises(DataError, match=r"line 1: missing field 'ts'"):
        read_warnings(path)
    with pytest.raises(DataError, match="reason kind"):
        Reason("mood", "x")


def test_webhook_retried_until_delivered():
    got: list[dict] = []
    calls = {"/hook": 0, "/auth": 0}

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            calls[self.path] += 1
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/auth":  # a refusal: never retried
                self.send_response(401)
            elif calls["/hook"] == 1:  # first try fails: the sink must retry
                self.send_response(503)
            else:
                got.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        WebhookSink(f"{url}/hook", retries=2, backoff_s=0.01).publish([_w("a", 5)])
        with pytest.raises(DeliveryError, match="refused the warnings: 401"):
            WebhookSink(f"{url}/auth", retries=3, backoff_s=0.01).publish([_w("a", 5)])
    finally:
        srv.shutdown()
        srv.server_close()
    assert calls == {"/hook": 2, "/auth": 1}
    assert got[0]["warnings"][0]["customer_id"] == "a"
    with pytest.raises(DeliveryError, match="failed after 2 tries"):  # nobody listening
        WebhookSink(f"{url}/hook", retries=1, backoff_s=0.01, timeout_s=1).publish([_w("a", 5)])


def test_watch_command_errors_named(tmp_path, capsys):
    """Bad input to `ecomrec churn watch`: a clear error naming the option, exit 2."""
    from ecomrec.cli import main

    base = ["churn", "watch", "--dataset", str(tmp_path / "shop"), "--once"]
    assert main([*base, "--sink", str(tmp_path / "w.jsonl")]) == 2
    assert "give one of --event-log PATH or --nats SERVERS" in capsys.readouterr().err
    missing = tmp_path / "nope.db"
    assert main([*base, "--sink", str(tmp_path / "w.jsonl"), "--event-log", str(missing)]) == 2
    assert f"--event-log {missing}: no such file" in capsys.readouterr().err
    (tmp_path / "events.db").write_bytes(b"")
    argv = [*base, "--sink", str(tmp_path), "--event-log", str(tmp_path / "events.db")]
    assert main(argv) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err
    argv = [*base, "--sink", str(tmp_path / "w.jsonl"), "--event-log", str(tmp_path / "events.db")]
    assert main([*argv, "--set", "alerts.rearm_below=0.9"]) == 2
    assert "rearm_below (0.9) <= threshold (0.7)" in capsys.readouterr().err
