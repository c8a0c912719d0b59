//! Support for tests that need PostgreSQL, shared by this crate's tests, the end-to-end
//! tests and the process tests. Not for production use.
//!
//! Without [`POSTGRES_URL_VAR`] set, PostgreSQL tests skip, and one line on stderr (not
//! captured by the test harness) says so and names the variable. With
//! [`REQUIRE_POSTGRES_VAR`] set to `1` (as `.ci/run` does), a missing URL fails instead,
//! so CI never skips them silently.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Once;

/// The PostgreSQL server for tests, e.g. `postgres://postgres@127.0.0.1:5432/test`.
pub const POSTGRES_URL_VAR: &str = "JOBTOKEN_TEST_POSTGRES_URL";
/// Set to `1` to make a missing [`POSTGRES_URL_VAR`] a failure instead of a skip.
pub const REQUIRE_POSTGRES_VAR: &str = "JOBTOKEN_TEST_REQUIRE_POSTGRES";

/// The test server's URL, or `None` (after saying so once) when PostgreSQL tests skip.
///
/// # Panics
/// When the URL is missing and [`REQUIRE_POSTGRES_VAR`] is `1`.
pub fn postgres_url() -> Option<String> {
    if let Ok(url) = std::env::var(POSTGRES_URL_VAR)
        && !url.is_empty()
    {
        return Some(url);
    }
    if std::env::var(REQUIRE_POSTGRES_VAR).as_deref() == Ok("1") {
        panic!("{REQUIRE_POSTGRES_VAR}=1 but {POSTGRES_URL_VAR} is not set");
    }
    static SAID: Once = Once::new();
    SAID.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "skipping the PostgreSQL tests: set {POSTGRES_URL_VAR} (e.g. \
             postgres://postgres@127.0.0.1:5432/test) to run them"
        );
    });
    None
}

/// The host and port `url` connects to, when it names one by address.
pub fn postgres_addr(url: &str) -> Option<SocketAddr> {
    let config: tokio_postgres::Config = url.parse().ok()?;
    let host = match config.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}").parse().ok()
}

/// A schema of a test's own, dropped (with everything in it) when this is dropped.
#[derive(Debug)]
pub struct TestSchema {
    url: String,
    name: String,
}

impl TestSchema {
    /// A fresh schema name starting with `prefix` (the schema itself is created by the
    /// store that uses it).
    pub fn new(url: &str, prefix: &str) -> Self {
        Self::adopt(url, &Self::fresh_name(prefix))
    }

    /// Takes charge of dropping schema `name` on the server at `url`.
    pub fn adopt(url: &str, name: &str) -> Self {
        Self {
            url: url.to_owned(),
            name: name.to_owned(),
        }
    }

    /// A fresh schema name starting with `prefix`.
    pub fn fresh_name(prefix: &str) -> String {
        format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop may run inside a runtime: do the async work on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| "panicked".to_owned()) {
            let _ = writeln!(
                std::io::stderr(),
                "test schema {} was not dropped: {e}",
                self.name
            );
        }
    }
}
