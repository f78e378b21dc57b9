"""The gRPC server: health, reflection, API-key auth, TLS, limits, metrics, graceful stop.

The server is grpcio's asyncio server (``grpc.aio``) on an event loop in its own thread
(:class:`_LoopThread`), so :func:`start_server` and :class:`ServiceHandle` stay plain
synchronous calls for the CLI, the demo and the tests.  Coroutine handlers (Recommend,
health, reflection) run on the loop; plain handlers (the other ecomrec methods) run on
a pool of ``ServeConfig.workers`` threads (grpc.aio's ``migration_thread_pool``).

Health (``grpc.health.v1``) answers NOT_SERVING until :meth:`ServiceHandle.set_ready` is
called with a loaded model and index, and while the index cannot be searched
(:class:`IndexMonitor`).  Health needs no API key; reflection and every ``ecomrec.v1``
method do (``x-api-key: KEY`` or ``authorization: Bearer KEY``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ecomrec.errors import ConfigError
from serving.config import ServeConfig
from serving.index_health import NOT_ATTACHED, IndexMonitor, index_version
from serving.observability import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = "ecomrec.v1.RecommendService"
_OPEN_PREFIX = "/grpc.health.v1.Health/"


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def method_label(method: str) -> str:
    """Metric label of a full method path: one of a FIXED set (:data:`_LABELS`), else
    ``"unknown"`` (caller-chosen method names must never become label values)."""
    return _labels().get(method, "unknown")


@functools.cache
def _labels() -> dict[str, str]:
    from serving._generated.ecomrec.v1 import recommend_pb2

    svc = recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"]
    out = {f"/{SERVICE_NAME}/{m.name}": m.name for m in svc.methods}
    out.update(
        {
            "/grpc.health.v1.Health/Check": "health.Check",
            "/grpc.health.v1.Health/Watch": "health.Watch",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "reflection",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "reflection",
        }
    )
    return out


def _kind(fn: Callable[..., Any]) -> str:
    """How grpc.aio runs a handler: "gen"/"func" in the thread pool, "agen"/"coro" on the loop."""
    if inspect.isasyncgenfunction(fn):
        return "agen"
    if inspect.iscoroutinefunction(fn):
        return "coro"
    return "gen" if inspect.isgeneratorfunction(fn) else "func"


def _guarded(
    fn: Callable[..., Any],
    check: Callable[[Any, Any], tuple[grpc.StatusCode, str] | None],
    release: Callable[[], None] | None = None,
) -> Callable[..., Any]:
    """``fn`` behind ``check(request, context)`` (a refusal aborts with its status) and with
    ``release()`` once the call is over, in the form grpc.aio runs ``fn`` in: a coroutine
    or async generator stays on the loop, a plain function or generator stays in the pool.

    A plain function that returns an iterator must be a generator function here: grpc.aio
    calls a non-generator streaming handler on the loop thread, where a blocking abort
    would deadlock.
    """
    kind = _kind(fn)
    done = release or (lambda: None)

    if kind == "agen":

        async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
            refused = check(request, context)
            if refused is not None:
                await context.abort(*refused)
            try:
                async for item in fn(request, context):
                    yield item
            finally:
                done()

        return agen
    if kind == "coro":

        async def coro(request: Any, context: Any) -> Any:
            refused = check(request, context)
            if refused is not None:
                await context.abort(*refused)
            try:
                return await fn(request, context)
            finally:
                done()

        return coro
    if kind == "gen":

        def gen(request: Any, context: Any) -> Iterator[Any]:
            refused = check(request, context)
            if refused is not None:
                context.abort(*refused)
            try:
                yield from fn(request, context)
            finally:
                done()

        return gen

    def func(request: Any, context: Any) -> Any:
        refused = check(request, context)
        if refused is not None:
            context.abort(*refused)
        try:
            return fn(request, context)
        finally:
            done()

    return func


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The server's gate, run before any handler (and before a request message is read).

    - Calls without a valid API key are rejected with UNAUTHENTICATED by a handler that
      does not wait for the request message.  Only health (``grpc.health.v1``) is open;
      reflection needs a key.
    - Long-lived streams (reflection, RecommendBatch) take one of ``max_streams`` slots
      or get RESOURCE_EXHAUSTED: a blocking stream holds a worker thread, and streams can
      never take every worker from unary calls.  Health ``Watch`` is not limited (a
      coroutine on the loop, it holds no worker).
    - A request that is not a valid protobuf message answers INVALID_ARGUMENT with one
      warning line (gRPC's default is INTERNAL plus a traceback per call).
    - Rejections are counted in ``ecomrec_requests_total`` under a fixed label set.
    """

    def __init__(
        self, keys: Sequence[str], metrics: Metrics | None = None, max_streams: int = 2
    ) -> None:
        self._keys = [k.encode() for k in keys]
        self._metrics = metrics
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams) if max_streams > 0 else None

        async def deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            # request-streaming on purpose: returns without reading a message
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

        self._deny = grpc.stream_unary_rpc_method_handler(deny)
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (handler, its wrapper)

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

    def _count(self, label: str, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(label, code.name).inc()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Coroutine[Any, Any, Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method = details.method or ""
        label = method_label(method)
        if (
            self._keys
            and not method.startswith(_OPEN_PREFIX)
            and not self._ok(details.invocation_metadata)
        ):
            self._count(label, grpc.StatusCode.UNAUTHENTICATED)
            return self._deny
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]  # the same registered handler: its wrapper is built once
        wrapped = self._wrap(handler, method, label)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, method: str, label: str) -> Any:
        behavior = handler.unary_unary or handler.unary_stream
        if behavior is not None and handler.request_deserializer is not None:
            handler = self._safe_decode(handler, label)
        if (handler.request_streaming or handler.response_streaming) and not method.startswith(
            _OPEN_PREFIX
        ):
            handler = self._limit_stream(handler, label)
        return handler

    def _safe_decode(self, handler: Any, label: str) -> Any:
        decode = handler.request_deserializer
        inner = handler.unary_unary or handler.unary_stream

        def safe(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as e:  # DecodeError and friends
                return _Undecodable(e)

        def check(request: Any, context: Any) -> tuple[grpc.StatusCode, str] | None:
            if not isinstance(request, _Undecodable):
                return None
            log.warning("%s: request is not a valid protobuf message (%s)", label, request.error)
            self._count(label, grpc.StatusCode.INVALID_ARGUMENT)
            return grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid protobuf message"

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
        )
        return make(_guarded(inner, check), safe, handler.response_serializer)

    def _limit_stream(self, handler: Any, label: str) -> Any:
        slots = self._streams
        limit = self.max_streams

        def acquire(request: Any, context: Any) -> tuple[grpc.StatusCode, str] | None:
            if slots is not None and slots.acquire(blocking=False):
                return None
            self._count(label, grpc.StatusCode.RESOURCE_EXHAUSTED)
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open streams (at most {limit}); close one or retry later",
            )

        def release() -> None:
            assert slots is not None
            slots.release()

        inner = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        make = {
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            _guarded(inner, acquire, release),
            handler.request_deserializer,
            handler.response_serializer,
        )


