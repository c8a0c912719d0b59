//! Server-side secrets: the master key and what is derived from it, refresh tokens, and
//! hashing of module and admin keys.
//!
//! Refresh tokens are never stored. Token number `g` of a lease is
//! `HMAC(refresh_key, lease_id ‖ seed ‖ g)`, where the seed is random per lease (and per
//! resume) and the refresh key is derived from the master key, which lives outside the
//! database. A leaked database therefore holds nothing that can be replayed, and a retry
//! of the previous token can be answered with the very same successor without keeping it.

use std::fmt;
use std::sync::Arc;

use aws_lc_rs::{aead, constant_time, digest, hmac, rand};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

/// Length of the master key and of every derived key, in bytes.
pub const KEY_LEN: usize = 32;

/// Prefix and version of refresh tokens, so a token is recognisable in a leak scanner.
const REFRESH_PREFIX: &str = "jrt1";

/// The service's root secret. Debug output never shows it.
#[derive(Clone)]
pub struct MasterKey(Arc<Keys>);

struct Keys {
    refresh: hmac::Key,
    seal: aead::LessSafeKey,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A refresh token as presented: which generation it claims and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken {
    /// The generation the token claims to be.
    pub generation: u64,
    mac: Vec<u8>,
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshToken")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl RefreshToken {
    /// Parses `jrt1.<generation>.<base64url mac>`; `None` if it is not of that shape.
    /// Only the spelling [`MasterKey::refresh_token`] writes is accepted: the generation
    /// in canonical decimal (no sign, no leading zero) and the MAC in canonical base64url,
    /// so one token has one spelling.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('.');
        let (prefix, generation, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if prefix != REFRESH_PREFIX || parts.next().is_some() || mac.len() != 43 {
            return None;
        }
        // `u64::from_str` also takes `+1` and `01`.
        let canonical = match generation.as_bytes() {
            [b'0'] => true,
            [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
            _ => false,
        };
        if !canonical {
            return None;
        }
        let generation = generation.parse().ok()?;
        let mac = B64.decode(mac).ok()?;
        (mac.len() == KEY_LEN).then_some(Self { generation, mac })
    }
}

/// A refresh token to hand out. Only its `expose` method reveals the text.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedRefreshToken(String);

impl IssuedRefreshToken {
    /// The token text, for the response to the holder and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IssuedRefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuedRefreshToken(<redacted>)")
    }
}

/// Errors of sealing and unsealing.
#[derive(Debug, thiserror::Error)]
#[error("sealed data could not be opened (wrong master key or corrupt data)")]
pub struct SealError;

impl MasterKey {
    /// Builds the key from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let derive = |label: &[u8]| hmac::sign(&root, label);
        let refresh = hmac::Key::new(
            hmac::HMAC_SHA256,
            derive(b"jobtoken refresh-token v1").as_ref(),
        );
        let seal_bytes = derive(b"jobtoken key-seal v1");
        let seal = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, seal_bytes.as_ref())
                .expect("a 32-byte key is valid for AES-256-GCM"),
        );
        Self(Arc::new(Keys { refresh, seal }))
    }

    /// Parses the base64url text form (as stored in a key file).
    pub fn from_text(text: &str) -> Option<Self> {
        let bytes = B64.decode(text.trim()).ok()?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self::from_bytes(&bytes))
    }

    /// A new random key and its text form (to persist).
    pub fn generate() -> (Self, String) {
        let bytes = random_bytes::<KEY_LEN>();
        (Self::from_bytes(&bytes), B64.encode(bytes))
    }

    /// The refresh token of a lease at a generation.
    pub fn refresh_token(
        &self,
        lease_id: &str,
        seed: &[u8],
        generation: u64,
    ) -> IssuedRefreshToken {
        let mac = self.refresh_mac(lease_id, seed, generation);
        IssuedRefreshToken(format!("{REFRESH_PREFIX}.{generation}.{}", B64.encode(mac)))
    }

    /// Whether `token` is the genuine token of this lease and seed at its claimed
    /// generation. Constant time in the secret part.
    pub fn verify_refresh_token(&self, lease_id: &str, seed: &[u8], token: &RefreshToken) -> bool {
        let expected = self.refresh_mac(lease_id, seed, token.generation);
        constant_time::verify_slices_are_equal(expected.as_ref(), &token.mac).is_ok()
    }

    fn refresh_mac(&self, lease_id: &str, seed: &[u8], generation: u64) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0.refresh);
        // Length-prefix the variable parts so no two inputs share an encoding.
        ctx.update(&(lease_id.len() as u64).to_be_bytes());
        ctx.update(lease_id.as_bytes());
        ctx.update(&(seed.len() as u64).to_be_bytes());
        ctx.update(seed);
        ctx.update(&generation.to_be_bytes());
        ctx.sign()
    }

    /// Encrypts `plain` (a private key) for storage: nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, plain: &[u8], context: &str) -> Vec<u8> {
        let nonce_bytes = random_bytes::<{ aead::NONCE_LEN }>();
        let mut data = plain.to_vec();
        self.0
            .seal
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce_bytes),
                aead::Aad::from(context.as_bytes()),
                &mut data,
            )
            .expect("AES-GCM sealing of a small buffer cannot fail");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&data);
        out
    }

    /// Decrypts what [`MasterKey::seal`] produced with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Vec<u8>, SealError> {
        if sealed.len() < aead::NONCE_LEN {
            return Err(SealError);
        }
        let (nonce, data) = sealed.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError)?;
        let mut data = data.to_vec();
        let plain = self
            .0
            .seal
            .open_in_place(nonce, aead::Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| SealError)?;
        Ok(plain.to_vec())
    }
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::fill(&mut out).expect("the system random source is available");
    out
}

