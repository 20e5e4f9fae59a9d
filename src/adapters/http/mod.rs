//! HTTP adapter: the legacy GM/GS endpoints and the operational endpoints (`/healthz`,
//! `/readyz`, `/metrics`), as one axum router, with the console under `/console` when it
//! is on.

pub mod access;
pub mod console;
pub mod legacy;
pub mod pyjson;
pub mod query;
pub mod server;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tower_http::timeout::TimeoutLayer;

use crate::adapters::nats::JetStreamBus;
use crate::adapters::redis::RedisStore;
use crate::adapters::role::RoleClient;
use crate::domain::ports::FriendStore;
use crate::domain::rate::RateLimiter;
use crate::metrics::Metrics;
use crate::relay::{Relay, Settlement};

/// The relay as wired in production: Redis state, JetStream events, HTTP role service.
pub type AppRelay = Relay<RedisStore, JetStreamBus, RoleClient>;
pub type AppSettlement = Settlement<RedisStore, JetStreamBus, RoleClient>;

/// Requests handled at once, over all routes; past it a request waits for a slot on its
/// connection (at most one per connection, and connections are bounded by
/// [`server::MAX_CONNECTIONS`]). Far above 1,000 hosts polling a few times a second.
pub const MAX_CONCURRENT_REQUESTS: usize = 4096;

/// No request may take longer: every backend call inside has a shorter bound of its own.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Bound on each backend check of `/readyz`.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct AppState {
    pub relay: Arc<AppRelay>,
    pub access: Arc<access::Access>,
    pub metrics: Arc<Metrics>,
    /// Requests per second per client IP, over both legacy endpoints.
    pub ip_rate: Arc<RateLimiter<IpAddr>>,
    /// The web console, when `GM_RELAY_SESSION_KEY` is set.
    pub console: Option<Arc<crate::console::Console>>,
    /// The native interface's own NATS connection (`adapters::native::connect`).
    pub native: async_nats::Client,
}

pub fn router(state: AppState, gm_path: &str, gs_path: &str) -> Router {
    let console = state.console.clone();
    let mut app = Router::new()
        .route(gm_path, get(legacy::gm))
        .route(gs_path, get(legacy::gs))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    if let Some(console) = console {
        app = app.merge(console::router(console));
    }
    // A live feed's response is its headers; the stream after them is bounded by the
    // console's own feed limit, not by these.
    app.layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT))
        // Global: `Router::layer` wraps each route on its own, and a plain concurrency limit
        // would then bound each route separately.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let nats = tokio::time::timeout(READY_CHECK_TIMEOUT, state.relay.bus().ping()).await;
    let redis = tokio::time::timeout(READY_CHECK_TIMEOUT, state.relay.store().ping()).await;
    let mut failing = Vec::new();
    if !matches!(nats, Ok(Ok(()))) {
        failing.push("nats");
    }
    // Same server, so its state is enough: while it reconnects, native requests fail.
    if state.native.connection_state() != async_nats::connection::State::Connected {
        failing.push("nats (native interface)");
    }
    if !matches!(redis, Ok(Ok(()))) {
        failing.push("redis");
    }
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        // Which backend failed is in the log, not in a reply anyone can read.
        tracing::warn!(?failing, "not ready");
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(Ok(depth)) = tokio::time::timeout(READY_CHECK_TIMEOUT, state.relay.store().outbox_len()).await {
        state.metrics.outbox_depth.set(depth as i64);
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
