//! The load generator works: every scenario, briefly, against the real service. Speed is
//! measured by the tool itself (see BENCHMARKS.md), not asserted here.

use std::time::Duration;

use token_load::{Load, Scale, Scenario};
use token_service::config::{IssuerConfig, PermissionSourceConfig};

use crate::support::{OTHER_KEY, TestServer, http_text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports() {
    let server = TestServer::start().await;
    for scenario in [
        Scenario::Noop,
        Scenario::Issue,
        Scenario::Refresh,
        Scenario::Introspect,
        Scenario::Mixed,
        Scenario::Churn,
    ] {
        let load = Load {
            endpoint: server.endpoint(),
            module_key: OTHER_KEY.into(),
            data_dir: server.data_dir().to_owned(),
            scenario,
            concurrency: 4,
            connections: 2,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            lease_lifetime: Duration::from_secs(600),
            idp_listen: "127.0.0.1:0".parse().unwrap(),
        };
        let report = load.run().await.unwrap();
        assert!(report.ok > 0, "{report}");
        assert!(report.errors.is_empty(), "{report}");
        assert!(report.p50_ms <= report.p99_ms && report.p99_ms <= report.max_ms);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], report.ok);
    }
    server.stop().await;
}

/// `issue-idp`: grants through the identity provider token-load serves (discovery keys,
/// HTTP permission source), trusted the way scripts/bench.sh trusts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issue_idp_scenario_grants_through_discovery_and_the_permission_source() {
    let idp_listen: std::net::SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let server = TestServer::start_with(|c| {
        c.trusted_issuers.push(IssuerConfig {
            issuer_pattern: Some(format!("http://{idp_listen}/realms/{{tenant}}")),
            discovery: true,
            subject_claim: "user_id".into(),
            permission_source: Some(PermissionSourceConfig::http(&format!(
                "http://{idp_listen}/permissions/users/{{user_id}}"
            ))),
            ..IssuerConfig::default()
        });
    })
    .await;
    let load = Load {
        endpoint: server.endpoint(),
        module_key: OTHER_KEY.into(),
        data_dir: server.data_dir().to_owned(),
        scenario: Scenario::IssueIdp,
        concurrency: 4,
        connections: 2,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(200),
        lease_lifetime: Duration::from_secs(600),
        idp_listen,
    };
    let report = load.run().await.unwrap();
    assert!(report.ok > 0, "{report}");
    assert!(report.errors.is_empty(), "{report}");
    let metrics = http_text(&format!("http://{}/metrics", server.http_addr())).await;
    // Two realms, each fetched once; permissions mostly from the cache.
    let fetched = format!(
        "jobtoken_issuer_key_fetches_total{{issuer=\"http://{idp_listen}/realms/{{tenant}}\",result=\"ok\"}} 2"
    );
    assert!(metrics.contains(&fetched), "{metrics}");
    assert!(
        metrics.contains("jobtoken_permission_source_lookups_total"),
        "{metrics}"
    );
    server.stop().await;
}

/// The scale scenario, small: 200 jobs with 2 s tokens renew on the SDK's schedule for
/// 6 s; every job keeps a live token, and the report adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_scenario_holds_every_lease_and_reports() {
    let server = TestServer::start_with(|c| c.access_token_ttl = Duration::from_secs(2)).await;
    let scale = Scale {
        endpoint: server.endpoint(),
        module_key: OTHER_KEY.into(),
        data_dir: server.data_dir().to_owned(),
        leases: 200,
        connections: 2,
        grant_concurrency: 8,
        grant_over: Duration::from_secs(1),
        duration: Duration::from_secs(6),
        lease_lifetime: Duration::from_secs(600),
        // The service runs in this process.
        service_pid: Some(std::process::id()),
    };
    let report = scale.run().await.unwrap();
    // `exp` is in whole seconds, rounded up: a 2 s token lives 2 to 3 s.
    assert!((2.0..=3.0).contains(&report.token_life_seconds), "{report}");
    assert_eq!(report.lapses, 0, "{report}");
    assert!(report.lost.is_empty(), "{report}");
    // Each job renews at most 2.4 s after its last token: at least twice in 6 s.
    assert!(report.renewals >= 400, "{report}");
    // The per-second series accounts for every renewal counted.
    assert_eq!(
        report.per_second.iter().sum::<u64>(),
        report.renewals,
        "{report}"
    );
    assert!(report.rss_mib_peak.is_some_and(|m| m > 0.0), "{report}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["renewals"], report.renewals);
    server.stop().await;
}