class _HealthServicer(health_aio.HealthServicer):
    """grpc_health's asyncio health servicer with ``Watch`` mended.

    Upstream (grpcio-health-checking 1.x) drops a service's shared condition as soon as ANY
    of its watchers ends, so every other open Watch of that service never hears of a later
    change (a load balancer would miss NOT_SERVING at shutdown).  Here the condition lives
    while a watcher still uses it (tests/serving/test_hardening.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self._watching: dict[str, int] = {}

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watching[service] = self._watching.get(service, 0) + 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last:  # only the latest status matters to a watcher
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    await condition.wait()
        finally:
            left = self._watching[service] - 1
            if left > 0:
                self._watching[service] = left
            else:
                del self._watching[service]
                if self._server_watchers.get(service) is condition:
                    del self._server_watchers[service]


class _LoopThread:
    """An asyncio event loop running in its own daemon thread (the gRPC server's)."""

    def __init__(self, name: str = "ecomrec-grpc-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result (from any other thread); from the
        loop's own thread it is only scheduled (waiting there would deadlock)."""
        if threading.current_thread() is self.thread:
            self.loop.create_task(coro)
            return None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)


@dataclass
class ServiceHandle:
    """A started server: its ports, health servicer and a graceful ``stop``.

    Health is SERVING when the service was marked ready (:meth:`set_ready`) AND the
    index is usable (:meth:`set_index_ok`; with ``ServeConfig.unhealthy_on_index_error``
    off a broken index leaves health SERVING, answers stay degraded).
    """

    server: grpc.aio.Server
    port: int
    health: _HealthServicer
    metrics: Metrics
    metrics_port: int | None = None
    unhealthy_on_index_error: bool = True
    _metrics_server: Any = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _ready: bool = False
    _index_ok: bool = True
    _state_lock: threading.Lock = field(default_factory=threading.Lock)
    _monitor: IndexMonitor | None = None
    _loop: _LoopThread | None = None
    _pool: futures.ThreadPoolExecutor | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _on_loop(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 10.0) -> Any:
        assert self._loop is not None
        return self._loop.call(coro, timeout_s)

    def _publish(self) -> None:
        with self._state_lock:
            if self._stopped.is_set():
                return
            ok = self._ready and (self._index_ok or not self.unhealthy_on_index_error)
            st = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            self._on_loop(_set_health(self.health, st))
            self.metrics.ready.set(1 if ok else 0)

    def set_ready(self, ready: bool = True) -> None:
        """Flip health to SERVING (model and index loaded) or NOT_SERVING."""
        self._ready = ready
        self._publish()

    def set_index_ok(self, ok: bool) -> None:
        """Record whether the index can be searched (health follows, see the class doc)."""
        self._index_ok = ok
        self.metrics.index_ok.set(1 if ok else 0)
        self._publish()

    def check_index(self) -> tuple[str | None, str | None]:
        """Check the index now (start-up, tests): see :func:`index_problem`."""
        if self._monitor is None:
            return None, None
        return self._monitor.check_now()

    def stop(self, grace_s: float = 5.0, delay_s: float = 0.0) -> None:
        """NOT_SERVING first, keep answering for ``delay_s`` (load balancers see the
        health change and drain), then close the port and finish in-flight RPCs for
        ``grace_s``."""
        with self._state_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            self._on_loop(self.health.enter_graceful_shutdown())
            self.metrics.ready.set(0)
        if self._monitor is not None:
            self._monitor.stop()
        if delay_s > 0:
            log.info("NOT_SERVING; still answering for %.1f s before closing the port", delay_s)
            time.sleep(delay_s)
        try:
            self._on_loop(self.server.stop(grace_s), grace_s + 5)
        finally:
            if self._loop is not None:
                self._loop.stop()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            srv, thread = self._metrics_server
            srv.shutdown()
            srv.server_close()
            thread.join(timeout=2)
        log.info("server on port %d stopped", self.port)

    def wait(self) -> None:
        """Block until the server was stopped."""
        if self._loop is not None:
            self._loop.thread.join()


async def _set_health(hs: _HealthServicer, status: int) -> None:
    await hs.set("", status)
    await hs.set(SERVICE_NAME, status)


def _engine_index(servicer: Any) -> Any:
    engine = getattr(servicer, "_engine", None)
    return NOT_ATTACHED if engine is None else engine.index


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"ServeConfig.{what}: cannot read {path}: {e.strerror or e}") from e


