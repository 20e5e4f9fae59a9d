//! The legacy HTTP protocol (`LEGACY_PROTOCOL.md`), row by row, against a real relay with
//! its own nats-server and redis-server per test.
//!
//! Sections: reply formats of every action; every errno; the order of checks; `relation`
//! coalescing; the 10-per-poll rule; the one-GM-per-player race; UTF-8 and `%2B`; messages
//! staying with their conversation; GS `online`; access control; request bounds; the
//! operational endpoints; repeated keys.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use serde_json::{json, Value};
use support::app::{b64, consumer_names, enc, Reply, TestApp};
use support::wait_until_async;

/// The exact body of every success without data, as Python's `json.dumps` wrote it.
const OK: &str = r#"{"res": 1}"#;

/// Non-canonical spellings of the id 5 (and other junk); every one must be errno -1.
const BAD_IDS: &[&str] = &[
    "005",
    "007",
    "+5",
    " 5",
    "5 ",
    "5.0",
    "*",
    ">",
    "a.b",
    "123456789012345678901234567890",
    "9223372036854775808",
    "-0",
    "",
];

// ---------------------------------------------------------------------------------------
// Helpers

/// Status 200 and `Content-Type: text/html` exactly, as every legacy reply but 404/414.
#[track_caller]
fn assert_legacy(r: &Reply) {
    assert_eq!(r.status, 200, "status of {}", r.text());
    assert_eq!(r.content_type, "text/html", "content type of {}", r.text());
    assert_no_script(r);
}

/// A browser may run nothing in a legacy reply: it shares the console's origin.
#[track_caller]
fn assert_no_script(r: &Reply) {
    let header =
        |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("<none>").to_owned();
    assert_eq!(header("content-security-policy"), "default-src 'none'; sandbox", "{}", r.text());
    assert_eq!(header("x-content-type-options"), "nosniff", "{}", r.text());
}

/// Exactly `{"res": 1}`.
#[track_caller]
fn assert_ok(r: &Reply) {
    assert_legacy(r);
    assert_eq!(r.text(), OK);
}

/// `{"res": 0, "errno": N}` plus optionally a string `error`, Python-formatted.
#[track_caller]
fn assert_errno(r: &Reply, errno: i64) {
    assert_legacy(r);
    assert_python_json(&r.body);
    let mut v = r.json();
    let obj = v.as_object_mut().expect("error reply is an object");
    if let Some(reason) = obj.remove("error") {
        assert!(reason.is_string(), "error is a string: {}", r.text());
    }
    assert_eq!(v, json!({"res": 0, "errno": errno}), "reply {}", r.text());
}

/// JSON as Python 2 `json.dumps` writes it: ASCII only, `", "` and `": "` separators, no
/// other whitespace outside strings. Key order is free.
#[track_caller]
fn assert_python_json(body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    assert!(body.is_ascii(), "JSON is ASCII only: {text}");
    let (mut in_string, mut escaped) = (false, false);
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b',' | b':' => assert_eq!(body.get(i + 1), Some(&b' '), "Python separator at byte {i} of {text}"),
            b' ' => assert!(i > 0 && matches!(body[i - 1], b',' | b':'), "stray space at byte {i} of {text}"),
            b'\t' | b'\n' | b'\r' => panic!("whitespace at byte {i} of {text}"),
            _ => {}
        }
    }
    assert!(!in_string, "unterminated string in {text}");
    serde_json::from_slice::<Value>(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
}

/// A base64 field of a reply, decoded to its raw bytes (the JSON inside).
#[track_caller]
fn field_raw(r: &Reply, field: &str) -> Vec<u8> {
    let v = r.json();
    let text = v[field].as_str().unwrap_or_else(|| panic!("no {field} in {}", r.text()));
    STANDARD.decode(text).expect("field is standard base64")
}

fn query(action: &str, params: &[(&str, &str)]) -> String {
    let mut q = format!("action={action}");
    for (k, v) in params {
        q.push_str(&format!("&{k}={}", enc(v)));
    }
    q
}

async fn gm_send_b64(app: &TestApp, gm: i64, uid: i64, msg: &str) -> Reply {
    app.gm(&format!("action=send&gm_account={gm}&uid={uid}&msg={}", enc(msg))).await
}

async fn gs_send_b64(app: &TestApp, uid: i64, msg: &str) -> Reply {
    app.gs(&format!("action=send&uid={uid}&msg={}", enc(msg))).await
}

/// GS `receive`: `[(uid, msg as sent on the wire, base64 joined by ",")]`.
async fn gs_receive_raw(app: &TestApp, host: i64) -> Vec<(String, String)> {
    let r = app.gs(&format!("action=receive&host={host}")).await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    assert_python_json(&field_raw(&r, "data"));
    assert_eq!(r.res(), 1, "{}", r.text());
    r.b64_json("data")
        .as_array()
        .expect("data is a list")
        .iter()
        .map(|e| {
            assert_eq!(e.as_object().unwrap().len(), 2, "only uid and msg: {e}");
            (
                e["uid"].as_str().expect("uid is a string").to_owned(),
                e["msg"].as_str().expect("msg is a string").to_owned(),
            )
        })
        .collect()
}

/// GM `receive`: `{gm: [(uid, raw joined msg)]}`.
async fn gm_receive_raw(app: &TestApp) -> BTreeMap<String, Vec<(String, String)>> {
    let r = app.gm("action=receive").await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    assert_python_json(&field_raw(&r, "data"));
    assert_eq!(r.res(), 1, "{}", r.text());
    r.b64_json("data")
        .as_object()
        .expect("data is an object")
        .iter()
        .map(|(gm, items)| {
            let items = items
                .as_array()
                .expect("a GM's entries are a list")
                .iter()
                .map(|e| {
                    (
                        e["uid"].as_str().expect("uid is a string").to_owned(),
                        e["msg"].as_str().expect("msg is a string").to_owned(),
                    )
                })
                .collect();
            (gm.clone(), items)
        })
        .collect()
}

/// GS `online`: the GM ids as a set.
async fn gs_online(app: &TestApp, host: i64) -> BTreeSet<String> {
    let r = app.gs(&format!("action=online&host={host}")).await;
    assert_legacy(&r);
    assert_eq!(r.res(), 1, "{}", r.text());
    r.b64_json("data")
        .as_array()
        .expect("data is a list")
        .iter()
        .map(|g| g.as_str().expect("GM ids are strings").to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

fn role_template(port: u16) -> String {
    format!("http://127.0.0.1:{port}/role?uid={{uid}}&hostnum={{host}}")
}

/// A role service on 127.0.0.1 answering every request with `status` and `body`, and
/// recording the path and query of each request.
struct RoleServer {
    template: String,
    calls: Arc<Mutex<Vec<String>>>,
}

impl RoleServer {
    async fn start(status: u16, body: &'static str) -> RoleServer {
        let gate = Arc::new(tokio::sync::Semaphore::new(tokio::sync::Semaphore::MAX_PERMITS));
        Self::start_gated(status, body, gate).await
    }

    /// Like [`RoleServer::start`], but each request is answered only once it takes a
    /// permit from `gate` (recorded on arrival, before waiting).
    async fn start_gated(status: u16, body: &'static str, gate: Arc<tokio::sync::Semaphore>) -> RoleServer {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let status = axum::http::StatusCode::from_u16(status).expect("status code");
        let router = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let seen = Arc::clone(&seen);
            let gate = Arc::clone(&gate);
            async move {
                seen.lock().unwrap().push(uri.to_string());
                gate.acquire().await.expect("gate open").forget();
                (status, body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind role server");
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await });
        RoleServer { template: role_template(port), calls }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

/// A server that accepts connections and never answers; returns its port.
async fn silent_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind silent server");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..16 {
            match listener.accept().await {
                Ok((socket, _)) => held.push(socket),
                Err(_) => break,
            }
        }
        // Keep the connections open, unanswered, until the test's runtime ends.
        std::future::pending::<()>().await;
        drop(held);
    });
    port
}

