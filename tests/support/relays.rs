//! Several relays over shared servers, for the scale-out tests: each relay in-process (fast,
//! inspectable) or as the real `gm-relay` binary (to `kill -9` it), and a small legacy
//! HTTP client per relay.
//!
//! [`super::app::TestApp`] owns its servers and exactly one relay; scale-out needs the
//! opposite (one set of servers, many relays, some of them killed), so it lives here.
//! `TestApp` starts its relay and talks to it with the same pieces ([`InProcess`],
//! [`Legacy`], [`base_settings`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use gm_relay::adapters::http::AppRelay;
use gm_relay::config::Config;
use gm_relay::startup::Application;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::app::{b64, enc, Reply};
use super::wait_until_async;

/// Bound on a relay starting or stopping.
pub const RELAY_DEADLINE: Duration = Duration::from_secs(20);

/// Bound on one HTTP request of a test client: polls and sends answer in milliseconds;
/// during a failover they may wait out the relay's own 2 s bounds.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings every test relay gets: loopback, pretty logs, rate limits off (tests send
/// faster than people type; rate limits have tests of their own).
pub fn base_settings(nats_url: &str, redis_url: &str) -> HashMap<String, String> {
    [
        ("GM_RELAY_LISTEN", "127.0.0.1:0"),
        ("GM_RELAY_NATS_URL", nats_url),
        ("GM_RELAY_REDIS_URL", redis_url),
        ("GM_RELAY_LOG_FORMAT", "pretty"),
        ("GM_RELAY_RATE_GM_PER_S", "0"),
        ("GM_RELAY_RATE_PLAYER_PER_S", "0"),
        ("GM_RELAY_RATE_IP_PER_S", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A relay built and run inside the test process.
pub struct InProcess {
    pub addr: SocketAddr,
    pub relay: Arc<AppRelay>,
    stop: oneshot::Sender<()>,
    join: JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    pub async fn start(settings: &HashMap<String, String>) -> InProcess {
        let config = Config::from_map(settings).expect("test config is valid");
        let app = tokio::time::timeout(RELAY_DEADLINE, Application::build(config))
            .await
            .expect("relay starts in time")
            .expect("relay starts");
        let addr = app.local_addr();
        let relay = app.relay();
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        InProcess { addr, relay, stop, join }
    }

    /// Stops the relay gracefully (as on SIGTERM) and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(RELAY_DEADLINE, self.join)
            .await
            .expect("relay stops in time")
            .expect("relay task did not panic")
            .expect("relay stopped cleanly");
    }
}

enum Kind {
    InProcess { relay: Arc<AppRelay>, running: Option<InProcess> },
    Process { child: Option<Child> },
}

/// One running relay.
pub struct RelayInstance {
    kind: Kind,
    addr: SocketAddr,
}

impl RelayInstance {
    /// Builds and runs a relay inside the test process.
    pub async fn in_process(settings: &HashMap<String, String>) -> RelayInstance {
        let running = InProcess::start(settings).await;
        RelayInstance {
            addr: running.addr,
            kind: Kind::InProcess { relay: Arc::clone(&running.relay), running: Some(running) },
        }
    }

    /// Runs the real `gm-relay serve` binary and waits until it answers `/healthz`.
    pub async fn process(settings: &HashMap<String, String>) -> RelayInstance {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gm-relay"));
        cmd.arg("serve").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in settings {
            cmd.env(k, v);
        }
        cmd.env("GM_RELAY_LISTEN", addr.to_string()).env("RUST_LOG", "warn");
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = super::spawn_child(cmd).expect("gm-relay binary starts");
        let instance = RelayInstance { kind: Kind::Process { child: Some(child) }, addr };
        let client = instance.client();
        wait_until_async(RELAY_DEADLINE, "the gm-relay process answers /healthz", || {
            let client = client.clone();
            async move { client.try_get("/healthz").await.is_ok_and(|r| r.status == 200) }
        })
        .await;
        instance
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The use cases of an in-process relay.
    pub fn relay(&self) -> Arc<AppRelay> {
        match &self.kind {
            Kind::InProcess { relay, .. } => Arc::clone(relay),
            Kind::Process { .. } => panic!("a relay process has no in-process handle"),
        }
    }

    /// A legacy HTTP client of this relay.
    pub fn client(&self) -> Legacy {
        Legacy::new(self.addr)
    }

    /// `kill -9` of a relay process.
    pub fn kill(&mut self) {
        match &mut self.kind {
            Kind::Process { child } => {
                if let Some(mut child) = child.take() {
                    child.kill().expect("kill -9 the relay");
                    child.wait().expect("reap the relay");
                }
            }
            Kind::InProcess { .. } => panic!("only a relay process can be killed"),
        }
    }

    /// Stops an in-process relay gracefully (as on SIGTERM) and waits for it.
    pub async fn stop(&mut self) {
        if let Kind::InProcess { running, .. } = &mut self.kind {
            if let Some(running) = running.take() {
                running.stop().await;
            }
        }
    }
}

impl Drop for RelayInstance {
    fn drop(&mut self) {
        if let Kind::Process { child: Some(child) } = &mut self.kind {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A legacy GM client / game server talking to one relay.
#[derive(Clone)]
pub struct Legacy {
    base: String,
    http: reqwest::Client,
}

impl Legacy {
    pub fn new(addr: SocketAddr) -> Legacy {
        let http = reqwest::Client::builder().timeout(HTTP_TIMEOUT).build().expect("http client");
        Self::with_client(addr, http)
    }

    /// A client on an existing HTTP client (its pool and timeout).
    pub fn with_client(addr: SocketAddr, http: reqwest::Client) -> Legacy {
        Legacy { base: format!("http://{addr}"), http }
    }

    /// GET `path?query`; `Err` on a connection error or timeout.
    pub async fn try_get(&self, path_and_query: &str) -> Result<Reply, reqwest::Error> {
        Reply::read(self.http.get(format!("{}{path_and_query}", self.base)).send().await?).await
    }

    pub async fn get(&self, path_and_query: &str) -> Reply {
        self.try_get(path_and_query).await.unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"))
    }

    pub async fn gm(&self, query: &str) -> Reply {
        self.get(&format!("/gm?{query}")).await
    }

    pub async fn gs(&self, query: &str) -> Reply {
        self.get(&format!("/gs?{query}")).await
    }

    /// The value of one series of `GET /metrics`, e.g. `gm_relay_outbox_depth` or
    /// `name{label="x"}`; 0 when the relay has not written it yet.
    pub async fn metric(&self, name_and_labels: &str) -> u64 {
        let body = self.get("/metrics").await.text();
        body.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Creates GM `gm`; asserts success.
    pub async fn create_gm(&self, gm: i64, name: &str) {
        let r = self.gm(&format!("action=create&gm_account={gm}&gm_name={}", enc(name))).await;
        assert_eq!(r.json(), serde_json::json!({"res": 1}), "create {gm}");
    }

    /// `add`; returns the reply.
    pub async fn add(&self, gm: i64, host: i64, uid: i64) -> Reply {
        self.gm(&format!("action=add&gm_account={gm}&host={host}&uid={uid}")).await
    }

    /// `del`; returns the reply.
    pub async fn del(&self, gm: i64, uid: i64) -> Reply {
        self.gm(&format!("action=del&gm_account={gm}&uid={uid}")).await
    }

    /// The query of a GM `send` of `text`.
    pub fn gm_send_query(gm: i64, uid: i64, text: &str) -> String {
        format!("/gm?action=send&gm_account={gm}&uid={uid}&msg={}", enc(&b64(text)))
    }

    /// The query of a GS `send` of `text`.
    pub fn gs_send_query(uid: i64, text: &str) -> String {
        format!("/gs?action=send&uid={uid}&msg={}", enc(&b64(text)))
    }

    /// GS `receive` for `host`: `[(uid, [texts])]`; `Err` when the request failed.
    pub async fn try_gs_receive(&self, host: i64) -> Result<Vec<(String, Vec<String>)>, String> {
        let r = self.try_get(&format!("/gs?action=receive&host={host}")).await.map_err(|e| e.to_string())?;
        if r.status != 200 || r.res() != 1 {
            return Err(r.text());
        }
        Ok(r.host_chat())
    }

    /// GM `receive`: `[(gm, uid, [texts])]`; `Err` when the request failed.
    pub async fn try_gm_receive(&self) -> Result<Vec<(String, String, Vec<String>)>, String> {
        let r = self.try_get("/gm?action=receive").await.map_err(|e| e.to_string())?;
        if r.status != 200 || r.res() != 1 {
            return Err(r.text());
        }
        Ok(r.gm_chat()
            .into_iter()
            .flat_map(|(gm, entries)| entries.into_iter().map(move |(uid, texts)| (gm.clone(), uid, texts)))
            .collect())
    }

    /// GS `relation` for `host`: (apply `{uid: [gm, name]}`, remove `[uid]`).
    pub async fn relation(&self, host: i64) -> (serde_json::Value, serde_json::Value) {
        let r = self.gs(&format!("action=relation&host={host}")).await;
        assert_eq!(r.res(), 1, "{}", r.text());
        (r.b64_json("apply_data"), r.b64_json("remove_data"))
    }
}
