//! A whole relay for a test: its own nats-server and redis-server, and the relay either
//! in-process (fast, inspectable) or as the real `gm-relay` binary (to kill it with -9).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use gm_relay::adapters::http::AppRelay;

use super::relays::{InProcess, Legacy, RELAY_DEADLINE};
use super::{wait_until_async, NatsServer, RedisServer};

/// Bound on one test HTTP request; polls and sends answer in milliseconds normally.
const HTTP_TIMEOUT: Duration = Duration::from_secs(20);

/// The chat of one host or one GM in a receive reply: `[(uid, [texts])]`, texts decoded.
pub type ChatEntries = Vec<(String, Vec<String>)>;

/// A legacy reply as the client sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", self.text()))
    }

    /// `res` of the reply.
    pub fn res(&self) -> i64 {
        self.json()["res"].as_i64().expect("res")
    }

    /// `errno` of the reply, or None for a success.
    pub fn errno(&self) -> Option<i64> {
        self.json().get("errno").and_then(|e| e.as_i64())
    }

    /// A base64 field decoded and parsed as JSON.
    pub fn b64_json(&self, field: &str) -> serde_json::Value {
        let b64 =
            self.json()[field].as_str().unwrap_or_else(|| panic!("no {field} in {}", self.text())).to_owned();
        let raw = STANDARD.decode(b64).expect("field is base64");
        serde_json::from_slice(&raw).expect("field holds JSON")
    }

    /// Reads a response whole.
    pub async fn read(resp: reqwest::Response) -> Result<Reply, reqwest::Error> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let content_type =
            headers.get("content-type").map(|v| v.to_str().unwrap_or("").to_owned()).unwrap_or_default();
        let body = resp.bytes().await?.to_vec();
        Ok(Reply { status, content_type, headers, body })
    }

    /// The entries of a GS `receive` reply: `[(uid, [texts])]`, texts decoded.
    pub fn host_chat(&self) -> ChatEntries {
        self.b64_json("data").as_array().expect("data is a list").iter().map(chat_entry).collect()
    }

    /// The entries of a GM `receive` reply: `[(gm, [(uid, [texts])])]`, texts decoded.
    pub fn gm_chat(&self) -> Vec<(String, ChatEntries)> {
        self.b64_json("data")
            .as_object()
            .expect("data is an object")
            .iter()
            .map(|(gm, entries)| {
                (gm.clone(), entries.as_array().expect("a list per GM").iter().map(chat_entry).collect())
            })
            .collect()
    }
}

/// `{"uid": .., "msg": ..}` of a receive reply, the texts decoded.
fn chat_entry(e: &serde_json::Value) -> (String, Vec<String>) {
    (e["uid"].as_str().expect("uid string").to_owned(), decode_joined(e["msg"].as_str().expect("msg string")))
}

pub fn b64(text: &str) -> String {
    STANDARD.encode(text)
}

