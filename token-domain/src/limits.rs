//! Every bound on what a caller sends (sizes, counts, dates, lifetimes): one place to read them, so the gRPC codec, the
//! domain's checks, the identity adapter and the admin CLI cannot disagree. (What a
//! module may *spend*, its call rates and open streams, is configured: the service
//! crate's `quota` module.)

use std::time::Duration;

/// Largest request message accepted; field limits are far below it.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Longest identifier: job id, lease id, audience, module id, tenant, and a claim that
/// names one (`sub`, a tenant, an issuer).
pub const MAX_ID_LEN: usize = 200;
/// Longest free-text reason or detail.
pub const MAX_DETAIL_LEN: usize = 1000;
/// Longest token accepted for checking: a user's token, an access token, a logout token.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Most permissions one grant may request.
pub const MAX_PERMISSIONS: usize = 256;
/// Longest permission name.
pub const MAX_PERMISSION_LEN: usize = 200;
/// Longest lease lifetime anyone may ask for; beyond is surely a mistake.
pub const ABSURD_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest page of ListLeases.
pub const MAX_PAGE_SIZE: usize = 500;
/// Page size of ListLeases when none is asked for.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Most tenants one revocation stream may name.
pub const MAX_STREAM_TENANTS: usize = 1000;
/// Largest back-channel logout request body.
pub const MAX_LOGOUT_BODY: usize = 64 * 1024;
/// Latest NumericDate accepted (9999-12-31T23:59:59Z): a date beyond it is garbage, and
/// the bound keeps every sum with a leeway far from overflow.
pub const MAX_NUMERIC_DATE: i64 = 253_402_300_799;
