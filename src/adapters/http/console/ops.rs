//! The ops dashboard's API: the figures as JSON, and the same as server-sent events
//! pushed when they change. Pages only read the shared snapshot, so the cost in JetStream
//! API calls is the refresher's, whatever the number of open dashboards.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::gm::{feed_response, FEED_KEEP_ALIVE, FEED_RETRY, FEED_SESSION_RECHECK};
use super::{cookie_token, still_signed_in, ApiError, SupervisorSession};
use crate::console::monitor::REFRESH_PERIOD;
use crate::console::Console;

pub async fn snapshot(
    State(console): State<Arc<Console>>,
    SupervisorSession(_): SupervisorSession,
) -> Response {
    console.monitor().watch();
    Json(&*console.monitor().snapshot()).into_response()
}

/// The figures, once now and again at each change, until the page goes away or the relay
/// shuts down. While open it keeps the refresher going.
pub async fn live(
    State(console): State<Arc<Console>>,
    SupervisorSession(supervisor): SupervisorSession,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let slot = console.live_feed_slot(supervisor.gm)?;
    console.monitor().watch();
    let figures = console.monitor().subscribe();
    let closing = console.closing();
    let token = cookie_token(&headers).unwrap_or_default().to_owned();
    let state = (console, figures, closing, slot, true, (token, Instant::now()));
    let events = futures::stream::unfold(
        state,
        |(console, mut figures, mut closing, slot, first, mut session)| async move {
            if !first {
                let mut keep_watching = tokio::time::interval(REFRESH_PERIOD);
                loop {
                    tokio::select! {
                        changed = figures.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                            break;
                        }
                        _ = keep_watching.tick() => console.monitor().watch(),
                        _ = closing.changed() => return None,
                    }
                }
            }
            if *closing.borrow() {
                return None;
            }
            // The session is looked at again before an event, at most every recheck period.
            if session.1.elapsed() >= FEED_SESSION_RECHECK {
                if !still_signed_in(&console, &session.0).await {
                    tracing::info!("dashboard feed ended: its session is over");
                    return None;
                }
                session.1 = Instant::now();
            }
            let snapshot = figures.borrow_and_update().clone();
            let data = serde_json::to_string(&*snapshot).unwrap_or_else(|_| "{}".into());
            let mut event = Event::default().event("figures").data(data);
            if first {
                event = event.retry(FEED_RETRY);
            }
            Some((Ok::<_, Infallible>(event), (console, figures, closing, slot, false, session)))
        },
    );
    Ok(feed_response(Sse::new(events).keep_alive(KeepAlive::new().interval(FEED_KEEP_ALIVE))))
}