/// A direct Redis connection, to set up states only migrated (original-system) data can
/// have. Uses the relay's key layout documented in `src/adapters/redis.rs`.
async fn redis_conn(app: &TestApp) -> redis::aio::MultiplexedConnection {
    redis::Client::open(app.redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn redis_do(app: &TestApp, args: &[&str]) {
    let mut conn = redis_conn(app).await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query_async(&mut conn).await.expect("redis command");
}

// ---------------------------------------------------------------------------------------
// 1. Every action's reply

#[tokio::test]
async fn create_replies_exactly_res_1() {
    let app = TestApp::spawn().await;
    let r = app.gm(&query("create", &[("gm_account", "7"), ("gm_name", "Alice")])).await;
    assert_ok(&r);
}

#[tokio::test]
async fn add_replies_res_1_and_the_host_gets_an_apply() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    let r = app.gm(&query("add", &[("gm_account", "7"), ("host", "3"), ("uid", "1001")])).await;
    assert_ok(&r);

    let r = app.gs("action=relation&host=3").await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    let mut keys: Vec<_> = r.json().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["apply_data", "remove_data", "res"]);
    assert_eq!(r.res(), 1);
    assert_eq!(field_raw(&r, "apply_data"), br#"{"1001": ["7", "Alice"]}"#);
    assert_eq!(field_raw(&r, "remove_data"), b"[]");
}

#[tokio::test]
async fn del_replies_res_1_and_the_host_gets_a_remove() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    app.add(7, 3, 1002).await;
    assert_eq!(app.relation(3).await, (json!({"1001": ["7", "Alice"], "1002": ["7", "Alice"]}), json!([])));
    let r = app.gm(&query("del", &[("gm_account", "7"), ("uid", "1001")])).await;
    assert_ok(&r);
    let r = app.gs("action=relation&host=3").await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    assert_eq!(field_raw(&r, "apply_data"), b"{}");
    assert_eq!(field_raw(&r, "remove_data"), br#"["1001"]"#);
}

#[tokio::test]
async fn gm_online_replies_res_1_and_is_idempotent() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    for _ in 0..2 {
        assert_ok(&app.gm("action=online&gm_account=7").await);
    }
    assert_ok(&app.gm("action=offline&gm_account=7").await);
    assert_eq!(gs_online(&app, 3).await, set(&[]));
    for _ in 0..2 {
        assert_ok(&app.gm("action=online&gm_account=7").await);
        assert_eq!(gs_online(&app, 3).await, set(&["7"]));
    }
}

#[tokio::test]
async fn gm_offline_replies_res_1_then_exactly_res_0_without_errno() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    assert_ok(&app.gm("action=offline&gm_account=7").await);
    let again = app.gm("action=offline&gm_account=7").await;
    assert_legacy(&again);
    assert_eq!(again.text(), r#"{"res": 0}"#);
    // A GM that does not exist is not online either.
    let unknown = app.gm("action=offline&gm_account=99").await;
    assert_legacy(&unknown);
    assert_eq!(unknown.text(), r#"{"res": 0}"#);
}

#[tokio::test]
async fn gm_send_replies_res_1_and_the_host_receives_it() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_ok(&gm_send_b64(&app, 7, 1001, "aGVsbG8=").await);
    let r = app.gs("action=receive&host=3").await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    assert_eq!(
        field_raw(&r, "data"),
        br#"[{"uid": "1001", "msg": "aGVsbG8="}]"#.to_vec(),
        "data holds {}",
        String::from_utf8_lossy(&field_raw(&r, "data"))
    );
}

#[tokio::test]
async fn gm_receive_replies_messages_grouped_by_gm() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    app.add(8, 4, 2001).await;
    assert_ok(&gs_send_b64(&app, 1001, "aGk=").await);
    assert_ok(&gs_send_b64(&app, 2001, "eW8=").await);
    let r = app.gm("action=receive").await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    let mut keys: Vec<_> = r.json().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["data", "res"]);
    assert_python_json(&field_raw(&r, "data"));
    assert_eq!(
        r.b64_json("data"),
        json!({
            "7": [{"uid": "1001", "msg": "aGk="}],
            "8": [{"uid": "2001", "msg": "eW8="}],
        })
    );
}

#[tokio::test]
async fn gs_send_replies_res_1() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_ok(&gs_send_b64(&app, 1001, "aGk=").await);
    assert_eq!(
        gm_receive_raw(&app).await,
        BTreeMap::from([("7".to_owned(), vec![("1001".into(), "aGk=".into())])])
    );
}

#[tokio::test]
async fn gs_online_replies_base64_json_list_of_gm_ids() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    let r = app.gs("action=online&host=3").await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    assert_eq!(r.res(), 1);
    assert_eq!(field_raw(&r, "data"), br#"["7"]"#);
}

