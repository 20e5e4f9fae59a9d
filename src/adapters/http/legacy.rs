//! The legacy GM and GS endpoints: every action of the original system, answered so a
//! deployed client cannot tell the difference (README, "The legacy protocol").
//!
//! Order of checks: query at most 12 KiB (else 414) → IP allowlist → action known →
//! per-IP rate limit → required parameters present → ids canonical and `gm_name`
//! valid → the action's own checks → `msg` valid → per-GM / per-player rate limit → effect.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use serde::Serialize;
use tokio::sync::oneshot;

use super::query::LegacyQuery;
use super::server::WriteWatch;
use super::{pyjson, AppSettlement, AppState};
use crate::domain::poll::{Conversation, RelationChanges};
use crate::domain::text::encode_base64;
use crate::domain::{Errno, GmId, GmName, HostId, RelayError, Uid};

/// Longest query accepted. A maximal message (500 four-byte characters) is 2,668 base64
/// characters, up to three times that when percent-encoded twice, plus the ids.
pub const MAX_QUERY_BYTES: usize = 12 * 1024;

const GM_ACTIONS: [&[u8]; 7] = [b"create", b"add", b"del", b"online", b"offline", b"send", b"receive"];
const GS_ACTIONS: [&[u8]; 4] = [b"relation", b"send", b"receive", b"online"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Gm,
    Gs,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Gm => "gm",
            Side::Gs => "gs",
        }
    }
}

pub async fn gm(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    watch: Option<Extension<WriteWatch>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    handle(state, Side::Gm, peer.ip(), watch.map(|Extension(w)| w), &headers, &uri).await
}

pub async fn gs(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    watch: Option<Extension<WriteWatch>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    handle(state, Side::Gs, peer.ip(), watch.map(|Extension(w)| w), &headers, &uri).await
}

/// The `text/html` every legacy reply carries, exactly, as the original sent it.
fn html(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    legacy_headers(r.headers_mut());
    r
}

/// `text/html`, as the original sent, but a page a browser may not run anything in: the
/// legacy endpoints share an origin with the console, so a script smuggled into a reply
/// (an unknown action is echoed back) would act with a signed-in GM's session. Legacy
/// clients read the body and ignore these headers.
fn legacy_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

/// The unknown action as `err action <action>` echoes it: HTML's special characters
/// escaped, so the echo is text in any browser.
fn escape_html(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for &b in raw {
        match b {
            b'<' => out.extend_from_slice(b"&lt;"),
            b'>' => out.extend_from_slice(b"&gt;"),
            b'&' => out.extend_from_slice(b"&amp;"),
            b'"' => out.extend_from_slice(b"&quot;"),
            b'\'' => out.extend_from_slice(b"&#39;"),
            b => out.push(b),
        }
    }
    out
}