/// Percent-encodes everything but unreserved characters.
pub fn enc(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub struct TestApp {
    pub nats: NatsServer,
    pub redis: RedisServer,
    settings: HashMap<String, String>,
    running: Option<InProcess>,
    process: Option<(Child, SocketAddr)>,
    http: reqwest::Client,
}

impl TestApp {
    /// Servers plus an in-process relay with default settings.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(&[]).await
    }

    /// Servers plus an in-process relay; `settings` override the defaults (env keys).
    pub async fn spawn_with(settings: &[(&str, &str)]) -> TestApp {
        let mut app = Self::servers_only(settings);
        app.start().await;
        app
    }

    /// Servers only; start a relay with [`TestApp::start`] or [`TestApp::start_process`].
    pub fn servers_only(settings: &[(&str, &str)]) -> TestApp {
        Self::servers_with_redis(RedisServer::start(), settings)
    }

    /// [`TestApp::servers_only`] with a Redis of the test's own (one that takes TLS, say).
    pub fn servers_with_redis(redis: RedisServer, settings: &[(&str, &str)]) -> TestApp {
        let nats = NatsServer::start();
        let settings = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        TestApp {
            nats,
            redis,
            settings,
            running: None,
            process: None,
            http: reqwest::Client::builder().timeout(HTTP_TIMEOUT).build().expect("client"),
        }
    }

    fn config_map(&self) -> HashMap<String, String> {
        let mut m = super::relays::base_settings(&self.nats.url(), &self.redis.url());
        m.extend(self.settings.clone());
        m
    }

    /// Starts an in-process relay.
    pub async fn start(&mut self) {
        assert!(self.running.is_none() && self.process.is_none(), "a relay is already running");
        self.running = Some(InProcess::start(&self.config_map()).await);
    }

    /// Stops the in-process relay gracefully (as on SIGTERM) and waits for it.
    pub async fn stop(&mut self) {
        self.running.take().expect("an in-process relay is running").stop().await;
    }

    /// The in-process relay, to arm fault points or call use cases directly.
    pub fn relay(&self) -> Arc<AppRelay> {
        Arc::clone(&self.running.as_ref().expect("an in-process relay is running").relay)
    }

    /// Starts the real `gm-relay serve` binary; `extra_env` adds to the settings.
    pub async fn start_process(&mut self, extra_env: &[(&str, &str)]) {
        self.start_process_with_stderr(extra_env, Stdio::inherit()).await;
    }

    /// [`TestApp::start_process`] with the relay's stderr going to `stderr`.
    pub async fn start_process_with_stderr(&mut self, extra_env: &[(&str, &str)], stderr: Stdio) {
        assert!(self.running.is_none() && self.process.is_none(), "a relay is already running");
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gm-relay"));
        cmd.arg("serve").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in self.config_map() {
            cmd.env(k, v);
        }
        cmd.env("GM_RELAY_LISTEN", addr.to_string());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(stderr);
        let child = super::spawn_child(cmd).expect("gm-relay binary starts");
        self.process = Some((child, addr));
        let http = self.http.clone();
        wait_until_async(
            RELAY_DEADLINE,
            "the gm-relay process answers /healthz",
            || {
                let http = http.clone();
                async move {
                    http.get(format!("http://{addr}/healthz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200)
                }
            },
        )
        .await;
    }

    /// kill -9 of the relay process.
    pub fn kill_process(&mut self) {
        let (mut child, _) = self.process.take().expect("a relay process is running");
        child.kill().expect("kill -9 the relay");
        child.wait().expect("reap the relay");
    }

    /// Sends `sig` to the relay process and returns at once.
    pub fn signal_process(&self, sig: libc::c_int) {
        let (child, _) = self.process.as_ref().expect("a relay process is running");
        super::send_signal(child.id(), sig);
    }

    /// SIGTERM to the relay process; waits (bounded) for it to exit and returns its status.
    pub fn terminate_process(&mut self, within: Duration) -> std::process::ExitStatus {
        let (mut child, _) = self.process.take().expect("a relay process is running");
        super::send_signal(child.id(), libc::SIGTERM);
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("poll the relay") {
                return status;
            }
            if started.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the relay did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match (&self.running, &self.process) {
            (Some(r), _) => r.addr,
            (_, Some((_, addr))) => *addr,
            _ => panic!("no relay running"),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// GET `path?query` with extra headers.
    pub async fn get_with(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.http.get(format!("{}{path_and_query}", self.base_url()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"));
        Reply::read(resp).await.expect("body")
    }

    pub async fn get(&self, path_and_query: &str) -> Reply {
        self.get_with(path_and_query, &[]).await
    }

    /// A legacy client of the running relay, on this app's HTTP client.
    pub fn legacy(&self) -> Legacy {
        Legacy::with_client(self.addr(), self.http.clone())
    }

    /// `GET /gm?<query>`.
    pub async fn gm(&self, query: &str) -> Reply {
        self.legacy().gm(query).await
    }

    /// `GET /gs?<query>`.
    pub async fn gs(&self, query: &str) -> Reply {
        self.legacy().gs(query).await
    }

    /// Creates GM `gm` named `name`; asserts success.
    pub async fn create_gm(&self, gm: i64, name: &str) {
        self.legacy().create_gm(gm, name).await
    }

    /// Befriends `uid` on `host` for `gm`; asserts success.
    pub async fn add(&self, gm: i64, host: i64, uid: i64) {
        let r = self.gm(&format!("action=add&gm_account={gm}&host={host}&uid={uid}")).await;
        assert_eq!(r.json(), serde_json::json!({"res": 1}), "add {gm} {host} {uid}");
    }

    /// GM sends `text`; returns the reply.
    pub async fn gm_send(&self, gm: i64, uid: i64, text: &str) -> Reply {
        self.gm(&format!("action=send&gm_account={gm}&uid={uid}&msg={}", enc(&b64(text)))).await
    }

    /// Player sends `text` through a legacy game server; returns the reply.
    pub async fn gs_send(&self, uid: i64, text: &str) -> Reply {
        self.gs(&format!("action=send&uid={uid}&msg={}", enc(&b64(text)))).await
    }

    /// GS `receive` for `host`: `[(uid, [texts])]`, texts decoded from base64.
    pub async fn gs_receive(&self, host: i64) -> Vec<(String, Vec<String>)> {
        let r = self.gs(&format!("action=receive&host={host}")).await;
        assert_eq!(r.res(), 1, "{}", r.text());
        r.host_chat()
    }

    /// GM `receive`: `{gm: [(uid, [texts])]}`.
    pub async fn gm_receive(&self) -> HashMap<String, Vec<(String, Vec<String>)>> {
        let r = self.gm("action=receive").await;
        assert_eq!(r.res(), 1, "{}", r.text());
        r.gm_chat().into_iter().collect()
    }

    /// GS `relation` for `host`: (apply `{uid: [gm, name]}`, remove `[uid]`).
    pub async fn relation(&self, host: i64) -> (serde_json::Value, serde_json::Value) {
        self.legacy().relation(host).await
    }
}

/// Splits a `,`-joined receive `msg` and decodes each part.
pub fn decode_joined(msg: &str) -> Vec<String> {
    msg.split(',')
        .map(|m| String::from_utf8(STANDARD.decode(m).expect("each message is base64")).expect("UTF-8"))
        .collect()
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Looking behind the relay: what NATS and Redis actually hold. For assertions only; the
// relay under test never sees these connections.

/// One message as JetStream stored it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub subject: String,
    pub stream_seq: u64,
    /// The `Nats-Msg-Id` header, if any.
    pub msg_id: Option<String>,
    /// The payload parsed as JSON (panics if it is not JSON).
    pub body: serde_json::Value,
}

/// Streams read by [`stored_events`] hold at most this many messages in a test.
const MAX_STORED_EVENTS: u64 = 10_000;

/// Every message stored in `stream` whose subject is `subject` or, when `subject` ends in
/// `.>`, starts with the part before it; in stream order. Reads by sequence, so it sees
/// exactly what the stream holds, whoever consumed it.
pub async fn stored_events(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
) -> Vec<StoredEvent> {
    let stream = js.get_stream(stream).await.unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let state = stream.get_info().await.expect("stream info").state;
    if state.messages == 0 {
        return Vec::new();
    }
    assert!(state.last_sequence - state.first_sequence < MAX_STORED_EVENTS, "stream too long for a test");
    let matches = |s: &str| match subject.strip_suffix('>') {
        Some(prefix) => s.starts_with(prefix),
        None => s == subject,
    };
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        // A deleted sequence is an error; limits retention in a test deletes nothing.
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        if !matches(m.subject.as_str()) {
            continue;
        }
        out.push(StoredEvent {
            subject: m.subject.to_string(),
            stream_seq: m.sequence,
            msg_id: m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()),
            body: serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
                panic!("stored message {seq} is not JSON ({e}): {}", String::from_utf8_lossy(&m.payload))
            }),
        });
    }
    out
}

/// `(num_pending, num_ack_pending)` of a durable consumer, or None if it does not exist.
pub async fn consumer_backlog(
    js: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
) -> Option<(u64, usize)> {
    let stream = js.get_stream(stream).await.ok()?;
    let info = stream.consumer_info(durable).await.ok()?;
    Some((info.num_pending, info.num_ack_pending))
}

/// Waits until something is stored on `gm.to.host.<host>` (an add's friend event is
/// published by the outbox drainer, just after the add answered).
pub async fn wait_stored_for_host(js: &async_nats::jetstream::Context, host: i64) {
    let stream = js.get_stream("GM_TO_HOST").await.expect("stream");
    wait_until_async(Duration::from_secs(10), &format!("something is stored for host {host}"), || {
        let stream = stream.clone();
        async move { stream.get_last_raw_message_by_subject(&format!("gm.to.host.{host}")).await.is_ok() }
    })
    .await;
}

/// The consumers of a stream, by name.
pub async fn consumer_names(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> std::collections::BTreeSet<String> {
    let stream = js.get_stream(stream).await.expect("stream");
    let mut names = stream.consumer_names();
    let mut found = std::collections::BTreeSet::new();
    while let Some(name) = futures::StreamExt::next(&mut names).await {
        found.insert(name.expect("consumer name"));
    }
    found
}

impl TestApp {
    /// A connection of the test's own to the relay's Redis.
    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis")
    }

    /// A JetStream context of the test's own on the relay's NATS.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.nats.url()).await.expect("connect to NATS");
        async_nats::jetstream::new(client)
    }

    /// Status of `GET /readyz`, or None when the relay does not answer within 5 s.
    pub async fn readyz(&self) -> Option<u16> {
        self.http
            .get(format!("{}/readyz", self.base_url()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_readyz(&self, status: u16, deadline: Duration) {
        wait_until_async(deadline, &format!("/readyz answers {status}"), || async move {
            self.readyz().await == Some(status)
        })
        .await;
    }

    /// Waits until no legacy poll holds its turn (its Redis lease): every poll answered so
    /// far has had its acks confirmed by the broker, so killing the relay now repeats
    /// nothing.
    pub async fn wait_polls_settled(&self, deadline: Duration) {
        wait_poll_leases_released(&self.redis_conn().await, deadline).await;
    }

    /// A GET with its own timeout: `Err` when it does not answer in time (a hang).
    pub async fn try_get(&self, path_and_query: &str, timeout: Duration) -> Result<Reply, reqwest::Error> {
        Reply::read(
            self.http.get(format!("{}{path_and_query}", self.base_url())).timeout(timeout).send().await?,
        )
        .await
    }

    /// Whether the relay process started by [`TestApp::start_process`] still runs.
    pub fn process_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|(child, _)| matches!(child.try_wait(), Ok(None)))
    }
}

impl TestApp {
    /// An in-process relay on a NATS server the test started itself (e.g. with an
    /// authorization config), and a fresh Redis.
    pub async fn spawn_on(nats: NatsServer, settings: &[(&str, &str)]) -> TestApp {
        let mut app = TestApp {
            nats,
            redis: RedisServer::start(),
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            running: None,
            process: None,
            http: reqwest::Client::builder().timeout(HTTP_TIMEOUT).build().expect("client"),
        };
        app.start().await;
        app
    }
}

/// Waits until no relay on this Redis holds a legacy poll's turn (its lease): see
/// [`TestApp::wait_polls_settled`].
pub async fn wait_poll_leases_released(conn: &redis::aio::MultiplexedConnection, deadline: Duration) {
    wait_until_async(deadline, "no poll lease is held", || {
        let mut conn = conn.clone();
        async move {
            let held: Vec<String> =
                redis::cmd("KEYS").arg("gmr:lease:poll:*").query_async(&mut conn).await.expect("KEYS");
            held.is_empty()
        }
    })
    .await;
}