#[tokio::test]
async fn empty_polls_have_empty_python_containers() {
    let app = TestApp::spawn().await;
    let r = app.gs("action=relation&host=3").await;
    assert_legacy(&r);
    assert_python_json(&r.body);
    assert_eq!(field_raw(&r, "apply_data"), b"{}");
    assert_eq!(field_raw(&r, "remove_data"), b"[]");
    let r = app.gs("action=receive&host=3").await;
    assert_legacy(&r);
    assert_eq!(r.text(), format!(r#"{{"res": 1, "data": "{}"}}"#, STANDARD.encode("[]")));
    let r = app.gs("action=online&host=3").await;
    assert_legacy(&r);
    assert_eq!(r.text(), format!(r#"{{"res": 1, "data": "{}"}}"#, STANDARD.encode("[]")));
    let r = app.gm("action=receive").await;
    assert_legacy(&r);
    assert_eq!(r.text(), format!(r#"{{"res": 1, "data": "{}"}}"#, STANDARD.encode("{}")));
}

#[tokio::test]
async fn polls_for_hosts_nothing_was_sent_to_leave_no_consumer_behind() {
    let app = TestApp::spawn().await;
    let js = app.jetstream().await;
    // A misconfigured game server polls host ids nobody ever sent anything to: each poll
    // is answered, empty, and leaves nothing in JetStream.
    for host in 5000..5020 {
        assert_eq!(app.gs_receive(host).await, vec![], "host {host}");
        assert_eq!(app.relation(host).await, (json!({}), json!([])), "host {host}");
    }
    assert_eq!(consumer_names(&js, "GM_TO_HOST").await, BTreeSet::new());

    // Once a host has a player, its next polls serve everything sent to it.
    app.create_gm(7, "Alice").await;
    app.add(7, 5000, 1001).await;
    // Well under the relay's 5 s recheck of a host found empty (host 5000 was, just now):
    // the publish through this relay ends that wait at once.
    wait_until_async(Duration::from_secs(2), "the host hears of its new player", || async {
        app.relation(5000).await.0.get("1001").is_some()
    })
    .await;
    assert_eq!(app.gm_send(7, 1001, "hi").await.res(), 1);
    assert_eq!(app.gs_receive(5000).await, vec![("1001".to_owned(), vec!["hi".to_owned()])]);
    let expected: BTreeSet<String> =
        ["host_5000", "legacy_chat_5000", "legacy_rel_5000"].into_iter().map(str::to_owned).collect();
    assert_eq!(consumer_names(&js, "GM_TO_HOST").await, expected);
}

// ---------------------------------------------------------------------------------------
// 2. Every errno

/// One legacy request: its side, action, parameters (decoded values) and which of them
/// are ids.
struct Request {
    side: &'static str,
    action: &'static str,
    params: Vec<(&'static str, &'static str)>,
    ids: &'static [&'static str],
}

fn req(
    side: &'static str,
    action: &'static str,
    params: &[(&'static str, &'static str)],
    ids: &'static [&'static str],
) -> Request {
    Request { side, action, params: params.to_vec(), ids }
}

impl Request {
    fn path(&self, params: &[(&str, &str)]) -> String {
        format!("/{}?{}", self.side, query(self.action, params))
    }
}

/// Every action with a full, valid parameter set against the state set up in
/// `missing_parameter_is_errno_minus_1_for_every_required_parameter`.
fn full_requests() -> Vec<Request> {
    vec![
        req("gm", "create", &[("gm_account", "8"), ("gm_name", "Bob")], &["gm_account"]),
        req(
            "gm",
            "add",
            &[("gm_account", "7"), ("host", "3"), ("uid", "1002")],
            &["gm_account", "host", "uid"],
        ),
        req("gm", "del", &[("gm_account", "7"), ("uid", "1001")], &["gm_account", "uid"]),
        req("gm", "online", &[("gm_account", "7")], &["gm_account"]),
        req("gm", "offline", &[("gm_account", "7")], &["gm_account"]),
        req("gm", "send", &[("gm_account", "7"), ("uid", "1001"), ("msg", "aGk=")], &["gm_account", "uid"]),
        req("gs", "relation", &[("host", "3")], &["host"]),
        req("gs", "send", &[("uid", "1001"), ("msg", "aGk=")], &["uid"]),
        req("gs", "receive", &[("host", "3")], &["host"]),
        req("gs", "online", &[("host", "3")], &["host"]),
    ]
}

#[tokio::test]
async fn missing_parameter_is_errno_minus_1_for_every_required_parameter() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    let mut cases = 0;
    for request in full_requests() {
        for missing in 0..request.params.len() {
            let rest: Vec<_> =
                request.params.iter().enumerate().filter(|(i, _)| *i != missing).map(|(_, p)| *p).collect();
            let r = app.get(&request.path(&rest)).await;
            assert_eq!(
                r.errno(),
                Some(-1),
                "{} {} without {}",
                request.side,
                request.action,
                request.params[missing].0
            );
            assert_errno(&r, -1);
            cases += 1;
        }
    }
    assert_eq!(cases, 17);
    // Nothing happened: no GM 8, uid 1002 free, 1001 still befriended, no message sent.
    assert_eq!(app.relation(3).await, (json!({"1001": ["7", "Alice"]}), json!([])));
    assert_eq!(gs_receive_raw(&app, 3).await, vec![]);
    assert!(gm_receive_raw(&app).await.is_empty());
    assert_eq!(gs_online(&app, 3).await, set(&["7"]));
    app.create_gm(8, "Bob").await;
    app.add(8, 3, 1002).await;
}

#[tokio::test]
async fn non_canonical_ids_are_errno_minus_1_on_every_action() {
    let app = TestApp::spawn().await;
    // Everything is 5, so a lenient parse of "005" or "+5" would hit real state.
    app.create_gm(5, "Five").await;
    app.add(5, 5, 5).await;
    assert_eq!(app.relation(5).await, (json!({"5": ["5", "Five"]}), json!([])));
    let requests = vec![
        req("gm", "create", &[("gm_account", "5"), ("gm_name", "X")], &["gm_account"]),
        req("gm", "add", &[("gm_account", "5"), ("host", "5"), ("uid", "6")], &["gm_account", "host", "uid"]),
        req("gm", "del", &[("gm_account", "5"), ("uid", "5")], &["gm_account", "uid"]),
        req("gm", "online", &[("gm_account", "5")], &["gm_account"]),
        req("gm", "offline", &[("gm_account", "5")], &["gm_account"]),
        req("gm", "send", &[("gm_account", "5"), ("uid", "5"), ("msg", "aGk=")], &["gm_account", "uid"]),
        req("gs", "relation", &[("host", "5")], &["host"]),
        req("gs", "send", &[("uid", "5"), ("msg", "aGk=")], &["uid"]),
        req("gs", "receive", &[("host", "5")], &["host"]),
        req("gs", "online", &[("host", "5")], &["host"]),
    ];
    let mut cases = 0;
    for request in &requests {
        let (side, action) = (request.side, request.action);
        for id in request.ids {
            for bad in BAD_IDS {
                let params: Vec<(&str, &str)> =
                    request.params.iter().map(|&(k, v)| if k == *id { (k, *bad) } else { (k, v) }).collect();
                let r = app.get(&request.path(&params)).await;
                assert_legacy(&r);
                assert_eq!(r.errno(), Some(-1), "{side} {action} with {id}={bad:?}: {}", r.text());
                assert_errno(&r, -1);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 14 * BAD_IDS.len());
    // Nothing happened: uid 5 still GM 5's, uid 6 free, no chat, GM 5 still online.
    assert_eq!(app.relation(5).await, (json!({}), json!([])));
    assert_eq!(gs_receive_raw(&app, 5).await, vec![]);
    assert!(gm_receive_raw(&app).await.is_empty());
    assert_eq!(gs_online(&app, 5).await, set(&["5"]));
    assert_ok(&app.gm("action=add&gm_account=5&host=5&uid=6").await);
    assert_errno(&app.gm("action=create&gm_account=5&gm_name=X").await, 1);
}

#[tokio::test]
async fn canonical_extremes_of_i64_are_accepted() {
    let app = TestApp::spawn().await;
    let max = i64::MAX;
    let min = i64::MIN;
    app.create_gm(min, "Min").await;
    app.add(min, max, 0).await;
    app.add(min, 0, max).await;
    assert_eq!(app.relation(max).await, (json!({"0": [min.to_string(), "Min"]}), json!([])));
    assert_eq!(app.relation(0).await, (json!({max.to_string(): [min.to_string(), "Min"]}), json!([])));
}

#[tokio::test]
async fn gm_name_must_be_1_to_64_utf8_characters() {
    let app = TestApp::spawn().await;
    let cases: [(&str, String); 6] = [
        ("empty", String::new()),
        ("not UTF-8", "%ff".into()),
        ("not UTF-8 after the second decode", "%25ff".into()),
        ("truncated UTF-8", "%E5%BC".into()),
        ("65 ASCII characters", "x".repeat(65)),
        ("65 Chinese characters", enc(&"张".repeat(65))),
    ];
    for (i, (what, raw)) in cases.iter().enumerate() {
        let r = app.gm(&format!("action=create&gm_account={}&gm_name={raw}", 100 + i)).await;
        assert_eq!(r.errno(), Some(-1), "{what}: {}", r.text());
        assert_errno(&r, -1);
    }
    // None of them was created.
    for i in 0..cases.len() {
        assert_errno(&app.gm(&format!("action=online&gm_account={}", 100 + i)).await, 2);
    }
    // 64 characters is the limit, counted in characters, not bytes.
    app.create_gm(1, &"x".repeat(64)).await;
    app.create_gm(2, &"张".repeat(64)).await;
    app.add(2, 3, 1001).await;
    assert_eq!(app.relation(3).await.0, json!({"1001": ["2", "张".repeat(64)]}));
}

#[tokio::test]
async fn create_of_an_existing_gm_is_errno_1() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    assert_errno(&app.gm("action=create&gm_account=7&gm_name=Alice").await, 1);
    assert_errno(&app.gm("action=create&gm_account=7&gm_name=Eve").await, 1);
    // The name did not change.
    app.add(7, 3, 1001).await;
    assert_eq!(app.relation(3).await.0, json!({"1001": ["7", "Alice"]}));
}

#[tokio::test]
async fn unknown_gm_is_errno_2_for_add_del_and_online() {
    let app = TestApp::spawn().await;
    assert_errno(&app.gm("action=add&gm_account=9&host=3&uid=1001").await, 2);
    assert_errno(&app.gm("action=add&gm_account=9&host=1000&uid=1001").await, 2);
    assert_errno(&app.gm("action=del&gm_account=9&uid=1001").await, 2);
    assert_errno(&app.gm("action=online&gm_account=9").await, 2);
    // `online` did not create it.
    assert_errno(&app.gm("action=online&gm_account=9").await, 2);
}

#[tokio::test]
async fn add_of_a_player_who_has_a_gm_is_errno_3() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    assert_errno(&app.gm("action=add&gm_account=8&host=3&uid=1001").await, 3);
    assert_errno(&app.gm("action=add&gm_account=8&host=4&uid=1001").await, 3);
    assert_errno(&app.gm("action=add&gm_account=7&host=3&uid=1001").await, 3);
    assert_eq!(app.relation(3).await, (json!({"1001": ["7", "Alice"]}), json!([])));
    assert_eq!(app.relation(4).await, (json!({}), json!([])));
}

#[tokio::test]
async fn del_of_a_player_of_another_gm_or_of_none_is_errno_5() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    assert_errno(&app.gm("action=del&gm_account=8&uid=1001").await, 5);
    assert_errno(&app.gm("action=del&gm_account=8&uid=4242").await, 5);
    app.gm("action=del&gm_account=7&uid=1001").await;
    assert_errno(&app.gm("action=del&gm_account=7&uid=1001").await, 5);
}

/// Errno 4 on `del` needs a player whose GM is this GM but who is missing from the GM's
/// friend set: a state the relay never makes itself, but data migrated from the original
/// system (whose check-then-set races left such leftovers) can hold.
#[tokio::test]
async fn del_of_a_player_missing_from_the_gms_friends_is_errno_4() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    redis_do(&app, &["SREM", "gmr:gm:7:friends", "1001"]).await;
    assert_errno(&app.gm("action=del&gm_account=7&uid=1001").await, 4);
}

#[tokio::test]
async fn gm_send_to_a_player_not_befriended_is_errno_4() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(8, 3, 1001).await;
    // Nobody's player, another GM's player, an unknown GM: not in the GM's friends → 4,
    // the protocol's first check for `send` (as in the original).
    assert_errno(&gm_send_b64(&app, 7, 4242, "aGk=").await, 4);
    assert_errno(&gm_send_b64(&app, 7, 1001, "aGk=").await, 4);
    assert_errno(&gm_send_b64(&app, 99, 1001, "aGk=").await, 4);
    // After a `del` the player is no longer a friend.
    app.create_gm(9, "Carol").await;
    app.add(9, 3, 1002).await;
    assert_ok(&app.gm("action=del&gm_account=9&uid=1002").await);
    assert_errno(&gm_send_b64(&app, 9, 1002, "aGk=").await, 4);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![]);
}

/// Errno 5 on GM `send`: the player is in this GM's friend set but belongs to another GM.
/// Only migrated data can hold this (the original let two GMs win one player).
#[tokio::test]
async fn gm_send_to_a_friend_owned_by_another_gm_is_errno_5() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(8, 3, 1001).await;
    redis_do(&app, &["SADD", "gmr:gm:7:friends", "1001"]).await;
    assert_errno(&gm_send_b64(&app, 7, 1001, "aGk=").await, 5);
    // And a friend-set entry for a player with no GM at all.
    redis_do(&app, &["SADD", "gmr:gm:7:friends", "4242"]).await;
    assert_errno(&gm_send_b64(&app, 7, 4242, "aGk=").await, 5);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![]);
}

