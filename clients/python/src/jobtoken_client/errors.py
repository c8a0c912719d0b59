"""Errors of the service: the stable reason in ``google.rpc.ErrorInfo``, and which ones a
retry can change (see docs/clients.md, "Errors")."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

#: The ErrorInfo domain of every error the service makes.
DOMAIN = "jobtoken.v1"

#: Codes worth retrying with the same request (for a renewal: the same refresh token):
#: the service was unreachable, overloaded or interrupted. Every other code is an answer.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    }
)


class EndReason(enum.Enum):
    """Why a lease ended, as this client saw it."""

    #: The holder released it.
    RELEASED = "released"
    #: Its hard expiry passed.
    EXPIRED = "expired"
    #: Nobody renewed it within the idle timeout.
    IDLE_TIMEOUT = "idle_timeout"
    #: An administrator revoked it.
    REVOKED = "revoked"
    #: An old refresh token was presented again; the service revoked the lease.
    REFRESH_TOKEN_REUSED = "refresh_token_reused"
    #: Another instance resumed the job (REFRESH_TOKEN_INVALID): this one lost the lease.
    SUPERSEDED = "superseded"
    #: The service refused a renewal for another reason (see the detail).
    REJECTED = "rejected"


#: Terminal answers to a renewal, by ErrorInfo reason.
END_BY_REASON: Mapping[str, EndReason] = {
    "LEASE_RELEASED": EndReason.RELEASED,
    "LEASE_EXPIRED": EndReason.EXPIRED,
    "LEASE_IDLE_TIMEOUT": EndReason.IDLE_TIMEOUT,
    "LEASE_REVOKED": EndReason.REVOKED,
    "REFRESH_TOKEN_REUSED": EndReason.REFRESH_TOKEN_REUSED,
    "REFRESH_TOKEN_INVALID": EndReason.SUPERSEDED,
}

#: EndReason of a revocation event, by the proto enum's number (jobtoken.v1.EndReason).
END_BY_PROTO: Mapping[int, EndReason] = {
    1: EndReason.RELEASED,
    2: EndReason.EXPIRED,
    3: EndReason.IDLE_TIMEOUT,
    4: EndReason.REVOKED,
    5: EndReason.REFRESH_TOKEN_REUSED,
}


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call's ``grpc-status-details-bin`` trailer says."""

    #: ErrorInfo.reason, e.g. "LEASE_REVOKED"; None for statuses the gRPC stack made.
    reason: Optional[str] = None
    #: ErrorInfo.metadata, e.g. {"field": "job_id"} or {"end_reason": "revoked"}.
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: RetryInfo.retry_delay in seconds (RATE_LIMITED), if any.
    retry_delay: Optional[float] = None


def details(error: grpc.RpcError) -> ErrorDetails:
    """Reads ErrorInfo and RetryInfo from a failed call."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (AttributeError, ValueError, TypeError):
        status = None
    if status is None:
        return ErrorDetails()
    reason, metadata, delay = None, {}, None
    for any_detail in status.details:
        if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(info)
            if info.domain == DOMAIN or reason is None:
                reason, metadata = info.reason, dict(info.metadata)
        elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return ErrorDetails(reason, metadata, delay)


def is_transient(error: grpc.RpcError) -> bool:
    """Whether the same request may well succeed later (see TRANSIENT_CODES)."""
    return error.code() in TRANSIENT_CODES


class JobTokenError(Exception):
    """A call to the service failed. ``reason`` is the stable machine reason."""

    def __init__(self, error: grpc.RpcError):
        self.code: grpc.StatusCode = error.code()
        self.message: str = error.details() or ""
        found = details(error)
        self.reason: Optional[str] = found.reason
        self.metadata: Mapping[str, str] = found.metadata
        self.retry_delay: Optional[float] = found.retry_delay
        self.transient: bool = is_transient(error)
        super().__init__(f"{self.code.name} {self.reason or '-'}: {self.message}")


class LeaseEndedError(Exception):
    """The lease has ended; ``end`` says why."""

    def __init__(self, end: "LeaseEnd"):
        self.end = end
        super().__init__(f"lease ended ({end.reason.value}): {end.detail}")


@dataclass(frozen=True)
class LeaseEnd:
    """How a lease ended: the reason, and a message for people."""

    reason: EndReason
    detail: str
