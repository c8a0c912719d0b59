//! Job tokens parsed once, by one parser, into one typed value that every check reads
//! (RFC 8725 §2-3). Duplicate JSON members (at any depth), unexpected JSON types and
//! missing required claims are refusals, never a skipped check; times are checked here
//! against the SDK's clock, not by `jsonwebtoken`, which reads the wall clock itself.

use std::collections::btree_map::Entry;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::verifier::{Claims, VerifyError};

/// Latest NumericDate believed (the end of year 9999); beyond it a time is refused.
const MAX_NUMERIC_DATE: f64 = 253_402_300_799.0;

/// A token split into its parts, its header and claims read and typed; not yet trusted.
pub(crate) struct Parsed<'a> {
    /// The signing key's id.
    pub(crate) kid: String,
    /// `header.payload`, the signed bytes.
    pub(crate) message: &'a str,
    /// The signature, base64url.
    pub(crate) signature: &'a str,
    pub(crate) claims: Claims,
    iss: String,
    aud: Option<Value>,
    exp: f64,
    nbf: Option<f64>,
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub(crate) issuer: String,
    pub(crate) audience: Option<String>,
    pub(crate) leeway: Duration,
}

/// A JSON value whose objects, at every depth, have no duplicate member names.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = std::collections::BTreeMap::new();
        while let Some(name) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            match members.entry(name) {
                Entry::Occupied(e) => {
                    return Err(de::Error::custom(format!("duplicate member {:?}", e.key())));
                }
                Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        Ok(Value::Object(members.into_iter().collect()))
    }
}

fn invalid(why: impl Into<String>) -> VerifyError {
    VerifyError::Invalid(why.into())
}

/// One part of the token: base64url without padding, holding a JSON object without
/// duplicate members.
fn object(part: &str, what: &str) -> Result<Map<String, Value>, VerifyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| VerifyError::Malformed)?;
    let Strict(value) = serde_json::from_slice(&bytes).map_err(|e| {
        if e.is_data() {
            // serde_json appends the position; the reason is what a person needs.
            let text = e.to_string();
            let reason = text.split(" at line ").next().unwrap_or(&text);
            invalid(format!("{what}: {reason}"))
        } else {
            VerifyError::Malformed
        }
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(VerifyError::Malformed),
    }
}

fn string(map: &Map<String, Value>, name: &str) -> Result<String, VerifyError> {
    match map.get(name) {
        None => Err(invalid(format!("missing claim {name}"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(format!("claim {name} is not a string"))),
    }
}

/// A NumericDate: integer or fractional seconds, within a sane horizon.
fn numeric_date(map: &Map<String, Value>, name: &str) -> Result<Option<f64>, VerifyError> {
    match map.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() && (0.0..=MAX_NUMERIC_DATE).contains(&v) => Ok(Some(v)),
            _ => Err(invalid(format!("claim {name} is out of range"))),
        },
        Some(_) => Err(invalid(format!("claim {name} is not a NumericDate"))),
    }
}

/// Splits, decodes and types a token. Checks structure and types only: no signature, no
/// time.
pub(crate) fn parse(token: &str) -> Result<Parsed<'_>, VerifyError> {
    let (message, signature) = token.rsplit_once('.').ok_or(VerifyError::Malformed)?;
    let (header, payload) = message.split_once('.').ok_or(VerifyError::Malformed)?;
    if payload.contains('.') {
        return Err(VerifyError::Malformed);
    }
    let header = object(header, "header")?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "EdDSA" => {}
        _ => return Err(invalid("the algorithm is not EdDSA")),
    }
    // No extension is understood, so any critical one is refused (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(invalid(
            "the header names critical parameters not understood",
        ));
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) => kid.clone(),
        _ => return Err(VerifyError::Malformed),
    };
    let claims = object(payload, "claims")?;
    let permissions = match claims.get("permissions") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|p| p.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("claim permissions holds a non-string"))?,
        Some(_) => return Err(invalid("claim permissions is not an array")),
        None => return Err(invalid("missing claim permissions")),
    };
    let actor = match claims.get("act") {
        Some(Value::Object(act)) => string(act, "sub")?,
        Some(_) => return Err(invalid("claim act is not an object")),
        None => return Err(invalid("missing claim act")),
    };
    let exp = numeric_date(&claims, "exp")?.ok_or_else(|| invalid("missing claim exp"))?;
    let nbf = numeric_date(&claims, "nbf")?;
    numeric_date(&claims, "iat")?;
    Ok(Parsed {
        kid,
        message,
        signature,
        iss: string(&claims, "iss")?,
        aud: claims.get("aud").cloned(),
        exp,
        nbf,
        claims: Claims {
            subject: string(&claims, "sub")?,
            tenant: string(&claims, "tenant")?,
            permissions,
            job_id: string(&claims, "job_id")?,
            lease_id: string(&claims, "lease_id")?,
            exp: exp.floor() as i64,
            actor,
        },
    })
}