#[tokio::test]
async fn gs_send_for_a_player_without_gm_is_errno_5() {
    let app = TestApp::spawn().await;
    assert_errno(&gs_send_b64(&app, 4242, "aGk=").await, 5);
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    app.gm("action=del&gm_account=7&uid=1001").await;
    assert_errno(&gs_send_b64(&app, 1001, "aGk=").await, 5);
    assert!(gm_receive_raw(&app).await.is_empty());
}

/// `msg` values that must be refused with errno 6, as they travel (percent-encoded).
fn bad_msgs() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("unpadded", "aGk".into()),
        ("non-canonical trailing bits", enc("aGl=")),
        ("url-safe alphabet '-'", URL_SAFE.encode(">>>")),
        ("url-safe alphabet '_'", URL_SAFE.encode("???")),
        ("valid base64 of a non-UTF-8 byte", enc(&STANDARD.encode([0xff]))),
        ("trailing newline", enc("aGk=\n")),
        ("not base64 at all", "hello!".into()),
        ("501 characters", enc(&b64(&"x".repeat(501)))),
        ("501 Chinese characters", enc(&b64(&"中".repeat(501)))),
    ]
}

#[tokio::test]
async fn gm_send_bad_msg_is_errno_6() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    for (what, raw) in bad_msgs() {
        let r = app.gm(&format!("action=send&gm_account=7&uid=1001&msg={raw}")).await;
        assert_eq!(r.errno(), Some(6), "{what}: {}", r.text());
        assert_errno(&r, 6);
    }
    assert_eq!(gs_receive_raw(&app, 3).await, vec![]);
}

#[tokio::test]
async fn gs_send_bad_msg_is_errno_6() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    for (what, raw) in bad_msgs() {
        let r = app.gs(&format!("action=send&uid=1001&msg={raw}")).await;
        assert_eq!(r.errno(), Some(6), "{what}: {}", r.text());
        assert_errno(&r, 6);
    }
    assert!(gm_receive_raw(&app).await.is_empty());
}

#[tokio::test]
async fn msg_of_exactly_500_characters_is_accepted_both_ways() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    let texts = ["x".repeat(500), "中".repeat(500), "😀".repeat(500)];
    for text in &texts {
        assert_ok(&app.gm_send(7, 1001, text).await);
        assert_ok(&app.gs_send(1001, text).await);
    }
    let expected: Vec<String> = texts.iter().map(|t| b64(t)).collect();
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), expected.join(","))]);
    assert_eq!(
        gm_receive_raw(&app).await,
        BTreeMap::from([("7".to_owned(), vec![("1001".into(), expected.join(","))])])
    );
}

// Role service (`add` on hosts ≥ 1000).

#[tokio::test]
async fn role_service_code_1_allows_add_and_gets_uid_and_host() {
    let role = RoleServer::start(200, r#"{"code": 1, "name": "someone"}"#).await;
    let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
    app.create_gm(7, "Alice").await;
    assert_ok(&app.gm("action=add&gm_account=7&host=1000&uid=1001").await);
    assert_ok(&app.gm("action=add&gm_account=7&host=2345&uid=-77").await);
    assert_eq!(role.calls(), ["/role?uid=1001&hostnum=1000", "/role?uid=-77&hostnum=2345"]);
    assert_eq!(app.relation(1000).await, (json!({"1001": ["7", "Alice"]}), json!([])));
}

#[tokio::test]
async fn role_service_code_not_1_is_errno_4() {
    let role = RoleServer::start(200, r#"{"code": 0}"#).await;
    let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
    app.create_gm(7, "Alice").await;
    assert_errno(&app.gm("action=add&gm_account=7&host=1000&uid=1001").await, 4);
    assert_eq!(role.calls(), ["/role?uid=1001&hostnum=1000"]);
    // Nothing was added: the uid is still free and the host hears nothing.
    assert_eq!(app.relation(1000).await, (json!({}), json!([])));
    assert_errno(&app.gm("action=del&gm_account=7&uid=1001").await, 5);
}

#[tokio::test]
async fn role_service_non_object_json_is_errno_4() {
    for body in ["[1]", "1", "\"code\"", "null", r#"{"code": "1"}"#, "{}"] {
        let role = RoleServer::start(200, body).await;
        let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
        app.create_gm(7, "Alice").await;
        let r = app.gm("action=add&gm_account=7&host=1000&uid=1001").await;
        assert_eq!(r.errno(), Some(4), "role reply {body}: {}", r.text());
        assert_errno(&r, 4);
    }
}

#[tokio::test]
async fn role_service_down_is_errno_7() {
    let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role_template(closed_port()))]).await;
    app.create_gm(7, "Alice").await;
    assert_errno(&app.gm("action=add&gm_account=7&host=1000&uid=1001").await, 7);
    assert_eq!(app.relation(1000).await, (json!({}), json!([])));
}

#[tokio::test]
async fn role_service_too_slow_is_errno_7_within_the_timeout() {
    let port = silent_server().await;
    let app = TestApp::spawn_with(&[
        ("GM_RELAY_ROLE_INFO_URL", &role_template(port)),
        ("GM_RELAY_ROLE_TIMEOUT_MS", "200"),
    ])
    .await;
    app.create_gm(7, "Alice").await;
    let started = Instant::now();
    let r = app.gm("action=add&gm_account=7&host=1000&uid=1001").await;
    let took = started.elapsed();
    assert_errno(&r, 7);
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert!(took >= Duration::from_millis(150), "answered after {took:?}: before the role timeout?");
}

#[tokio::test]
async fn role_service_non_2xx_is_errno_7() {
    for status in [500, 404, 302] {
        let role = RoleServer::start(status, r#"{"code": 1}"#).await;
        let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
        app.create_gm(7, "Alice").await;
        let r = app.gm("action=add&gm_account=7&host=1000&uid=1001").await;
        assert_eq!(r.errno(), Some(7), "role status {status}: {}", r.text());
        assert_errno(&r, 7);
        assert!(!role.calls().is_empty());
    }
}

#[tokio::test]
async fn role_service_non_json_is_errno_7() {
    for body in ["ok", "", "<html>code 1</html>", "{\"code\": 1"] {
        let role = RoleServer::start(200, body).await;
        let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
        app.create_gm(7, "Alice").await;
        let r = app.gm("action=add&gm_account=7&host=1000&uid=1001").await;
        assert_eq!(r.errno(), Some(7), "role reply {body:?}: {}", r.text());
        assert_errno(&r, 7);
    }
}

#[tokio::test]
async fn role_service_is_asked_only_for_hosts_from_1000() {
    let role = RoleServer::start(200, r#"{"code": 0}"#).await;
    let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
    app.create_gm(7, "Alice").await;
    assert_ok(&app.gm("action=add&gm_account=7&host=999&uid=1001").await);
    assert_ok(&app.gm("action=add&gm_account=7&host=-5&uid=1002").await);
    assert_ok(&app.gm("action=add&gm_account=7&host=0&uid=1003").await);
    assert!(role.calls().is_empty(), "asked: {:?}", role.calls());
}

/// `add` checks, asks the role service, then claims in one script that checks again: a
/// GM who takes the player while the role service is thinking wins, the other gets 3.
#[tokio::test]
async fn add_rechecks_the_uid_after_the_role_service_answers() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let role = RoleServer::start_gated(200, r#"{"code": 1}"#, Arc::clone(&gate)).await;
    let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    let slow_add = app.gm("action=add&gm_account=7&host=1000&uid=1001");
    let meanwhile = async {
        wait_until_async(Duration::from_secs(5), "the role service is asked", || {
            let asked = !role.calls().is_empty();
            async move { asked }
        })
        .await;
        let r = app.gm("action=add&gm_account=8&host=3&uid=1001").await;
        gate.add_permits(1);
        r
    };
    let (slow, fast) = tokio::join!(slow_add, meanwhile);
    assert_ok(&fast);
    assert_errno(&slow, 3);
    assert_eq!(app.relation(3).await, (json!({"1001": ["8", "Bob"]}), json!([])));
    assert_eq!(app.relation(1000).await, (json!({}), json!([])));
}

#[tokio::test]
async fn host_999_works_while_the_role_service_is_down() {
    let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role_template(closed_port()))]).await;
    app.create_gm(7, "Alice").await;
    assert_ok(&app.gm("action=add&gm_account=7&host=999&uid=1001").await);
    assert_errno(&app.gm("action=add&gm_account=7&host=1000&uid=1002").await, 7);
    assert_eq!(app.relation(999).await, (json!({"1001": ["7", "Alice"]}), json!([])));
}

// ---------------------------------------------------------------------------------------
// 3. Order of checks

#[tokio::test]
async fn denied_ip_beats_unknown_action() {
    let app =
        TestApp::spawn_with(&[("GM_RELAY_GM_ALLOW", "10.9.9.9"), ("GM_RELAY_GS_ALLOW", "10.9.9.9")]).await;
    for path in ["/gm?action=nope", "/gs?action=nope", "/gm", "/gs?action=relation"] {
        let r = app.get(path).await;
        assert_legacy(&r);
        assert_eq!(r.text(), "127.0.0.1 has no access to the website", "{path}");
    }
}

