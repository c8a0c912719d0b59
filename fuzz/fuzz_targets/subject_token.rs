//! Subject-token verification. The first byte picks a mode:
//! - even: the rest is a whole token, so the fuzzer works on the split, the base64, the
//!   strict JSON parser and the header checks in front of the signature;
//! - odd: the rest is `header 0xFF payload`, signed here with the issuer's secret, so it
//!   reaches every claim decision behind the signature.
//!
//! A token that verifies must say, to a lax second reader (serde_json, last member
//! wins), what the verifier returned, with a well-formed audience and times; a refusal
//! must not echo more than a short excerpt of its input.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use token_service::config::Config;
use token_service::ident;
use token_service::limits::{MAX_ID_LEN, MAX_PERMISSION_LEN};
use token_service::subject::{Subject, SubjectVerifier};

const ISSUER: &str = "https://fuzz.invalid";
const SECRET: &[u8] = b"fuzzing-secret-of-at-least-32-bytes!";
/// 2026-01-01T00:00:00Z, as in the seeds.
const NOW: u64 = 1_767_225_600;
const LEEWAY: u64 = 30;

static VERIFIER: LazyLock<SubjectVerifier> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("jobtoken-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("hs256.secret");
    std::fs::write(&secret, SECRET).unwrap();
    // Through the config file format, so new issuer fields take their defaults.
    let toml = format!(
        r#"
        [[trusted_issuers]]
        issuer = "{ISSUER}"
        audiences = ["platform"]
        hs256_secret_file = "{}"
        permissions_claim = "realm_access.roles"
        tenant_claim = "tenant"
        leeway = "{LEEWAY}s"
        "#,
        secret.display()
    );
    let config = Config::from_toml(&toml, Path::new("fuzz.toml")).unwrap();
    SubjectVerifier::from_config(&config.trusted_issuers).unwrap()
});

static KEY: LazyLock<hmac::Key> = LazyLock::new(|| hmac::Key::new(hmac::HMAC_SHA256, SECRET));

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        match std::str::from_utf8(rest) {
            Ok(token) => token.to_owned(),
            Err(_) => return,
        }
    } else {
        let split = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
        let payload = rest.get(split + 1..).unwrap_or_default();
        let input = format!("{}.{}", B64.encode(&rest[..split]), B64.encode(payload));
        let sig = hmac::sign(&KEY, input.as_bytes());
        format!("{input}.{}", B64.encode(sig))
    };
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    match VERIFIER.verify(&token, now) {
        Ok(subject) => check_accepted(&token, &subject),
        Err(e) => {
            let message = e.to_string();
            // Names from the token come back cut short and escaped, never whole.
            assert!(
                message.len() < 1024,
                "a refusal echoes its input: {message}"
            );
        }
    }
});

fn check_accepted(token: &str, subject: &Subject) {
    assert_eq!(subject.issuer, ISSUER);
    assert!(ident::check(&subject.subject, MAX_ID_LEN).is_ok());
    assert!(ident::check(&subject.tenant, MAX_ID_LEN).is_ok());
    for p in &subject.permissions {
        assert!(ident::check(p, MAX_PERMISSION_LEN).is_ok(), "{p:?}");
    }
    // A second, lax reader of the same payload agrees: no duplicate was let through.
    let payload = B64.decode(token.split('.').nth(1).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claims["sub"].as_str(), Some(subject.subject.as_str()));
    assert_eq!(claims["tenant"].as_str(), Some(subject.tenant.as_str()));
    let aud_ok = match &claims["aud"] {
        Value::String(a) => a == "platform",
        Value::Array(items) => {
            items.iter().all(Value::is_string) && items.iter().any(|a| a == "platform")
        }
        _ => false,
    };
    assert!(aud_ok, "aud {:?}", claims["aud"]);
    let now = NOW as f64;
    let date = |name: &str| claims.get(name).map(|v| v.as_f64().expect("a number"));
    let exp = date("exp").expect("exp is required");
    assert!(exp + LEEWAY as f64 + 1.0 > now, "expired: {exp}");
    if let Some(nbf) = date("nbf") {
        assert!(nbf - LEEWAY as f64 - 1.0 < now, "not yet valid: {nbf}");
    }
    let _iat = date("iat"); // must be a number too
}
