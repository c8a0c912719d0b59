//! `Debug` for the messages that carry secrets: tokens print as `<redacted>` (with their
//! length), so a `{:?}` of a request or response never leaks one.

use std::fmt;

use crate::jobtoken::v1::{
    IntrospectTokenRequest, IssueJobTokenRequest, RefreshJobTokenRequest, TokenPair,
};

/// Shows that a secret is there, and how long, but not what it is.
struct Redacted<'a>(&'a str);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            write!(f, "<redacted {} bytes>", self.0.len())
        }
    }
}

impl fmt::Debug for IssueJobTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssueJobTokenRequest")
            .field("subject_token", &Redacted(&self.subject_token))
            .field("job_id", &self.job_id)
            .field("permissions", &self.permissions)
            .field("max_lifetime", &self.max_lifetime)
            .field("audience", &self.audience)
            .finish()
    }
}

impl fmt::Debug for RefreshJobTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshJobTokenRequest")
            .field("lease_id", &self.lease_id)
            .field("refresh_token", &Redacted(&self.refresh_token))
            .finish()
    }
}

impl fmt::Debug for IntrospectTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntrospectTokenRequest")
            .field("token", &Redacted(&self.token))
            .finish()
    }
}

impl fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenPair")
            .field("access_token", &Redacted(&self.access_token))
            .field("access_token_expires_in", &self.access_token_expires_in)
            .field("access_token_expires_at", &self.access_token_expires_at)
            .field("refresh_token", &Redacted(&self.refresh_token))
            .field("token_type", &self.token_type)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobtoken::v1::IssueJobTokenResponse;

    #[test]
    fn secrets_never_print() {
        let secret = "eyJhbGciOiJFZERTQSJ9.secret-payload.sig";
        let pair = TokenPair {
            access_token: secret.into(),
            refresh_token: "jrt1.3.secret-refresh".into(),
            token_type: "Bearer".into(),
            ..Default::default()
        };
        let printed = format!(
            "{:?} {:?} {:?} {:?}",
            IssueJobTokenRequest {
                subject_token: secret.into(),
                job_id: "job-7".into(),
                ..Default::default()
            },
            RefreshJobTokenRequest {
                lease_id: "lease-9".into(),
                refresh_token: "jrt1.3.secret-refresh".into(),
            },
            IntrospectTokenRequest {
                token: secret.into(),
            },
            IssueJobTokenResponse {
                tokens: Some(pair),
                ..Default::default()
            },
        );
        assert!(!printed.contains("secret"), "{printed}");
        // What is not secret still shows.
        for visible in ["job-7", "lease-9", "Bearer", "<redacted"] {
            assert!(printed.contains(visible), "{printed}");
        }
    }
}