def _credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    key = _read(cfg.tls_key, "tls_key")
    cert = _read(cfg.tls_cert, "tls_cert")
    try:
        return grpc.ssl_server_credentials([(key, cert)])
    except Exception as e:
        raise ConfigError(f"ServeConfig.tls_cert/tls_key: not a usable PEM pair: {e}") from e


def start_server(cfg: ServeConfig, servicer: Any, metrics: Metrics | None = None) -> ServiceHandle:
    """Start a server with health NOT_SERVING; ``cfg.port = 0`` picks a free port.

    ``servicer`` may have no engine yet (it answers UNAVAILABLE until ``attach``).
    Raises ConfigError (one line, no traceback in the CLI) when a TLS file cannot be
    read or a port cannot be bound.
    """
    metrics = metrics or getattr(servicer, "metrics", None) or Metrics()
    keys = cfg.resolved_api_keys()
    if not keys:
        log.warning("no API keys configured: authentication is OFF (development only)")
    creds = _credentials(cfg)
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # reuse_port: several `ecomrec serve` processes share the port (the kernel spreads
        # connections over them); off by default so a second server on a busy port fails
        ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
    ]
    addr = f"{cfg.host}:{cfg.port}"
    # plain (non-coroutine) handlers and Recommend's "threads" path run on this pool
    pool = futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="ecomrec-rpc")
    loop = _LoopThread()
    loop.loop.set_default_executor(pool)
    hs = _HealthServicer()

    async def make() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            migration_thread_pool=pool,
            interceptors=[ApiKeyInterceptor(keys, metrics, cfg.max_streams)],
            options=options,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        await _set_health(hs, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        add_servicer(server, servicer)
        try:
            port = (
                server.add_secure_port(addr, creds)
                if creds is not None
                else server.add_insecure_port(addr)
            )
        except RuntimeError as e:  # grpcio raises RuntimeError("Failed to bind to address ...")
            port = 0
            log.debug("bind %s: %s", addr, e)
        if port != 0:
            await server.start()
        return server, port

    try:
        server, port = loop.call(make(), 30)
    except BaseException:
        loop.stop()
        pool.shutdown(wait=False)
        raise
    if port == 0:
        loop.stop()
        pool.shutdown(wait=False)
        raise ConfigError(f"cannot listen on {addr}: the port is in use or the host is not local")
    handle = ServiceHandle(
        server,
        port,
        hs,
        metrics,
        unhealthy_on_index_error=cfg.unhealthy_on_index_error,
        _loop=loop,
        _pool=pool,
    )
    handle.set_ready(False)
    metrics.set_index_source(lambda: index_version(_engine_index(servicer)))
    if cfg.metrics_port >= 0:
        from prometheus_client import start_http_server

        try:
            srv, thread = start_http_server(
                cfg.metrics_port, addr=cfg.metrics_host, registry=metrics.registry
            )
        except OSError as e:
            handle.stop(0)
            raise ConfigError(
                f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {e.strerror or e}"
            ) from e
        handle._metrics_server = (srv, thread)
        handle.metrics_port = int(srv.server_port)
    handle._monitor = IndexMonitor(
        handle, lambda: _engine_index(servicer), cfg.index_check_s, cfg.index_full_check_every
    )
    if cfg.index_check_s > 0:
        handle._monitor.start()
    log.info(
        "gRPC server listening on %s (tls=%s, auth=%s)",
        f"{cfg.host}:{port}",
        creds is not None,
        bool(keys),
    )
    return handle


def add_servicer(server: grpc.aio.Server, servicer: Any) -> None:
    """Register the ecomrec servicer on ``server``."""
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc

    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(servicer, server)


def install_signal_handlers(
    handle: ServiceHandle, grace_s: float, delay_s: float = 0.0
) -> threading.Event:
    """SIGTERM/SIGINT -> health NOT_SERVING, answer for ``delay_s`` more, then close the
    port and drain in-flight calls for ``grace_s``; returns an event set when stopped."""
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info(
            "signal %d: NOT_SERVING for %.1f s, then draining for %.1f s", signum, delay_s, grace_s
        )
        handle.stop(grace_s, delay_s)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done
