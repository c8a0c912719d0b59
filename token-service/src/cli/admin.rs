//! `token-service admin …`: the operator's client of `AdminService` (and of
//! `WatchRevocations` with the admin key). The key comes from a file or the environment,
//! never from the command line (where `ps` would show it).

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use jobtoken_proto::jobtoken::v1 as pb;
use pb::admin_service_client::AdminServiceClient;
use pb::job_token_service_client::JobTokenServiceClient;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Environment variable holding the admin key.
const KEY_ENV: &str = "JOBTOKEN_ADMIN_KEY";
/// Largest page `ListLeases` serves.
const MAX_PAGE: u32 = crate::limits::MAX_PAGE_SIZE as u32;

/// Where and how to reach the service.
#[derive(Debug, Args)]
pub(crate) struct AdminArgs {
    /// gRPC endpoint of the service (`https://…` for TLS).
    #[arg(
        long,
        env = "JOBTOKEN_ADMIN_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    endpoint: String,
    /// File holding the admin key (else the JOBTOKEN_ADMIN_KEY environment variable).
    #[arg(long, env = "JOBTOKEN_ADMIN_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    /// CA certificate (PEM) of the service's TLS certificate, for `https://` endpoints.
    #[arg(long, env = "JOBTOKEN_ADMIN_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Output: a table for people, or JSON (one document; one line per event for
    /// `watch`).
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// List, show and revoke leases.
    #[command(subcommand)]
    Leases(LeasesCommand),
    /// Rotate the signing key: the new key is published now and signs after
    /// `key_activation_delay`.
    RotateKey,
    /// Follow lease ends as they happen (every tenant), until interrupted.
    Watch {
        /// Start after this cursor (0: from the oldest kept end); default: from now.
        #[arg(long)]
        after_cursor: Option<u64>,
        /// Only these tenants (repeatable).
        #[arg(long)]
        tenant: Vec<String>,
        /// Stop after this many ends.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum LeasesCommand {
    /// Leases, newest first, filtered.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this user (subject).
        #[arg(long)]
        user: Option<String>,
        /// Only this module (actor).
        #[arg(long)]
        module: Option<String>,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Only active or ended leases.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// At most this many (pages through the results).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One lease with its counters and events.
    Show {
        /// The lease id.
        lease_id: String,
    },
    /// Revoke one lease, or every active lease of a job, a user or a module.
    Revoke {
        /// This lease.
        #[arg(long, conflicts_with_all = ["job", "user", "module"])]
        lease: Option<String>,
        /// Every active lease of this job (needs --tenant).
        #[arg(long, requires = "tenant", conflicts_with_all = ["user", "module"])]
        job: Option<String>,
        /// Every active lease of this user (needs --tenant).
        #[arg(long, requires = "tenant", conflicts_with = "module")]
        user: Option<String>,
        /// Every active lease held by this module.
        #[arg(long)]
        module: Option<String>,
        /// Tenant of --job or --user.
        #[arg(long)]
        tenant: Option<String>,
        /// Why (recorded with the lease and shown to its holder).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StateArg {
    Active,
    Ended,
}

/// Runs an admin command; the error is printed by `main`.
pub(crate) fn run(args: AdminArgs) -> Result<(), String> {
    let key = admin_key(args.key_file.as_deref(), std::env::var(KEY_ENV).ok())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let channel = connect(&args.endpoint, args.ca_file.as_deref()).await?;
        let client = Client {
            channel,
            key,
            output: args.output,
        };
        client.run(args.command).await
    })
}

fn admin_key(file: Option<&Path>, env: Option<String>) -> Result<String, String> {
    let key = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("admin key file {}: {e}", path.display()))?,
        None => env.ok_or_else(|| {
            format!("no admin key: pass --key-file (or JOBTOKEN_ADMIN_KEY_FILE) or set {KEY_ENV}")
        })?,
    };
    let key = key.trim().to_owned();
    if key.is_empty() {
        return Err("the admin key is empty".into());
    }
    Ok(key)
}

async fn connect(endpoint: &str, ca_file: Option<&Path>) -> Result<Channel, String> {
    let mut ep = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| format!("endpoint {endpoint:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    // The admin key never crosses a network in clear text.
    let loopback = matches!(
        ep.uri().host(),
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
    );
    if !endpoint.starts_with("https://") && !loopback {
        return Err(format!(
            "endpoint {endpoint:?}: the admin key is only sent over https:// or to loopback"
        ));
    }
    if endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls).map_err(|e| format!("tls: {e}"))?;
    }
    ep.connect()
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))
}

