"""The dashboard's Starlette application (read-only: GET pages, one login POST).

Every page needs a signed-in session (the login form, a cookie) or ``Authorization: Bearer
KEY``; without one a page answers a redirect to ``/login`` (a wrong bearer key: 401) and
shows nothing. Page handlers are plain functions: Starlette runs them on its thread pool,
so file reads, charts and the gRPC calls never block the event loop.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from ecomrec.errors import EcomrecError
from serving.dashboard import data, plots
from serving.dashboard.auth import COOKIE, FailedSignIns, Sessions
from serving.dashboard.config import DashboardConfig

log = logging.getLogger(__name__)

#: Sent with every answer: no scripts at all, styles and images only from the page
#: itself (charts are data: URLs), never framed, never cached, no referrer.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
MAX_LOGIN_BODY = 4096


class _SecurityHeaders:
    """Pure ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._raw = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self._raw]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- formats
def pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100.0 * v:.{digits}f} %"


def amount(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.2f}"


def count(v: int | None) -> str:
    return "n/a" if v is None else f"{v:,}"


def metric(v: float, name: str) -> str:
    """A report metric as shown: rates in percent, revenue per 1,000 as an amount."""
    return pct(v) if name in data.RATE_METRICS else amount(v)


def signed_metric(v: float, name: str) -> str:
    """A difference: percentage points for rates, amounts otherwise, with its sign."""
    if name in data.RATE_METRICS:
        return f"{100.0 * v:+.2f} pp"
    return f"{v:+,.2f}"


def when(ts: int | None) -> str:
    if ts is None:
        return "unknown"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("serving.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        pct=pct, amount=amount, count=count, metric=metric, signed_metric=signed_metric, when=when
    )
    return env


def _client(request: Any) -> str:
    """The caller's address (behind a proxy: the proxy's; run uvicorn with its
    forwarded-allow-ips there)."""
    return request.client.host if request.client is not None else "?"


def _too_many(wait: float) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(
        "too many wrong API keys from this address: try again later",
        status_code=429,
        headers={"retry-after": str(max(1, int(wait + 0.999)))},
    )


