"""THE mapping from our errors to gRPC status codes, in one place (:func:`status_for`):

=========================  =====================================================
InvalidArgumentError       INVALID_ARGUMENT (message names the field)
NotFoundError              NOT_FOUND
IndexUnavailableError      degraded answer where a fallback exists, else UNAVAILABLE
encoder unavailable        in-process fallback (degraded), else UNAVAILABLE
DeadlineExceededError      DEADLINE_EXCEEDED
anything else              INTERNAL "internal error (request <id>)": the trace is logged,
                           never sent
=========================  =====================================================
"""

from __future__ import annotations

import grpc

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError, NotFoundError
from serving.encoders import EncoderUnavailableError
from serving.requests import CancelledError, DeadlineExceededError, UnavailableError


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
    if isinstance(exc, IndexUnavailableError | UnavailableError | EncoderUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"
