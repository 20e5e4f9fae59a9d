//! TLS on the relay's outgoing connections: Redis over `rediss://`, the role service and
//! the server list over `https://`, trusting a private CA through `SSL_CERT_FILE`; and a
//! server whose certificate the relay does not trust is refused.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::app::TestApp;
use support::tls::{serve_https, TestCa};
use support::{wait_until, wait_until_async, RedisServer};

const GM: i64 = 7;
/// A host the role service is asked about (hosts from 1000 on).
const HOST: i64 = 1001;
const UID: i64 = 42;
const DEADLINE: Duration = Duration::from_secs(15);

/// The GS endpoint's reply to a client the allowlist refuses (the original's words).
const REFUSED: &str = "127.0.0.1 has no access to the website";

#[tokio::test]
async fn redis_the_role_service_and_the_server_list_work_over_tls() {
    let ca = TestCa::new();
    let redis = RedisServer::start_tls(ca.files.clone());
    let redis_url = redis.tls_url();
    let (role_addr, role_calls) = serve_https(&ca, |_| (200, r#"{"code": 1}"#.to_owned())).await;
    let (list_addr, list_calls) = serve_https(&ca, |_| (200, "s1 9000 127.0.0.1 x\n".to_owned())).await;
    // The role service by IP, the list by name: the certificate names both.
    let role = format!("https://127.0.0.1:{}/info?uid={{uid}}&hostnum={{host}}", role_addr.port());
    let list = format!("https://localhost:{}/servers.txt", list_addr.port());
    let mut app = TestApp::servers_with_redis(
        redis,
        &[
            ("GM_RELAY_REDIS_URL", &redis_url),
            ("GM_RELAY_ROLE_INFO_URL", &role),
            ("GM_RELAY_GS_LIST_URL", &list),
            // Only the server list lets 127.0.0.1 call the GS endpoint.
            ("GM_RELAY_GS_ALLOW", "192.0.2.1"),
        ],
    );
    app.start_process(&[("SSL_CERT_FILE", ca.files.ca.to_str().expect("a UTF-8 path"))]).await;

    // Friendship state goes through Redis, and `add` asks the role service.
    app.create_gm(GM, "Alice").await;
    app.add(GM, HOST, UID).await;
    assert_eq!(role_calls.load(Ordering::SeqCst), 1, "the role service was asked once");

    // The list, fetched over HTTPS, lets the game server in.
    wait_until_async(DEADLINE, "the server list lets 127.0.0.1 in", || async {
        app.gs(&format!("action=online&host={HOST}")).await.text() != REFUSED
    })
    .await;
    assert!(list_calls.load(Ordering::SeqCst) >= 1);
    let sent = app.gm_send(GM, UID, "over TLS").await;
    assert_eq!(sent.json(), serde_json::json!({"res": 1}), "{}", sent.text());
    let got = std::sync::Mutex::new(Vec::new());
    wait_until_async(DEADLINE, "the message reaches the game server", || {
        let (got, app) = (&got, &app);
        async move {
            let reply = app.gs_receive(HOST).await;
            let mut got = got.lock().unwrap();
            got.extend(reply);
            !got.is_empty()
        }
    })
    .await;
    let got = got.into_inner().unwrap();
    assert_eq!(got, vec![(UID.to_string(), vec!["over TLS".to_owned()])]);
}

/// Runs `gm-relay serve` with `env` (and the given servers), expects it to exit with an
/// error within DEADLINE, and returns its stderr.
fn start_fails(nats: &support::NatsServer, redis_url: &str, env: &[(&str, &str)]) -> String {
    let mut relay = Command::new(env!("CARGO_BIN_EXE_gm-relay"));
    relay
        .arg("serve")
        .env_clear()
        .env("GM_RELAY_LISTEN", "127.0.0.1:0")
        .env("GM_RELAY_NATS_URL", nats.url())
        .env("GM_RELAY_REDIS_URL", redis_url)
        .env("GM_RELAY_LOG_FORMAT", "pretty")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut relay = relay.spawn().expect("gm-relay runs");
    let mut status = None;
    wait_until(DEADLINE, "the relay exits", || {
        status = relay.try_wait().expect("wait");
        status.is_some()
    });
    let output = relay.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!status.expect("exited").success(), "the relay started: {stderr}");
    stderr
}

/// Without the CA (the system's store does not hold it), the relay refuses Redis's
/// certificate and does not start.
#[test]
fn a_certificate_the_relay_does_not_trust_stops_it_at_start() {
    let ca = TestCa::new();
    let redis = RedisServer::start_tls(ca.files.clone());
    let nats = support::NatsServer::start();
    let empty_store = ca.files.cert.with_file_name("no-ca.pem");
    std::fs::write(&empty_store, "").expect("write an empty store");
    let stderr =
        start_fails(&nats, &redis.tls_url(), &[("SSL_CERT_FILE", empty_store.to_str().expect("UTF-8"))]);
    assert!(
        stderr.contains("cannot connect to Redis") && stderr.contains("certificate"),
        "the error names Redis and its certificate: {stderr}"
    );
}

/// An `https://` role service with a trust store of no certificate (a mistyped
/// `SSL_CERT_FILE`) stops the relay at start, instead of every `add` failing later.
#[test]
fn an_empty_trust_store_for_https_stops_the_relay_at_start() {
    let redis = RedisServer::start();
    let nats = support::NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-ca.pem");
    let stderr = start_fails(
        &nats,
        &redis.url(),
        &[
            ("GM_RELAY_ROLE_INFO_URL", "https://127.0.0.1:9/info?uid={uid}&hostnum={host}"),
            ("SSL_CERT_FILE", missing.to_str().expect("UTF-8")),
        ],
    );
    assert!(stderr.contains("no trusted certificate for https://"), "{stderr}");
}
