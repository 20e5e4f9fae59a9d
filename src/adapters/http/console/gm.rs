//! The GM view's API: the GM's roster, history pages, sending, adding and removing
//! players, presence, a host's delivery figures, and the live feed of new messages.
//!
//! The live feed is server-sent events fed by a JetStream consumer of `gs.to.gm.<gm>`:
//! each event's id is its `GS_TO_GM` sequence, so a browser that reconnects (it sends
//! `Last-Event-ID` by itself) resumes right after the last message it got, with no gap,
//! even on another relay.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::{cookie_token, still_signed_in, ApiError, ApiSession};
use crate::console::Console;
use crate::domain::text::encode_base64;
use crate::domain::{HostId, Uid};

/// Keep-alive comments on idle feeds: well under the idle timeouts of proxies (nginx's
/// `proxy_read_timeout` defaults to 60 s).
pub(super) const FEED_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What a browser waits before reconnecting a dropped feed.
pub(super) const FEED_RETRY: Duration = Duration::from_secs(1);

/// Consecutive errors a live feed rides out before it ends (and the page reconnects).
const MAX_FEED_ERRORS: usize = 5;

/// How often an open feed checks that its session still stands (not signed out, password
/// unchanged, not expired): a signed-out or disabled account stops receiving within this.
pub(super) const FEED_SESSION_RECHECK: Duration = Duration::from_secs(15);

/// A feed as a response: also tells nginx not to buffer it (else events would wait in
/// the proxy's buffer instead of reaching the page).
pub(super) fn feed_response(sse: impl IntoResponse) -> Response {
    ([("x-accel-buffering", "no"), ("cache-control", "no-store")], sse).into_response()
}

fn parse_uid(raw: &str) -> Result<Uid, ApiError> {
    Uid::parse(raw.as_bytes()).ok_or_else(|| ApiError::bad_request("a player id is a number"))
}

/// The signed-in account and, for a GM account, its view.
pub async fn me(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
) -> Result<Response, ApiError> {
    let view = console.gm_view(&session).await?;
    Ok(Json(json!({ "gm": session.gm, "role": session.role, "view": view })).into_response())
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    before: Option<u64>,
}

pub async fn history(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
    Path(uid): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let uid = parse_uid(&uid)?;
    let (messages, more) = console.history(session.gm, uid, q.before).await?;
    Ok(Json(json!({ "messages": messages, "more": more })).into_response())
}

