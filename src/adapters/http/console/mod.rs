//! The console's HTTP side, under `/console`: the sign-in, GM and dashboard pages (plain
//! HTML, CSS and JS embedded in the binary: deployments may have no internet), their JSON
//! API and two server-sent-event feeds (a GM's new messages, the dashboard's figures).
//!
//! Sessions are signed, HttpOnly, `SameSite=Strict` cookies (see
//! [`crate::domain::session`]); each request also checks the account's credential version
//! in Redis, so a new password ends older sessions at once. Every write (POST, DELETE)
//! must carry `Content-Type: application/json`, even one without a body: a cross-site form
//! cannot send that content type, which is what keeps writes from being forged.

mod assets;
mod gm;
mod ops;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::console::{Console, LiveFeedRefused};
use crate::domain::event::now_ms;
use crate::domain::session::{Role, Session, SESSION_TTL_S};
use crate::domain::{Errno, RelayError};

/// The session cookie's name.
pub const COOKIE: &str = "gmr_session";

/// Where the console lives; the legacy paths may not use it (see the config).
pub const BASE: &str = "/console";

/// Largest JSON body the console accepts: a chat line is at most 500 characters.
const MAX_BODY_BYTES: usize = 16 * 1024;

pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(assets::gm_page))
        .route("/console/signin", get(assets::signin_page))
        .route("/console/ops", get(assets::ops_page))
        .route("/console/assets/{name}", get(assets::asset))
        .route("/console/api/signin", post(sign_in))
        .route("/console/api/signout", post(sign_out))
        .route("/console/api/me", get(gm::me))
        .route("/console/api/presence", post(gm::presence))
        .route("/console/api/players", post(gm::add_player))
        .route("/console/api/players/{uid}", delete(gm::remove_player))
        .route("/console/api/players/{uid}/history", get(gm::history))
        .route("/console/api/players/{uid}/messages", post(gm::send))
        .route("/console/api/players/{uid}/read", post(gm::mark_read))
        .route("/console/api/hosts/{host}", get(gm::host))
        .route("/console/api/live", get(gm::live))
        .route("/console/api/ops", get(ops::snapshot))
        .route("/console/api/ops/live", get(ops::live))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .route_layer(axum::middleware::from_fn(json_writes_only))
        .with_state(console)
}

/// Refuses a write that does not say it is JSON. A page on another site can make the
/// browser send a form (a POST, with the cookie when that page is same-site, e.g. on
/// another port of this host), but not with this content type without asking the console
/// first (a CORS preflight, which the console never allows). Writes that take no body
/// (sign-out, marking read) would otherwise be forgeable.
async fn json_writes_only(request: Request, next: Next) -> Response {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if safe || json {
        return next.run(request).await;
    }
    ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "writes must be JSON (Content-Type: application/json)")
        .into_response()
}

/// An API failure: a status and a JSON body `{"error": "...", "errno": N}`. Backend
/// causes go to the log, never to the body.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    status: StatusCode,
    message: String,
    errno: Option<i32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), errno: None }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> Self {
        match e {
            RelayError::NotOnline => ApiError::new(StatusCode::CONFLICT, "you are not online"),
            RelayError::Unavailable { backend, source } => {
                tracing::error!(%backend, error = %source, "console request failed: backend unavailable");
                let errno = Errno::Unavailable;
                ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: errno.reason().into(),
                    errno: Some(errno.code()),
                }
            }
            RelayError::Rejected(errno) => {
                let status = match errno {
                    Errno::BadParam | Errno::BadMsg => StatusCode::BAD_REQUEST,
                    Errno::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                    Errno::RoleUnavailable | Errno::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::CONFLICT,
                };
                ApiError { status, message: errno.reason().into(), errno: Some(errno.code()) }
            }
        }
    }
}

impl From<LiveFeedRefused> for ApiError {
    fn from(refused: LiveFeedRefused) -> Self {
        match refused {
            LiveFeedRefused::RelayFull => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many live feeds; retrying")
            }
            LiveFeedRefused::AccountFull => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many live pages open for this account; close some",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(errno) = self.errno {
            body["errno"] = errno.into();
        }
        (self.status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
    }
}

/// The session token of a request, if it carries our cookie.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Why a request is not signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum NotSignedIn {
    #[error("not signed in")]
    NoSession,
    #[error("session expired or ended; sign in again")]
    Invalid,
    #[error("sessions cannot be checked now")]
    Unavailable,
}

/// Checks the cookie's signature and expiry, then that the account still has the
/// credential version and role the session was signed for and that it was not signed out.
async fn authenticate(console: &Console, headers: &HeaderMap) -> Result<Session, NotSignedIn> {
    check_token(console, cookie_token(headers).ok_or(NotSignedIn::NoSession)?).await
}

async fn check_token(console: &Console, token: &str) -> Result<Session, NotSignedIn> {
    let session = console.signin().key().verify(token, now_ms() / 1000).map_err(|_| NotSignedIn::Invalid)?;
    match console.relay().store().session_state(session.gm, token_mac(token)).await {
        Ok((Some((role, ver)), false)) if role == session.role && ver == session.ver => Ok(session),
        Ok(_) => Err(NotSignedIn::Invalid),
        Err(e) => {
            tracing::error!(error = %e, "cannot check a console session");
            Err(NotSignedIn::Unavailable)
        }
    }
}