async fn handle(
    state: AppState,
    side: Side,
    peer: IpAddr,
    watch: Option<WriteWatch>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Response {
    let raw = uri.query().unwrap_or("");
    if raw.len() > MAX_QUERY_BYTES {
        state.metrics.requests.with_label_values(&[side.label(), "-", "too_long"]).inc();
        let mut r =
            (StatusCode::URI_TOO_LONG, "request too long: the query may be at most 12 KiB\n").into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return r;
    }
    let ip = state.access.client_ip(peer, headers);
    let allowed = match side {
        Side::Gm => state.access.gm_allowed(ip),
        Side::Gs => state.access.gs_allowed(ip),
    };
    if !allowed {
        state.metrics.requests.with_label_values(&[side.label(), "-", "refused"]).inc();
        return html(StatusCode::OK, format!("{ip} has no access to the website"));
    }
    let q = LegacyQuery::parse(raw.as_bytes());
    let action = q.get("action").unwrap_or_default().to_vec();
    let known = match side {
        Side::Gm => GM_ACTIONS.contains(&action.as_slice()),
        Side::Gs => GS_ACTIONS.contains(&action.as_slice()),
    };
    if known && !state.ip_rate.allow(&ip) {
        state.metrics.rate_limited.with_label_values(&["ip"]).inc();
        state.metrics.requests.with_label_values(&[side.label(), "-", "errno_8"]).inc();
        let errno = Errno::RateLimited;
        return html(StatusCode::OK, json(&ErrReply { res: 0, errno: errno.code(), error: errno.reason() }));
    }
    // Each action's future is boxed on its own, sized to that action: inline, every
    // request's future would be as large as the largest action's (a poll's ~3 KB) and be
    // moved whole into the box axum makes for it, a send's too.
    let outcome: BoxFuture<'_, Result<Reply, RelayError>> = match (side, action.as_slice()) {
        (Side::Gm, b"create") => Box::pin(create(&state, &q)),
        (Side::Gm, b"add") => Box::pin(add(&state, &q)),
        (Side::Gm, b"del") => Box::pin(del(&state, &q)),
        (Side::Gm, b"online") => Box::pin(gm_online(&state, &q)),
        (Side::Gm, b"offline") => Box::pin(gm_offline(&state, &q)),
        (Side::Gm, b"send") => Box::pin(gm_send(&state, &q)),
        (Side::Gm, b"receive") => Box::pin(gm_receive(&state)),
        (Side::Gs, b"relation") => Box::pin(gs_relation(&state, &q)),
        (Side::Gs, b"send") => Box::pin(gs_send(&state, &q)),
        (Side::Gs, b"receive") => Box::pin(gs_receive(&state, &q)),
        (Side::Gs, b"online") => Box::pin(gs_online(&state, &q)),
        _ => {
            state.metrics.requests.with_label_values(&[side.label(), "-", "unknown_action"]).inc();
            let mut body = b"err action ".to_vec();
            body.extend_from_slice(&escape_html(&action));
            return html(StatusCode::NOT_FOUND, body);
        }
    };
    let outcome = outcome.await;
    let action = String::from_utf8_lossy(&action).into_owned();
    let result = match &outcome {
        Ok(_) => "ok".to_owned(),
        Err(RelayError::NotOnline) => "not_online".to_owned(),
        Err(e) => format!("errno_{}", e.errno().map(Errno::code).unwrap_or(0)),
    };
    state.metrics.requests.with_label_values(&[side.label(), &action, &result]).inc();
    if matches!(&outcome, Err(RelayError::Rejected(Errno::RateLimited))) {
        state.metrics.rate_limited.with_label_values(&[side.label()]).inc();
    }
    match outcome {
        Ok(Reply::Json(body)) => html(StatusCode::OK, body),
        Ok(Reply::Poll(mut body)) => {
            body.watch = watch;
            let mut r = Response::new(Body::new(body));
            legacy_headers(r.headers_mut());
            r
        }
        Err(RelayError::NotOnline) => html(StatusCode::OK, json(&Res0 { res: 0 })),
        Err(e) => {
            let errno = e.errno().unwrap_or(Errno::Unavailable);
            if let RelayError::Unavailable { backend, source } = &e {
                tracing::error!(side = side.label(), %action, %backend, error = %source, "request failed: backend unavailable");
            }
            html(StatusCode::OK, json(&ErrReply { res: 0, errno: errno.code(), error: errno.reason() }))
        }
    }
}

enum Reply {
    Json(Vec<u8>),
    Poll(PollBody),
}

#[derive(Serialize)]
struct Res0 {
    res: u8,
}

#[derive(Serialize)]
struct ErrReply {
    res: u8,
    errno: i32,
    error: &'static str,
}

fn json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Our reply types are maps, sequences, strings and integers: serialising cannot fail.
    pyjson::to_vec(value).unwrap_or_else(|_| b"{\"res\": 0, \"errno\": 10}".to_vec())
}

fn ok() -> Result<Reply, RelayError> {
    Ok(Reply::Json(json(&Res0 { res: 1 })))
}

fn param<'q>(q: &'q LegacyQuery, key: &str) -> Result<&'q [u8], RelayError> {
    q.get(key).ok_or(RelayError::Rejected(Errno::BadParam))
}

fn gm_id(q: &LegacyQuery) -> Result<GmId, RelayError> {
    GmId::parse(param(q, "gm_account")?).ok_or(Errno::BadParam.into())
}

