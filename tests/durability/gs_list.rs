//! `GM_RELAY_GS_LIST_URL`: the original's server list joins the GS allowlist, is refreshed
//! periodically, and a failed refresh keeps the last good list.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::common::*;
use crate::support::app::TestApp;
use crate::support::wait_until_async;

const REFUSED: &str = "127.0.0.1 has no access to the website";

/// What the list server answers now, and how many requests it has answered.
#[derive(Default)]
struct ListState {
    reply: Mutex<(u16, String)>,
    served: AtomicUsize,
}

async fn serve_list(State(state): State<Arc<ListState>>) -> (StatusCode, String) {
    let (status, body) = state.reply.lock().unwrap().clone();
    state.served.fetch_add(1, Ordering::SeqCst);
    (StatusCode::from_u16(status).unwrap(), body)
}

/// A server-list HTTP server on loopback; lives as long as the test's runtime.
async fn list_server(state: Arc<ListState>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the list server");
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/servers.txt", get(serve_list)).with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn set_reply(state: &ListState, status: u16, body: &str) {
    *state.reply.lock().unwrap() = (status, body.to_owned());
}

/// Whether a GS request from this test (127.0.0.1) is let in.
async fn gs_allowed(app: &TestApp) -> bool {
    let r = app.gs("action=online&host=3").await;
    assert_eq!(r.status, 200);
    match r.text().as_str() {
        REFUSED => false,
        _ => {
            assert_eq!(r.res(), 1, "{}", r.text());
            true
        }
    }
}

/// Waits until the list server answered `more` requests beyond the count now: the last of
/// them started after everything before it finished (the relay refreshes one at a time),
/// so at least one full refresh ran on what the server answers now.
async fn wait_refreshes(state: &ListState, more: usize) {
    let target = state.served.load(Ordering::SeqCst) + more;
    wait_until_async(DEADLINE, &format!("the list server answered {target} requests"), || async {
        state.served.load(Ordering::SeqCst) >= target
    })
    .await;
}

#[tokio::test]
async fn server_list_allows_keeps_last_good_list_and_revokes() {
    let state = Arc::new(ListState::default());
    set_reply(&state, 200, "s1 8001 10.1.1.1 x\nthis line is bad\ns2 8002 10.1.1.2 y\n");
    let addr = list_server(Arc::clone(&state)).await;
    let url = format!("http://{addr}/servers.txt");
    let app = TestApp::spawn_with(&[
        ("GM_RELAY_GS_ALLOW", "10.255.255.1"),
        ("GM_RELAY_GS_LIST_URL", &url),
        ("GM_RELAY_GS_LIST_REFRESH_S", "1"),
    ])
    .await;

    // Not on the list (nor on the static allowlist): refused. The GM side is unaffected.
    wait_refreshes(&state, 2).await;
    assert!(!gs_allowed(&app).await, "127.0.0.1 is not listed yet");
    app.create_gm(GM, GM_NAME).await;

    // Listed (runs of spaces, next to a bad line): allowed once the list is refreshed.
    set_reply(&state, 200, "s1   8001   10.1.1.1   x\nbroken\ns3 8003 127.0.0.1 z\ns4 1 not-an-ip z\n");
    wait_until_async(DEADLINE, "127.0.0.1 is let in", || gs_allowed(&app)).await;

    // The list server fails: the last good list stays.
    set_reply(&state, 500, "internal error");
    wait_refreshes(&state, 2).await;
    assert!(gs_allowed(&app).await, "a failed refresh dropped the last good list");

    // Dropped from the list: refused again.
    set_reply(&state, 200, "s1 8001 10.1.1.1 x\n");
    wait_until_async(DEADLINE, "127.0.0.1 is refused", || async { !gs_allowed(&app).await }).await;
    wait_refreshes(&state, 2).await;
    assert!(!gs_allowed(&app).await);
}
