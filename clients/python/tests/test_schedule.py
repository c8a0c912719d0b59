"""The renewal schedule's promises, checked over many random draws (no service needed)."""

import random

from jobtoken_client.schedule import FLOOR, RenewalConfig, refresh_in, retry_in, rpc_timeout

CFG = RenewalConfig()
_RNG = random.Random(7)
DRAWS = [_RNG.random() for _ in range(2000)]


def test_renews_before_expiry_and_never_in_a_tight_loop():
    for life in [0.06, 0.2, 1.0, 2.0, 5.0, 59.0, 300.0, 3600.0, 86400.0]:
        for u in DRAWS:
            d = refresh_in(life, CFG, u)
            assert d < life, (life, d)
            assert d + 1e-9 >= max(min(CFG.min_delay, life / 2), FLOOR), (life, d)
    assert refresh_in(0.0, CFG, 0.5) == FLOOR


def test_renews_at_70_percent_with_10_percent_jitter():
    assert abs(refresh_in(300.0, CFG, 0.5) - 210.0) < 1e-9
    waits = [refresh_in(300.0, CFG, u) for u in DRAWS]
    assert min(waits) >= 180.0 and max(waits) <= 240.0
    # Spread over the window, not bunched: each fifth of it gets a fair share.
    buckets = [0] * 5
    for w in waits:
        buckets[min(int((w - 180.0) / 12.0), 4)] += 1
    assert all(300 <= b <= 500 for b in buckets), buckets


def test_polite_backoff_while_the_token_is_healthy():
    long = 3600.0
    top = [retry_in(a, long, CFG, 1.0) for a in range(8)]
    assert top[:4] == [1.0, 2.0, 4.0, 8.0]
    assert top[-1] == CFG.backoff_max
    for a in range(12):
        for u in DRAWS[:200]:
            w = retry_in(a, long, CFG, u)
            assert CFG.urgent_retry * 0.5 <= w <= CFG.backoff_max
    # Every retry of a renewal whose answer was lost lands inside the 30 s grace window.
    assert CFG.backoff_max < 30.0


def test_never_sleeps_into_the_near_expiry_window():
    for until in [11.0, 12.0, 15.0, 20.0]:
        for a in range(10):
            w = retry_in(a, until, CFG, 1.0)
            assert until - w >= CFG.near_expiry - 1e-9 or w <= CFG.urgent_retry * 0.5 + 1e-9, (until, a, w)


def test_about_every_second_near_and_after_expiry():
    for until in [10.0, 5.0, 0.5, 0.0, -30.0, -3600.0]:
        for a in [0, 3, 50]:
            waits = [retry_in(a, until, CFG, u) for u in DRAWS]
            assert 0.5 <= min(waits) and max(waits) <= 1.5
            assert 0.9 <= sum(waits) / len(waits) <= 1.1


def test_rpc_timeout_is_half_the_remaining_life_within_bounds():
    assert rpc_timeout(100.0, CFG) == CFG.rpc_timeout
    assert rpc_timeout(6.0, CFG) == 3.0
    assert rpc_timeout(0.5, CFG) == 1.0
    assert rpc_timeout(-5.0, CFG) == 1.0