fn host_id(q: &LegacyQuery) -> Result<HostId, RelayError> {
    HostId::parse(param(q, "host")?).ok_or(Errno::BadParam.into())
}

fn uid(q: &LegacyQuery) -> Result<Uid, RelayError> {
    Uid::parse(param(q, "uid")?).ok_or(Errno::BadParam.into())
}

/// `msg`, decoded once more like the original's `urllib.unquote`.
fn msg(q: &LegacyQuery) -> Result<Vec<u8>, RelayError> {
    q.get_unquoted("msg").ok_or(Errno::BadParam.into())
}

async fn create(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    let (gm, raw_name) = (param(q, "gm_account")?, q.get_unquoted("gm_name").ok_or(Errno::BadParam)?);
    let gm = GmId::parse(gm).ok_or(Errno::BadParam)?;
    let name = GmName::parse(&raw_name).ok_or(Errno::BadParam)?;
    state.relay.create(gm, &name).await?;
    ok()
}

async fn add(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    param(q, "gm_account")?;
    param(q, "host")?;
    param(q, "uid")?;
    state.relay.add(gm_id(q)?, host_id(q)?, uid(q)?).await?;
    ok()
}

async fn del(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    param(q, "gm_account")?;
    param(q, "uid")?;
    state.relay.remove(gm_id(q)?, uid(q)?).await?;
    ok()
}

async fn gm_online(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    state.relay.online(gm_id(q)?).await?;
    ok()
}

async fn gm_offline(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    state.relay.offline(gm_id(q)?).await?;
    ok()
}

async fn gm_send(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    param(q, "gm_account")?;
    param(q, "uid")?;
    let msg = msg(q)?;
    state.relay.gm_send(gm_id(q)?, uid(q)?, &msg).await?;
    ok()
}

async fn gs_send(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    param(q, "uid")?;
    let msg = msg(q)?;
    state.relay.gs_send(uid(q)?, &msg).await?;
    ok()
}

async fn gs_online(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    let gms = state.relay.gs_online(host_id(q)?).await?;
    state.metrics.poll_size.with_label_values(&["online"]).observe(gms.len() as f64);
    let data = encode_base64_bytes(&json(&gms));
    Ok(Reply::Json(json(&DataReply { res: 1, data: &data })))
}

#[derive(Serialize)]
struct DataReply<'a> {
    res: u8,
    data: &'a str,
}

#[derive(Serialize)]
struct ChatItem {
    uid: Uid,
    msg: String,
}

/// Messages of one conversation joined by `,` (base64 has no commas), as the original did.
fn chat_item(c: &Conversation) -> ChatItem {
    let joined = c.texts.iter().map(|t| encode_base64(t)).collect::<Vec<_>>().join(",");
    ChatItem { uid: c.uid, msg: joined }
}

fn encode_base64_bytes(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn gs_receive(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    let host = host_id(q)?;
    let (conversations, settlement) = state.relay.gs_receive(host).await?.into_parts();
    state.metrics.poll_size.with_label_values(&["gs_receive"]).observe(conversations.len() as f64);
    let items: Vec<ChatItem> = conversations.iter().map(chat_item).collect();
    let data = encode_base64_bytes(&json(&items));
    Ok(Reply::Poll(PollBody::new(json(&DataReply { res: 1, data: &data }), settlement)))
}

async fn gm_receive(state: &AppState) -> Result<Reply, RelayError> {
    let (conversations, settlement) = state.relay.gm_receive().await?.into_parts();
    state.metrics.poll_size.with_label_values(&["gm_receive"]).observe(conversations.len() as f64);
    let mut by_gm: BTreeMap<String, Vec<ChatItem>> = BTreeMap::new();
    for c in &conversations {
        by_gm.entry(c.gm.to_string()).or_default().push(chat_item(c));
    }
    let data = encode_base64_bytes(&json(&by_gm));
    Ok(Reply::Poll(PollBody::new(json(&DataReply { res: 1, data: &data }), settlement)))
}

#[derive(Serialize)]
struct RelationReply<'a> {
    res: u8,
    apply_data: &'a str,
    remove_data: &'a str,
}