# --------------------------------------------------------------------------- the app
class Dashboard:
    """The pages over a config, the API keys and a customer lookup (``ServiceLookup``)."""

    def __init__(self, cfg: DashboardConfig, keys: Sequence[str], lookup: Any) -> None:
        self.cfg = cfg
        self.sessions = Sessions(keys, cfg.session_ttl_s, cfg.max_sessions)
        self.failures = FailedSignIns(cfg.max_failed_logins)
        self.lookup = lookup
        self.cache = data.FileCache()
        self.env = _templates()
        self._views_lock = threading.Lock()
        self._views: tuple[Any, Any, list[dict[str, Any]]] | None = None

    # ----------------------------------------------------------------- plumbing
    def _html(self, template: str, status: int = 200, **ctx: Any) -> Any:
        from starlette.responses import HTMLResponse

        body = self.env.get_template(template).render(cfg=self.cfg, **ctx)
        return HTMLResponse(body, status_code=status)

    def _key(self, request: Any) -> str | Any:
        """The caller's API key, or the answer that refuses them."""
        from starlette.responses import PlainTextResponse, RedirectResponse

        header = request.headers.get("authorization")
        if header is not None:
            client = _client(request)
            wait = self.failures.blocked(client)
            if wait:
                return _too_many(wait)
            key = self.sessions.bearer_key(header)
            if key is None:
                self.failures.failed(client)
                return PlainTextResponse(
                    "missing or invalid API key",
                    status_code=401,
                    headers={"www-authenticate": 'Bearer realm="ecomrec dashboard"'},
                )
            return key
        key = self.sessions.key_for(request.cookies.get(COOKIE))
        if key is None:
            return RedirectResponse("/login", status_code=303)
        return key

    # ----------------------------------------------------------------- login
    async def login(self, request: Any) -> Any:
        from starlette.responses import RedirectResponse

        if request.method != "POST":
            return self._html("login.html", error=None)
        client = _client(request)
        wait = self.failures.blocked(client)
        if wait:
            return _too_many(wait)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return self._html("login.html", status=413, error="request too large")
        form = parse_qs(body.decode(errors="replace"), max_num_fields=4)
        key = (form.get("api_key") or [""])[0]
        cookie = self.sessions.login(key)
        if cookie is None:
            self.failures.failed(client)
            log.info("dashboard: refused a sign-in (wrong API key)")
            return self._html("login.html", status=401, error="wrong API key")
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            COOKIE,
            cookie,
            max_age=int(self.cfg.session_ttl_s),
            httponly=True,
            samesite="strict",
            secure=self.cfg.cookie_secure,
        )
        return resp

    def logout(self, request: Any) -> Any:
        from starlette.responses import RedirectResponse

        self.sessions.logout(request.cookies.get(COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    def healthz(self, request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok")

    # ----------------------------------------------------------------- pages
    def _load_overview(self, f: Path) -> tuple[dict[str, Any], dict[str, str | None]]:
        """The report and its charts (drawn once per version of the file)."""
        report = data.load_report(f)
        charts: dict[str, str | None] = {}
        if self.cfg.charts:
            charts["metrics"] = plots.variant_metrics(report)
            charts["daily"] = plots.daily(data.daily_series(report))
        return report, charts

    def _report(self) -> tuple[dict[str, Any] | None, dict[str, str | None], str | None]:
        if not self.cfg.report:
            return None, {}, "no online report configured ([dashboard] report or --report)"
        try:
            f = data.report_file(self.cfg.report)
            report, charts = self.cache.get("report", f, f, self._load_overview)
            return report, charts, None
        except EcomrecError as e:
            return None, {}, str(e)

    def overview(self, request: Any) -> Any:
        key = self._key(request)
        if not isinstance(key, str):
            return key
        report, charts, error = self._report()
        return self._html(
            "overview.html",
            page="overview",
            report=report,
            error=error,
            metrics=data.METRICS,
            counts=data.COUNTS,
            charts=charts,
        )

    def _snapshot(self, path: str) -> data.Snapshot:
        return self.cache.get("snapshot", Path(path), data.snapshot_stamp(path), data.load_snapshot)

    def segments(self, request: Any) -> Any:
        key = self._key(request)
        if not isinstance(key, str):
            return key
        error = None
        cur = prev = None
        views: list[dict[str, Any]] = []
        try:
            if not self.cfg.segments:
                raise EcomrecError(
                    "no segment snapshot configured ([dashboard] segments or --segments)"
                )
            cur = self._snapshot(self.cfg.segments)
            if self.cfg.previous_segments:
                prev = self._snapshot(self.cfg.previous_segments)
            views = self._segment_views(cur, prev)
        except EcomrecError as e:
            error = str(e)
        return self._html(
            "segments.html", page="segments", current=cur, previous=prev, views=views, error=error
        )

    def _segment_views(
        self, cur: data.Snapshot, prev: data.Snapshot | None
    ) -> list[dict[str, Any]]:
        """Sizes, movement and charts per segment column (kept while both snapshots are)."""
        with self._views_lock:
            memo = self._views
            if memo is not None and memo[0] is cur and memo[1] is prev:
                return memo[2]
        views: list[dict[str, Any]] = []
        for col, label in data.SEGMENT_COLUMNS:
            if col not in cur.table.columns:
                continue
            if prev is not None:
                mv = data.movement(cur, prev, col)
            else:
                sizes = data.segment_sizes(cur, col)
                mv = {
                    "rows": [
                        {"segment": s, "previous": None, "current": n, "change": None}
                        for s, n in sizes.items()
                    ],
                    "segments": list(sizes),
                    "matrix": {},
                    "reason": "no previous snapshot configured ([dashboard] previous_segments)",
                }
            chart_rows = [{**r, "previous": r["previous"] or 0} for r in mv["rows"]]
            views.append(
                {
                    "column": col,
                    "label": label,
                    "movement": mv,
                    "chart": plots.segment_sizes(chart_rows, f"{label}: customers")
                    if self.cfg.charts
                    else None,
                }
            )
        with self._views_lock:
            self._views = (cur, prev, views)
        return views

    def _warnings(self) -> tuple[list[dict[str, Any]], str | None]:
        if not self.cfg.warnings:
            return [], "no churn warnings file configured ([dashboard] warnings or --warnings)"
        try:
            p = Path(self.cfg.warnings)
            rows = self.cache.get(
                "warnings", p, p, lambda f: data.load_warnings(f, self.cfg.max_warnings)
            )
            return rows, None
        except EcomrecError as e:
            return [], str(e)

    def churn(self, request: Any) -> Any:
        key = self._key(request)
        if not isinstance(key, str):
            return key
        rows, error = self._warnings()
        return self._html("churn.html", page="churn", warnings=rows, error=error)

    def customer(self, request: Any) -> Any:
        key = self._key(request)
        if not isinstance(key, str):
            return key
        user_id = (request.query_params.get("id") or "").strip()
        result = None
        warnings: list[dict[str, Any]] = []
        if user_id:
            result = self.lookup.customer(key, user_id, self.cfg.recommend_k)
            rows, _ = self._warnings()
            warnings = [w for w in rows if str(w.get("customer_id")) == user_id]
        return self._html(
            "customer.html", page="customer", user_id=user_id, result=result, warnings=warnings
        )


def create_app(cfg: DashboardConfig, keys: Sequence[str], lookup: Any) -> Any:
    """The ASGI application (``keys``: the service's resolved API keys, never empty)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    if not keys:
        raise EcomrecError("the dashboard needs the service's API keys (none configured)")
    d = Dashboard(cfg, keys, lookup)
    routes = [
        Route("/", d.overview, methods=["GET"]),
        Route("/segments", d.segments, methods=["GET"]),
        Route("/churn", d.churn, methods=["GET"]),
        Route("/customer", d.customer, methods=["GET"]),
        Route("/login", d.login, methods=["GET", "POST"]),
        Route("/logout", d.logout, methods=["GET"]),
        Route("/healthz", d.healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_SecurityHeaders)])
    app.state.dashboard = d
    return app