struct Client {
    channel: Channel,
    key: String,
    output: Output,
}

/// A failed call as a person reads it: the message and the machine reason.
fn failed(status: tonic::Status) -> String {
    let reason = tonic_types::StatusExt::get_details_error_info(&status)
        .map(|info| format!(" ({})", info.reason))
        .unwrap_or_default();
    format!("{:?}: {}{reason}", status.code(), status.message())
}

impl Client {
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, String> {
        let mut request = tonic::Request::new(message);
        let mut value: MetadataValue<_> = self
            .key
            .parse()
            .map_err(|_| "the admin key holds characters a header can't carry".to_owned())?;
        value.set_sensitive(true);
        request
            .metadata_mut()
            .insert(crate::grpc::ADMIN_KEY_HEADER, value);
        Ok(request)
    }

    fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    async fn run(&self, command: AdminCommand) -> Result<(), String> {
        match command {
            AdminCommand::Leases(LeasesCommand::List {
                tenant,
                user,
                module,
                job,
                state,
                limit,
            }) => {
                let mut leases = Vec::new();
                let mut page_token = String::new();
                while leases.len() < limit {
                    let want = u32::try_from(limit - leases.len()).unwrap_or(MAX_PAGE);
                    let page = self
                        .admin()
                        .list_leases(self.request(pb::ListLeasesRequest {
                            tenant: tenant.clone().unwrap_or_default(),
                            subject: user.clone().unwrap_or_default(),
                            actor: module.clone().unwrap_or_default(),
                            job_id: job.clone().unwrap_or_default(),
                            state: match state {
                                None => pb::LeaseState::Unspecified,
                                Some(StateArg::Active) => pb::LeaseState::Active,
                                Some(StateArg::Ended) => pb::LeaseState::Ended,
                            } as i32,
                            page_size: want.min(MAX_PAGE),
                            page_token,
                        })?)
                        .await
                        .map_err(failed)?
                        .into_inner();
                    leases.extend(page.leases);
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                leases.truncate(limit);
                self.print_leases(&leases);
            }
            AdminCommand::Leases(LeasesCommand::Show { lease_id }) => {
                let got = self
                    .admin()
                    .get_lease(self.request(pb::GetLeaseRequest { lease_id })?)
                    .await
                    .map_err(failed)?
                    .into_inner();
                self.print_lease_detail(&got);
            }
            AdminCommand::Leases(LeasesCommand::Revoke {
                lease,
                job,
                user,
                module,
                tenant,
                reason,
            }) => {
                let tenant = tenant.unwrap_or_default();
                let mut admin = self.admin();
                let (what, count, lease) = if let Some(lease_id) = lease {
                    let r = admin
                        .revoke_lease(self.request(pb::RevokeLeaseRequest { lease_id, reason })?)
                        .await
                        .map_err(failed)?
                        .into_inner();
                    ("lease", 1, r.lease)
                } else if let Some(job_id) = job {
                    let r = admin
                        .revoke_job(self.request(pb::RevokeJobRequest {
                            tenant,
                            job_id,
                            reason,
                        })?)
                        .await
                        .map_err(failed)?
                        .into_inner();
                    ("job", r.revoked_count, None)
                } else if let Some(subject) = user {
                    let r = admin
                        .revoke_subject(self.request(pb::RevokeSubjectRequest {
                            tenant,
                            subject,
                            reason,
                        })?)
                        .await
                        .map_err(failed)?
                        .into_inner();
                    ("user", r.revoked_count, None)
                } else if let Some(actor) = module {
                    let r = admin
                        .revoke_actor(self.request(pb::RevokeActorRequest { actor, reason })?)
                        .await
                        .map_err(failed)?
                        .into_inner();
                    ("module", r.revoked_count, None)
                } else {
                    return Err("say what to revoke: --lease, --job, --user or --module".into());
                };
                match self.output {
                    Output::Json => {
                        let mut doc = json!({ "revoked_count": count });
                        if let Some(lease) = &lease {
                            doc["lease"] = lease_json(lease);
                        }
                        out!("{doc}");
                    }
                    Output::Table => match lease {
                        Some(lease) => {
                            out!("revoked lease {} ({})", lease.lease_id, end_text(&lease))
                        }
                        None => out!("revoked {count} active lease(s) of that {what}"),
                    },
                }
            }
            AdminCommand::RotateKey => {
                let r = self
                    .admin()
                    .rotate_signing_key(self.request(pb::RotateSigningKeyRequest {})?)
                    .await
                    .map_err(failed)?
                    .into_inner();
                let starts = time_text(r.signing_starts_at.as_ref());
                match self.output {
                    Output::Json => out!(
                        "{}",
                        json!({
                            "new_kid": r.new_kid,
                            "retired_kid": r.retired_kid,
                            "signing_starts_at": starts,
                        })
                    ),
                    Output::Table => out!(
                        "new key {} is published; it signs from {starts}, when {} retires",
                        r.new_kid,
                        r.retired_kid
                    ),
                }
            }
            AdminCommand::Watch {
                after_cursor,
                tenant,
                count,
            } => self.watch(after_cursor, tenant, count).await?,
        }
        Ok(())
    }

    async fn watch(
        &self,
        after_cursor: Option<u64>,
        tenants: Vec<String>,
        count: Option<u64>,
    ) -> Result<(), String> {
        let mut stream = JobTokenServiceClient::new(self.channel.clone())
            .watch_revocations(self.request(pb::WatchRevocationsRequest {
                after_cursor,
                replay_live: false,
                tenants,
            })?)
            .await
            .map_err(failed)?
            .into_inner();
        if self.output == Output::Table {
            out!(
                "{:<8} {:<36} {:<16} {:<22} {:<20} TOKENS VALID UNTIL",
                "CURSOR",
                "LEASE",
                "TENANT",
                "REASON",
                "ENDED"
            );
        }
        let mut seen = 0;
        while count.is_none_or(|c| seen < c) {
            let Some(event) = stream.message().await.map_err(failed)? else {
                break;
            };
            if event.heartbeat {
                continue;
            }
            seen += 1;
            let reason = end_reason(event.reason);
            let ended = time_text(event.ended_at.as_ref());
            let until = time_text(event.tokens_valid_until.as_ref());
            match self.output {
                Output::Json => out!(
                    "{}",
                    json!({
                        "cursor": event.cursor,
                        "lease_id": event.lease_id,
                        "tenant": event.tenant,
                        "reason": reason,
                        "ended_at": ended,
                        "tokens_valid_until": until,
                    })
                ),
                Output::Table => out!(
                    "{:<8} {:<36} {:<16} {:<22} {:<20} {until}",
                    event.cursor,
                    event.lease_id,
                    event.tenant,
                    reason,
                    ended
                ),
            }
        }
        Ok(())
    }

    fn print_leases(&self, leases: &[pb::Lease]) {
        match self.output {
            Output::Json => out!("{}", Value::Array(leases.iter().map(lease_json).collect())),
            Output::Table => {
                out!(
                    "{:<36} {:<12} {:<20} {:<12} {:<16} {:<6} {:<20} END",
                    "LEASE",
                    "TENANT",
                    "JOB",
                    "USER",
                    "MODULE",
                    "STATE",
                    "CREATED"
                );
                for l in leases {
                    out!(
                        "{:<36} {:<12} {:<20} {:<12} {:<16} {:<6} {:<20} {}",
                        l.lease_id,
                        l.tenant,
                        l.job_id,
                        l.subject,
                        l.actor,
                        state(l.state),
                        time_text(l.created_at.as_ref()),
                        end_text(l)
                    );
                }
            }
        }
    }

    fn print_lease_detail(&self, got: &pb::GetLeaseResponse) {
        let Some(lease) = &got.lease else { return };
        let events: Vec<Value> = got
            .events
            .iter()
            .map(|e| {
                json!({
                    "sequence": e.sequence,
                    "kind": e.kind,
                    "at": time_text(e.at.as_ref()),
                    "by": e.by,
                    "detail": e.detail,
                })
            })
            .collect();
        match self.output {
            Output::Json => {
                let mut doc = lease_json(lease);
                doc["refresh_count"] = json!(got.refresh_count);
                doc["last_refreshed_at"] = json!(time_text(got.last_refreshed_at.as_ref()));
                doc["resume_count"] = json!(got.resume_count);
                doc["events"] = Value::Array(events);
                out!("{doc}");
            }
            Output::Table => {
                let rows = [
                    ("lease", lease.lease_id.clone()),
                    ("tenant", lease.tenant.clone()),
                    ("job", lease.job_id.clone()),
                    ("user", lease.subject.clone()),
                    ("module", lease.actor.clone()),
                    ("permissions", lease.granted_permissions.join(" ")),
                    ("audience", lease.audience.clone()),
                    ("state", state(lease.state).to_owned()),
                    ("created", time_text(lease.created_at.as_ref())),
                    ("expires", time_text(lease.expires_at.as_ref())),
                    ("end", end_text(lease)),
                    ("refreshes", got.refresh_count.to_string()),
                    ("last refresh", time_text(got.last_refreshed_at.as_ref())),
                    ("resumes", got.resume_count.to_string()),
                ];
                for (k, v) in rows {
                    out!("{k:<13} {v}");
                }
                out!("events:");
                for e in &got.events {
                    out!(
                        "  {:>4} {:<20} {:<8} {:<24} {}",
                        e.sequence,
                        time_text(e.at.as_ref()),
                        e.kind,
                        e.by,
                        e.detail
                    );
                }
            }
        }
    }
}

fn state(s: i32) -> &'static str {
    match pb::LeaseState::try_from(s) {
        Ok(pb::LeaseState::Active) => "active",
        Ok(pb::LeaseState::Ended) => "ended",
        _ => "?",
    }
}

