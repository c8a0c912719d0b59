"""The client against the real service: grant, background renewal, release, resume,
revocation by an administrator, the revocation stream, and the error contract."""

import threading
import time

import grpc
import pytest

from jobtoken.v1 import admin_pb2, jobtoken_pb2
from jobtoken_client import Client, EndReason, JobTokenError, LeaseEndedError, details


@pytest.fixture
def client(service):
    with Client(service.target, module_key=service.module_key) as c:
        yield c


def introspect(client, token):
    return client.stub.IntrospectToken(
        jobtoken_pb2.IntrospectTokenRequest(token=token), metadata=client.metadata, timeout=5
    )


def test_grant_renews_in_the_background_and_every_token_is_valid(service, client, job_id):
    lease = client.lease(job_id, service.user_token(), permissions=["inventory.write"])
    assert lease.info.permissions == ("inventory.write",)
    assert lease.info.tenant == "diku" and lease.info.subject == "alice" and lease.info.actor == "dev-module"
    assert lease.info.idle_timeout and lease.info.remaining and lease.info.remaining > 3600
    seen = [lease.access_token]
    # Tokens of 2 s (up to 3 s: `exp` is rounded up to a second) renew every 1.2-2.4 s.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(seen) < 4:
        token = lease.access_token
        if token != seen[-1]:
            seen.append(token)
        claims = introspect(client, token)
        # A token handed out may have just been superseded, but it is never expired.
        assert claims.active, "the lease handed out an inactive token"
        time.sleep(0.2)
    assert lease.renewals >= 3 and len(seen) >= 4, (lease.renewals, len(seen))
    assert lease.active
    assert lease.metadata() == (("authorization", f"Bearer {lease.access_token}"),)
    assert lease.metadata("x-okapi-token")[0][1] == lease.access_token
    end = lease.release("succeeded", "imported 3 records")
    assert end.reason is EndReason.RELEASED
    assert not introspect(client, seen[-1]).active
    with pytest.raises(LeaseEndedError):
        lease.access_token
    renewals = lease.renewals
    time.sleep(2.0)
    assert lease.renewals == renewals, "renewal went on after release"
    # Releasing again is a no-op.
    assert lease.release().reason is EndReason.RELEASED


def test_context_manager_releases_with_the_outcome(service, client, job_id):
    with pytest.raises(RuntimeError):
        with client.lease(job_id, service.user_token()) as lease:
            raise RuntimeError("boom")
    assert lease.end.reason is EndReason.RELEASED
    admin, md = service.admin()
    got = admin.GetLease(admin_pb2.GetLeaseRequest(lease_id=lease.info.lease_id), metadata=md, timeout=5)
    assert got.lease.end_detail.startswith("outcome: failed")


def test_refusals_carry_the_reason_and_its_metadata(service, client, job_id):
    with pytest.raises(JobTokenError) as refused:
        client.lease(job_id, service.user_token(), permissions=["users.delete"])
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.reason == "PERMISSION_NOT_HELD"
    assert "users.delete" in refused.value.metadata["permissions"]
    assert not refused.value.transient
    with pytest.raises(JobTokenError) as refused:
        client.lease("", service.user_token())
    assert refused.value.reason == "INVALID_ARGUMENT" and refused.value.metadata["field"] == "job_id"
    with pytest.raises(JobTokenError) as refused:
        Client(service.target, module_key="mk_wrong", watch_revocations=False).lease(job_id, service.user_token())
    assert refused.value.reason == "MODULE_UNAUTHENTICATED"


def test_a_retry_with_the_same_refresh_token_converges_within_the_grace_window(service, client, job_id):
    stub, md = client.stub, client.metadata
    issued = stub.IssueJobToken(
        jobtoken_pb2.IssueJobTokenRequest(subject_token=service.user_token(), job_id=job_id), metadata=md, timeout=5
    )
    r0 = jobtoken_pb2.RefreshJobTokenRequest(lease_id=issued.lease.lease_id, refresh_token=issued.tokens.refresh_token)
    first = stub.RefreshJobToken(r0, metadata=md, timeout=5)
    retry = stub.RefreshJobToken(r0, metadata=md, timeout=5)  # "the answer was lost"
    assert retry.tokens.refresh_token == first.tokens.refresh_token
    r1 = jobtoken_pb2.RefreshJobTokenRequest(lease_id=issued.lease.lease_id, refresh_token=first.tokens.refresh_token)
    stub.RefreshJobToken(r1, metadata=md, timeout=5)
    # r0 is now two generations old: theft, and the lease is revoked.
    with pytest.raises(grpc.RpcError) as reused:
        stub.RefreshJobToken(r0, metadata=md, timeout=5)
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(reused.value).reason == "REFRESH_TOKEN_REUSED"


