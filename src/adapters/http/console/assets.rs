//! The console's pages and static files, compiled into the binary (`include_str!`): no
//! CDN, no build step, nothing to deploy beside the relay.
//!
//! Pages carry a strict Content-Security-Policy (scripts and styles from this origin
//! only, no inline code), so text that reaches a page can never run as script; the
//! scripts also insert text with `textContent` only.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::PageSession;
use crate::console::Console;
use crate::domain::session::Role;

const SIGNIN_HTML: &str = include_str!("assets/signin.html");
const GM_HTML: &str = include_str!("assets/gm.html");
const OPS_HTML: &str = include_str!("assets/ops.html");

/// Files under `/console/assets/`: name, content type, contents.
const FILES: &[(&str, &str, &str)] = &[
    ("console.css", "text/css; charset=utf-8", include_str!("assets/console.css")),
    ("common.js", "text/javascript; charset=utf-8", include_str!("assets/common.js")),
    ("signin.js", "text/javascript; charset=utf-8", include_str!("assets/signin.js")),
    ("gm.js", "text/javascript; charset=utf-8", include_str!("assets/gm.js")),
    ("ops.js", "text/javascript; charset=utf-8", include_str!("assets/ops.js")),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn page(html: &'static str) -> Response {
    let mut r = html.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub async fn signin_page() -> Response {
    page(SIGNIN_HTML)
}

pub async fn gm_page(PageSession(_): PageSession) -> Response {
    page(GM_HTML)
}

pub async fn ops_page(PageSession(session): PageSession, State(_): State<Arc<Console>>) -> Response {
    if session.role != Role::Supervisor {
        return Redirect::to("/console/").into_response();
    }
    page(OPS_HTML)
}

pub async fn asset(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                // Small files that change with the binary: revalidating costs little.
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
