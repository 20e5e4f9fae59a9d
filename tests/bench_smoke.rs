//! The benchmark's smoke mode runs in the test suite so it never rots: `gm-relay-bench
//! --quick` starts its own servers and relay, runs every workload with small numbers, and
//! must exit 0 with non-zero figures for each.

use std::process::Command;
use std::time::{Duration, Instant};

/// Far above the smoke run's few seconds per workload, far below a CI run's patience.
const SMOKE_DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn quick_benchmark_reports_every_workload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("results.json");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gm-relay-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run gm-relay-bench");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the benchmark") {
            break status;
        }
        if started.elapsed() > SMOKE_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gm-relay-bench --quick took more than {SMOKE_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("benchmark output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "gm-relay-bench --quick failed ({status}):\n{stderr}\n{stdout}");
    assert!(stdout.contains("| target | measured | met |"), "no targets table:\n{stdout}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("results JSON written")).expect("valid JSON");
    let w = &json["workloads"];
    let positive = |v: &serde_json::Value, what: &str| {
        let x = v.as_f64().unwrap_or_else(|| panic!("{what} missing in {json:#}"));
        assert!(x > 0.0, "{what} is {x}");
    };
    positive(&w["w0"]["e2e_rate_per_s"], "W0 end-to-end rate");
    positive(&w["w1"]["polls_per_s"], "W1 polls/s");
    positive(&w["w1"]["polls"]["all"]["p99_ms"], "W1 poll p99");
    positive(&w["w1"]["relay_rss_mb"], "W1 relay RSS");
    assert_eq!(w["w1"]["polls"]["all"]["errors"], 0, "W1 polls failed: {:#}", w["w1"]["polls"]);
    for key in ["gm_http_max_per_s", "gs_http_max_per_s", "native_max_per_s", "gm_http_to_native_p99_ms"] {
        positive(&w["w2"][key], &format!("W2 {key}"));
    }
    // Each path's share rounds with the W0 runs beside each, and their median, which the
    // verdict uses.
    for path in ["gm_http", "gs_http", "native"] {
        let r = &w["w2"]["share_rounds_beside_w0"][path];
        let rounds = r["rounds"].as_array().unwrap_or_else(|| panic!("W2 {path}: no share rounds"));
        assert_eq!(rounds.len(), 2, "W2 {path}: the quick run has two share rounds: {r:#}");
        for b in rounds.iter().chain([&r["median"]]) {
            for key in ["rate_per_s", "w0_before_per_s", "w0_after_per_s", "pct_of_w0_beside"] {
                positive(&b[key], &format!("W2 {path} beside W0: {key}"));
            }
        }
    }
    // Every W2 phase reports the CPU of the relay, nats-server and the load generator itself,
    // which shares the 2 cores with them.
    let phases = w["w2"]["phases"].as_array().unwrap_or_else(|| panic!("W2 phases missing"));
    for phase in phases {
        for key in ["relay_cpu_pct", "nats_cpu_pct", "bench_cpu_pct"] {
            positive(&phase[key], &format!("W2 phase {key}"));
        }
    }
    for mode in ["sync_1s", "sync_always"] {
        positive(&w["sync"][mode]["w0"]["e2e_rate_per_s"], &format!("{mode} W0"));
        positive(&w["sync"][mode]["w2"]["native_max_per_s"], &format!("{mode} native max"));
    }
    // The servers' CPU per operation is what the time verdict reads beside the relay's; a
    // single figure may round to nothing after the idle background is taken off, their sum not.
    let mut servers_cpu = 0.0;
    for op in ["online", "relation", "receive", "gm_send", "gs_send", "native_send"] {
        let points = w["w3"]["ops"][op].as_array().unwrap_or_else(|| panic!("W3 {op} missing"));
        assert!(points.len() >= 2, "W3 {op}: fewer than two points");
        for p in points {
            positive(&p["p50_ms"], &format!("W3 {op} p50"));
            positive(&p["relay_cpu_us_per_op"], &format!("W3 {op} relay CPU per op"));
            positive(&p["redis_cmds_per_op"], &format!("W3 {op} Redis commands per op"));
            let s = p["servers_cpu_us_per_op"]
                .as_f64()
                .unwrap_or_else(|| panic!("W3 {op}: no servers' CPU: {p}"));
            assert!(s >= 0.0, "W3 {op}: servers' CPU per op is {s}");
            servers_cpu += s;
            assert_eq!(p["errors"], 0, "W3 {op} had errors: {p}");
        }
    }
    assert!(servers_cpu > 0.0, "W3 measured no server CPU at all");
    for point in w["w3"]["load"].as_array().expect("W3 load") {
        assert!(point["idle_cpu_pct"]["nats_server"].is_f64(), "W3 point without its idle CPU: {point}");
    }
}