pub async fn mark_read(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
    Path(uid): Path<String>,
) -> Result<StatusCode, ApiError> {
    console.mark_read(session.gm, parse_uid(&uid)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct SendBody {
    text: String,
}

/// Sends through the relay's GM send path (the player must be this GM's, rate limits,
/// answered after the broker stored it), exactly as the legacy `send` does.
pub async fn send(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
    Path(uid): Path<String>,
    Json(body): Json<SendBody>,
) -> Result<Response, ApiError> {
    let uid = parse_uid(&uid)?;
    let sent = console.relay().gm_send(session.gm, uid, encode_base64(&body.text).as_bytes()).await?;
    Ok(Json(json!({ "id": sent.id, "host": sent.host, "delivery_seq": sent.seq })).into_response())
}

#[derive(Deserialize)]
pub struct AddBody {
    host: String,
    uid: String,
}

pub async fn add_player(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
    Json(body): Json<AddBody>,
) -> Result<StatusCode, ApiError> {
    let host = HostId::parse(body.host.trim().as_bytes())
        .ok_or_else(|| ApiError::bad_request("a host is a number"))?;
    let uid = parse_uid(body.uid.trim())?;
    console.relay().add(session.gm, host, uid).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_player(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
    Path(uid): Path<String>,
) -> Result<StatusCode, ApiError> {
    console.relay().remove(session.gm, parse_uid(&uid)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct PresenceBody {
    online: bool,
}

pub async fn presence(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
    Json(body): Json<PresenceBody>,
) -> Result<StatusCode, ApiError> {
    let result = if body.online {
        console.relay().online(session.gm).await
    } else {
        console.relay().offline(session.gm).await
    };
    match result {
        // Offline twice is offline.
        Ok(()) | Err(crate::domain::RelayError::NotOnline) => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(e.into()),
    }
}

/// A host's delivery figures, from the dashboard's cache (refreshed about once a second
/// while anyone looks): the page marks a message taken once `acked_through` reaches it.
pub async fn host(
    State(console): State<Arc<Console>>,
    ApiSession(_): ApiSession,
    Path(host): Path<String>,
) -> Result<Response, ApiError> {
    let host = HostId::parse(host.as_bytes()).ok_or_else(|| ApiError::bad_request("a host is a number"))?;
    console.monitor().watch();
    let known = console.monitor().snapshot().at_ms > 0;
    let row = console.monitor().host(host);
    Ok(Json(json!({ "host": host, "known": known, "figures": row })).into_response())
}

#[derive(Deserialize)]
pub struct LiveQuery {
    /// Start after this `GS_TO_GM` sequence (the view's `live_after`) when the browser
    /// has no `Last-Event-ID` yet.
    after: Option<u64>,
}

/// What an open live feed holds between two events.
struct LiveState<F> {
    feed: std::pin::Pin<Box<F>>,
    closing: tokio::sync::watch::Receiver<bool>,
    /// Held for the feed's life: it counts against the open-feed limit.
    _slot: crate::console::LiveFeedSlot,
    /// Consecutive errors of the feed.
    errors: usize,
    recheck: tokio::time::Interval,
    console: Arc<Console>,
    token: String,
}

/// New messages from the GM's players, as server-sent events (`event: chat`).
pub async fn live(
    State(console): State<Arc<Console>>,
    ApiSession(session): ApiSession,
    headers: HeaderMap,
    Query(q): Query<LiveQuery>,
) -> Result<Response, ApiError> {
    let resume =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let after = resume.or(q.after);
    let slot = console.live_feed_slot(session.gm)?;
    let feed = console.relay().bus().gm_feed(session.gm, after).await?;
    let closing = console.closing();
    let token = cookie_token(&headers).unwrap_or_default().to_owned();
    let recheck =
        tokio::time::interval_at(tokio::time::Instant::now() + FEED_SESSION_RECHECK, FEED_SESSION_RECHECK);
    let first = futures::stream::once(async {
        Ok::<_, Infallible>(Event::default().retry(FEED_RETRY).comment("live"))
    });
    let gm = session.gm;
    let state = LiveState { feed: Box::pin(feed), closing, _slot: slot, errors: 0, recheck, console, token };
    let events = futures::stream::unfold(state, move |mut s| async move {
        loop {
            if *s.closing.borrow() {
                return None;
            }
            let next = tokio::select! {
                next = s.feed.next() => next,
                _ = s.closing.changed() => None,
                _ = s.recheck.tick() => {
                    if still_signed_in(&s.console, &s.token).await {
                        continue;
                    }
                    tracing::info!(%gm, "live feed ended: its session is over");
                    return None;
                }
            };
            match next {
                Some(Ok(m)) => {
                    let data = json!({
                        "seq": m.seq, "id": m.event.id, "uid": m.event.uid, "host": m.event.host,
                        "text": m.event.text, "ts": m.event.ts,
                    });
                    let event = Event::default().id(m.seq.to_string()).event("chat").data(data.to_string());
                    s.errors = 0;
                    return Some((Ok::<_, Infallible>(event), s));
                }
                // The ordered consumer recreates itself after a hiccup (a missed heartbeat,
                // a reconnect) and goes on from where it was; only a run of failures ends
                // the feed, and the browser then reconnects after the last id it saw.
                Some(Err(e)) if s.errors < MAX_FEED_ERRORS => {
                    s.errors += 1;
                    tracing::debug!(error = %e, errors = s.errors, "a console live feed hiccuped");
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "a console live feed failed; the page will reconnect");
                    return None;
                }
                None => return None,
            }
        }
    });
    Ok(feed_response(Sse::new(first.chain(events)).keep_alive(KeepAlive::new().interval(FEED_KEEP_ALIVE))))
}