/// A new random secret in text form, with a recognisable prefix (`mk` module key, `ak`
/// admin key).
pub fn generate_key_text(prefix: &str) -> String {
    format!("{prefix}_{}", B64.encode(random_bytes::<KEY_LEN>()))
}

/// Lower-case hex SHA-256 of a key: the only form in which config keeps module and admin
/// keys. Keys are high-entropy, so a plain hash cannot be brute-forced.
pub fn key_hash(key: &str) -> String {
    let d = digest::digest(&digest::SHA256, key.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::from_bytes(&[7u8; KEY_LEN])
    }

    #[test]
    fn refresh_tokens_verify_only_for_their_lease_seed_and_generation() {
        let m = master();
        let t = m.refresh_token("lease-1", b"seed", 3);
        let parsed = RefreshToken::parse(t.expose()).expect("well-formed");
        assert_eq!(parsed.generation, 3);
        assert!(m.verify_refresh_token("lease-1", b"seed", &parsed));
        assert!(!m.verify_refresh_token("lease-2", b"seed", &parsed));
        assert!(!m.verify_refresh_token("lease-1", b"other", &parsed));
        let forged = RefreshToken {
            generation: 4,
            ..parsed.clone()
        };
        assert!(!m.verify_refresh_token("lease-1", b"seed", &forged));
        let other_master = MasterKey::from_bytes(&[8u8; KEY_LEN]);
        assert!(!other_master.verify_refresh_token("lease-1", b"seed", &parsed));
    }

    #[test]
    fn refresh_tokens_carry_256_bits_and_reject_garbage() {
        let t = master().refresh_token("l", b"s", 0);
        let mac = t.expose().rsplit('.').next().unwrap();
        assert_eq!(B64.decode(mac).unwrap().len(), 32);
        for bad in [
            "",
            "jrt1",
            "jrt1.1",
            "jrt1.x.AAAA",
            "jrt2.1.",
            "jrt1.1.a.b",
            "\u{0}.1.2",
        ] {
            assert!(RefreshToken::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn refresh_tokens_have_one_spelling() {
        let m = master();
        for generation in [0, 1, 7, 10, u64::MAX] {
            let t = m.refresh_token("l", b"s", generation);
            let parsed = RefreshToken::parse(t.expose()).expect("canonical");
            assert_eq!(parsed.generation, generation);
            assert!(m.verify_refresh_token("l", b"s", &parsed));
            let mac = t.expose().rsplit('.').next().unwrap();
            for spelling in [
                format!("0{generation}"),
                format!("00{generation}"),
                format!("+{generation}"),
                format!("-{generation}"),
                format!(" {generation}"),
                format!("{generation} "),
                format!("{generation}\n"),
            ] {
                let other = format!("jrt1.{spelling}.{mac}");
                assert!(RefreshToken::parse(&other).is_none(), "{spelling:?}");
            }
        }
        let mac = "A".repeat(43);
        assert!(RefreshToken::parse(&format!("jrt1.18446744073709551615.{mac}")).is_some());
        assert!(RefreshToken::parse(&format!("jrt1.18446744073709551616.{mac}")).is_none());
        assert!(RefreshToken::parse(&format!("jrt1..{mac}")).is_none());
        assert!(RefreshToken::parse(&format!("jrt1.\u{661}.{mac}")).is_none());
        // The MAC's last character with a trailing bit set decodes to the same bytes in a
        // lax decoder: a second spelling.
        let t = m.refresh_token("l", b"s", 3);
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut other = t.expose().to_owned();
        let last = alphabet.find(other.pop().unwrap()).unwrap();
        other.push(alphabet.as_bytes()[last ^ 1].into());
        assert!(RefreshToken::parse(&other).is_none());
    }

    #[test]
    fn debug_output_hides_secrets() {
        let m = master();
        let t = m.refresh_token("l", b"s", 1);
        let secret = t.expose().to_owned();
        for shown in [
            format!("{t:?}"),
            format!("{:?}", RefreshToken::parse(&secret).unwrap()),
            format!("{m:?}"),
        ] {
            assert!(
                !shown.contains(secret.rsplit('.').next().unwrap()),
                "{shown}"
            );
        }
    }

    #[test]
    fn sealing_round_trips_and_binds_context_and_key() {
        let m = master();
        let sealed = m.seal(b"private key", "kid-1");
        assert_eq!(m.open(&sealed, "kid-1").unwrap(), b"private key");
        assert!(m.open(&sealed, "kid-2").is_err());
        assert!(
            MasterKey::from_bytes(&[1u8; KEY_LEN])
                .open(&sealed, "kid-1")
                .is_err()
        );
        assert!(m.open(&sealed[..5], "kid-1").is_err());
    }

    #[test]
    fn master_key_text_round_trips() {
        let (key, text) = MasterKey::generate();
        let again = MasterKey::from_text(&text).unwrap();
        let sealed = key.seal(b"x", "c");
        assert_eq!(again.open(&sealed, "c").unwrap(), b"x");
        assert!(MasterKey::from_text("short").is_none());
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        assert_eq!(
            key_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
