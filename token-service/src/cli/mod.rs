//! The `token-service` command line: run the service, administer a running one, mint
//! dev tokens and keys. A library module, so every binary that is the service (the
//! `token-service` binary, the end-to-end tests' copy) runs the same code.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// `println!` that ends the process quietly when stdout is closed (`… | head -1`)
/// instead of panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::print_line(format_args!($($arg)*))
    };
}

mod admin;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, DEFAULT_DATA_DIR};
use crate::dev::{self, DEV_ADMIN_KEY_FILE, DEV_MODULE_KEY_FILE, DevTokenRequest};
use crate::secrets::{generate_key_text, key_hash};
use crate::server::{RunningServer, Server};
use clap::{Parser, Subcommand, ValueEnum};

/// Job tokens for long-running work: leases that keep a job's credential alive for
/// exactly as long as the job runs.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Administer a running service over its gRPC admin API: list, show and revoke
    /// leases, rotate the signing key, watch lease ends. The admin key comes from
    /// --key-file or JOBTOKEN_ADMIN_KEY.
    Admin(admin::AdminArgs),
    /// Run the service. Without --config it starts in DEV MODE: SQLite under the data
    /// directory, a generated signing key, a dev issuer (see `dev-token`), and a dev module
    /// key and admin key written to <data-dir>/dev-module.key and dev-admin.key.
    Serve {
        /// TOML config file (see README "Configuration"). Environment variables
        /// JOBTOKEN_GRPC_LISTEN, JOBTOKEN_HTTP_LISTEN, JOBTOKEN_DATA_DIR,
        /// JOBTOKEN_STORE_PATH, JOBTOKEN_STORE_URL, JOBTOKEN_STORE_SYNC,
        /// JOBTOKEN_STORE_MAX_CONNECTIONS, JOBTOKEN_MASTER_KEY_FILE,
        /// JOBTOKEN_ACCESS_TOKEN_TTL, JOBTOKEN_IDLE_TIMEOUT, JOBTOKEN_GRANTS_PER_SECOND,
        /// JOBTOKEN_RENEWALS_PER_SECOND, JOBTOKEN_INTROSPECTIONS_PER_SECOND and
        /// JOBTOKEN_ADMIN_KEY_SHA256 override it.
        #[arg(long, env = "JOBTOKEN_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory in dev mode (with a config, set `data_dir` there).
        #[arg(long, env = "JOBTOKEN_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Log format.
        #[arg(long, env = "JOBTOKEN_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Print a subject token (a user's access token) signed by the dev issuer, to try the
    /// service in dev mode. Needs the same --data-dir as `serve`.
    DevToken {
        /// The user (`sub` claim).
        #[arg(long)]
        user: String,
        /// The user's tenant.
        #[arg(long)]
        tenant: String,
        /// The user's permissions, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "")]
        permissions: Vec<String>,
        /// Lifetime of the token, e.g. 10m, 1h.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Data directory of the dev-mode service.
        #[arg(long, env = "JOBTOKEN_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Read a module or admin key on standard input and print its SHA-256, the form the
    /// config keeps (`key_sha256`, `admin_key_sha256`).
    HashKey,
    /// Print a new master key (base64url of 32 random bytes) for `master_key_file`. Replicas
    /// sharing a PostgreSQL store must all use the same one.
    GenMasterKey,
    /// Generate a new random module key (or admin key with --admin): prints the key on the
    /// first line and its SHA-256 for the config on the second.
    GenKey {
        /// Make an admin key.
        #[arg(long)]
        admin: bool,
    },
}

/// Writes one line to stdout. A closed pipe ends the process with success, as other
/// Unix tools do; another write error ends it with failure.
fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("token-service: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// Colours only on a terminal, and never with `NO_COLOR` set (https://no-color.org).
fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn init_logs(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The config as `serve` reads it: the file (or dev mode), then the environment.
fn load_config(config: Option<&Path>, data_dir: &Path) -> Result<Config, String> {
    let mut config = match config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => dev::dev_config(data_dir).map_err(|e| e.to_string())?,
    };
    config
        .apply_env(|k| std::env::var(k).ok())
        .map_err(|e| e.to_string())?;
    Ok(config)
}

/// SIGHUP: re-read the config and apply what can change live. A config that doesn't
/// load or validate is refused with a log line; the running one stays.
fn reload(running: &RunningServer, config: Option<&Path>, data_dir: &Path) {
    tracing::info!("SIGHUP: reloading the config");
    let result = load_config(config, data_dir)
        .and_then(|new| running.reload(new).map_err(|e| e.to_string()));
    match result {
        Ok(done) => {
            tracing::info!(applied = ?done.applied, "config reloaded");
            if !done.need_restart.is_empty() {
                tracing::warn!(
                    settings = ?done.need_restart,
                    "changed settings need a restart to apply; they keep their running values"
                );
            }
        }
        Err(e) => tracing::error!(error = %e, "config reload refused; the running config stays"),
    }
}

async fn serve(config: Option<PathBuf>, data_dir: PathBuf) -> Result<(), String> {
    let initial = load_config(config.as_deref(), &data_dir)?;
    if initial.dev_mode {
        tracing::warn!(
            module_id = dev::DEV_MODULE,
            module_key_file = %initial.data_dir.join(DEV_MODULE_KEY_FILE).display(),
            admin_key_file = %initial.data_dir.join(DEV_ADMIN_KEY_FILE).display(),
            issuer = dev::DEV_ISSUER,
            "DEV MODE: no --config given; using a dev issuer and dev keys. Not for production."
        );
    }
    let running = Server::start(initial).await.map_err(|e| e.to_string())?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = &mut stop => break,
            Some(()) = hup => reload(&running, config.as_deref(), &data_dir),
        }
    }
    running.run_until(async {}).await;
    Ok(())
}

/// Parses the command line and runs what it asks for.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Admin(args) => admin::run(args),
        Command::Serve {
            config,
            data_dir,
            log_format,
        } => {
            init_logs(log_format);
            match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(serve(config, data_dir)),
                Err(e) => Err(format!("cannot start the runtime: {e}")),
            }
        }
        Command::DevToken {
            user,
            tenant,
            permissions,
            ttl,
            data_dir,
        } => {
            let request = DevTokenRequest {
                user,
                tenant,
                permissions: permissions
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .collect::<BTreeSet<_>>(),
                ttl,
            };
            dev::require_issuer_key(&data_dir)
                .and_then(|()| dev::mint_dev_token(&data_dir, &request, SystemClock.now()))
                .map(|token| out!("{token}"))
                .map_err(|e| e.to_string())
        }
        Command::HashKey => {
            let mut key = String::new();
            match std::io::stdin().read_to_string(&mut key) {
                Err(e) => Err(format!("reading standard input: {e}")),
                Ok(_) if key.trim().is_empty() => Err("standard input is empty: pipe the key \
                     in, e.g. `echo \"$KEY\" | token-service hash-key`"
                    .to_owned()),
                Ok(_) => {
                    out!("{}", key_hash(key.trim()));
                    Ok(())
                }
            }
        }
        Command::GenMasterKey => {
            out!("{}", crate::secrets::MasterKey::generate().1);
            Ok(())
        }
        Command::GenKey { admin } => {
            let key = generate_key_text(if admin { "ak" } else { "mk" });
            out!("{key}");
            out!("{}", key_hash(&key));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("token-service: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
