"""Python client of the jobtoken.v1 service: a job lease with background renewal,
release, and revocation watching. The contract it implements is docs/clients.md.

    from jobtoken_client import Client

    with Client("127.0.0.1:50051", module_key=module_key) as client:
        with client.lease("import-42", user_access_token, permissions=["inventory.write"]) as lease:
            for record in records:
                if lease.end:                      # revoked, expired, ...: checkpoint and stop
                    break
                api.Import(record, metadata=lease.metadata())
        # leaving the block released the lease ("succeeded", or "failed" on an exception)
"""

from .client import MODULE_KEY_HEADER, Client
from .errors import (
    DOMAIN,
    TRANSIENT_CODES,
    EndReason,
    ErrorDetails,
    JobTokenError,
    LeaseEnd,
    LeaseEndedError,
    details,
    is_transient,
)
from .lease import AccessToken, Lease, LeaseInfo
from .schedule import RenewalConfig, refresh_in, retry_in
from .watcher import RevocationWatcher

__all__ = [
    "AccessToken",
    "Client",
    "DOMAIN",
    "EndReason",
    "ErrorDetails",
    "JobTokenError",
    "Lease",
    "LeaseEnd",
    "LeaseEndedError",
    "LeaseInfo",
    "MODULE_KEY_HEADER",
    "RenewalConfig",
    "RevocationWatcher",
    "TRANSIENT_CODES",
    "details",
    "is_transient",
    "refresh_in",
    "retry_in",
]
