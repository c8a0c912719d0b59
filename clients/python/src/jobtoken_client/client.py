"""The module's connection to the service: grants, resumes, and one revocation stream
shared by every lease it holds."""

from __future__ import annotations

import logging
import threading
import weakref
from datetime import timedelta
from typing import Callable, Iterable, Optional

import grpc
from google.protobuf import duration_pb2

from jobtoken.v1 import jobtoken_pb2, jobtoken_pb2_grpc

from .errors import END_BY_PROTO, EndReason, JobTokenError
from .lease import Lease
from .schedule import RenewalConfig
from .watcher import Event, RevocationWatcher

log = logging.getLogger("jobtoken_client")

#: Metadata entry that carries a module key.
MODULE_KEY_HEADER = "x-module-key"

#: Channel options of a channel the client opens. gRPC's own reconnect backoff grows to
#: 120 s by default, so after a long outage a channel could wait minutes before it even
#: tries the service again, whatever the renewal schedule says; cap it at 1 s so a job
#: holds a fresh token within about a second of the service coming back.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Client:
    """A module's client of ``jobtoken.v1.JobTokenService``.

    ``Client("127.0.0.1:50051", module_key=key)`` opens a plaintext channel; pass
    ``credentials=grpc.ssl_channel_credentials(...)`` for TLS (with a client certificate
    for mTLS, then no module key is needed), or a ready ``channel`` (give it
    CHANNEL_OPTIONS, or it may reconnect slowly after an outage).

    With ``watch_revocations=True`` (default) the client follows the revocation stream
    once for all its leases, so an administrator's revoke ends the lease within about a
    second instead of at its next renewal.
    """

    def __init__(
        self,
        target: Optional[str] = None,
        *,
        module_key: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        channel: Optional[grpc.Channel] = None,
        renewal: RenewalConfig = RenewalConfig(),
        watch_revocations: bool = True,
    ):
        if channel is None:
            if target is None:
                raise ValueError("give a target or a channel")
            if credentials is not None:
                channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            self._own_channel = True
        else:
            self._own_channel = False
        if module_key is not None and (not module_key.isascii() or not module_key.isprintable()):
            raise ValueError("a module key is printable ASCII")
        self.channel = channel
        self.stub = jobtoken_pb2_grpc.JobTokenServiceStub(channel)
        #: Metadata that authenticates this module; add it to raw stub calls.
        self.metadata = ((MODULE_KEY_HEADER, module_key),) if module_key else ()
        self._renewal = renewal
        self._watch = watch_revocations
        self._lock = threading.Lock()
        # By (tenant, lease_id): the tenant is part of every key.
        self._leases: "weakref.WeakValueDictionary[tuple, Lease]" = weakref.WeakValueDictionary()
        self._watcher: Optional[RevocationWatcher] = None

    def __repr__(self) -> str:
        return f"Client(module_key={'<redacted>' if self.metadata else None})"

    def lease(
        self,
        job_id: str,
        subject_token: str,
        *,
        permissions: Iterable[str] = (),
        max_lifetime: Optional[timedelta] = None,
        audience: str = "",
        timeout: float = 10.0,
    ) -> Lease:
        """Grants a lease for ``job_id`` from the user's access token and starts renewing
        it. Empty ``permissions``: all the user holds that this module may delegate.
        Raises JobTokenError (``reason`` says why) if refused."""
        self._ensure_watcher()
        request = jobtoken_pb2.IssueJobTokenRequest(
            subject_token=subject_token, job_id=job_id, permissions=list(permissions), audience=audience
        )
        if max_lifetime is not None:
            request.max_lifetime.CopyFrom(duration_pb2.Duration(seconds=int(max_lifetime.total_seconds())))
        try:
            response = self.stub.IssueJobToken(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise JobTokenError(error) from None
        return self._hold(response.lease, response.tokens)

    def resume(self, job_id: str, tenant: str = "", *, timeout: float = 10.0) -> Lease:
        """Re-attaches to this module's active lease for the job (after a restart). Every
        refresh token from before stops working: an old instance still renewing loses the
        lease (SUPERSEDED)."""
        self._ensure_watcher()
        request = jobtoken_pb2.ResumeJobTokenRequest(job_id=job_id, tenant=tenant)
        try:
            response = self.stub.ResumeJobToken(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise JobTokenError(error) from None
        return self._hold(response.lease, response.tokens)

    def watch_revocations(
        self,
        on_event: Callable[[Event], None],
        *,
        after_cursor: Optional[int] = None,
        replay_live: bool = False,
        tenants: Iterable[str] = (),
    ) -> RevocationWatcher:
        """Follows the revocation stream (e.g. for a resource server's deny list) until
        the returned watcher is stopped."""
        return RevocationWatcher(
            self.stub,
            self.metadata,
            on_event,
            after_cursor=after_cursor,
            replay_live=replay_live,
            tenants=tenants,
        )

    def close(self) -> None:
        """Stops renewing every lease (without releasing them) and the revocation stream,
        and closes the channel if this client opened it."""
        with self._lock:
            leases = list(self._leases.values())
            watcher, self._watcher = self._watcher, None
        for lease in leases:
            lease.stop()
        if watcher is not None:
            watcher.stop()
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- inside ------------------------------------------------------------------------

    def _hold(self, lease: jobtoken_pb2.Lease, pair: jobtoken_pb2.TokenPair) -> Lease:
        held = Lease(self.stub, self.metadata, lease, pair, self._renewal, on_close=self._forget)
        with self._lock:
            self._leases[(held.info.tenant, held.info.lease_id)] = held
        return held

    def _forget(self, lease: Lease) -> None:
        with self._lock:
            key = (lease.info.tenant, lease.info.lease_id)
            if self._leases.get(key) is lease:
                del self._leases[key]

    def _ensure_watcher(self) -> None:
        """Opens the shared stream before the first grant, and waits (briefly) until it is
        caught up, so no end of a lease granted afterwards is missed."""
        if not self._watch:
            return
        with self._lock:
            if self._watcher is not None:
                return
            self._watcher = RevocationWatcher(self.stub, self.metadata, self._on_revocation)
            watcher = self._watcher
        if not watcher.wait_ready(2.0):
            log.warning("revocation stream not ready after 2 s; leases still end at their next renewal")

    def _on_revocation(self, event: Event) -> None:
        with self._lock:
            lease = self._leases.get((event.tenant, event.lease_id))
        if lease is not None:
            reason = END_BY_PROTO.get(event.reason, EndReason.REJECTED)
            lease._ended_by_service(reason, f"revocation stream: {jobtoken_pb2.EndReason.Name(event.reason)}")
