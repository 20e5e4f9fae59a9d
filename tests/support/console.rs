//! Console helpers for tests: a relay with the console on, accounts with passwords, an
//! HTTP client that keeps the session cookie, and a reader of server-sent events.

use std::time::Duration;

use gm_relay::console::accounts::set_password;
use gm_relay::domain::session::Role;
use gm_relay::domain::GmId;
use serde_json::Value;

use super::app::TestApp;

/// A session key for tests (at least 32 bytes).
pub const KEY: &str = "test-session-key-0123456789abcdef-0123456789";

/// Bound on one console request in a test.
const HTTP_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on waiting for one server-sent event.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(10);

/// A relay with the console on, plus `settings`.
pub async fn spawn_console(settings: &[(&str, &str)]) -> TestApp {
    let mut all = vec![("GM_RELAY_SESSION_KEY", KEY)];
    all.extend_from_slice(settings);
    TestApp::spawn_with(&all).await
}

/// Creates GM `gm` (through the legacy endpoint) and gives it `password`.
pub async fn create_gm_with_password(app: &TestApp, gm: i64, name: &str, password: &str, role: Role) {
    app.create_gm(gm, name).await;
    set_password(app.relay().store(), GmId(gm), password, role).await.expect("set password");
}

/// A browser-like client of one relay: it keeps the session cookie it was given.
pub struct ConsoleClient {
    pub base: String,
    http: reqwest::Client,
    pub cookie: Option<String>,
    /// Sent as `X-Real-IP` (the relay believes it when 127.0.0.1 is a trusted proxy).
    pub real_ip: Option<String>,
}

/// A reply: status, `Set-Cookie` if any, body as JSON (Null when empty or not JSON).
#[derive(Debug)]
pub struct ApiReply {
    pub status: u16,
    pub set_cookie: Option<String>,
    pub location: Option<String>,
    pub json: Value,
}

impl ConsoleClient {
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        Self { base: base.to_owned(), http, cookie: None, real_ip: None }
    }

    pub fn for_app(app: &TestApp) -> Self {
        Self::new(&app.base_url())
    }

    /// The same session against another relay.
    pub fn with_base(&self, base: &str) -> Self {
        Self { cookie: self.cookie.clone(), ..Self::new(base) }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            r = r.header("cookie", format!("gmr_session={c}"));
        }
        if let Some(ip) = &self.real_ip {
            r = r.header("x-real-ip", ip);
        }
        r
    }

    async fn reply(resp: reqwest::Response) -> ApiReply {
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let set_cookie = header("set-cookie");
        let location = header("location");
        let body = resp.bytes().await.expect("body");
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        ApiReply { status, set_cookie, location, json }
    }

    pub async fn get(&self, path: &str) -> ApiReply {
        Self::reply(self.request(reqwest::Method::GET, path).send().await.expect("GET")).await
    }

    /// The status of a GET, without reading the body (an event stream's never ends; it is
    /// closed with the response).
    pub async fn status_only(&self, path: &str) -> u16 {
        self.request(reqwest::Method::GET, path).send().await.expect("GET").status().as_u16()
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self.request(reqwest::Method::GET, path).send().await.expect("GET");
        (resp.status().as_u16(), resp.text().await.expect("text"))
    }

    pub async fn post(&self, path: &str, body: Value) -> ApiReply {
        let r = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_string());
        Self::reply(r.send().await.expect("POST")).await
    }

    /// A POST as an HTML form sends it: what a page on another site can make a browser do.
    pub async fn post_form(&self, path: &str) -> ApiReply {
        let r = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("x=1");
        Self::reply(r.send().await.expect("POST")).await
    }

    pub async fn delete(&self, path: &str) -> ApiReply {
        let r = self.request(reqwest::Method::DELETE, path).header("content-type", "application/json");
        Self::reply(r.send().await.expect("DELETE")).await
    }

    /// Signs in; on success keeps the cookie. Returns the reply.
    pub async fn sign_in(&mut self, gm: i64, password: &str) -> ApiReply {
        let r = self
            .post("/console/api/signin", serde_json::json!({"gm": gm.to_string(), "password": password}))
            .await;
        if r.status == 200 {
            let set = r.set_cookie.as_deref().expect("a sign-in sets the cookie");
            let token = set.split(';').next().unwrap().strip_prefix("gmr_session=").expect("our cookie");
            self.cookie = Some(token.to_owned());
        }
        r
    }

    /// Opens a server-sent-event stream at `path`, with `Last-Event-ID` if given.
    pub async fn events(&self, path: &str, last_event_id: Option<&str>) -> EventStream {
        let mut r = self.request(reqwest::Method::GET, path).timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            r = r.header("last-event-id", id);
        }
        let resp = r.send().await.expect("open the event stream");
        assert_eq!(resp.status().as_u16(), 200, "event stream at {path}");
        EventStream { resp, buf: String::new() }
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

pub struct EventStream {
    resp: reqwest::Response,
    buf: String,
}

impl EventStream {
    /// Takes the first complete event with data out of the buffer; comments and
    /// retry-only blocks are dropped on the way.
    fn take_event(&mut self) -> Option<SseEvent> {
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let mut e = SseEvent::default();
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    e.id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("event:") {
                    e.event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                }
            }
            if !data.is_empty() {
                e.data = data.join("\n");
                return Some(e);
            }
        }
        None
    }

    /// The next event with data; panics after [`EVENT_DEADLINE`] or when the stream ends.
    pub async fn next(&mut self) -> SseEvent {
        self.next_or_end(EVENT_DEADLINE).await.expect("the event stream ended")
    }

    /// The next event with data, or None when the stream ends (e.g. the relay stops);
    /// panics when neither happens `within`.
    pub async fn next_or_end(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self.take_event() {
                return Some(e);
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("the event stream neither ended nor sent an event within {within:?}"),
            }
        }
    }
}