impl Parsed<'_> {
    /// Issuer, audience and validity at `now` (the SDK's clock), with the leeway.
    pub(crate) fn check(&self, rules: &Rules, now: SystemTime) -> Result<(), VerifyError> {
        if self.iss != rules.issuer {
            return Err(invalid("wrong issuer"));
        }
        if let Some(wanted) = &rules.audience {
            let ok = match &self.aud {
                Some(Value::String(aud)) => aud == wanted,
                Some(Value::Array(auds)) => {
                    let auds: Option<Vec<&str>> = auds.iter().map(Value::as_str).collect();
                    auds.ok_or_else(|| invalid("claim aud holds a non-string"))?
                        .contains(&wanted.as_str())
                }
                None => return Err(invalid("missing claim aud")),
                Some(_) => return Err(invalid("claim aud is not a string or an array")),
            };
            if !ok {
                return Err(invalid("wrong audience"));
            }
        }
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let leeway = rules.leeway.as_secs_f64();
        if now >= self.exp + leeway {
            return Err(invalid("the token has expired"));
        }
        if self.nbf.is_some_and(|nbf| now + leeway < nbf) {
            return Err(invalid("the token is not valid yet"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT","kid":"k1"}"#;
    const NOW: u64 = 1_700_000_000;

    fn claims_with(extra: &str) -> String {
        format!(
            r#"{{"iss":"jobtoken","sub":"alice","tenant":"acme","permissions":["a.read"],
            "job_id":"j","lease_id":"l","act":{{"sub":"importer"}}{extra}}}"#
        )
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(claims))
    }

    fn rules(audience: Option<&str>) -> Rules {
        Rules {
            issuer: "jobtoken".into(),
            audience: audience.map(str::to_owned),
            leeway: Duration::ZERO,
        }
    }

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    /// Parses and checks at `NOW` against `rules`; the refusal's text, or "ok".
    fn outcome(header: &str, claims: &str, rules: &Rules) -> String {
        let t = token(header, claims);
        match parse(&t).and_then(|p| p.check(rules, at(NOW as f64))) {
            Ok(()) => "ok".into(),
            Err(VerifyError::Invalid(why)) => why,
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn claims_and_headers_as_a_table() {
        let exp = format!(r#","exp":{}"#, NOW + 60);
        let none = rules(None);
        let aud = rules(Some("inventory"));
        let cases: Vec<(String, String, &Rules, &str)> = vec![
            (HEADER.into(), claims_with(&exp), &none, "ok"),
            // exp / nbf / iat: integers or fractions; anything else refused by name.
            (
                HEADER.into(),
                claims_with(&format!(r#","exp":{}.5"#, NOW)),
                &none,
                "ok",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#","exp":{NOW}"#)),
                &none,
                "the token has expired",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#","exp":"{}""#, NOW + 60)),
                &none,
                "claim exp is not a NumericDate",
            ),
            (
                HEADER.into(),
                claims_with(r#","exp":null"#),
                &none,
                "claim exp is not a NumericDate",
            ),
            (
                HEADER.into(),
                claims_with(r#","exp":true"#),
                &none,
                "claim exp is not a NumericDate",
            ),
            (
                HEADER.into(),
                claims_with(r#","exp":1e300"#),
                &none,
                "claim exp is out of range",
            ),
            (
                HEADER.into(),
                claims_with(r#","exp":-1"#),
                &none,
                "claim exp is out of range",
            ),
            (HEADER.into(), claims_with(""), &none, "missing claim exp"),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"nbf":{}"#, NOW + 10)),
                &none,
                "the token is not valid yet",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"nbf":{}.5"#, NOW - 1)),
                &none,
                "ok",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"nbf":"{NOW}""#)),
                &none,
                "claim nbf is not a NumericDate",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"iat":[1]"#)),
                &none,
                "claim iat is not a NumericDate",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"iat":1e300"#)),
                &none,
                "claim iat is out of range",
            ),
            // Audience: required when configured; strings only.
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":"inventory""#)),
                &aud,
                "ok",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":["x","inventory"]"#)),
                &aud,
                "ok",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":"billing""#)),
                &aud,
                "wrong audience",
            ),
            (HEADER.into(), claims_with(&exp), &aud, "missing claim aud"),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":null"#)),
                &aud,
                "claim aud is not a string or an array",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":7"#)),
                &aud,
                "claim aud is not a string or an array",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":true"#)),
                &aud,
                "claim aud is not a string or an array",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":{{"a":"inventory"}}"#)),
                &aud,
                "claim aud is not a string or an array",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":["inventory",1]"#)),
                &aud,
                "claim aud holds a non-string",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"aud":7"#)),
                &none,
                "ok",
            ),
            // Duplicate members, in the payload (at any depth) or the header.
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"sub":"mallory""#)),
                &none,
                "claims: duplicate member \"sub\"",
            ),
            (
                HEADER.into(),
                claims_with(&format!(r#"{exp},"x":{{"y":1,"y":2}}"#)),
                &none,
                "claims: duplicate member \"y\"",
            ),
            (
                r#"{"alg":"EdDSA","kid":"k1","kid":"k2"}"#.into(),
                claims_with(&exp),
                &none,
                "header: duplicate member \"kid\"",
            ),
            // Header parameters: crit refused, unknown others of any type ignored.
            (
                r#"{"alg":"EdDSA","kid":"k1","crit":["exp"],"exp":1}"#.into(),
                claims_with(&exp),
                &none,
                "the header names critical parameters not understood",
            ),
            (
                r#"{"alg":"EdDSA","kid":"k1","x5u":7,"ext":{"a":[null,true]},"n":null}"#.into(),
                claims_with(&exp),
                &none,
                "ok",
            ),
            (
                r#"{"alg":"HS256","kid":"k1"}"#.into(),
                claims_with(&exp),
                &none,
                "the algorithm is not EdDSA",
            ),
            (
                r#"{"alg":"EdDSA"}"#.into(),
                claims_with(&exp),
                &none,
                "Malformed",
            ),
            // Other claims must have their types.
            (
                HEADER.into(),
                claims_with(&exp).replace(r#"["a.read"]"#, r#"["a.read",1]"#),
                &none,
                "claim permissions holds a non-string",
            ),
            (
                HEADER.into(),
                claims_with(&exp).replace(r#""tenant":"acme""#, r#""tenant":1"#),
                &none,
                "claim tenant is not a string",
            ),
            (
                HEADER.into(),
                claims_with(&exp).replace(r#""iss":"jobtoken""#, r#""iss":"other""#),
                &none,
                "wrong issuer",
            ),
        ];
        for (header, claims, rules, expected) in cases {
            assert_eq!(
                outcome(&header, &claims, rules),
                expected,
                "{header} {claims}"
            );
        }
    }

    #[test]
    fn times_are_read_from_the_clock_given_with_the_leeway() {
        let t = token(HEADER, &claims_with(&format!(r#","exp":{}"#, NOW + 10)));
        let parsed = parse(&t).unwrap();
        let mut r = rules(None);
        assert!(parsed.check(&r, at(NOW as f64 + 9.9)).is_ok());
        assert!(parsed.check(&r, at(NOW as f64 + 10.0)).is_err());
        r.leeway = Duration::from_secs(5);
        assert!(parsed.check(&r, at(NOW as f64 + 14.9)).is_ok());
        assert!(parsed.check(&r, at(NOW as f64 + 15.0)).is_err());
        assert_eq!(parsed.claims.exp, (NOW + 10) as i64);
    }

    #[test]
    fn malformed_shapes() {
        for t in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.e30.c2ln",
            &format!("{}.e30", b64(HEADER)),
        ] {
            assert!(parse(t).is_err(), "{t}");
        }
        let not_object = format!("{}.{}.c2ln", b64(HEADER), b64("[1]"));
        assert!(matches!(parse(&not_object), Err(VerifyError::Malformed)));
    }
}