#[tokio::test]
async fn unknown_or_missing_action_is_404_err_action() {
    let app = TestApp::spawn().await;
    let cases = [
        ("/gm?action=nope", "err action nope"),
        ("/gs?action=nope&host=3", "err action nope"),
        ("/gm", "err action "),
        ("/gm?", "err action "),
        ("/gs?host=3", "err action "),
        ("/gm?action=", "err action "),
        // Each side knows only its own actions.
        ("/gm?action=relation&host=3", "err action relation"),
        ("/gs?action=create&gm_account=7&gm_name=x", "err action create"),
        ("/gs?action=add", "err action add"),
        // Keys are case-sensitive, values too.
        ("/gm?action=Create&gm_account=7&gm_name=x", "err action Create"),
        ("/gm?Action=create&gm_account=7&gm_name=x", "err action "),
        // The echo is text, never markup: the console shares this origin.
        (
            "/gm?action=%3Cscript%3Ealert(%22x%22)%3C/script%3E",
            "err action &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;",
        ),
        ("/gs?action=a%26b%27c", "err action a&amp;b&#39;c"),
    ];
    for (path, body) in cases {
        let r = app.get(path).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(r.content_type, "text/html", "{path}");
        assert_eq!(r.text(), body, "{path}");
        assert_no_script(&r);
    }
    // None of them created GM 7.
    assert_errno(&app.gm("action=online&gm_account=7").await, 2);
}

#[tokio::test]
async fn missing_parameter_beats_the_actions_own_checks() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    // Would be 2 (no GM 9), 3 (uid taken), 4 (not a friend), 5 (no GM), 1 (exists).
    assert_errno(&app.gm("action=add&gm_account=9&host=3").await, -1);
    assert_errno(&app.gm("action=add&gm_account=8&uid=1001").await, -1);
    assert_errno(&app.gm("action=send&gm_account=7&uid=4242").await, -1);
    assert_errno(&app.gs("action=send&uid=4242").await, -1);
    assert_errno(&app.gm("action=create&gm_account=7").await, -1);
    assert_errno(&app.gm("action=del&gm_account=9").await, -1);
}

#[tokio::test]
async fn bad_id_beats_the_actions_own_checks() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    // With valid ids and names these would be 2 (no GM 9), 3 (uid taken), 1 (GM exists).
    assert_errno(&app.gm("action=add&gm_account=09&host=3&uid=2").await, -1);
    assert_errno(&app.gm("action=add&gm_account=7&host=3&uid=01001").await, -1);
    assert_errno(&app.gm("action=create&gm_account=7&gm_name=").await, -1);
    // A bad id beats the bad msg too: 4 (not a friend) with a good id, -1 with a bad one.
    assert_errno(&app.gm("action=send&gm_account=7&uid=4242&msg=*").await, 4);
    assert_errno(&app.gm("action=send&gm_account=7&uid=4242x&msg=*").await, -1);
    // And GS send: 5 (no GM) with a good id, -1 with a bad one.
    assert_errno(&app.gs("action=send&uid=4242&msg=*").await, 5);
    assert_errno(&app.gs("action=send&uid=%2B4242&msg=*").await, -1);
}

#[tokio::test]
async fn gm_send_not_friend_4_and_wrong_gm_5_beat_bad_msg_6() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    app.add(8, 3, 2001).await;
    // Not a friend: 4 whatever the msg.
    assert_errno(&app.gm("action=send&gm_account=7&uid=4242&msg=").await, 4);
    assert_errno(&app.gm("action=send&gm_account=7&uid=2001&msg=%%%").await, 4);
    // In the friend set but owned by another GM (migrated data): 5 whatever the msg.
    redis_do(&app, &["SADD", "gmr:gm:7:friends", "2001"]).await;
    assert_errno(&app.gm("action=send&gm_account=7&uid=2001&msg=").await, 5);
    // Only when both pass does the msg count.
    assert_errno(&app.gm("action=send&gm_account=7&uid=1001&msg=").await, 6);
    assert_errno(&app.gm("action=send&gm_account=7&uid=1001&msg=aGk").await, 6);
}

#[tokio::test]
async fn gs_send_no_gm_5_beats_bad_msg_6() {
    let app = TestApp::spawn().await;
    assert_errno(&app.gs("action=send&uid=4242&msg=").await, 5);
    assert_errno(&app.gs("action=send&uid=4242&msg=aGk").await, 5);
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 4242).await;
    assert_errno(&app.gs("action=send&uid=4242&msg=aGk").await, 6);
}

#[tokio::test]
async fn add_checks_gm_2_then_uid_taken_3_then_role_service() {
    let role = RoleServer::start(200, r#"{"code": 0}"#).await;
    let app = TestApp::spawn_with(&[("GM_RELAY_ROLE_INFO_URL", &role.template)]).await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    // GM missing and uid taken: 2.
    assert_errno(&app.gm("action=add&gm_account=9&host=3&uid=1001").await, 2);
    assert_errno(&app.gm("action=add&gm_account=9&host=1000&uid=1001").await, 2);
    // uid taken, on a role-checked host: 3, and the role service is not asked.
    assert_errno(&app.gm("action=add&gm_account=8&host=1000&uid=1001").await, 3);
    assert!(role.calls().is_empty(), "asked: {:?}", role.calls());
    // Both pass: now the role service decides.
    assert_errno(&app.gm("action=add&gm_account=8&host=1000&uid=1002").await, 4);
    assert_eq!(role.calls(), ["/role?uid=1002&hostnum=1000"]);
}

#[tokio::test]
async fn del_checks_gm_2_before_owner_5() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_errno(&app.gm("action=del&gm_account=9&uid=1001").await, 2);
    assert_errno(&app.gm("action=del&gm_account=9&uid=4242").await, 2);
}

// ---------------------------------------------------------------------------------------
// 4. `relation` coalescing

#[tokio::test]
async fn relation_add_then_del_before_a_poll_is_remove_only() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    assert_eq!(app.relation(3).await, (json!({}), json!(["1001"])));
    assert_eq!(app.relation(3).await, (json!({}), json!([])));
}

#[tokio::test]
async fn relation_del_then_add_by_the_same_gm_is_apply_only() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_eq!(app.relation(3).await.0, json!({"1001": ["7", "Alice"]}));
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    app.add(7, 3, 1001).await;
    assert_eq!(app.relation(3).await, (json!({"1001": ["7", "Alice"]}), json!([])));
    assert_eq!(app.relation(3).await, (json!({}), json!([])));
}

#[tokio::test]
async fn relation_del_then_add_by_another_gm_is_apply_with_the_current_gm() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    assert_eq!(app.relation(3).await.0, json!({"1001": ["7", "Alice"]}));
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    app.add(8, 3, 1001).await;
    assert_eq!(app.relation(3).await, (json!({"1001": ["8", "Bob"]}), json!([])));
    // Several flips before one poll: the latest wins.
    assert_ok(&app.gm("action=del&gm_account=8&uid=1001").await);
    app.add(7, 3, 1001).await;
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    app.add(8, 3, 1001).await;
    assert_eq!(app.relation(3).await, (json!({"1001": ["8", "Bob"]}), json!([])));
    assert_eq!(app.relation(3).await, (json!({}), json!([])));
}

#[tokio::test]
async fn relation_re_add_on_another_host_tells_both_hosts() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    assert_eq!(app.relation(3).await.0, json!({"1001": ["7", "Alice"]}));
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    app.add(8, 4, 1001).await;
    // The original dropped host 3's pending remove here; the relay still tells it.
    assert_eq!(app.relation(3).await, (json!({}), json!(["1001"])));
    assert_eq!(app.relation(4).await, (json!({"1001": ["8", "Bob"]}), json!([])));
    assert_eq!(app.relation(3).await, (json!({}), json!([])));
    assert_eq!(app.relation(4).await, (json!({}), json!([])));
}

#[tokio::test]
async fn relation_move_to_another_host_before_any_poll() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    app.add(7, 4, 1001).await;
    assert_eq!(app.relation(3).await, (json!({}), json!(["1001"])));
    assert_eq!(app.relation(4).await, (json!({"1001": ["7", "Alice"]}), json!([])));
}

#[tokio::test]
async fn relation_of_many_players_and_hosts() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    for uid in 1..=5 {
        app.add(7, 3, uid).await;
    }
    app.add(7, 4, 6).await;
    for uid in [2, 4] {
        assert_ok(&app.gm(&format!("action=del&gm_account=7&uid={uid}")).await);
    }
    assert_eq!(
        app.relation(3).await,
        (json!({"1": ["7", "Alice"], "3": ["7", "Alice"], "5": ["7", "Alice"]}), json!(["2", "4"]))
    );
    assert_eq!(app.relation(4).await, (json!({"6": ["7", "Alice"]}), json!([])));
    assert_eq!(app.relation(5).await, (json!({}), json!([])));
}

