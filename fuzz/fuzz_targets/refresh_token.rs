//! Refresh-token parsing: whatever parses is spelled exactly as the service writes it,
//! never verifies unless genuine, and never shows its MAC in Debug output.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use token_service::secrets::{KEY_LEN, MasterKey, RefreshToken};

static MASTER: LazyLock<MasterKey> = LazyLock::new(|| MasterKey::from_bytes(&[7; KEY_LEN]));

fuzz_target!(|data: &[u8]| {
    // The genuine token of any generation round-trips.
    let generation = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let genuine = MASTER.refresh_token("lease", b"seed", generation);
    let parsed = RefreshToken::parse(genuine.expose()).expect("a genuine token parses");
    assert_eq!(parsed.generation, generation);
    assert!(MASTER.verify_refresh_token("lease", b"seed", &parsed));

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(token) = RefreshToken::parse(text) else {
        return;
    };
    // One spelling: the canonical decimal generation, then exactly 43 MAC characters.
    let prefix = format!("jrt1.{}.", token.generation);
    assert!(
        text.starts_with(&prefix) && text.len() == prefix.len() + 43,
        "non-canonical token accepted: {text:?}"
    );
    let mac = &text[prefix.len()..];
    assert!(!format!("{token:?}").contains(mac), "Debug shows the MAC");
    // Only the genuine token verifies.
    let genuine = MASTER.refresh_token("lease", b"seed", token.generation);
    assert_eq!(
        MASTER.verify_refresh_token("lease", b"seed", &token),
        text == genuine.expose()
    );
});
