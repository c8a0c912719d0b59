"""A lease held for one job, renewed on a background thread until it ends."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import grpc

from jobtoken.v1 import jobtoken_pb2, jobtoken_pb2_grpc

from .errors import END_BY_REASON, EndReason, JobTokenError, LeaseEnd, LeaseEndedError, details, is_transient
from .schedule import RenewalConfig, refresh_in, retry_in, rpc_timeout

log = logging.getLogger("jobtoken_client")

#: Longest token life believed, in seconds; a larger answer is clamped.
MAX_LIFE = 24 * 3600.0


@dataclass(frozen=True)
class LeaseInfo:
    """What the service granted."""

    lease_id: str
    job_id: str
    tenant: str
    subject: str
    actor: str
    permissions: Tuple[str, ...]
    audience: str
    #: Idle timeout in seconds (None if the service sent none).
    idle_timeout: Optional[float]
    #: Seconds left until the hard expiry when granted or resumed, from the service's own
    #: timestamps (local clock skew does not matter).
    remaining: Optional[float]


@dataclass(frozen=True)
class AccessToken:
    """One access token. ``expires_at`` is on this process's monotonic clock."""

    value: str
    expires_at: float
    generation: int

    def __repr__(self) -> str:
        return f"AccessToken(<redacted>, expires_at={self.expires_at:.3f}, generation={self.generation})"


def _life(pair: jobtoken_pb2.TokenPair) -> float:
    life = pair.access_token_expires_in.ToTimedelta().total_seconds()
    return min(max(life, 0.0), MAX_LIFE)


def info_from(lease: jobtoken_pb2.Lease, pair: jobtoken_pb2.TokenPair) -> LeaseInfo:
    remaining = None
    if lease.HasField("expires_at") and pair.HasField("access_token_expires_at"):
        # The service's "now" is the token's expiry minus its life: both are its numbers.
        server_now = pair.access_token_expires_at.ToNanoseconds() / 1e9 - _life(pair)
        remaining = max(lease.expires_at.ToNanoseconds() / 1e9 - server_now, 0.0)
    idle = lease.idle_timeout.ToTimedelta().total_seconds() if lease.HasField("idle_timeout") else None
    return LeaseInfo(
        lease_id=lease.lease_id,
        job_id=lease.job_id,
        tenant=lease.tenant,
        subject=lease.subject,
        actor=lease.actor,
        permissions=tuple(lease.granted_permissions),
        audience=lease.audience,
        idle_timeout=idle,
        remaining=remaining,
    )