async fn gs_relation(state: &AppState, q: &LegacyQuery) -> Result<Reply, RelayError> {
    let host = host_id(q)?;
    let (changes, settlement) = state.relay.gs_relation(host).await?.into_parts();
    let RelationChanges { apply, remove } = changes;
    state.metrics.poll_size.with_label_values(&["relation"]).observe((apply.len() + remove.len()) as f64);
    let apply: BTreeMap<String, (GmId, String)> =
        apply.into_iter().map(|(uid, gm, name)| (uid.to_string(), (gm, name))).collect();
    let body = json(&RelationReply {
        res: 1,
        apply_data: &encode_base64_bytes(&json(&apply)),
        remove_data: &encode_base64_bytes(&json(&remove)),
    });
    Ok(Reply::Poll(PollBody::new(body, settlement)))
}

/// How long a poll whose reply missed its deadline waits for the connection it gave up to
/// settle whether the reply was written after all (a write already under way). The
/// writer is woken at once; this bound only covers a busy runtime, well inside the second
/// the lease has to spare (see `relay::POLL_REPLY_BUDGET`).
const ABANDONED_WRITE_WAIT: Duration = Duration::from_millis(200);

/// A poll's reply body. The poll's acks follow the written reply: once the connection has
/// written the bytes to the socket (its [`WriteWatch`]), the poll settles as planned; a
/// body dropped unsent, or a connection that closes (or stalls) before the bytes are out,
/// naks everything so the next poll gets it again.
pub struct PollBody {
    data: Option<Bytes>,
    len: u64,
    settlement: Option<AppSettlement>,
    /// The request's connection; without one (a router driven directly, in tests) taking
    /// the bytes counts as writing them.
    watch: Option<WriteWatch>,
    /// Set once hyper took the bytes: resolves when they are written.
    written: Option<WhenWritten>,
}

enum WhenWritten {
    Taken,
    Watched(oneshot::Receiver<()>),
}

impl PollBody {
    fn new(body: Vec<u8>, settlement: Option<AppSettlement>) -> Self {
        Self { len: body.len() as u64, data: Some(Bytes::from(body)), settlement, watch: None, written: None }
    }
}

impl http_body::Body for PollBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this.data.take() {
            Some(data) => {
                // Asked before hyper can write the bytes, so the flush that writes them
                // is one this waits for.
                this.written = Some(match &this.watch {
                    Some(watch) => WhenWritten::Watched(watch.written()),
                    None => WhenWritten::Taken,
                });
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

impl Drop for PollBody {
    fn drop(&mut self) {
        let Some(settlement) = self.settlement.take() else { return };
        // A body dropped unsent: the settlement's own drop naks everything, or, without a
        // runtime (it is shutting down), leaves the events to the broker's redelivery.
        let (Some(written), Ok(runtime)) = (self.written.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (mut written, watch) = match (written, self.watch.take()) {
            (WhenWritten::Watched(written), Some(watch)) => (written, watch),
            _ => {
                drop(settlement.finish(true));
                return;
            }
        };
        // The settlement holds the feed's turn until then, so the next poll starts after
        // these acks or naks, as always.
        let deadline = settlement.reply_deadline();
        runtime.spawn(async move {
            // A poll's settlement always holds its turn, hence a deadline.
            let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
            let in_time = tokio::time::timeout_at(deadline, &mut written).await.ok();
            let written = match in_time {
                Some(outcome) => outcome.is_ok(),
                None => {
                    // Too late to ack within the lease: stop the reply so that the client,
                    // which gets these events again, does not also read them now. The
                    // woken writer settles the outcome at once: a write under way that
                    // completes is flushed (written), any other fails and closes.
                    watch.abandon();
                    matches!(tokio::time::timeout(ABANDONED_WRITE_WAIT, written).await, Ok(Ok(())))
                }
            };
            if !written {
                tracing::warn!("a poll reply was not written to its client; its events come again");
            }
            let _ = settlement.finish(written).await;
        });
    }
}
