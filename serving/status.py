"""THE mapping from our errors to gRPC status codes, in one place (:func:`status_for`):

=========================  =====================================================
InvalidArgumentError       INVALID_ARGUMENT (message names the field)
NotFoundError              NOT_FOUND
IndexUnavailableError      degraded answer where a fallback exists, else UNAVAILABLE
                           "index unavailable" (the cause, which may name files, is only
                           logged)
encoder unavailable        in-process fallback (degraded), else UNAVAILABLE "user encoder
                           unavailable" (the cause is only logged)
DeadlineExceededError      DEADLINE_EXCEEDED
FailedPreconditionError    FAILED_PRECONDITION (e.g. TrackEvents without an event log)
PermissionDeniedError      PERMISSION_DENIED (an admin call without an admin key)
anything else              INTERNAL "internal error (request <id>)": the trace is logged,
                           never sent
=========================  =====================================================
"""

from __future__ import annotations

import grpc

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError, NotFoundError
from serving.encoders import EncoderUnavailableError
from serving.requests import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnavailableError,
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """THE mapping from our errors to gRPC status codes (see the module docstring)."""
    if isinstance(exc, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, CancelledError):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, FailedPreconditionError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, IndexUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "index unavailable; retry later"
    if isinstance(exc, EncoderUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, "user encoder unavailable; retry later"
    if isinstance(exc, UnavailableError):  # our own fixed messages (still loading, ...)
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"
