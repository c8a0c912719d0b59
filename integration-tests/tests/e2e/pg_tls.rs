//! The PostgreSQL store over TLS, against a PostgreSQL this test starts itself (initdb and
//! pg_ctl of the installed server, run as the `postgres` user, on a free port) with
//! `ssl = on`, a certificate it makes, and `hostssl` as the only way in. Also: store
//! errors that name the host and carry the SQLSTATE, never the password.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use token_service::store::PostgresStore;
use token_service::store::postgres::PostgresOptions;

use crate::support::TestServer;

/// A private PostgreSQL with TLS; stopped on drop.
struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    ca: PathBuf,
    other_ca: PathBuf,
}

/// The installed PostgreSQL's programs, if any and if we can run them as `postgres`.
fn pg_bin() -> Result<PathBuf, String> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        return Err("not root: cannot run initdb as the postgres user".into());
    }
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(base)
        .map_err(|e| format!("{}: {e}", base.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .ok_or_else(|| "no initdb under /usr/lib/postgresql".into())
}

fn as_postgres(args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(params, key))
}

impl TlsPostgres {
    fn start() -> Option<Self> {
        let bin = match pg_bin() {
            Ok(bin) => bin,
            Err(why) => {
                if std::env::var(token_service::testing::REQUIRE_POSTGRES_VAR).as_deref() == Ok("1")
                {
                    panic!("PostgreSQL TLS test cannot run: {why}");
                }
                eprintln!("skipping the PostgreSQL TLS test: {why}");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = ca("test PostgreSQL CA");
        let (other_pem, _) = ca("some other CA");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca = write("ca.pem", &ca_pem);
        let other_ca = write("other-ca.pem", &other_pem);
        let crt = write("server.crt", &cert.pem());
        let key_file = write("server.key", &key.serialize_pem());
        let hba = write(
            "pg_hba.conf",
            "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        );
        let status = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.path().join("data");
        let p = |p: &Path| p.to_str().unwrap().to_owned();
        as_postgres(&[
            &p(&bin.join("initdb")),
            "-D",
            &p(&data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ]);
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} \
             -c ssl_key_file={} -c hba_file={} -c fsync=off",
            p(dir.path()),
            p(&crt),
            p(&key_file),
            p(&hba)
        );
        as_postgres(&[
            &p(&bin.join("pg_ctl")),
            "-D",
            &p(&data),
            "-l",
            &p(&dir.path().join("log")),
            "-o",
            &options,
            "-w",
            "start",
        ]);
        Some(Self {
            dir,
            bin,
            port,
            ca,
            other_ca,
        })
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres:s3cret-pw@{host}:{}/postgres?{query}",
            self.port
        )
    }

    async fn connect(&self, url: String, ca_file: Option<&Path>) -> Result<(), String> {
        let options = PostgresOptions {
            url,
            schema: "jobtoken".into(),
            max_connections: 2,
            statement_timeout: Duration::from_secs(5),
            ca_file: ca_file.map(Path::to_owned),
        };
        PostgresStore::connect(&options)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_tls_as_sslmode_says_and_its_errors_carry_causes() {
    let Some(pg) = TlsPostgres::start() else {
        return;
    };
    let host = format!("127.0.0.1:{}", pg.port);
    let no_secret = |e: &str| assert!(!e.contains("s3cret-pw"), "password leaked: {e}");

    // verify-full: chain to the CA and the name (localhost) match. The whole service
    // runs on it; pg_hba admits only TLS, so this is TLS.
    let url = pg.url("localhost", "sslmode=verify-full");
    let ca = pg.ca.clone();
    let server = TestServer::start_with(move |c| {
        c.store.kind = token_service::config::StoreKind::Postgres;
        c.store.url = Some(token_service::config::SecretString::new(url));
        c.store.ca_file = Some(ca);
        // (The test harness drops this name on the shared test server too: a fresh
        // name makes that a no-op there.)
        c.store.schema = token_service::testing::TestSchema::fresh_name("jt_tls");
    })
    .await;
    let issued = server.issue("job-over-tls").await;
    assert!(issued.tokens.is_some());
    server.stop().await;

    // sslrootcert in the URL works too, and verify-ca ignores the name (127.0.0.1 is
    // not on the certificate).
    let root = format!("sslmode=verify-ca&sslrootcert={}", pg.ca.display());
    pg.connect(pg.url("127.0.0.1", &root), None).await.unwrap();
    // require (and prefer) encrypt without checking the certificate, as libpq does.
    pg.connect(pg.url("127.0.0.1", "sslmode=require"), None)
        .await
        .unwrap();
    pg.connect(pg.url("127.0.0.1", "sslmode=prefer"), None)
        .await
        .unwrap();

    // verify-full against 127.0.0.1: the certificate names only localhost.
    let e = pg
        .connect(pg.url("127.0.0.1", "sslmode=verify-full"), Some(&pg.ca))
        .await
        .unwrap_err();
    assert!(e.contains(&host) && e.contains("not valid for name"), "{e}");
    no_secret(&e);
    // A certificate from another CA.
    let e = pg
        .connect(
            pg.url("localhost", "sslmode=verify-full"),
            Some(&pg.other_ca),
        )
        .await
        .unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    no_secret(&e);
    // verify-full without any CA is refused before connecting.
    let e = pg
        .connect(pg.url("localhost", "sslmode=verify-full"), None)
        .await
        .unwrap_err();
    assert!(e.contains("store.ca_file"), "{e}");
    // Without TLS, pg_hba refuses: the SQLSTATE and the server's words come through.
    let e = pg
        .connect(pg.url("127.0.0.1", "sslmode=disable"), None)
        .await
        .unwrap_err();
    assert!(
        e.contains(&host) && e.contains("SQLSTATE 28000") && e.contains("pg_hba.conf"),
        "{e}"
    );
    no_secret(&e);
    // A database that does not exist.
    let url = format!(
        "postgres://postgres:s3cret-pw@127.0.0.1:{}/nope?sslmode=require",
        pg.port
    );
    let e = pg.connect(url, None).await.unwrap_err();
    assert!(
        e.contains("SQLSTATE 3D000")
            && e.contains("\"nope\" does not exist")
            && e.contains("database nope"),
        "{e}"
    );
    no_secret(&e);
    // Nobody listening: the host and port are named.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres:s3cret-pw@127.0.0.1:{free}/postgres");
    let e = pg.connect(url, None).await.unwrap_err();
    assert!(
        e.contains(&format!("127.0.0.1:{free}")) && e.to_lowercase().contains("refused"),
        "{e}"
    );
    no_secret(&e);
}
