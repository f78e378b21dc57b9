"""The gRPC server: health, reflection, API-key auth, TLS, limits, metrics, graceful stop.

The server is grpcio's asyncio server (``grpc.aio``) on an event loop in its own thread
(:class:`_LoopThread`), so :func:`start_server` and :class:`ServiceHandle` stay plain
synchronous calls for the CLI, the demo and the tests.  Every handler is async (ecomrec
methods, health, reflection) and runs on the loop; their blocking work runs on a pool of
``ServeConfig.workers`` threads, the loop's default executor.  The gate
(:class:`ApiKeyInterceptor`) keeps the call budgets: keyed calls, keyless health calls,
RecommendBatch and reflection streams, each with its own limit.

Health (``grpc.health.v1``) answers NOT_SERVING until :meth:`ServiceHandle.set_ready` is
called with a loaded model and index, and while the index cannot be searched
(:class:`IndexMonitor`).  Health needs no API key; reflection and every ``ecomrec.v1``
method do (``x-api-key: KEY`` or ``authorization: Bearer KEY``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import inspect
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
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
from serving.observability import LogLimiter, Metrics

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


#: Why the gate refuses a call (``ecomrec_refused_total{reason}``): a fixed set.
REFUSALS = (
    "unauthenticated",
    "rpc_limit",
    "open_rpc_limit",
    "batch_streams",
    "reflection_streams",
    "bad_protobuf",
    "request_timeout",
)
#: ``ecomrec_requests_total{code}`` of a call that ended before its request message was read
#: (client cancel or deadline, or a message over ``max_message_bytes``: gRPC refused it).
NO_REQUEST = "NO_REQUEST"

_BATCH_METHOD = f"/{SERVICE_NAME}/RecommendBatch"
#: every server-streaming batch call: each takes one of the gate's ``max_streams`` slots
_BATCH_METHODS = frozenset(
    {_BATCH_METHOD}
    | {f"/{SERVICE_NAME}/{m}" for m in ("CompleteBasketBatch", "SearchProductsBatch")}
)
_REFLECTION_PREFIX = "/grpc.reflection."


class _Budget:
    """Calls in flight against a limit.  Touched on the event loop only (the gate and the
    calls' done-callbacks), so a plain int needs no lock."""

    __slots__ = ("limit", "n", "name")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.n = 0

    def take(self) -> bool:
        if self.n >= self.limit:
            return False
        self.n += 1
        return True

    def give(self) -> None:
        self.n -= 1


class _CallState:
    """What the gate knows of one admitted call (a context variable of its task)."""

    __slots__ = ("expired", "started")

    def __init__(self, started: bool) -> None:
        self.started = started  # the handler ran (the request message was read)
        self.expired = False  # a keyless call that sent no request in time


_CALL: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar(
    "ecomrec_call", default=None
)


def _guarded(
    fn: Callable[..., Any], check: Callable[[Any, Any], tuple[grpc.StatusCode, str] | None]
) -> Callable[..., Any]:
    """``fn`` (a coroutine or async generator function: every handler here is async) behind
    ``check(request, context)``; a refusal aborts with its status."""
    if inspect.isasyncgenfunction(fn):

        async def agen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            refused = check(request, context)
            if refused is not None:
                await context.abort(*refused)
            async for item in fn(request, context):
                yield item

        return agen
    if inspect.iscoroutinefunction(fn):

        async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refused = check(request, context)
            if refused is not None:
                await context.abort(*refused)
            return await fn(request, context)

        return coro
    raise TypeError(
        f"{getattr(fn, '__qualname__', fn)}: every handler must be async (a coroutine or an "
        "async generator); run blocking work with run_in_executor"
    )


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The server's gate, run in each call's task before its handler (and before a request
    message is read).  It admits a call against budgets it counts itself, released by the
    task's done-callback whatever ends the call (answer, abort, client cancel, deadline,
    a request that never arrives):

    - Without a valid API key only health (``grpc.health.v1``) is open; anything else is
      UNAUTHENTICATED at once.  Reflection needs a key.
    - Keyless health calls share ``max_open_rpcs``; every other call shares
      ``max_concurrent_rpcs``: callers without a key can never take a keyed caller's
      place.  A keyless call must send its request within ``open_request_timeout_s``.
    - RecommendBatch streams take one of ``max_streams`` slots, reflection streams one of
      ``max_reflection_streams`` (separate: idle reflection never blocks batches).
    - A request that is not a valid protobuf message answers INVALID_ARGUMENT (gRPC's
      default is INTERNAL plus a traceback per call), logged at most every 10 s.
    - Refusals are counted in ``ecomrec_requests_total`` and ``ecomrec_refused_total``
      under fixed label sets.
    """

    def __init__(
        self,
        keys: Sequence[str],
        metrics: Metrics | None = None,
        max_streams: int = 2,
        *,
        max_concurrent_rpcs: int = 256,
        max_open_rpcs: int = 32,
        max_reflection_streams: int = 2,
        open_request_timeout_s: float = 5.0,
    ) -> None:
        self._keys = [k.encode() for k in keys]
        self._metrics = metrics
        self.max_streams = max_streams
        self.open_request_timeout_s = open_request_timeout_s
        self.rpcs = _Budget("rpcs", max_concurrent_rpcs)
        self.open = _Budget("open", max_open_rpcs)
        self.batches = _Budget("batch_streams", max_streams)
        self.reflection = _Budget("reflection_streams", max_reflection_streams)
        self._refusals: dict[tuple[grpc.StatusCode, str], Any] = {}
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method -> (handler, its wrapper)
        self._bad_log = LogLimiter(log, 10.0)
        if metrics is not None:
            metrics.inflight.source = self.inflight

    def inflight(self) -> dict[str, int]:
        """Calls holding each budget now (``ecomrec_inflight``)."""
        return {b.name: b.n for b in (self.rpcs, self.open, self.batches, self.reflection)}

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

    def _refuse(self, label: str, code: grpc.StatusCode, reason: str, message: str) -> Any:
        """A handler that answers ``code`` without reading the request (counted here)."""
        if self._metrics is not None:
            self._metrics.record_refusal(label, code.name, reason)
        handler = self._refusals.get((code, message))
        if handler is None:

            async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                # request-streaming on purpose: returns without reading a message
                await context.abort(code, message)

            handler = grpc.stream_unary_rpc_method_handler(refuse)
            self._refusals[(code, message)] = handler
        return handler

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Coroutine[Any, Any, Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method = details.method or ""
        label = method_label(method)
        is_open = method.startswith(_OPEN_PREFIX)
        keyed = bool(self._keys) and self._ok(details.invocation_metadata)
        if self._keys and not keyed and not is_open:
            return self._refuse(
                label,
                grpc.StatusCode.UNAUTHENTICATED,
                "unauthenticated",
                "missing or invalid API key",
            )
        if is_open and not keyed:
            budget, reason = self.open, "open_rpc_limit"
            message = (
                f"too many calls without an API key in flight (at most {self.open.limit}); "
                "retry later or send the API key"
            )
        else:
            budget, reason = self.rpcs, "rpc_limit"
            message = f"too many calls in flight (at most {self.rpcs.limit}); retry later"
        if not budget.take():
            return self._refuse(label, grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message)
        stream = None
        if method in _BATCH_METHODS:
            stream, what = self.batches, "batch"
        elif method.startswith(_REFLECTION_PREFIX):
            stream, what = self.reflection, "reflection"
        if stream is not None and not stream.take():
            budget.give()
            return self._refuse(
                label,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{stream.name}",
                f"too many open {what} streams (at most {stream.limit}); close one or retry later",
            )
        try:
            handler = await continuation(details)
        except BaseException:
            budget.give()
            if stream is not None:
                stream.give()
            raise
        state = _CallState(started=handler is None or handler.request_streaming)
        _CALL.set(state)
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs every call in its own task
        timer = None
        if is_open and not keyed and not state.started:
            timer = asyncio.get_running_loop().call_later(
                self.open_request_timeout_s, self._expire, task, state
            )

        def done(_: Any) -> None:
            budget.give()
            if stream is not None:
                stream.give()
            if timer is not None:
                timer.cancel()
            if self._metrics is not None and not state.started:
                if state.expired:
                    self._metrics.record_refusal(
                        label, grpc.StatusCode.CANCELLED.name, "request_timeout"
                    )
                else:
                    self._metrics.count(label, NO_REQUEST)

        task.add_done_callback(done)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]  # the same registered handler: its wrapper is built once
        wrapped = self._wrap(handler, label)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _expire(task: asyncio.Task[Any], state: _CallState) -> None:
        if not state.started:
            state.expired = True
            task.cancel()

    def _wrap(self, handler: Any, label: str) -> Any:
        """Unary-request handlers: undecodable bytes answer INVALID_ARGUMENT, and the call
        is marked started once its request was read."""
        if handler.request_streaming:
            return handler
        decode = handler.request_deserializer
        inner = handler.unary_unary or handler.unary_stream

        def safe(data: bytes) -> Any:
            try:
                return decode(data) if decode is not None else data
            except Exception as e:  # DecodeError and friends
                return _Undecodable(e)

        def check(request: Any, context: Any) -> tuple[grpc.StatusCode, str] | None:
            state = _CALL.get()
            if state is not None:
                state.started = True
            if not isinstance(request, _Undecodable):
                return None
            self._bad_log.log(
                logging.WARNING,
                label,
                "%s: request is not a valid protobuf message (%s)",
                label,
                request.error,
            )
            if self._metrics is not None:
                self._metrics.record_refusal(
                    label, grpc.StatusCode.INVALID_ARGUMENT.name, "bad_protobuf"
                )
            return grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid protobuf message"

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
        )
        return make(_guarded(inner, check), safe, handler.response_serializer)


class _HealthServicer(health_aio.HealthServicer):
    """grpc_health's asyncio health servicer with ``Watch`` mended.

    Upstream (grpcio-health-checking 1.x) drops a service's shared condition as soon as ANY
    of its watchers ends, so every other open Watch of that service never hears of a later
    change (a load balancer would miss NOT_SERVING at shutdown).  Here the condition lives
    while a watcher still uses it (tests/serving/test_hardening.py).  :meth:`end_watches`
    ends every open Watch (after it sent the latest status) so a graceful stop does not
    wait ``grace_s`` for them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watching: dict[str, int] = {}
        self._ending = False

    async def end_watches(self) -> None:
        """Close every open Watch stream once it has sent the current status (shutdown)."""
        self._ending = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()

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
                    if self._ending:
                        return
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
    _on_stop: list[Callable[[], None]] = field(default_factory=list)

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the server has stopped (the servicer's ``close``: event log)."""
        self._on_stop.append(fn)

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
            # watchers have heard NOT_SERVING: end their streams so they do not hold the
            # stop for the whole grace period
            self._on_loop(self.health.end_watches())
            self._on_loop(self.server.stop(grace_s), grace_s + 5)
        finally:
            if self._loop is not None:
                self._loop.stop()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        for fn in self._on_stop:
            try:
                fn()
            except Exception:
                log.exception("closing %s at stop failed", fn)
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
    _check_tls_pair(cfg.tls_cert, cfg.tls_key)
    try:
        return grpc.ssl_server_credentials([(key, cert)])
    except Exception as e:
        raise ConfigError(f"ServeConfig.tls_cert/tls_key: not a usable PEM pair: {e}") from e


def _check_tls_pair(cert: str, key: str) -> None:
    """Refuse a key that does not belong to the certificate, or files that are not PEM
    (gRPC would only fail at bind time, as if the port were taken)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # password=b"": an encrypted key fails here instead of prompting on a terminal
        ctx.load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise ConfigError(
                f"ServeConfig.tls_key: the private key in {key} does not belong to the "
                f"certificate in {cert}"
            ) from e
        raise ConfigError(
            f"ServeConfig.tls_cert/tls_key: {cert} + {key} is not a usable unencrypted PEM "
            f"certificate and key ({e.reason or e})"
        ) from e


def start_server(cfg: ServeConfig, servicer: Any, metrics: Metrics | None = None) -> ServiceHandle:
    """Start a server with health NOT_SERVING; ``cfg.port = 0`` picks a free port.

    ``servicer`` may have no engine yet (it answers UNAVAILABLE until ``attach``).
    Raises ConfigError (one line, no traceback in the CLI) when a TLS file cannot be
    read or a port cannot be bound.
    """
    metrics = metrics or getattr(servicer, "metrics", None) or Metrics()
    if hasattr(servicer, "register_metrics"):  # the live outcome counters (docs/outcomes.md)
        servicer.register_metrics(metrics)
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
    # every handler is async; their blocking work (run_in_executor / asyncio.to_thread)
    # runs on this pool, the loop's default executor
    pool = futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="ecomrec-rpc")
    loop = _LoopThread()
    loop.loop.set_default_executor(pool)
    hs = _HealthServicer()

    gate = ApiKeyInterceptor(
        keys,
        metrics,
        cfg.max_streams,
        max_concurrent_rpcs=cfg.max_concurrent_rpcs,
        max_open_rpcs=cfg.max_open_rpcs,
        max_reflection_streams=cfg.max_reflection_streams,
        open_request_timeout_s=cfg.open_request_timeout_s,
    )

    async def make() -> tuple[grpc.aio.Server, int]:
        # no maximum_concurrent_rpcs: grpc.aio's limit counts keyless calls too (256 open
        # health Watch streams would refuse every keyed call); the gate keeps the budgets
        server = grpc.aio.server(interceptors=[gate], options=options)
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
    close = getattr(servicer, "close", None)
    if close is not None:
        handle.on_stop(close)
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
    port and drain in-flight calls for ``grace_s``; returns an event set when stopped.

    SIGHUP (a terminal closing, ``kill -HUP`` by habit) is logged and ignored: it must never
    kill a server.  ``--follow-refresh`` replaces it with a reload
    (:meth:`serving.reload.EngineReloader.install_sighup`).
    """
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info(
            "signal %d: NOT_SERVING for %.1f s, then draining for %.1f s", signum, delay_s, grace_s
        )
        handle.stop(grace_s, delay_s)
        done.set()

    def on_hangup(signum: int, frame: Any) -> None:
        log.info("SIGHUP ignored: nothing to reload (serve --follow-refresh reloads on SIGHUP)")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hangup)
    return done