#[tokio::test]
async fn relation_ignores_presence_and_chat_and_chat_ignores_friend_events() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_ok(&app.gm("action=offline&gm_account=7").await);
    assert_ok(&app.gm("action=online&gm_account=7").await);
    assert_ok(&app.gm_send(7, 1001, "hi").await);
    assert_eq!(app.relation(3).await, (json!({"1001": ["7", "Alice"]}), json!([])));
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), b64("hi"))]);
    assert_eq!(app.relation(3).await, (json!({}), json!([])));
    assert_eq!(gs_receive_raw(&app, 3).await, vec![]);
}

// ---------------------------------------------------------------------------------------
// 5. Ten messages per uid per poll

#[tokio::test]
async fn gs_receive_gives_10_per_uid_per_poll_oldest_first() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    app.add(7, 3, 1002).await;
    let sent: Vec<String> = (0..25).map(|i| b64(&format!("to 1001 #{i:02}"))).collect();
    let other: Vec<String> = (0..3).map(|i| b64(&format!("to 1002 #{i}"))).collect();
    for (i, msg) in sent.iter().enumerate() {
        assert_ok(&gm_send_b64(&app, 7, 1001, msg).await);
        if i % 8 == 3 {
            assert_ok(&gm_send_b64(&app, 7, 1002, &other[i / 8]).await);
        }
    }
    let first = gs_receive_raw(&app, 3).await;
    assert_eq!(
        first,
        vec![("1001".to_owned(), sent[0..10].join(",")), ("1002".to_owned(), other.join(",")),]
    );
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), sent[10..20].join(","))]);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), sent[20..25].join(","))]);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![]);
}

#[tokio::test]
async fn gm_receive_gives_10_per_conversation_per_poll_oldest_first() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    app.add(8, 4, 2001).await;
    app.add(7, 4, 1002).await;
    let sent: Vec<String> = (0..25).map(|i| b64(&format!("from 1001 #{i:02}"))).collect();
    let other: Vec<String> = (0..3).map(|i| b64(&format!("from 2001 #{i}"))).collect();
    for (i, msg) in sent.iter().enumerate() {
        assert_ok(&gs_send_b64(&app, 1001, msg).await);
        if i % 8 == 3 {
            assert_ok(&gs_send_b64(&app, 2001, &other[i / 8]).await);
        }
        if i == 20 {
            assert_ok(&gs_send_b64(&app, 1002, &b64("late")).await);
        }
    }
    assert_eq!(
        gm_receive_raw(&app).await,
        BTreeMap::from([
            (
                "7".to_owned(),
                vec![("1001".to_owned(), sent[0..10].join(",")), ("1002".to_owned(), b64("late")),]
            ),
            ("8".to_owned(), vec![("2001".to_owned(), other.join(","))]),
        ])
    );
    assert_eq!(
        gm_receive_raw(&app).await,
        BTreeMap::from([("7".to_owned(), vec![("1001".to_owned(), sent[10..20].join(","))])])
    );
    assert_eq!(
        gm_receive_raw(&app).await,
        BTreeMap::from([("7".to_owned(), vec![("1001".to_owned(), sent[20..25].join(","))])])
    );
    assert!(gm_receive_raw(&app).await.is_empty());
}

#[tokio::test]
async fn gs_receive_serves_only_its_own_host() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    app.add(7, 4, 1002).await;
    assert_ok(&app.gm_send(7, 1001, "for host 3").await);
    assert_ok(&app.gm_send(7, 1002, "for host 4").await);
    assert_eq!(gs_receive_raw(&app, 4).await, vec![("1002".to_owned(), b64("for host 4"))]);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), b64("for host 3"))]);
    assert_eq!(gs_receive_raw(&app, 5).await, vec![]);
}

/// Sends `count` distinct messages to `uid` from GM `gm`, 50 at a time; returns them.
async fn flood_gm_to_player(app: &TestApp, gm: i64, uid: i64, count: usize) -> Vec<String> {
    let msgs: Vec<String> = (0..count).map(|i| b64(&format!("flood {i}"))).collect();
    for chunk in msgs.chunks(50) {
        let sends = chunk.iter().map(|m| async move { gm_send_b64(app, gm, uid, m).await });
        for r in futures::future::join_all(sends).await {
            assert_ok(&r);
        }
    }
    msgs
}

/// As the original (one Redis list per uid, up to 10 popped per uid per poll): a player
/// with a long backlog does not delay the other players of the host. The relay fetches
/// at most 1,000 events per poll and naks a uid's surplus to the front of the feed, so a
/// backlog of over 1,000 messages of one uid fills every fetch and holds back everyone
/// queued behind it for about backlog/10 polls.
#[tokio::test]
async fn gs_receive_one_players_backlog_does_not_hold_back_other_players() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    app.add(7, 3, 1002).await;
    flood_gm_to_player(&app, 7, 1001, 1001).await;
    assert_ok(&app.gm_send(7, 1002, "me too").await);
    let first = gs_receive_raw(&app, 3).await;
    let counts: Vec<(&str, usize)> = first.iter().map(|(u, m)| (u.as_str(), m.split(',').count())).collect();
    assert_eq!(counts, [("1001", 10), ("1002", 1)], "first poll after a 1,001-message backlog");
}

/// The same on the GM side, where it is worse: GM `receive` is one feed for all GMs, so
/// one player's backlog of over 1,000 messages holds back every GM's chat.
#[tokio::test]
async fn gm_receive_one_players_backlog_does_not_hold_back_other_gms() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    app.add(8, 3, 2001).await;
    let msgs: Vec<String> = (0..1001).map(|i| b64(&format!("flood {i}"))).collect();
    for chunk in msgs.chunks(50) {
        let app = &app;
        let sends = chunk.iter().map(|m| async move { gs_send_b64(app, 1001, m).await });
        for r in futures::future::join_all(sends).await {
            assert_ok(&r);
        }
    }
    assert_ok(&app.gs_send(2001, "hello Bob").await);
    let first = gm_receive_raw(&app).await;
    assert_eq!(first.get("8"), Some(&vec![("2001".to_owned(), b64("hello Bob"))]), "GM 8 waits behind 1001");
    assert_eq!(first["7"][0].1.split(',').count(), 10);
}

#[tokio::test]
async fn relation_poll_returns_at_most_1000_uids() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    let uids: Vec<i64> = (1..=1005).collect();
    for chunk in uids.chunks(50) {
        futures::future::join_all(chunk.iter().map(|&uid| app.add(7, 3, uid))).await;
    }
    let (apply, remove) = app.relation(3).await;
    assert_eq!((apply.as_object().unwrap().len(), remove), (1000, json!([])));
    let (rest, remove) = app.relation(3).await;
    assert_eq!((rest.as_object().unwrap().len(), remove), (5, json!([])));
    let mut all: BTreeSet<String> = apply.as_object().unwrap().keys().cloned().collect();
    all.extend(rest.as_object().unwrap().keys().cloned());
    assert_eq!(all, uids.iter().map(|u| u.to_string()).collect());
    assert_eq!(app.relation(3).await, (json!({}), json!([])));
}

// ---------------------------------------------------------------------------------------
// 6. One GM per player, under contention

