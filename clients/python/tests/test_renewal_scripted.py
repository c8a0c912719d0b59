"""The renewal loop against a scripted in-process server: transient failures retry with
the same refresh token, RATE_LIMITED waits its RetryInfo, terminal reasons end the lease."""

import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from jobtoken.v1 import jobtoken_pb2, jobtoken_pb2_grpc
from jobtoken_client import Client, EndReason, RenewalConfig

LIFE = 0.4  # seconds: renewals every ~0.28 s


def status(code, reason, retry_delay=None):
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="jobtoken.v1"))
    details = [info]
    if retry_delay is not None:
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(retry_delay * 1e9))))
        details.append(retry)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=reason.lower(), details=details))


class Scripted(jobtoken_pb2_grpc.JobTokenServiceServicer):
    def __init__(self):
        self.script = []  # answers to the next renewals: None = success, else a grpc.Status
        self.presented = []  # (monotonic time, refresh token) of every renewal
        self.generation = 0
        self.lock = threading.Lock()

    def pair(self):
        pair = jobtoken_pb2.TokenPair(access_token=f"at-{self.generation}", refresh_token=f"rt-{self.generation}")
        pair.access_token_expires_in.FromNanoseconds(int(LIFE * 1e9))
        return pair

    def IssueJobToken(self, request, context):
        lease = jobtoken_pb2.Lease(lease_id="l-1", job_id=request.job_id, state=jobtoken_pb2.LEASE_STATE_ACTIVE)
        return jobtoken_pb2.IssueJobTokenResponse(lease=lease, tokens=self.pair())

    def RefreshJobToken(self, request, context):
        with self.lock:
            self.presented.append((time.monotonic(), request.refresh_token))
            answer = self.script.pop(0) if self.script else None
            if answer is not None:
                context.abort_with_status(answer)
            self.generation += 1
            return jobtoken_pb2.RefreshJobTokenResponse(tokens=self.pair())


@pytest.fixture
def scripted():
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    jobtoken_pb2_grpc.add_JobTokenServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cfg = RenewalConfig(jitter=0.0, backoff_initial=0.1, urgent_retry=0.2, near_expiry=0.1)
    client = Client(f"127.0.0.1:{port}", module_key="mk_test", renewal=cfg, watch_revocations=False)
    yield servicer, client
    client.close()
    server.stop(0)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_transient_failures_retry_with_the_same_refresh_token(scripted):
    servicer, client = scripted
    servicer.script = [status(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")] * 2
    lease = client.lease("job", "user-token")
    wait_for(lambda: lease.renewals >= 2)
    tokens = [t for _, t in servicer.presented]
    assert tokens[:3] == ["rt-0", "rt-0", "rt-0"], tokens
    assert tokens[3] == "rt-1"
    assert lease.active and lease.access_token == f"at-{servicer.generation}"
    lease.stop()


def test_rate_limited_waits_the_retry_delay(scripted):
    servicer, client = scripted
    servicer.script = [status(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", retry_delay=0.6)]
    lease = client.lease("job", "user-token")
    wait_for(lambda: lease.renewals >= 1)
    (first, _), (second, token) = servicer.presented[:2]
    assert token == "rt-0"
    assert second - first >= 0.55
    lease.stop()


@pytest.mark.parametrize(
    "code, reason, expected",
    [
        (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_REVOKED", EndReason.REVOKED),
        (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_EXPIRED", EndReason.EXPIRED),
        (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_IDLE_TIMEOUT", EndReason.IDLE_TIMEOUT),
        (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_RELEASED", EndReason.RELEASED),
        (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED", EndReason.REFRESH_TOKEN_REUSED),
        (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_INVALID", EndReason.SUPERSEDED),
        (grpc.StatusCode.PERMISSION_DENIED, "ACTOR_MISMATCH", EndReason.REJECTED),
    ],
)
def test_terminal_answers_end_the_lease_with_the_reason(scripted, code, reason, expected):
    servicer, client = scripted
    servicer.script = [status(code, reason)]
    lease = client.lease("job", "user-token")
    end = lease.wait_ended(5)
    assert end is not None and end.reason is expected and reason in end.detail
    time.sleep(0.5)
    assert len(servicer.presented) == 1, "renewed after a terminal answer"
