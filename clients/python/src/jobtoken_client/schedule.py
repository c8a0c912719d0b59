"""When to renew, and how long to wait after a failure.

Pure functions of the durations the service returned (``access_token_expires_in``), never
of wall clocks, so a host whose clock is wrong still renews on time. The numbers are the
ones in docs/clients.md ("The numbers"); keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Shortest wait of all, in seconds: a token with no life left is renewed after this,
#: not at once, so a misbehaving server cannot drive a tight loop.
FLOOR = 0.05


@dataclass(frozen=True)
class RenewalConfig:
    """Tuning of the background renewal (seconds and fractions of a token's life)."""

    #: Renew at this fraction of the token's life.
    refresh_at: float = 0.7
    #: Spread renewals by +/- this fraction of the token's life.
    jitter: float = 0.1
    #: Never renew sooner than this after a success (unless the token lives < 2x this).
    min_delay: float = 0.5
    #: First wait after a transient failure while the token in hand is healthy; doubles.
    backoff_initial: float = 1.0
    #: Longest such wait. Keep it well under the service's refresh grace (30 s): a retry
    #: of a renewal whose answer was lost converges only inside the grace window.
    backoff_max: float = 10.0
    #: "Near expiry": the token in hand expires within this many seconds (or has expired).
    near_expiry: float = 10.0
    #: Mean wait between retries near or after expiry (jittered by +/- 50%).
    urgent_retry: float = 1.0
    #: Longest wait for one renewal RPC (half the token's remaining life, at least 1 s).
    rpc_timeout: float = 10.0


def refresh_in(life: float, cfg: RenewalConfig, u: float) -> float:
    """Seconds after receiving a token that lives ``life`` seconds to renew it.

    ``u`` is uniform in [0, 1) (0.5 means no jitter). Always before the token expires (for
    tokens living more than FLOOR), never sooner than ``min(min_delay, life / 2)`` or FLOOR.
    """
    life = max(life, 0.0)
    fraction = min(max(cfg.refresh_at, 0.0), 1.0)
    spread = min(max(cfg.jitter, 0.0), 0.5) * (2.0 * min(max(u, 0.0), 1.0) - 1.0)
    wanted = life * (fraction + spread)
    earliest = min(cfg.min_delay, life / 2.0)
    # Leave at least 5% of the life (and 10 ms) for the renewal itself.
    latest = life - max(life * 0.05, 0.010)
    return max(max(min(wanted, latest), earliest, 0.0), FLOOR)


def retry_in(attempt: int, until_expiry: float, cfg: RenewalConfig, u: float) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based) after a transient failure.

    While the token in hand is healthy (expires in more than ``near_expiry``): polite
    exponential backoff with "equal jitter" (half fixed, half random), capped by
    ``backoff_max`` and never sleeping into the near-expiry window. Near or after expiry:
    about every ``urgent_retry`` seconds (+/- 50%), so the job holds a fresh token within
    about a second of the service answering again.
    """
    u = min(max(u, 0.0), 1.0)
    urgent = cfg.urgent_retry * (0.5 + u)
    if until_expiry <= cfg.near_expiry:
        return max(urgent, FLOOR)
    polite = min(cfg.backoff_initial * (2 ** min(attempt, 20)), cfg.backoff_max)
    polite *= 0.5 + 0.5 * u
    # Wake up no later than the start of the near-expiry window.
    polite = min(polite, until_expiry - cfg.near_expiry)
    return max(polite, cfg.urgent_retry * 0.5, FLOOR)


def rpc_timeout(until_expiry: float, cfg: RenewalConfig) -> float:
    """How long to wait for one renewal RPC: half the token's remaining life, 1 s to
    ``rpc_timeout``, so a black-holed connection counts as a transient failure."""
    return min(max(until_expiry / 2.0, 1.0), cfg.rpc_timeout)
