//! Tests of the real `token-service` binary as a process: dev mode from an empty
//! directory, durability across `kill -9`, graceful shutdown on SIGTERM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use token_sdk::proto::{
    GetLeaseRequest, IntrospectTokenRequest, IssueJobTokenRequest, RefreshJobTokenRequest,
    ResumeJobTokenRequest, RevokeJobTokenRequest,
};
use token_service::clock::{Clock, SystemClock};
use token_service::dev::{self, DevTokenRequest};
use token_service::secrets::key_hash;

const BIN: &str = env!("CARGO_BIN_EXE_token-service");
const MODULE_KEY: &str = "mk_process-test-module-key-0123456789abcdefghij";
const ADMIN_KEY: &str = "ak_process-test-admin-key-0123456789abcdefghijk";

/// A running service process and everything it logged.
struct Proc {
    child: Child,
    grpc: String,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `token-service` with `args` in `cwd`, waits until it serves.
    fn start(cwd: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .env("JOBTOKEN_GRPC_LISTEN", "127.0.0.1:0")
            .env("JOBTOKEN_HTTP_LISTEN", "127.0.0.1:0")
            .env("JOBTOKEN_LOG_FORMAT", "json")
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start token-service");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let Some(addr) = v["fields"]["grpc_addr"].as_str()
                {
                    let _ = tx.send(addr.to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("service did not start; log:\n{}", log.lock().unwrap()));
        Proc {
            child,
            grpc: format!("http://{addr}"),
            log,
        }
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap(); // SIGKILL on Unix
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn user_token(data_dir: &Path) -> String {
    let request = DevTokenRequest {
        user: "alice".into(),
        tenant: "acme".into(),
        permissions: ["inventory.read".to_owned()].into(),
        ttl: Duration::from_secs(600),
    };
    dev::mint_dev_token(data_dir, &request, SystemClock.now()).unwrap()
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    dev::ensure_issuer_key(dir).unwrap();
    let issuer = dev::dev_issuer_config(dir);
    let config = format!(
        r#"
data_dir = "{data}"
admin_key_sha256 = "{admin}"

[[modules]]
id = "importer"
key_sha256 = "{module}"
delegable = ["inventory.*"]

[[trusted_issuers]]
issuer = "{issuer}"
public_key_file = "{public}"
algorithm = "EdDSA"
"#,
        data = dir.display(),
        admin = key_hash(ADMIN_KEY),
        module = key_hash(MODULE_KEY),
        issuer = issuer.issuer,
        public = issuer.public_key_file.unwrap().display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    path
}

async fn issue(endpoint: &str, data_dir: &Path, job: &str) -> (String, String) {
    let mut client = token_sdk::connect(endpoint, MODULE_KEY).await.unwrap();
    let issued = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: user_token(data_dir),
            job_id: job.into(),
            permissions: vec!["inventory.read".into()],
            max_lifetime: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            audience: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (
        issued.lease.unwrap().lease_id,
        issued.tokens.unwrap().refresh_token,
    )
}

/// Every acknowledged renewal survives `kill -9`: after a restart, each holder's latest
/// refresh token (the last one it received a response for) still renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_renewals_survive_kill_9() {
    const HOLDERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let config = config.to_str().unwrap();
    let mut proc = Proc::start(dir.path(), &["serve", "--config", config]);

    // Per lease: the latest acknowledged refresh token, and renewals acknowledged this round.
    let latest: Arc<Mutex<HashMap<String, (String, u64)>>> = Arc::default();
    for i in 0..HOLDERS {
        let (lease, token) = issue(&proc.grpc, dir.path(), &format!("job-{i}")).await;
        latest.lock().unwrap().insert(lease, (token, 0));
    }

    for round in 0..3u64 {
        let mut holders = Vec::new();
        let leases: Vec<String> = latest.lock().unwrap().keys().cloned().collect();
        for lease in leases {
            let (endpoint, latest) = (proc.grpc.clone(), Arc::clone(&latest));
            holders.push(tokio::spawn(async move {
                let mut client = token_sdk::connect(&endpoint, MODULE_KEY).await.unwrap();
                loop {
                    let token = latest.lock().unwrap()[&lease].0.clone();
                    let request = RefreshJobTokenRequest {
                        lease_id: lease.clone(),
                        refresh_token: token,
                    };
                    match client.refresh_job_token(request).await {
                        Ok(r) => {
                            let next = r.into_inner().tokens.unwrap().refresh_token;
                            let mut latest = latest.lock().unwrap();
                            let entry = latest.get_mut(&lease).unwrap();
                            *entry = (next, entry.1 + 1);
                        }
                        // The process died under us: stop, as a holder would, and retry
                        // after the restart below.
                        Err(_) => return,
                    }
                }
            }));
        }
        // Let renewals run, then kill at an arbitrary moment, mid-flight.
        tokio::time::sleep(Duration::from_millis(300 + 170 * round)).await;
        proc.kill_9();
        for h in holders {
            h.await.unwrap();
        }
        proc = Proc::start(dir.path(), &["serve", "--config", config]);
        let mut client = token_sdk::connect(&proc.grpc, MODULE_KEY).await.unwrap();
        let mut admin = token_sdk::connect_admin(&proc.grpc, ADMIN_KEY)
            .await
            .unwrap();
        let snapshot = latest.lock().unwrap().clone();
        let total: u64 = snapshot.values().map(|(_, n)| n).sum();
        assert!(
            total > 0,
            "round {round}: some renewals happened before the kill"
        );
        for (lease, (token, _)) in snapshot {
            let stored = admin
                .get_lease(GetLeaseRequest {
                    lease_id: lease.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            // The latest acknowledged token names its generation (`jrt1.<g>.…`); with no
            // resumes, the stored refresh count is the current generation. An
            // acknowledged renewal that was lost would leave it behind.
            let generation: u64 = token.split('.').nth(1).unwrap().parse().unwrap();
            assert!(
                stored.refresh_count >= generation,
                "round {round}: lease {lease} lost acknowledged renewals ({} < {generation})",
                stored.refresh_count
            );
            let renewed = client
                .refresh_job_token(RefreshJobTokenRequest {
                    lease_id: lease.clone(),
                    refresh_token: token,
                })
                .await
                .unwrap_or_else(|e| panic!("round {round}: lease {lease} cannot renew: {e:?}"));
            let next = renewed.into_inner().tokens.unwrap().refresh_token;
            latest.lock().unwrap().insert(lease, (next, 0));
        }
    }
}

/// From an empty directory: dev mode starts, `dev-token` mints a subject token the service
/// accepts, the dev keys persist across a restart, secrets stay out of the log, and
/// SIGTERM shuts the service down cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let proc = Proc::start(dir.path(), &["serve"]);
    let data = dir.path().join("data");
    let module_key = std::fs::read_to_string(data.join(dev::DEV_MODULE_KEY_FILE)).unwrap();
    #[cfg(unix)]
    for secret_file in [
        dev::DEV_MODULE_KEY_FILE,
        dev::DEV_ADMIN_KEY_FILE,
        "master.key",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(secret_file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret_file} is private");
    }
    let output = Command::new(BIN)
        .args([
            "dev-token",
            "--user",
            "bob",
            "--tenant",
            "t1",
            "--permissions",
            "a.read,a.write",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let subject_token = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let mut client = token_sdk::connect(&proc.grpc, module_key.trim())
        .await
        .unwrap();
    let issued = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: subject_token.clone(),
            job_id: "dev-job".into(),
            permissions: vec!["a.write".into()],
            max_lifetime: None,
            audience: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let lease = issued.lease.unwrap();
    assert_eq!(
        (lease.subject.as_str(), lease.tenant.as_str()),
        ("bob", "t1")
    );
    let tokens = issued.tokens.unwrap();
    let mut secrets = vec![
        module_key.trim().to_owned(),
        subject_token.clone(),
        tokens.access_token.clone(),
        tokens.refresh_token.clone(),
    ];
    secrets.extend(exercise_every_path(&mut client, &subject_token, "t1").await);
    let log = proc.log();
    for event in [
        "DEV MODE",
        "lease.issued",
        "lease.refreshed",
        "lease.refresh_retry",
        "lease.reuse_detected",
        "lease.resumed",
        "lease.ended",
    ] {
        assert!(log.contains(event), "{event} is logged");
    }
    for (i, secret) in secrets.iter().enumerate() {
        // The signature / MAC part is what makes a token secret; a key is secret whole.
        let tail = secret.rsplit('.').next().unwrap();
        assert!(tail.len() >= 32, "secret {i} has a distinctive part");
        assert!(!log.contains(tail), "secret {i} reached the log");
    }

    // SIGTERM: graceful exit.
    let status = Command::new("kill")
        .args(["-TERM", &proc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut proc = proc;
    let exited = tokio::task::spawn_blocking(move || {
        let status = proc.child.wait().unwrap();
        (status, proc)
    });
    let (status, proc) = tokio::time::timeout(Duration::from_secs(10), exited)
        .await
        .expect("exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    drop(proc);

    // Restart: same dev keys, the lease renews.
    let proc = Proc::start(dir.path(), &["serve"]);
    let mut client = token_sdk::connect(&proc.grpc, module_key.trim())
        .await
        .unwrap();
    client
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: lease.lease_id,
            refresh_token: tokens.refresh_token,
        })
        .await
        .unwrap();
    // The signing key persisted: the access token from before the restart still verifies.
    let introspected = client
        .introspect_token(IntrospectTokenRequest {
            token: tokens.access_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(introspected.active);
}

/// Renewal, grace retry, reuse detection, resume, introspection, release and refusals, so
/// the log check above sees every path. Returns the secrets it handled.
async fn exercise_every_path(
    client: &mut token_sdk::JobTokenClient,
    subject_token: &str,
    tenant: &str,
) -> Vec<String> {
    let issued = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: subject_token.to_owned(),
            job_id: "paths".into(),
            permissions: vec!["a.read".into()],
            max_lifetime: None,
            audience: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let lease_id = issued.lease.unwrap().lease_id;
    let t0 = issued.tokens.unwrap();
    let refresh = |token: &str| RefreshJobTokenRequest {
        lease_id: lease_id.clone(),
        refresh_token: token.to_owned(),
    };
    let t1 = client
        .refresh_job_token(refresh(&t0.refresh_token))
        .await
        .unwrap()
        .into_inner();
    let retry = client
        .refresh_job_token(refresh(&t0.refresh_token))
        .await
        .unwrap()
        .into_inner();
    let t1 = t1.tokens.unwrap();
    let t2 = client
        .refresh_job_token(refresh(&t1.refresh_token))
        .await
        .unwrap()
        .into_inner();
    client
        .refresh_job_token(refresh(&t0.refresh_token))
        .await
        .unwrap_err(); // reuse
    let other = client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: subject_token.to_owned(),
            job_id: "resumed".into(),
            permissions: vec!["a.read".into()],
            max_lifetime: None,
            audience: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let resumed = client
        .resume_job_token(ResumeJobTokenRequest {
            job_id: "resumed".into(),
            tenant: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let other_tokens = other.tokens.unwrap();
    client
        .introspect_token(IntrospectTokenRequest {
            token: resumed.access_token.clone(),
        })
        .await
        .unwrap();
    client
        .revoke_job_token(RevokeJobTokenRequest {
            lease_id: other.lease.unwrap().lease_id,
            outcome: 1,
            detail: "done".into(),
        })
        .await
        .unwrap();
    client
        .issue_job_token(IssueJobTokenRequest {
            subject_token: format!("{subject_token}x"),
            job_id: "bad".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let mut secrets = vec![
        t0.access_token,
        t0.refresh_token,
        t1.access_token,
        t1.refresh_token,
    ];
    secrets.push(retry.tokens.unwrap().access_token);
    let t2 = t2.tokens.unwrap();
    secrets.extend([
        t2.access_token,
        t2.refresh_token,
        resumed.access_token,
        resumed.refresh_token,
    ]);
    secrets.extend([other_tokens.access_token, other_tokens.refresh_token]);
    secrets
}

#[test]
fn help_is_complete() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    for word in ["serve", "dev-token", "hash-key", "gen-key"] {
        assert!(top.contains(word), "{top}");
    }
    let serve = help(&["serve", "--help"]);
    for word in [
        "--config",
        "JOBTOKEN_CONFIG",
        "--data-dir",
        "DEV MODE",
        "--log-format",
    ] {
        assert!(serve.contains(word), "{serve}");
    }
    let dev_token = help(&["dev-token", "--help"]);
    for word in ["--user", "--tenant", "--permissions", "--ttl"] {
        assert!(dev_token.contains(word), "{dev_token}");
    }
}

#[test]
fn a_missing_master_key_with_an_existing_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    std::fs::write(dir.path().join("jobtoken.db"), b"").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("JOBTOKEN_GRPC_LISTEN", "127.0.0.1:0")
        .env("JOBTOKEN_HTTP_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("master.key") && err.contains("restore"),
        "{err}"
    );
    assert!(
        !dir.path().join("master.key").exists(),
        "no new key was made"
    );
}

/// Two replicas of the real binary on one PostgreSQL database: leases renew on either,
/// and when one is killed with SIGKILL mid-load, every lease keeps renewing through the
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_keep_renewing_through_a_surviving_replica() {
    const HOLDERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let Some(url) = token_service::testing::postgres_url() else {
        return;
    };
    // Declared before the processes, so it is dropped after they are killed.
    let pg_schema = token_service::testing::TestSchema::new(&url, "jt_proc");
    let schema = pg_schema.name();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replacen(
        "\n[[modules]]",
        &format!(
            "\n[store]\nkind = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\"\n\n[[modules]]"
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let key = Command::new(BIN).arg("gen-master-key").output().unwrap();
    std::fs::write(dir.path().join("master.key"), key.stdout).unwrap();
    let config = config.to_str().unwrap();
    let a = Proc::start(dir.path(), &["serve", "--config", config]);
    let b = Proc::start(dir.path(), &["serve", "--config", config]);

    let mut leases = Vec::new();
    for i in 0..HOLDERS {
        leases.push(issue(&a.grpc, dir.path(), &format!("job-{i}")).await);
    }
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut holders = Vec::new();
    for (lease, token) in leases {
        let (ea, eb, killed) = (a.grpc.clone(), b.grpc.clone(), Arc::clone(&killed));
        holders.push(tokio::spawn(async move {
            let mut replicas = [
                token_sdk::connect(&ea, MODULE_KEY).await.unwrap(),
                token_sdk::connect(&eb, MODULE_KEY).await.unwrap(),
            ];
            let (mut token, mut renewals_after_kill, mut a_alive) = (token, 0u32, true);
            for n in 0..u64::MAX {
                // Round-robin across live replicas, as behind a load balancer.
                let which = if a_alive { (n % 2) as usize } else { 1 };
                let request = RefreshJobTokenRequest {
                    lease_id: lease.clone(),
                    refresh_token: token.clone(),
                };
                let after_kill = killed.load(std::sync::atomic::Ordering::SeqCst);
                match replicas[which].refresh_job_token(request).await {
                    Ok(r) => {
                        token = r.into_inner().tokens.unwrap().refresh_token;
                        if after_kill {
                            renewals_after_kill += 1;
                            if renewals_after_kill >= 20 {
                                return (lease, token, renewals_after_kill);
                            }
                        }
                    }
                    // Replica A died under us: retry the same token on B.
                    Err(status) => {
                        assert_eq!(which, 0, "B failed: {status:?}");
                        a_alive = false;
                    }
                }
                tokio::task::yield_now().await;
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    a.kill_9();
    let mut client = token_sdk::connect(&b.grpc, MODULE_KEY).await.unwrap();
    for holder in holders {
        let (lease, token, renewals) = tokio::time::timeout(Duration::from_secs(60), holder)
            .await
            .expect("every holder keeps renewing")
            .unwrap();
        assert!(renewals >= 20);
        client
            .refresh_job_token(RefreshJobTokenRequest {
                lease_id: lease,
                refresh_token: token,
            })
            .await
            .unwrap();
    }
    // B started on a schema A had made: PostgreSQL's NOTICEs ("already exists,
    // skipping") stay out of the log.
    let log = b.log();
    assert!(!log.contains("skipping"), "{log}");
}

impl Proc {
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until the log holds `n` lines containing `text`.
    async fn wait_for_log(&self, text: &str, n: usize) -> String {
        for _ in 0..200 {
            let log = self.log();
            if log.lines().filter(|l| l.contains(text)).count() >= n {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {text:?} (x{n}) in the log:\n{}", self.log());
    }
}

/// SIGHUP re-reads the config: a module's delegable set changes live on an open
/// connection; a bad config is refused and the old one stays; restart-only settings say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_modules_live_and_refuses_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path());
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace(r#"["inventory.*"]"#, r#"["users.*"]"#)).unwrap();
    let service = Proc::start(dir.path(), &["serve", "--config", path.to_str().unwrap()]);
    // One client, one connection, kept across every reload.
    let mut client = token_sdk::connect(&service.grpc, MODULE_KEY).await.unwrap();
    let request = |job: &str| IssueJobTokenRequest {
        subject_token: user_token(dir.path()),
        job_id: job.into(),
        permissions: vec!["inventory.read".into()],
        ..Default::default()
    };
    let refused = client.issue_job_token(request("before")).await.unwrap_err();
    assert_eq!(
        token_sdk::error_reason(&refused).as_deref(),
        Some("PERMISSION_NOT_DELEGABLE")
    );

    std::fs::write(&path, &good).unwrap();
    service.signal("HUP");
    let log = service.wait_for_log("config reloaded", 1).await;
    assert!(log.contains("modules"), "{log}");
    client.issue_job_token(request("after")).await.unwrap();

    // Invalid: refused, logged, and the running config stays.
    std::fs::write(&path, good.replace(r#"id = "importer""#, r#"id = """#)).unwrap();
    service.signal("HUP");
    service
        .wait_for_log("config reload refused; the running config stays", 1)
        .await;
    client.issue_job_token(request("still")).await.unwrap();

    // Token lifetimes are built into the domain: applied nothing, says a restart is
    // needed. (The listeners too, but this test overrides them from the environment.)
    std::fs::write(&path, format!("access_token_ttl = \"2m\"\n{good}")).unwrap();
    service.signal("HUP");
    let log = service.wait_for_log("need a restart", 1).await;
    assert!(log.contains("access_token_ttl"), "{log}");
    client.issue_job_token(request("unmoved")).await.unwrap();
    assert!(service.child.try_wait_alive());
}

trait Alive {
    fn try_wait_alive(&self) -> bool;
}

impl Alive for Child {
    fn try_wait_alive(&self) -> bool {
        // Still running: /proc/<pid> exists and is not a zombie we reaped.
        std::path::Path::new(&format!("/proc/{}", self.id())).exists()
    }
}

/// Runs `token-service admin <args>` against `endpoint` with the admin key in the
/// environment; returns (success, stdout, stderr).
fn admin(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("admin")
        .args(["--endpoint", endpoint])
        .args(args)
        .env("JOBTOKEN_ADMIN_KEY", ADMIN_KEY)
        .env_remove("JOBTOKEN_ADMIN_KEY_FILE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn admin_json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (ok, out, err) = admin(endpoint, &all);
    assert!(ok, "admin {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_lists_shows_revokes_watches_and_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path());
    let service = Proc::start(dir.path(), &["serve", "--config", path.to_str().unwrap()]);
    let ep = service.grpc.clone();
    let mut ids = HashMap::new();
    let mut tokens = HashMap::new();
    for job in ["job-a", "job-b", "job-c", "job-d"] {
        let (lease, token) = issue(&ep, dir.path(), job).await;
        ids.insert(job, lease);
        tokens.insert(job, token);
    }

    let all = admin_json(&ep, &["leases", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 4, "{all}");
    let one = admin_json(
        &ep,
        &["leases", "list", "--job", "job-a", "--state", "active"],
    );
    assert_eq!(one[0]["lease_id"], ids["job-a"].as_str(), "{one}");
    assert_eq!(one.as_array().unwrap().len(), 1);
    let paged = admin_json(&ep, &["leases", "list", "--limit", "3"]);
    assert_eq!(paged.as_array().unwrap().len(), 3);

    let (ok, table, err) = admin(&ep, &["leases", "show", &ids["job-a"]]);
    assert!(ok, "{err}");
    assert!(
        table.contains("job-a") && table.contains("events:") && table.contains("issued"),
        "{table}"
    );

    let (ok, out, err) = admin(
        &ep,
        &[
            "leases",
            "revoke",
            "--lease",
            &ids["job-a"],
            "--reason",
            "user asked",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("revoked lease") && out.contains("user asked"),
        "{out}"
    );
    // The holder's next renewal carries the admin's reason.
    let refused = token_sdk::connect(&ep, MODULE_KEY)
        .await
        .unwrap()
        .refresh_job_token(RefreshJobTokenRequest {
            lease_id: ids["job-a"].clone(),
            refresh_token: tokens["job-a"].clone(),
        })
        .await
        .unwrap_err();
    let info = tonic_types::StatusExt::get_details_error_info(&refused).unwrap();
    assert_eq!(info.reason, "LEASE_REVOKED");
    assert_eq!(info.metadata["end_detail"], "user asked", "{info:?}");
    let job = admin_json(
        &ep,
        &[
            "leases", "revoke", "--job", "job-b", "--tenant", "acme", "--reason", "r",
        ],
    );
    assert_eq!(job["revoked_count"], 1);
    let (ok, out, err) = admin(
        &ep,
        &[
            "leases", "revoke", "--user", "alice", "--tenant", "acme", "--reason", "left",
        ],
    );
    assert!(
        ok && out.contains("revoked 2 active lease(s) of that user"),
        "{out}{err}"
    );
    let module = admin_json(
        &ep,
        &["leases", "revoke", "--module", "importer", "--reason", "r"],
    );
    assert_eq!(module["revoked_count"], 0);
    let shown = admin_json(&ep, &["leases", "show", &ids["job-a"]]);
    assert_eq!(shown["end_reason"], "revoked");
    assert_eq!(shown["ended_by"], "admin");
    assert!(
        shown["end_detail"].as_str().unwrap().contains("user asked"),
        "{shown}"
    );

    let (ok, out, err) = admin(
        &ep,
        &[
            "watch",
            "--after-cursor",
            "0",
            "--count",
            "4",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let ends: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ends.len(), 4, "{out}");
    assert!(
        ends.iter()
            .all(|e| e["reason"] == "revoked" && e["tenant"] == "acme"),
        "{out}"
    );

    let rotated = admin_json(&ep, &["rotate-key"]);
    assert!(
        !rotated["new_kid"].as_str().unwrap().is_empty(),
        "{rotated}"
    );

    // The key from a file; a wrong one is refused with the reason.
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "ak_wrong\n").unwrap();
    let (ok, _, err) = admin(
        &ep,
        &["--key-file", bad.to_str().unwrap(), "leases", "list"],
    );
    assert!(!ok && err.contains("ADMIN_UNAUTHENTICATED"), "{err}");
    let good = dir.path().join("admin.key");
    std::fs::write(&good, format!("{ADMIN_KEY}\n")).unwrap();
    let (ok, _, err) = admin(
        &ep,
        &["--key-file", good.to_str().unwrap(), "leases", "list"],
    );
    assert!(ok, "{err}");
}

/// The small things: a closed pipe is not a panic, empty input is not a key, `dev-token`
/// away from the service's data refuses instead of making a key nobody trusts, logs to a
/// file have no colour codes, and the start-up line names only the store in use.
#[test]
fn command_line_edges() {
    // `gen-key | head -0`: stdout is closed before anything is written.
    let mut child = Command::new(BIN)
        .arg("gen-key")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");

    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"\n").unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("standard input is empty"));

    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["dev-token", "--user", "alice", "--tenant", "acme"])
        .current_dir(elsewhere.path())
        .env_remove("JOBTOKEN_DATA_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no dev issuer key"),
        "{err}"
    );
    assert!(!elsewhere.path().join("data").exists(), "no key was made");

    // Text logs into a pipe: no ANSI escapes; the start-up line names the SQLite file
    // and no PostgreSQL schema.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env("JOBTOKEN_GRPC_LISTEN", "127.0.0.1:0")
        .env("JOBTOKEN_HTTP_LISTEN", "127.0.0.1:0")
        .env("JOBTOKEN_LOG_FORMAT", "text")
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("token service serving") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("token service serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
    assert!(
        log.contains("jobtoken.db") && !log.contains("schema"),
        "{log}"
    );
}
