"""What the engine takes and gives: a request's deadline, the result types and the errors.

Plain dataclasses, no protobuf: :mod:`serving.service` converts them at the gRPC edge and
:mod:`serving.status` maps the errors (these and :mod:`ecomrec.errors`) to status codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ecomrec.errors import EcomrecError
from serving.segments import UserSegments

# Degraded reasons (stable strings).
ENCODER_FALLBACK = "ENCODER_FALLBACK"
INDEX_UNAVAILABLE = "INDEX_UNAVAILABLE"
BUY_AGAIN = "BUY_AGAIN"  # reason code: an own item of the buy-again mode


class DeadlineExceededError(EcomrecError):
    """The request's deadline passed before the named stage."""


class CancelledError(EcomrecError):
    """The client cancelled the request."""


class FailedPreconditionError(EcomrecError):
    """The call cannot work in this deployment as configured (e.g. no event log)."""


class PermissionDeniedError(EcomrecError):
    """An authenticated caller may not use this call (e.g. an admin call without an admin key)."""


class UnavailableError(EcomrecError):
    """A dependency is down and no fallback exists."""


class IdMapLike(Protocol):
    def get(self, external_id: str) -> int | None: ...
    def to_external(self, internal_id: int) -> str: ...


@dataclass
class RequestContext:
    """Deadline and cancellation of one request, checked between stages."""

    deadline: float  # time.monotonic() value
    is_active: Callable[[], bool] = lambda: True
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    @classmethod
    def with_timeout(
        cls, seconds: float, is_active: Callable[[], bool] = lambda: True
    ) -> RequestContext:
        return cls(time.monotonic() + seconds, is_active)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, stage: str) -> None:
        if not self.is_active():
            raise CancelledError(f"cancelled before {stage}")
        if time.monotonic() >= self.deadline:
            raise DeadlineExceededError(f"deadline exceeded before {stage}")

    def timed(self, stage: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (t1 - t0)
        return t1


@dataclass(frozen=True)
class ResultItem:
    item_id: str
    score: float
    relevance: float
    reasons: tuple[str, ...]
    category: str
    price: float
    title: str


@dataclass(frozen=True)
class RecommendResult:
    request_id: str
    items: tuple[ResultItem, ...]
    segment: str
    model_version: str
    index_version: str
    degraded: bool
    degraded_reasons: tuple[str, ...]


@dataclass(frozen=True)
class ProfileResult:
    user_id: str
    segments: UserSegments
    n_events: int


@dataclass(frozen=True)
class AudienceResult:
    request_id: str
    members: tuple[tuple[str, float, str], ...]  # (external user id, score, segment)
    degraded: bool
