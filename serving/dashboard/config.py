"""``DashboardConfig``: the ``[dashboard]`` table of serve.toml (unknown keys are an error)."""

from __future__ import annotations

from dataclasses import dataclass

from ecomrec.errors import ConfigError


@dataclass(frozen=True)
class DashboardConfig:
    """Where the dashboard listens, which service it asks and which files it shows.

    The API keys are the service's (``[serve]`` ``api_keys`` / ``$api_keys_env`` /
    ``admin_keys``): the dashboard never has keys of its own.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    # The running Recommend service (gRPC HOST:PORT) the customer lookup asks; a PEM CA
    # file when it serves TLS ("" = plain connection).
    target: str = "127.0.0.1:50051"
    tls_ca: str = ""
    timeout_s: float = 2.0
    # Files shown (re-read when they change; "" = that page says what to run):
    # the online report (`ecomrec report online --out DIR`: DIR or DIR/online.json),
    report: str = ""
    # the current and the previous segment snapshot (an `ecomrec segments export` folder,
    # a `segments report` folder or its scores/ folder),
    segments: str = ""
    previous_segments: str = ""
    # the churn warnings (JSON Lines written by the churn watcher, segments/alerts.py).
    warnings: str = ""
    # Warnings listed (newest first) and recommendations asked per customer lookup.
    max_warnings: int = 200
    recommend_k: int = 10
    # Server-rendered charts (matplotlib PNG, inlined); false = tables only.
    charts: bool = True
    # A sign-in lasts this long (seconds); sessions live in the process's memory (a
    # restart signs everyone out).  cookie_secure = true when served behind HTTPS.
    session_ttl_s: float = 8 * 3600.0
    max_sessions: int = 10_000
    cookie_secure: bool = False
    # Wrong keys (form or bearer) allowed per client address per minute; then 429.
    max_failed_logins: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"DashboardConfig.port must be in [0, 65535], got {self.port}")
        for name in ("max_warnings", "recommend_k", "max_sessions", "max_failed_logins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DashboardConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.session_ttl_s <= 0:
            raise ConfigError("DashboardConfig.timeout_s and session_ttl_s must be > 0")
        if not self.target or ":" not in self.target:
            raise ConfigError(f"DashboardConfig.target must be HOST:PORT, got {self.target!r}")
