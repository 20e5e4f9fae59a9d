//! The binary's edges: settings validation at start-up, graceful shutdown on SIGTERM, and
//! a stderr that stops being read.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::app::TestApp;

/// Runs `gm-relay <args>` with only `env` (and PATH) in its environment.
fn gm_relay(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gm-relay"));
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("gm-relay runs")
}

fn serve_with(env: &[(&str, &str)]) -> std::process::Output {
    gm_relay(&["serve"], env)
}

#[test]
fn an_invalid_setting_exits_2_naming_it_on_one_line() {
    for (key, value) in [
        ("GM_RELAY_LISTEN", "not-an-address"),
        ("GM_RELAY_NATS_URL", "http://wrong-scheme"),
        ("GM_RELAY_GM_ALLOW", "10.0.0.0/40"),
        ("GM_RELAY_RETENTION_MAX_AGE", "forever"),
        ("GM_RELAY_NATS_NKEY_FILE", "/nonexistent/relay.nk"),
    ] {
        let out = serve_with(&[(key, value)]);
        assert_eq!(out.status.code(), Some(2), "{key}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "names {key}: {stderr}");
    }
}

#[test]
fn a_config_file_sets_keys_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.conf");
    std::fs::write(&file, "# comment\nGM_RELAY_LISTEN=bad-from-file\n").unwrap();
    let out = gm_relay(&["serve", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GM_RELAY_LISTEN"));

    // The environment wins over the file: the file's bad LISTEN is replaced, so the next
    // bad setting is the one reported.
    let serve_file = ["serve", "--config", file.to_str().unwrap()];
    let out = gm_relay(&serve_file, &[("GM_RELAY_LISTEN", "127.0.0.1:0"), ("GM_RELAY_NATS_URL", "bogus")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("GM_RELAY_NATS_URL") && !stderr.contains("GM_RELAY_LISTEN"), "{stderr}");

    std::fs::write(&file, "GM_RELAY_LISTEN=127.0.0.1:1\nGM_RELAY_UNKNOWN=1\n").unwrap();
    let out = gm_relay(&["serve", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GM_RELAY_UNKNOWN"), "unknown keys are refused");
}

#[test]
fn streams_that_do_not_fit_the_store_name_the_settings_to_change() {
    // JetStream reserves every stream's max_bytes up front: 3 × 10 GiB by default.
    let nats = support::NatsServer::start_with_config("jetstream {\n    max_file_store: 100MB\n}\n");
    let url = nats.url();
    // Port 1: nothing listens, so getting as far as Redis shows the streams were set up.
    let base = [
        ("GM_RELAY_LISTEN", "127.0.0.1:0"),
        ("GM_RELAY_NATS_URL", &url),
        ("GM_RELAY_REDIS_URL", "redis://127.0.0.1:1"),
    ];

    let out = serve_with(&base);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("GM_RELAY_RETENTION_MAX_BYTES") && stderr.contains("max_file_store"), "{stderr}");

    let out = serve_with(&[base.as_slice(), &[("GM_RELAY_RETENTION_MAX_BYTES", "16MiB")]].concat());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect to Redis") && !stderr.contains("max_file_store"), "{stderr}");
}

#[test]
fn unknown_commands_print_usage() {
    let out = gm_relay(&["nope"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: gm-relay serve"));
}

#[tokio::test]
async fn sigterm_stops_gracefully_and_publishes_what_was_committed() {
    let mut app = TestApp::servers_only(&[]);
    app.start_process(&[]).await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    let status = app.terminate_process(Duration::from_secs(15));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    // Nothing was lost across the stop: a new relay serves the friend event.
    app.start_process(&[]).await;
    assert_eq!(app.relation(3).await.0, json!({"1001": ["7", "Alice"]}));
}

/// Polls sent at most while waiting for the log queue to overflow; at `trace` each poll
/// logs about a dozen lines (its JetStream fetch), so the queue's 10,000 lines are passed
/// after about a thousand.
const STALLED_LOG_REQUESTS: usize = 20_000;

#[tokio::test]
async fn a_stalled_stderr_drops_log_lines_instead_of_stalling_the_relay() {
    let mut app = TestApp::servers_only(&[]);
    // A pipe nobody reads fills after 64 KiB, as with a log shipper that hung.
    let (mut unread, stderr) = std::io::pipe().expect("pipe");
    app.start_process_with_stderr(&[("RUST_LOG", "trace")], stderr.into()).await;
    // The host has a player, so each of its polls fetches from JetStream (and logs it).
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    let dropped = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("gm_relay_log_lines_dropped_total "))
            .map(|v| v.trim().parse().expect("a count"))
            .expect("the metric is exported")
    };
    let mut seen = 0;
    for i in 0..STALLED_LOG_REQUESTS {
        let reply = app.try_get("/gs?action=receive&host=3", Duration::from_secs(5)).await;
        assert_eq!(reply.map(|r| r.res()).ok(), Some(1), "request {i} answered while stderr is stalled");
        if i % 100 == 99 {
            let metrics = app.try_get("/metrics", Duration::from_secs(5)).await.expect("metrics answered");
            seen = dropped(&metrics.text());
            if seen > 0 {
                break;
            }
        }
    }
    assert!(seen > 0, "{STALLED_LOG_REQUESTS} requests at trace level overflowed no log queue");
    // Once stderr is read again, the relay still stops cleanly (and the pipe ends with it).
    let drain = std::thread::spawn(move || std::io::copy(&mut unread, &mut std::io::sink()));
    let status = app.terminate_process(Duration::from_secs(15));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    assert!(drain.join().expect("drain thread").expect("stderr read to its end") > 0);
}

#[test]
fn every_setting_is_documented_in_the_readme() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (key, default, _) in gm_relay::config::SETTINGS {
        assert!(readme.contains(&format!("`{key}`")), "README's settings table lacks {key}");
        if !default.is_empty() {
            assert!(readme.contains(default), "README does not show {key}'s default {default:?}");
        }
    }
}
