"""The gRPC server: health, reflection, API-key auth, TLS, limits, metrics, graceful stop.

Health (``grpc.health.v1``) answers NOT_SERVING until :meth:`ServiceHandle.set_ready` is
called with a loaded model and index; health and reflection need no API key, every
``ecomrec.v1`` method does (``x-api-key: KEY`` or ``authorization: Bearer KEY``).
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.config import ServeConfig
from serving.observability import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = "ecomrec.v1.RecommendService"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid API key with UNAUTHENTICATED (health/reflection exempt)."""

    def __init__(self, keys: Sequence[str], metrics: Metrics | None = None) -> None:
        self._keys = [k.encode() for k in keys]
        self._metrics = metrics

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def _ok(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        for k, v in metadata or ():
            value = v if isinstance(v, str) else v.decode(errors="replace")
            if k == "authorization" and value.lower().startswith("bearer "):
                value = value[7:]
            elif k != "x-api-key":
                continue
            cand = value.strip().encode()
            # compare against every key in constant time
            if any(hmac.compare_digest(cand, key) for key in self._keys):
                return True
        return False

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        method = details.method or ""
        if (
            not self._keys
            or method.startswith(_OPEN_PREFIXES)
            or self._ok(details.invocation_metadata)
        ):
            return continuation(details)
        if self._metrics is not None:
            self._metrics.requests.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        return self._deny


@dataclass
class ServiceHandle:
    """A started server: its ports, health servicer and a graceful ``stop``."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    metrics: Metrics
    metrics_port: int | None = None
    _metrics_server: Any = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_ready(self, ready: bool = True) -> None:
        """Flip health to SERVING (model and index loaded) or NOT_SERVING."""
        st = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", st)
        self.health.set(SERVICE_NAME, st)
        self.metrics.ready.set(1 if ready else 0)

    def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING first (load balancers drain), then finish in-flight RPCs for ``grace_s``."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait(grace_s + 1)
        if self._metrics_server is not None:
            srv, thread = self._metrics_server
            srv.shutdown()
            srv.server_close()
            thread.join(timeout=2)
        log.info("server on port %d stopped", self.port)

    def wait(self) -> None:
        self.server.wait_for_termination()


def _credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    key = Path(cfg.tls_key).read_bytes()
    cert = Path(cfg.tls_cert).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


def start_server(cfg: ServeConfig, servicer: Any, metrics: Metrics | None = None) -> ServiceHandle:
    """Start a server with health NOT_SERVING; ``cfg.port = 0`` picks a free port.

    ``servicer`` may have no engine yet (it answers UNAVAILABLE until ``attach``).
    """
    metrics = metrics or getattr(servicer, "metrics", None) or Metrics()
    keys = cfg.resolved_api_keys()
    if not keys:
        log.warning("no API keys configured: authentication is OFF (development only)")
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # reuse_port: several `ecomrec serve` processes share the port (the kernel spreads
        # connections over them); off by default so a second server on a busy port fails
        ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="ecomrec-rpc"),
        interceptors=[ApiKeyInterceptor(keys, metrics)],
        options=options,
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )
    hs = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    add_servicer(server, servicer)
    addr = f"{cfg.host}:{cfg.port}"
    creds = _credentials(cfg)
    port = (
        server.add_secure_port(addr, creds) if creds is not None else server.add_insecure_port(addr)
    )
    if port == 0:
        raise OSError(f"cannot bind {addr}")
    server.start()
    handle = ServiceHandle(server, port, hs, metrics)
    handle.set_ready(False)
    if cfg.metrics_port >= 0:
        from prometheus_client import start_http_server

        srv, thread = start_http_server(cfg.metrics_port, addr=cfg.host, registry=metrics.registry)
        handle._metrics_server = (srv, thread)
        handle.metrics_port = int(srv.server_port)
    log.info(
        "gRPC server listening on %s (tls=%s, auth=%s)",
        f"{cfg.host}:{port}",
        creds is not None,
        bool(keys),
    )
    return handle


def add_servicer(server: grpc.Server, servicer: Any) -> None:
    """Register the ecomrec servicer on ``server``."""
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc

    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(servicer, server)


def install_signal_handlers(handle: ServiceHandle, grace_s: float) -> threading.Event:
    """SIGTERM/SIGINT -> graceful stop; returns an event set when stopped."""
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: draining for %.1f s", signum, grace_s)
        handle.stop(grace_s)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done