def test_an_admin_revoke_ends_the_lease_within_a_second(service, client, job_id):
    lease = client.lease(job_id, service.user_token())
    ended = threading.Event()
    lease.on_end(lambda end: ended.set())
    admin, md = service.admin()
    admin.RevokeJob(admin_pb2.RevokeJobRequest(tenant="diku", job_id=job_id, reason="user asked"), metadata=md, timeout=5)
    revoked_at = time.monotonic()
    end = lease.wait_ended(5)
    assert end is not None and end.reason is EndReason.REVOKED
    assert ended.is_set()
    assert time.monotonic() - revoked_at < 1.5  # "within a second", with room for a slow CI


def test_revocations_reach_the_lease_at_renewal_without_the_stream(service, job_id):
    with Client(service.target, module_key=service.module_key, watch_revocations=False) as client:
        lease = client.lease(job_id, service.user_token())
        admin, md = service.admin()
        admin.RevokeLease(admin_pb2.RevokeLeaseRequest(lease_id=lease.info.lease_id), metadata=md, timeout=5)
        end = lease.wait_ended(5)  # the next renewal, at most ~2.4 s away, answers LEASE_REVOKED
        assert end is not None and end.reason is EndReason.REVOKED
        assert "LEASE_REVOKED" in end.detail


def test_resume_takes_over_and_the_old_instance_is_superseded(service, job_id):
    with Client(service.target, module_key=service.module_key) as old, Client(
        service.target, module_key=service.module_key
    ) as new:
        before = old.lease(job_id, service.user_token())
        after = new.resume(job_id, tenant="diku")
        assert after.info.lease_id == before.info.lease_id
        end = before.wait_ended(5)
        assert end is not None and end.reason is EndReason.SUPERSEDED
        deadline = time.monotonic() + 5
        while after.renewals < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert after.active and after.renewals >= 1
        after.release()


def test_the_revocation_stream_resumes_from_its_cursor(service, client):
    events, lock = [], threading.Lock()

    def collect(event):
        with lock:
            events.append(event)

    watcher = client.watch_revocations(collect)
    assert watcher.wait_ready(5)
    start = watcher.cursor
    ids = []
    for _ in range(3):
        lease = client.lease(f"py-stream-{time.monotonic_ns()}", service.user_token())
        lease.release("cancelled")
        ids.append(lease.info.lease_id)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not set(ids) <= {e.lease_id for e in events}:
        time.sleep(0.05)
    watcher.stop()
    mine = [e for e in events if e.lease_id in ids]
    assert [e.lease_id for e in mine] == ids
    assert all(e.reason == jobtoken_pb2.END_REASON_RELEASED and e.tenant == "diku" for e in mine)
    assert all(not e.heartbeat for e in events)
    cursors = [e.cursor for e in events]
    assert cursors == sorted(cursors) and cursors[0] > start

    # A new watcher from the first cursor sees the same ends again, and nothing earlier.
    replayed = []
    again = client.watch_revocations(replayed.append, after_cursor=start)
    assert again.wait_ready(5)
    again.stop()
    assert [e.cursor for e in replayed][: len(cursors)] == cursors


def test_a_stream_cursor_beyond_the_newest_event_is_refused(service, client):
    call = client.stub.WatchRevocations(
        jobtoken_pb2.WatchRevocationsRequest(after_cursor=10**12), metadata=client.metadata, timeout=5
    )
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(call))
    assert details(refused.value).reason == "INVALID_ARGUMENT"
    assert details(refused.value).metadata.get("field") == "after_cursor"


def test_an_outage_is_survived_and_a_fresh_token_follows_within_a_second(own_service, job_id):
    service = own_service.service
    with Client(service.target, module_key=service.module_key) as client:
        lease = client.lease(job_id, service.user_token())
        own_service.stop()
        # Down for longer than a token lives (2 s): the token in hand expires meanwhile,
        # and the client retries about every second with the same refresh token. Long
        # enough that gRPC's default reconnect backoff (1 s growing 1.6x) would lag.
        time.sleep(8)
        assert lease.active, lease.end
        renewals = lease.renewals
        own_service.start()
        back = time.monotonic()
        while lease.renewals == renewals and time.monotonic() - back < 5:
            time.sleep(0.02)
        assert lease.renewals > renewals, "no renewal after the service came back"
        assert time.monotonic() - back < 2.0  # about a second: 0.5-1.5 s retries, 1 s reconnects
        assert introspect(client, lease.access_token).active
        lease.release()
