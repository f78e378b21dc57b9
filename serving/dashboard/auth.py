"""Sign-in with the service's API keys: a login form that opens a server-side session
(an HttpOnly, signed cookie), or ``Authorization: Bearer KEY`` on each request.

Keys are compared in constant time against every configured key (as the gRPC gate does).
A session remembers the key it was opened with: the dashboard calls the gRPC service
with that key, so a key the service no longer accepts stops working there too, and the
session ends when the key leaves the dashboard's own list (``Sessions.key_for`` checks it
on every request). Sessions live in memory: a restart signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

COOKIE = "ecomrec_dash"


class Sessions:
    """Open, check and end sessions; thread-safe."""

    def __init__(
        self,
        keys: Sequence[str],
        ttl_s: float,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = [k.encode() for k in keys]
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._secret = secrets.token_bytes(32)  # signs the cookies of this process only
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[str, float]] = OrderedDict()  # token -> (key, expiry)

    def valid_key(self, key: str) -> bool:
        cand = key.strip().encode()
        ok = False
        for k in self._keys:  # every key, whatever matches first: constant time
            ok |= hmac.compare_digest(cand, k)
        return bool(cand) and ok

    def _sign(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def login(self, key: str) -> str | None:
        """A cookie value for a valid key (None for a wrong one)."""
        if not self.valid_key(key):
            return None
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._open[token] = (key.strip(), self._clock() + self.ttl_s)
            while len(self._open) > self.max_sessions:
                self._open.popitem(last=False)  # the oldest sign-in goes first
        return f"{token}.{self._sign(token)}"

    def key_for(self, cookie: str | None) -> str | None:
        """The key of a live session (None: no cookie, forged, expired, or key revoked)."""
        if not cookie or "." not in cookie:
            return None
        token, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(sig.encode(), self._sign(token).encode()):
            return None
        with self._lock:
            hit = self._open.get(token)
            if hit is None:
                return None
            key, expiry = hit
            if self._clock() >= expiry or not self.valid_key(key):
                del self._open[token]
                return None
        return key

    def logout(self, cookie: str | None) -> None:
        if cookie and "." in cookie:
            with self._lock:
                self._open.pop(cookie.rsplit(".", 1)[0], None)

    def bearer_key(self, header: str | None) -> str | None:
        """The key of an ``Authorization: Bearer KEY`` header when it is valid."""
        if not header or not header.lower().startswith("bearer "):
            return None
        key = header[7:].strip()
        return key if self.valid_key(key) else None


class FailedSignIns:
    """At most ``limit`` wrong keys per client address in ``window_s`` (then 429): a
    guessing client is slowed down without locking out anyone else. Thread-safe; at
    most ``max_clients`` addresses are remembered (the least recent forgotten first)."""

    def __init__(
        self,
        limit: int,
        window_s: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._seen.get(client, ()) if now - t < self.window_s]
        if times:
            self._seen[client] = times
        else:
            self._seen.pop(client, None)
        return times

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may try again (0 = now)."""
        now = self._clock()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.limit:
                return 0.0
            return max(0.0, self.window_s - (now - times[0]))

    def failed(self, client: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._recent(client, now)
            self._seen[client] = [*times, now][-self.limit :]
            self._seen.move_to_end(client)
            while len(self._seen) > self.max_clients:
                self._seen.popitem(last=False)