fn end_reason(r: i32) -> &'static str {
    match pb::EndReason::try_from(r) {
        Ok(pb::EndReason::Unspecified) => "",
        Ok(pb::EndReason::Released) => "released",
        Ok(pb::EndReason::Expired) => "expired",
        Ok(pb::EndReason::IdleTimeout) => "idle_timeout",
        Ok(pb::EndReason::Revoked) => "revoked",
        Ok(pb::EndReason::RefreshTokenReused) => "refresh_token_reused",
        Ok(pb::EndReason::PermissionsWithdrawn) => "permissions_withdrawn",
        Ok(pb::EndReason::SubjectDisabled) => "subject_disabled",
        Ok(pb::EndReason::SubjectLoggedOut) => "subject_logged_out",
        Ok(pb::EndReason::PermissionsUnverifiable) => "permissions_unverifiable",
        Err(_) => "?",
    }
}

/// "revoked by admin: user asked", or "" for an active lease.
fn end_text(l: &pb::Lease) -> String {
    if l.end_reason == 0 {
        return String::new();
    }
    let mut out = format!("{} by {}", end_reason(l.end_reason), l.ended_by);
    if !l.end_detail.is_empty() {
        out.push_str(": ");
        out.push_str(&l.end_detail);
    }
    out
}

/// RFC 3339 (seconds), or "" when absent.
fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return String::new();
    };
    let Ok(secs) = u64::try_from(t.seconds) else {
        return t.seconds.to_string();
    };
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn lease_json(l: &pb::Lease) -> Value {
    let ended = l.end_reason != 0;
    json!({
        "lease_id": l.lease_id,
        "tenant": l.tenant,
        "job_id": l.job_id,
        "subject": l.subject,
        "actor": l.actor,
        "granted_permissions": l.granted_permissions,
        "audience": l.audience,
        "state": state(l.state),
        "created_at": time_text(l.created_at.as_ref()),
        "expires_at": time_text(l.expires_at.as_ref()),
        "end_reason": ended.then(|| end_reason(l.end_reason)),
        "ended_at": ended.then(|| time_text(l.ended_at.as_ref())),
        "ended_by": ended.then(|| l.ended_by.clone()),
        "end_detail": ended.then(|| l.end_detail.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_comes_from_the_file_first_trimmed_and_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.key");
        std::fs::write(&file, "ak_from_file\n").unwrap();
        assert_eq!(
            admin_key(Some(&file), Some("ak_env".into())).unwrap(),
            "ak_from_file"
        );
        assert_eq!(admin_key(None, Some("ak_env".into())).unwrap(), "ak_env");
        assert!(admin_key(None, None).unwrap_err().contains(KEY_ENV));
        std::fs::write(&file, "\n").unwrap();
        assert!(admin_key(Some(&file), None).unwrap_err().contains("empty"));
    }

    #[test]
    fn times_print_as_rfc3339_and_absent_ones_as_nothing() {
        let t = prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 5,
        };
        assert_eq!(time_text(Some(&t)), "2027-01-15T08:00:00Z");
        assert_eq!(time_text(None), "");
    }
}