class Lease:
    """A lease held by this module for one job.

    Share it between the job's threads: ``access_token`` is a plain attribute read.
    Renewal runs on a daemon thread: at ~70% of each token's life, retrying transient
    failures with the same refresh token, and ending the lease on a terminal answer.
    Use it as a context manager to release it when the job finishes (``succeeded``) or
    raises (``failed``).
    """

    def __init__(
        self,
        stub: jobtoken_pb2_grpc.JobTokenServiceStub,
        metadata: Sequence[tuple],
        lease: jobtoken_pb2.Lease,
        pair: jobtoken_pb2.TokenPair,
        config: RenewalConfig,
        on_close: Optional[Callable[["Lease"], None]] = None,
    ):
        self.info = info_from(lease, pair)
        self._stub = stub
        self._metadata = tuple(metadata)
        self._config = config
        self._on_close = on_close
        self._cond = threading.Condition()
        self._token = AccessToken(pair.access_token, time.monotonic() + _life(pair), 0)
        self._refresh_token = pair.refresh_token
        self._end: Optional[LeaseEnd] = None
        self._ended = threading.Event()
        self._callbacks: List[Callable[[LeaseEnd], None]] = []
        self._wanted = 0
        self._stop = False
        #: Successful renewals so far.
        self.renewals = 0
        self._thread = threading.Thread(
            target=self._run, args=(_life(pair),), name=f"jobtoken-renew-{self.info.job_id}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"Lease({self.info!r}, state={'ended' if self._end else 'active'})"

    # --- reading -----------------------------------------------------------------------

    @property
    def access_token(self) -> str:
        """The current access token (a JWT). Raises LeaseEndedError once the lease ended."""
        end = self._end
        if end is not None:
            raise LeaseEndedError(end)
        return self._token.value

    @property
    def token(self) -> AccessToken:
        """The current token with its (monotonic) expiry and generation."""
        return self._token

    def metadata(self, header: str = "authorization") -> Tuple[Tuple[str, str], ...]:
        """gRPC metadata carrying the token: ``(("authorization", "Bearer <jwt>"),)``, or
        the raw token under a platform's own header (e.g. ``x-okapi-token``)."""
        token = self.access_token
        value = f"Bearer {token}" if header == "authorization" else token
        return ((header, value),)

    @property
    def end(self) -> Optional[LeaseEnd]:
        """None while active; how it ended otherwise."""
        return self._end

    @property
    def active(self) -> bool:
        return self._end is None

    def wait_ended(self, timeout: Optional[float] = None) -> Optional[LeaseEnd]:
        """Blocks until the lease ends (or the timeout passes); returns how it ended."""
        self._ended.wait(timeout)
        return self._end

    def on_end(self, callback: Callable[[LeaseEnd], None]) -> None:
        """Calls ``callback(end)`` once when the lease ends (at once if it already has),
        on the thread that saw the end: keep it short (set a flag, signal the job)."""
        with self._cond:
            if self._end is None:
                self._callbacks.append(callback)
                return
        callback(self._end)

    # --- acting ------------------------------------------------------------------------

    def refresh_now(self, timeout: float = 10.0) -> AccessToken:
        """Renews now (e.g. after a resource server refused the token as expired) and
        returns the new token. Concurrent callers share one renewal."""
        with self._cond:
            generation = self._token.generation
            self._wanted = max(self._wanted, generation + 1)
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while self._token.generation <= generation and self._end is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no renewal within the timeout")
                self._cond.wait(left)
            if self._end is not None:
                raise LeaseEndedError(self._end)
            return self._token

    def release(self, outcome: str = "succeeded", detail: str = "", timeout: float = 10.0) -> LeaseEnd:
        """Ends the lease (``outcome``: succeeded, failed or cancelled) and stops renewal.
        Idempotent; raises JobTokenError if the service could not be told."""
        outcomes = {
            "succeeded": jobtoken_pb2.JOB_OUTCOME_SUCCEEDED,
            "failed": jobtoken_pb2.JOB_OUTCOME_FAILED,
            "cancelled": jobtoken_pb2.JOB_OUTCOME_CANCELLED,
        }
        request = jobtoken_pb2.RevokeJobTokenRequest(
            lease_id=self.info.lease_id, outcome=outcomes[outcome], detail=detail
        )
        if self._end is None or self._end.reason is not EndReason.RELEASED:
            try:
                self._stub.RevokeJobToken(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                raise JobTokenError(error) from None
        self._finish(LeaseEnd(EndReason.RELEASED, f"released: {outcome}" + (f"; {detail}" if detail else "")))
        self._shutdown()
        return self._end  # type: ignore[return-value]

    def stop(self) -> None:
        """Stops renewing without telling the service (the lease then ends at its idle
        timeout, or another instance resumes it)."""
        self._shutdown()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._end is None:
            self.release("succeeded" if exc_type is None else "failed", "" if exc is None else type(exc).__name__)
        else:
            self._shutdown()

    # --- inside ------------------------------------------------------------------------

    def _ended_by_service(self, reason: EndReason, detail: str) -> None:
        """A revocation event for this lease (from the client's watcher)."""
        self._finish(LeaseEnd(reason, detail))

    def _finish(self, end: LeaseEnd) -> None:
        with self._cond:
            if self._end is not None:
                return
            self._end = end
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        self._ended.set()
        log.info("lease ended", extra={"lease_id": self.info.lease_id, "job_id": self.info.job_id, "reason": end.reason.value})
        for callback in callbacks:
            try:
                callback(end)
            except Exception:  # noqa: BLE001
                log.exception("lease end callback failed")

    def _shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=15)
        if self._on_close is not None:
            self._on_close(self)

    def _run(self, life: float) -> None:
        cfg = self._config
        started = time.monotonic()
        hard_deadline = started + self.info.remaining if self.info.remaining is not None else None
        last_success = started
        due = started + refresh_in(life, cfg, random.random())
        attempt = 0
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._stop or self._end is not None:
                        return
                    asked = self._wanted > self._token.generation and attempt == 0
                    if asked or now >= due:
                        break
                    self._cond.wait(due - now)
            # The service's own limits passed without a renewal: the lease is gone.
            now = time.monotonic()
            if hard_deadline is not None and now >= hard_deadline:
                self._finish(LeaseEnd(EndReason.EXPIRED, "the lease ran out while the service could not be reached"))
                return
            if self.info.idle_timeout is not None and now >= last_success + self.info.idle_timeout:
                self._finish(LeaseEnd(EndReason.IDLE_TIMEOUT, "the lease ran out while the service could not be reached"))
                return
            until_expiry = self._token.expires_at - now
            request = jobtoken_pb2.RefreshJobTokenRequest(lease_id=self.info.lease_id, refresh_token=self._refresh_token)
            try:
                response = self._stub.RefreshJobToken(
                    request, timeout=rpc_timeout(until_expiry, cfg), metadata=self._metadata
                )
            except grpc.RpcError as error:
                if not is_transient(error):
                    found = details(error)
                    reason = END_BY_REASON.get(found.reason or "", EndReason.REJECTED)
                    self._finish(LeaseEnd(reason, f"{found.reason or error.code().name}: {error.details()}"))
                    return
                # Same refresh token next time: the grace window makes a retry of a renewal
                # whose answer was lost return the same successor.
                until_expiry = self._token.expires_at - time.monotonic()
                wait = retry_in(attempt, until_expiry, cfg, random.random())
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    wait = max(wait, details(error).retry_delay or 0.0)
                attempt += 1
                due = time.monotonic() + wait
                log.warning(
                    "renewal failed (%s); retrying in %.2f s with the same refresh token",
                    error.code().name,
                    wait,
                    extra={"lease_id": self.info.lease_id, "attempt": attempt},
                )
                continue
            life = _life(response.tokens)
            now = time.monotonic()
            with self._cond:
                self._refresh_token = response.tokens.refresh_token
                self._token = AccessToken(response.tokens.access_token, now + life, self._token.generation + 1)
                self.renewals += 1
                self._cond.notify_all()
            attempt = 0
            last_success = now
            due = now + refresh_in(life, cfg, random.random())
