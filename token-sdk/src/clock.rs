//! The one place the SDK reads a clock: tokio's monotonic clock, which tests pause and
//! advance (`#[tokio::test(start_paused = true)]`).

use tokio::time::Instant;

/// Now, on the monotonic clock.
#[allow(clippy::disallowed_methods)] // the one place allowed
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// The wall clock, for comparing with times the service sends.
#[allow(clippy::disallowed_methods)] // the one place allowed
pub(crate) fn wall_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}
