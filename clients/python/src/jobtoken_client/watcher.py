"""Following the service's revocation stream from a cursor, reconnecting without a gap."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Iterable, Optional, Sequence

import grpc

from jobtoken.v1 import jobtoken_pb2, jobtoken_pb2_grpc

from .schedule import RenewalConfig, retry_in

log = logging.getLogger("jobtoken_client")

#: The service sends a heartbeat every 30 s; a stream silent for longer than this is
#: presumed dead (a half-open connection) and reopened from its cursor.
SILENCE = 75.0

Event = jobtoken_pb2.WatchRevocationsResponse


class RevocationWatcher:
    """Follows ``WatchRevocations`` on a thread of its own until ``stop()``.

    ``on_event`` gets every lease end (never a heartbeat), in cursor order, and each
    exactly once per watcher, even across reconnects: the watcher resumes from the cursor
    of the last message it saw. ``cursor`` is that position; persist it if the process must
    resume where it left off after a restart (pass it back as ``after_cursor``).
    """

    def __init__(
        self,
        stub: jobtoken_pb2_grpc.JobTokenServiceStub,
        metadata: Sequence[tuple],
        on_event: Callable[[Event], None],
        *,
        after_cursor: Optional[int] = None,
        replay_live: bool = False,
        tenants: Iterable[str] = (),
        silence: float = SILENCE,
    ):
        self._stub = stub
        self._metadata = tuple(metadata)
        self._on_event = on_event
        self._replay_live = replay_live
        self._tenants = list(tenants)
        self._silence = silence
        self._retry = RenewalConfig()
        self._lock = threading.Lock()
        self._call = None
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._last_seen = time.monotonic()
        #: Position after the last message seen (None: not yet connected, "from now").
        self.cursor: Optional[int] = after_cursor
        #: Times the stream was (re)opened.
        self.connections = 0
        self._thread = threading.Thread(target=self._follow, name="jobtoken-watch", daemon=True)
        self._watchdog = threading.Thread(target=self._watch_silence, name="jobtoken-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Waits until the stream is open and caught up (its first heartbeat follows the
        backlog). True if it is."""
        return self._ready.wait(timeout)

    def stop(self) -> None:
        """Stops following (cancels the open stream). Idempotent."""
        self._stopped.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _request(self) -> jobtoken_pb2.WatchRevocationsRequest:
        request = jobtoken_pb2.WatchRevocationsRequest(tenants=self._tenants)
        if self.cursor is not None:
            request.after_cursor = self.cursor
        else:
            request.replay_live = self._replay_live
        return request

    def _follow(self) -> None:
        attempt = 0
        while not self._stopped.is_set():
            try:
                call = self._stub.WatchRevocations(self._request(), metadata=self._metadata)
                with self._lock:
                    self._call = call
                    self._last_seen = time.monotonic()
                if self._stopped.is_set():
                    call.cancel()
                self.connections += 1
                for message in call:
                    self._last_seen = time.monotonic()
                    attempt = 0
                    if not message.heartbeat:
                        try:
                            self._on_event(message)
                        except Exception:  # noqa: BLE001 - a bad callback must not stop the stream
                            log.exception("revocation callback failed", extra={"lease_id": message.lease_id})
                    self.cursor = message.cursor
                    if message.heartbeat:
                        self._ready.set()
                # The server ended the stream (a shutdown): reconnect from the cursor.
            except grpc.RpcError as error:
                if self._stopped.is_set():
                    return
                log.warning("revocation stream failed: %s; reconnecting from cursor %s", error.code(), self.cursor)
            finally:
                with self._lock:
                    self._call = None
            # Reconnect politely; the cursor means nothing is missed meanwhile.
            wait = retry_in(attempt, float("inf"), self._retry, random.random())
            attempt += 1
            self._stopped.wait(wait)

    def _watch_silence(self) -> None:
        while not self._stopped.wait(1.0):
            with self._lock:
                call, last = self._call, self._last_seen
            if call is not None and time.monotonic() - last > self._silence:
                log.warning("revocation stream silent for %.0f s; reopening", self._silence)
                call.cancel()