#[tokio::test]
async fn fifty_concurrent_adds_of_one_uid_have_exactly_one_winner() {
    let app = TestApp::spawn().await;
    let creates = (1..=50).map(|gm| {
        let app = &app;
        async move { app.create_gm(gm, &format!("GM {gm}")).await }
    });
    futures::future::join_all(creates).await;

    let adds = (1..=50).map(|gm| {
        let app = &app;
        async move {
            let r = app.gm(&format!("action=add&gm_account={gm}&host=3&uid=1001")).await;
            (gm, r)
        }
    });
    let replies = futures::future::join_all(adds).await;
    let mut winners = Vec::new();
    for (gm, r) in &replies {
        if r.text() == OK {
            assert_ok(r);
            winners.push(*gm);
        } else {
            assert_errno(r, 3);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let winner = winners[0];
    assert_eq!(
        app.relation(3).await,
        (json!({"1001": [winner.to_string(), format!("GM {winner}")]}), json!([]))
    );
    // Only the winner can talk to the player.
    for gm in 1..=50 {
        let r = app.gm_send(gm, 1001, "mine?").await;
        if gm == winner {
            assert_ok(&r);
        } else {
            assert_errno(&r, 4);
        }
    }
    assert_eq!(gs_online(&app, 3).await, set(&[&winner.to_string()]));
}

// ---------------------------------------------------------------------------------------
// 7. UTF-8

#[tokio::test]
async fn chinese_gm_names_encoded_once_or_twice_reach_relation_as_ascii_escapes() {
    let app = TestApp::spawn().await;
    // Once (what a browser sends) and twice (gm_name is unquoted a second time).
    assert_ok(&app.gm(&format!("action=create&gm_account=7&gm_name={}", enc("张三"))).await);
    assert_ok(&app.gm(&format!("action=create&gm_account=8&gm_name={}", enc(&enc("客服小王")))).await);
    assert_ok(&app.gm(&format!("action=create&gm_account=9&gm_name={}", enc("客服 😀"))).await);
    app.add(7, 3, 1001).await;
    let r = app.gs("action=relation&host=3").await;
    assert_python_json(&r.body);
    let raw = field_raw(&r, "apply_data");
    assert_eq!(String::from_utf8_lossy(&raw), r#"{"1001": ["7", "\u5f20\u4e09"]}"#);
    app.add(8, 4, 1002).await;
    app.add(9, 4, 1003).await;
    let r = app.gs("action=relation&host=4").await;
    let raw = field_raw(&r, "apply_data");
    assert!(raw.is_ascii(), "{}", String::from_utf8_lossy(&raw));
    assert_python_json(&raw);
    let text = String::from_utf8(raw).unwrap();
    assert!(text.contains(r#""\u5ba2\u670d\u5c0f\u738b""#), "{text}");
    // Beyond the BMP: a UTF-16 surrogate pair, as Python writes it.
    assert!(text.contains(r#""\u5ba2\u670d \ud83d\ude00""#), "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"1002": ["8", "客服小王"], "1003": ["9", "客服 😀"]})
    );
}

#[tokio::test]
async fn gm_name_plus_is_a_space_and_2b_or_252b_is_a_plus() {
    let app = TestApp::spawn().await;
    for (gm, raw) in [(7, "a+b"), (8, "a%2Bb"), (9, "a%252Bb"), (10, "%E5%BC%A0+%E4%B8%89")] {
        assert_ok(&app.gm(&format!("action=create&gm_account={gm}&gm_name={raw}")).await);
        app.add(gm, 3, 1000 + gm).await;
    }
    assert_eq!(
        app.relation(3).await.0,
        json!({
            "1007": ["7", "a b"],
            "1008": ["8", "a+b"],
            "1009": ["9", "a+b"],
            "1010": ["10", "张 三"],
        })
    );
}

/// Python's `ensure_ascii`: `"` and `\` escaped, control chars and DEL as `\u00XX`, `/` not
/// escaped, non-ASCII as lowercase `\uXXXX`, beyond the BMP as a surrogate pair.
#[tokio::test]
async fn names_in_relation_are_escaped_exactly_as_python_does() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "a\"b\\c\u{1}\u{7f}/é\t😀").await;
    app.add(7, 3, 1001).await;
    let r = app.gs("action=relation&host=3").await;
    assert_eq!(
        String::from_utf8(field_raw(&r, "apply_data")).unwrap(),
        r#"{"1001": ["7", "a\"b\\c\u0001\u007f/\u00e9\t\ud83d\ude00"]}"#
    );
}

#[tokio::test]
async fn chinese_and_emoji_messages_round_trip_both_ways() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "客服小王").await;
    app.add(7, 3, 1001).await;
    let texts = ["你好，玩家！", "😀👍🏽 ok", "混合 text\n第二行 \"quoted\" \\ /"];
    for text in texts {
        assert_ok(&app.gm_send(7, 1001, text).await);
        assert_ok(&app.gs_send(1001, text).await);
    }
    let expected: Vec<String> = texts.iter().map(|t| b64(t)).collect();
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), expected.join(","))]);
    assert_eq!(app.gm_receive().await["7"], vec![("1001".to_owned(), strings(&texts))]);
}

// ---------------------------------------------------------------------------------------
// 8. `+` in base64

#[tokio::test]
async fn base64_plus_and_slash_arrive_via_2b_or_252b_but_raw_plus_is_errno_6() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    // Its base64 `fn5+Pz8/Pj4+` has both `+` and `/`.
    let text = "~~~???>>>";
    let msg = b64(text);
    assert!(msg.contains('+') && msg.contains('/'), "{msg}");
    let once = msg.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
    let twice = msg.replace('+', "%252B").replace('/', "%252F").replace('=', "%253D");
    let raw_slash = msg.replace('+', "%2B");
    for encoded in [&once, &twice, &raw_slash] {
        let r = app.gm(&format!("action=send&gm_account=7&uid=1001&msg={encoded}")).await;
        assert_ok(&r);
        let r = app.gs(&format!("action=send&uid=1001&msg={encoded}")).await;
        assert_ok(&r);
    }
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), [msg.as_str(); 3].join(","))]);
    assert_eq!(
        gm_receive_raw(&app).await,
        BTreeMap::from([("7".to_owned(), vec![("1001".to_owned(), [msg.as_str(); 3].join(","))])])
    );
    // A raw `+` is a space by form decoding: not base64.
    assert_errno(&app.gm(&format!("action=send&gm_account=7&uid=1001&msg={msg}")).await, 6);
    assert_errno(&app.gs(&format!("action=send&uid=1001&msg={msg}")).await, 6);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![]);
}

// ---------------------------------------------------------------------------------------
// 9. A message belongs to the conversation it was sent in

#[tokio::test]
async fn gm_message_sent_before_del_still_reaches_the_host() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_ok(&app.gm_send(7, 1001, "bye").await);
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), b64("bye"))]);
}

#[tokio::test]
async fn gm_message_goes_to_the_host_the_player_was_on_when_sent() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_ok(&app.gm_send(7, 1001, "on host 3").await);
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    app.add(7, 4, 1001).await;
    assert_ok(&app.gm_send(7, 1001, "on host 4").await);
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("1001".to_owned(), b64("on host 3"))]);
    assert_eq!(gs_receive_raw(&app, 4).await, vec![("1001".to_owned(), b64("on host 4"))]);
}

#[tokio::test]
async fn player_message_stays_with_the_gm_it_was_sent_to() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.add(7, 3, 1001).await;
    assert_ok(&app.gs_send(1001, "to Alice").await);
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    app.add(8, 3, 1001).await;
    assert_ok(&app.gs_send(1001, "to Bob").await);
    assert_eq!(
        gm_receive_raw(&app).await,
        BTreeMap::from([
            ("7".to_owned(), vec![("1001".to_owned(), b64("to Alice"))]),
            ("8".to_owned(), vec![("1001".to_owned(), b64("to Bob"))]),
        ])
    );
}

// ---------------------------------------------------------------------------------------
// 10. GS `online`

#[tokio::test]
async fn gs_online_lists_online_gms_with_a_friend_on_the_host() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.create_gm(8, "Bob").await;
    app.create_gm(9, "Carol").await; // online, but no friends anywhere
    assert_eq!(gs_online(&app, 3).await, set(&[]));
    // `create` makes a GM online: its first friend puts it on the host's list.
    app.add(7, 3, 1).await;
    assert_eq!(gs_online(&app, 3).await, set(&["7"]));
    app.add(8, 3, 2).await;
    app.add(8, 4, 3).await;
    assert_eq!(gs_online(&app, 3).await, set(&["7", "8"]));
    assert_eq!(gs_online(&app, 4).await, set(&["8"]));
    assert_eq!(gs_online(&app, 5).await, set(&[]));
    // Offline: gone from every host; online again: back on every host.
    assert_ok(&app.gm("action=offline&gm_account=8").await);
    assert_eq!(gs_online(&app, 3).await, set(&["7"]));
    assert_eq!(gs_online(&app, 4).await, set(&[]));
    assert_ok(&app.gm("action=online&gm_account=8").await);
    assert_eq!(gs_online(&app, 3).await, set(&["7", "8"]));
    assert_eq!(gs_online(&app, 4).await, set(&["8"]));
    // `del` of the last friend on a host removes the GM from that host only.
    app.add(7, 3, 4).await;
    assert_ok(&app.gm("action=del&gm_account=7&uid=1").await);
    assert_eq!(gs_online(&app, 3).await, set(&["7", "8"]));
    assert_ok(&app.gm("action=del&gm_account=7&uid=4").await);
    assert_eq!(gs_online(&app, 3).await, set(&["8"]));
    assert_ok(&app.gm("action=del&gm_account=8&uid=3").await);
    assert_eq!(gs_online(&app, 4).await, set(&[]));
    assert_eq!(gs_online(&app, 3).await, set(&["8"]));
}

#[tokio::test]
async fn gs_online_offline_gm_who_adds_a_friend_is_not_listed_until_online() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    assert_ok(&app.gm("action=offline&gm_account=7").await);
    app.add(7, 3, 1001).await;
    assert_eq!(gs_online(&app, 3).await, set(&[]));
    assert_ok(&app.gm("action=online&gm_account=7").await);
    assert_eq!(gs_online(&app, 3).await, set(&["7"]));
    // Offline GMs can still be removed from a host.
    assert_ok(&app.gm("action=offline&gm_account=7").await);
    assert_ok(&app.gm("action=del&gm_account=7&uid=1001").await);
    assert_ok(&app.gm("action=online&gm_account=7").await);
    assert_eq!(gs_online(&app, 3).await, set(&[]));
}

// ---------------------------------------------------------------------------------------
// 11. Access control

