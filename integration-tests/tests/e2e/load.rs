//! The load generator works: every scenario, briefly, against the real service. Speed is
//! measured by the tool itself (see BENCHMARKS.md), not asserted here.

use std::time::Duration;

use token_load::{Load, Scenario};

use crate::support::{OTHER_KEY, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports() {
    let server = TestServer::start().await;
    for scenario in [
        Scenario::Noop,
        Scenario::Issue,
        Scenario::Refresh,
        Scenario::Introspect,
        Scenario::Mixed,
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