/// Whether the session of a long-lived response (a live feed) still stands; a feed whose
/// session ended, was signed out or lost its password ends too. While sessions cannot be
/// checked (Redis away) the feed goes on: it carries nothing the session could not see.
async fn still_signed_in(console: &Console, token: &str) -> bool {
    !matches!(check_token(console, token).await, Err(NotSignedIn::NoSession | NotSignedIn::Invalid))
}

/// The signature part of a token: what a sign-out is remembered by.
fn token_mac(token: &str) -> &str {
    token.rsplit('.').next().unwrap_or(token)
}

/// A signed-in API caller; others get 401 (503 when sessions cannot be checked).
pub struct ApiSession(pub Session);

impl FromRequestParts<Arc<Console>> for ApiSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> Result<Self, ApiError> {
        match authenticate(console, &parts.headers).await {
            Ok(s) => Ok(ApiSession(s)),
            Err(e @ NotSignedIn::Unavailable) => {
                Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
            }
            Err(e) => Err(ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())),
        }
    }
}

/// A signed-in supervisor; a GM gets 403.
pub struct SupervisorSession(pub Session);

impl FromRequestParts<Arc<Console>> for SupervisorSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> Result<Self, ApiError> {
        let ApiSession(session) = ApiSession::from_request_parts(parts, console).await?;
        if session.role != Role::Supervisor {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "the dashboard is for supervisors"));
        }
        Ok(SupervisorSession(session))
    }
}

/// A signed-in page visitor; others are sent to the sign-in page.
pub struct PageSession(pub Session);

impl FromRequestParts<Arc<Console>> for PageSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> Result<Self, Response> {
        authenticate(console, &parts.headers)
            .await
            .map(PageSession)
            .map_err(|_| Redirect::to("/console/signin").into_response())
    }
}

/// `Set-Cookie` for `token` (or, with None, one that deletes the cookie). `Secure` when
/// the request came through a TLS-terminating proxy.
fn session_cookie(token: Option<&str>, headers: &HeaderMap) -> HeaderValue {
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let (value, max_age) = match token {
        Some(t) => (t, SESSION_TTL_S),
        None => ("", 0),
    };
    let cookie = format!(
        "{COOKIE}={value}; Path={BASE}; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&cookie).expect("a token is ASCII without separators")
}

#[derive(serde::Deserialize)]
struct SignInBody {
    gm: String,
    password: String,
}

async fn sign_in(
    axum::extract::State(console): axum::extract::State<Arc<Console>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(body): Json<SignInBody>,
) -> Result<Response, ApiError> {
    use crate::console::accounts::SignInError;
    let gm = crate::domain::GmId::parse(body.gm.trim().as_bytes())
        .ok_or_else(|| ApiError::bad_request("the GM account is a number"))?;
    let ip = console.access().client_ip(peer.ip(), &headers);
    match console.signin().sign_in(console.relay().store(), gm, &body.password, ip).await {
        Ok((session, token)) => {
            let home = if session.role == Role::Supervisor
                && console.relay().store().gm_profile(gm).await.ok().flatten().is_none()
            {
                "/console/ops"
            } else {
                "/console/"
            };
            let body = Json(json!({ "gm": session.gm, "role": session.role, "home": home }));
            Ok(([(header::SET_COOKIE, session_cookie(Some(&token), &headers))], body).into_response())
        }
        Err(e @ SignInError::Refused) => Err(ApiError::new(StatusCode::UNAUTHORIZED, e.to_string())),
        Err(e @ SignInError::Limited) => Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())),
        Err(e @ SignInError::Busy) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(SignInError::Store(e)) => Err(e.into()),
    }
}

/// Ends the session on every relay (until its token would have expired) and deletes the
/// cookie. The cookie is deleted even when the sign-out cannot be recorded (503).
async fn sign_out(
    axum::extract::State(console): axum::extract::State<Arc<Console>>,
    headers: HeaderMap,
) -> Response {
    let clear = [(header::SET_COOKIE, session_cookie(None, &headers))];
    let now = now_ms() / 1000;
    let Some((token, session)) =
        cookie_token(&headers).and_then(|t| Some((t, console.signin().key().verify(t, now).ok()?)))
    else {
        return (StatusCode::NO_CONTENT, clear).into_response();
    };
    let ttl = Duration::from_secs(session.expires.saturating_sub(now).max(1) as u64);
    match console.relay().store().sign_out(token_mac(token), ttl).await {
        Ok(()) => (StatusCode::NO_CONTENT, clear).into_response(),
        Err(e) => {
            tracing::error!(error = %e, gm = %session.gm, "cannot record a console sign-out");
            let mut r = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sign-out not recorded; try again")
                .into_response();
            r.headers_mut().insert(header::SET_COOKIE, session_cookie(None, &headers));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_session_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; gmr_session=v1.x.y; gmr_sessionx=no"));
        assert_eq!(cookie_token(&h), Some("v1.x.y"));
        h.insert(header::COOKIE, HeaderValue::from_static("gmr_sessionx=no"));
        assert_eq!(cookie_token(&h), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_scoped() {
        let c = session_cookie(Some("tok"), &HeaderMap::new());
        assert_eq!(c, "gmr_session=tok; Path=/console; Max-Age=43200; HttpOnly; SameSite=Strict");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(session_cookie(None, &h)
            .to_str()
            .unwrap()
            .ends_with("Max-Age=0; HttpOnly; SameSite=Strict; Secure"));
    }
}