#[tokio::test]
async fn gm_allowlist_refuses_other_ips_with_the_originals_text() {
    let app = TestApp::spawn_with(&[("GM_RELAY_GM_ALLOW", "10.9.9.9")]).await;
    let r = app.gm("action=create&gm_account=7&gm_name=Alice").await;
    assert_legacy(&r);
    assert_eq!(r.text(), "127.0.0.1 has no access to the website");
    // The GS side has its own list (default: loopback) and still answers.
    assert_errno(&app.gs("action=send&uid=1&msg=aGk=").await, 5);
}

#[tokio::test]
async fn gs_allowlist_is_separate_from_the_gm_allowlist() {
    let app = TestApp::spawn_with(&[("GM_RELAY_GS_ALLOW", "10.9.9.9")]).await;
    for q in ["action=relation&host=3", "action=receive&host=3", "action=online&host=3"] {
        let r = app.gs(q).await;
        assert_legacy(&r);
        assert_eq!(r.text(), "127.0.0.1 has no access to the website", "{q}");
    }
    app.create_gm(7, "Alice").await;
}

#[tokio::test]
async fn cidr_allowlists_admit_the_whole_network() {
    let app = TestApp::spawn_with(&[
        ("GM_RELAY_GM_ALLOW", "10.0.0.0/8,127.0.0.0/8"),
        ("GM_RELAY_GS_ALLOW", "127.0.0.0/8"),
    ])
    .await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_eq!(app.relation(3).await, (json!({"1001": ["7", "Alice"]}), json!([])));
}

#[tokio::test]
async fn trusted_proxy_headers_give_the_client_ip() {
    let app =
        TestApp::spawn_with(&[("GM_RELAY_TRUSTED_PROXIES", "127.0.0.1"), ("GM_RELAY_GM_ALLOW", "10.1.2.3")])
            .await;
    let create = "/gm?action=create&gm_account=7&gm_name=Alice";
    let r = app.get_with(create, &[("X-Real-IP", "10.1.2.3")]).await;
    assert_ok(&r);
    let online = "/gm?action=online&gm_account=7";
    // Rightmost X-Forwarded-For entry that is not a trusted proxy.
    for xff in ["6.6.6.6, 10.1.2.3", "10.1.2.3", "10.1.2.3, 127.0.0.1"] {
        let r = app.get_with(online, &[("X-Forwarded-For", xff)]).await;
        assert_ok(&r);
    }
    let r = app.get_with(online, &[("X-Forwarded-For", "10.1.2.3, 6.6.6.6")]).await;
    assert_legacy(&r);
    assert_eq!(r.text(), "6.6.6.6 has no access to the website");
    // X-Real-IP wins over X-Forwarded-For.
    let r = app.get_with(online, &[("X-Real-IP", "6.6.6.6"), ("X-Forwarded-For", "10.1.2.3")]).await;
    assert_eq!(r.text(), "6.6.6.6 has no access to the website");
    // No header: the proxy itself, which is not allowed.
    let r = app.get(online).await;
    assert_eq!(r.text(), "127.0.0.1 has no access to the website");
}

#[tokio::test]
async fn proxy_headers_are_ignored_without_trusted_proxies() {
    let app = TestApp::spawn_with(&[("GM_RELAY_GM_ALLOW", "10.1.2.3")]).await;
    let create = "/gm?action=create&gm_account=7&gm_name=Alice";
    for headers in [
        &[("X-Real-IP", "10.1.2.3")][..],
        &[("X-Forwarded-For", "6.6.6.6, 10.1.2.3")][..],
        &[("X-Forwarded-For", "10.1.2.3")][..],
    ] {
        let r = app.get_with(create, headers).await;
        assert_legacy(&r);
        assert_eq!(r.text(), "127.0.0.1 has no access to the website", "{headers:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 12. Bounds

#[tokio::test]
async fn query_over_12_kib_is_414_plain_text() {
    let app = TestApp::spawn().await;
    let head = "action=nope&pad=";
    let at_limit = format!("{head}{}", "x".repeat(12 * 1024 - head.len()));
    assert_eq!(at_limit.len(), 12 * 1024);
    let r = app.gm(&at_limit).await;
    assert_eq!(r.status, 404, "a 12 KiB query is still read");
    assert_eq!(r.text(), "err action nope");

    let over = format!("{at_limit}x");
    for side in ["gm", "gs"] {
        let r = app.get(&format!("/{side}?{over}")).await;
        assert_eq!(r.status, 414, "{side}");
        assert_eq!(r.content_type, "text/plain", "{side}");
        assert!(!r.text().trim().is_empty(), "a reason is given");
    }
}

// ---------------------------------------------------------------------------------------
// 13. Operational endpoints

#[tokio::test]
async fn healthz_readyz_and_metrics_answer() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(app.get("/readyz").await.status, 200);
    app.create_gm(7, "Alice").await;
    assert_errno(&app.gm("action=create&gm_account=7&gm_name=Alice").await, 1);
    let r = app.get("/metrics").await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let requests: Vec<&str> = text.lines().filter(|l| l.starts_with("gm_relay_requests_total{")).collect();
    let count = |result: &str| {
        requests.iter().any(|l| {
            l.contains(r#"side="gm""#)
                && l.contains(r#"action="create""#)
                && l.contains(&format!(r#"result="{result}""#))
                && l.ends_with(" 1")
        })
    };
    assert!(count("ok"), "{text}");
    assert!(count("errno_1"), "{text}");
}

// ---------------------------------------------------------------------------------------
// 14. Repeated keys

#[tokio::test]
async fn repeated_keys_first_value_wins() {
    let app = TestApp::spawn().await;
    assert_ok(&app.gm("action=create&gm_account=7&gm_name=Alice&gm_name=Eve&gm_account=8").await);
    assert_errno(&app.gm("action=online&gm_account=8").await, 2);
    assert_ok(&app.gm("action=add&gm_account=7&host=3&uid=5&uid=6&host=4").await);
    assert_eq!(app.relation(3).await, (json!({"5": ["7", "Alice"]}), json!([])));
    assert_eq!(app.relation(4).await, (json!({}), json!([])));
    assert_ok(
        &app.gm(&format!("action=send&gm_account=7&uid=5&uid=6&msg={}&msg=", enc(&b64("first")))).await,
    );
    assert_eq!(gs_receive_raw(&app, 3).await, vec![("5".to_owned(), b64("first"))]);
    // The first action wins too, and an empty first value counts.
    assert_ok(&app.gm("action=online&action=nope&gm_account=7").await);
    assert_errno(&app.gs("action=send&uid=5&msg=&msg=aGk=").await, 6);
}

mod rate_limits {
    use super::*;

    #[tokio::test]
    async fn gm_and_player_sends_are_rate_limited_with_errno_8() {
        let app =
            TestApp::spawn_with(&[("GM_RELAY_RATE_GM_PER_S", "3"), ("GM_RELAY_RATE_PLAYER_PER_S", "2")])
                .await;
        app.create_gm(7, "Alice").await;
        app.add(7, 3, 1001).await;
        let mut gm = Vec::new();
        for i in 0..5 {
            gm.push(app.gm_send(7, 1001, &format!("m{i}")).await.errno());
        }
        assert_eq!(&gm[..3], &[None, None, None], "a burst up to the rate passes");
        assert!(gm[3..].iter().all(|e| *e == Some(8)), "{gm:?}");
        let mut player = Vec::new();
        for i in 0..4 {
            player.push(app.gs_send(1001, &format!("p{i}")).await.errno());
        }
        assert_eq!(&player[..2], &[None, None]);
        assert!(player[2..].iter().all(|e| *e == Some(8)), "{player:?}");
        // A refused send is not delivered: only the three accepted ones arrive.
        let received: Vec<String> = app.gs_receive(3).await.into_iter().flat_map(|(_, m)| m).collect();
        assert_eq!(received, vec!["m0", "m1", "m2"]);
        let metrics = app.get("/metrics").await.text();
        assert!(metrics.contains("gm_relay_rate_limited_total{limit=\"gm\"} 2"), "{metrics}");
        assert!(metrics.contains("gm_relay_rate_limited_total{limit=\"gs\"} 2"), "{metrics}");
    }

    #[tokio::test]
    async fn requests_per_ip_are_rate_limited_and_zero_turns_a_limit_off() {
        let app = TestApp::spawn_with(&[("GM_RELAY_RATE_IP_PER_S", "5")]).await;
        let mut errnos = Vec::new();
        for _ in 0..8 {
            errnos.push(app.gs("action=online&host=3").await.errno());
        }
        assert_eq!(&errnos[..5], &[None; 5]);
        assert!(errnos[5..].iter().all(|e| *e == Some(8)), "{errnos:?}");
        assert!(app.get("/metrics").await.text().contains("gm_relay_rate_limited_total{limit=\"ip\"} 3"));

        // TestApp::spawn turns every limit off (0).
        let unlimited = TestApp::spawn().await;
        unlimited.create_gm(7, "Alice").await;
        unlimited.add(7, 3, 1001).await;
        for i in 0..30 {
            assert_eq!(unlimited.gm_send(7, 1001, &format!("m{i}")).await.errno(), None);
        }
    }
}
