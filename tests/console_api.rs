//! The console over HTTP, without a browser: sign-in and sessions, the GM view's API
//! (roster, unread counts, history pages, sends and their delivery status, the live feed
//! and its resumption), the dashboard's figures and their bounded cost, and the
//! `gm set-password` command. Real nats-server and redis-server, loopback only.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use gm_relay::config::Config;
use gm_relay::console::accounts::{MAX_FAILURES_PER_ACCOUNT, MAX_FAILURES_PER_IP};
use gm_relay::console::monitor::MAX_API_CALLS_PER_REFRESH;
use gm_relay::console::MAX_LIVE_FEEDS_PER_ACCOUNT;
use gm_relay::domain::session::Role;
use gm_relay::startup::Application;
use serde_json::{json, Value};
use support::app::TestApp;
use support::console::{create_gm_with_password, spawn_console, ConsoleClient, KEY};
use support::wait_until_async;

const PASSWORD: &str = "correct horse battery";

/// Bound on a condition a test waits for (the dashboard refreshes once a second).
const WAIT: Duration = Duration::from_secs(15);

async fn signed_in(app: &TestApp, gm: i64, role: Role) -> ConsoleClient {
    create_gm_with_password(app, gm, &format!("GM {gm}"), PASSWORD, role).await;
    let mut c = ConsoleClient::for_app(app);
    let r = c.sign_in(gm, PASSWORD).await;
    assert_eq!(r.status, 200, "{r:?}");
    c
}

/// A second in-process relay on the same NATS and Redis, with `key` as session key.
async fn second_relay(app: &TestApp, key: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = Config::from_map(
        &[
            ("GM_RELAY_LISTEN", "127.0.0.1:0".to_owned()),
            ("GM_RELAY_NATS_URL", app.nats.url()),
            ("GM_RELAY_REDIS_URL", app.redis.url()),
            ("GM_RELAY_SESSION_KEY", key.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    )
    .expect("config");
    let relay = Application::build(config).await.expect("second relay");
    let base = format!("http://{}", relay.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(relay.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    (base, stop)
}

#[tokio::test]
async fn the_console_is_off_without_a_session_key_and_legacy_endpoints_work_beside_it() {
    let off = TestApp::spawn().await;
    assert_eq!(ConsoleClient::for_app(&off).get("/console/").await.status, 404);

    let app = spawn_console(&[]).await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    assert_eq!(app.gm_send(7, 1001, "legacy hello").await.res(), 1);
    assert_eq!(app.gs_receive(3).await, vec![("1001".to_owned(), vec!["legacy hello".to_owned()])]);
    let page = ConsoleClient::for_app(&app).get("/console/").await;
    assert_eq!((page.status, page.location.as_deref()), (303, Some("/console/signin")));
}

#[tokio::test]
async fn sign_in_sets_a_signed_http_only_cookie_that_any_relay_with_the_key_accepts() {
    let app = spawn_console(&[]).await;
    create_gm_with_password(&app, 7, "Alice", PASSWORD, Role::Gm).await;
    let mut c = ConsoleClient::for_app(&app);

    let wrong = c.sign_in(7, "wrong password!").await;
    assert_eq!((wrong.status, wrong.json["error"].as_str()), (401, Some("wrong account or password")));
    let nobody = c.sign_in(8, PASSWORD).await;
    assert_eq!(nobody.status, 401, "an account without a password looks the same");
    assert_eq!(c.get("/console/api/me").await.status, 401);

    let ok = c.sign_in(7, PASSWORD).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json, json!({"gm": "7", "role": "gm", "home": "/console/"}));
    let cookie = ok.set_cookie.unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=43200"] {
        assert!(cookie.contains(part), "{part} in {cookie}");
    }
    let me = c.get("/console/api/me").await;
    assert_eq!((me.status, me.json["view"]["name"].as_str()), (200, Some("Alice")));
    assert_eq!(c.get_text("/console/").await.0, 200);
    assert_eq!(c.get("/console/api/ops").await.status, 403, "a GM is not a supervisor");

    // Another relay with the same key accepts the session; one with another key does not.
    let (same, _stop_same) = second_relay(&app, KEY).await;
    assert_eq!(c.with_base(&same).get("/console/api/me").await.status, 200);
    let (other, _stop_other) = second_relay(&app, "another-key-of-at-least-32-bytes-long!!").await;
    assert_eq!(c.with_base(&other).get("/console/api/me").await.status, 401);

    // A tampered cookie is refused; a new password ends the session everywhere.
    let mut forged = c.with_base(&app.base_url());
    forged.cookie = Some(c.cookie.clone().unwrap().replacen(".gm.", ".supervisor.", 1));
    assert_eq!(forged.get("/console/api/me").await.status, 401);
    gm_relay::console::accounts::set_password(
        app.relay().store(),
        gm_relay::domain::GmId(7),
        "new password!",
        Role::Gm,
    )
    .await
    .unwrap();
    assert_eq!(c.get("/console/api/me").await.status, 401);
    assert_eq!(c.with_base(&same).get("/console/api/me").await.status, 401);

    // Signing out clears the cookie.
    let out = c.post("/console/api/signout", json!({})).await;
    assert_eq!(out.status, 204);
    assert!(out.set_cookie.unwrap().contains("Max-Age=0"));
}

/// Signing out ends that session on every relay, not just in this browser: the token,
/// replayed, is refused, and an open live feed ends at its next session check. Another
/// session of the same account goes on.
#[tokio::test]
async fn signing_out_ends_the_session_everywhere_and_closes_its_live_feed() {
    let app = spawn_console(&[]).await;
    let mut c = signed_in(&app, 7, Role::Gm).await;
    let mut other_tab = ConsoleClient::for_app(&app);
    assert_eq!(other_tab.sign_in(7, PASSWORD).await.status, 200);
    let (second, _stop) = second_relay(&app, KEY).await;
    let mut feed = c.events("/console/api/live", None).await;
    let replayed = c.with_base(&app.base_url());

    let out = c.post("/console/api/signout", json!({})).await;
    assert_eq!(out.status, 204);
    assert!(out.set_cookie.unwrap().contains("Max-Age=0"));
    c.cookie = None;
    assert_eq!(replayed.get("/console/api/me").await.status, 401);
    assert_eq!(replayed.with_base(&second).get("/console/api/me").await.status, 401);
    assert_eq!(other_tab.get("/console/api/me").await.status, 200, "only that session ends");

    let started = std::time::Instant::now();
    let ended = feed.next_or_end(Duration::from_secs(30)).await;
    assert!(ended.is_none(), "the feed of a signed-out session sent {ended:?}");
    eprintln!("live feed ended {:?} after the sign-out", started.elapsed());
}

#[tokio::test]
async fn failed_sign_ins_are_limited_per_account_and_per_ip() {
    // Trusting loopback as a proxy lets the test speak from many client IPs.
    let app = spawn_console(&[("GM_RELAY_TRUSTED_PROXIES", "127.0.0.1")]).await;
    create_gm_with_password(&app, 7, "Alice", PASSWORD, Role::Gm).await;
    create_gm_with_password(&app, 8, "Bob", PASSWORD, Role::Gm).await;

    // Per account: from several addresses, the account is locked after its limit, even
    // for the right password; other accounts are not.
    for i in 0..MAX_FAILURES_PER_ACCOUNT {
        let mut c = ConsoleClient::for_app(&app);
        c.real_ip = Some(format!("10.0.0.{}", i % 5 + 1));
        assert_eq!(c.sign_in(7, "wrong password!").await.status, 401);
    }
    let mut c = ConsoleClient::for_app(&app);
    c.real_ip = Some("10.0.1.1".into());
    let locked = c.sign_in(7, PASSWORD).await;
    assert_eq!(
        (locked.status, locked.json["error"].as_str()),
        (429, Some("too many failed sign-ins; try again later"))
    );
    assert_eq!(c.sign_in(8, PASSWORD).await.status, 200);

    // Per IP: one address guessing across accounts is stopped, another address is not.
    let mut guesser = ConsoleClient::for_app(&app);
    guesser.real_ip = Some("10.9.9.9".into());
    for i in 0..MAX_FAILURES_PER_IP {
        assert_eq!(guesser.sign_in(1000 + i as i64, "guess").await.status, 401);
    }
    assert_eq!(guesser.sign_in(8, PASSWORD).await.status, 429);
    let mut other = ConsoleClient::for_app(&app);
    other.real_ip = Some("10.9.9.10".into());
    assert_eq!(other.sign_in(8, PASSWORD).await.status, 200);
}

/// Guesses sent all at once are counted before their passwords are checked: no more than
/// the account's limit get a password check, however many arrive together.
#[tokio::test]
async fn concurrent_guesses_cannot_overrun_the_account_limit() {
    const GUESSES: u64 = 4 * MAX_FAILURES_PER_ACCOUNT;
    let app = spawn_console(&[("GM_RELAY_TRUSTED_PROXIES", "127.0.0.1")]).await;
    create_gm_with_password(&app, 7, "Alice", PASSWORD, Role::Gm).await;
    let guesses = (0..GUESSES).map(|i| {
        let mut c = ConsoleClient::for_app(&app);
        // Each from its own address: only the account's limit applies.
        c.real_ip = Some(format!("10.1.{}.{}", i / 200, i % 200 + 1));
        async move { c.sign_in(7, "wrong password!").await.status }
    });
    let statuses = futures::future::join_all(guesses).await;
    let checked = statuses.iter().filter(|s| **s == 401).count() as u64;
    let refused = statuses.iter().filter(|s| **s == 429).count() as u64;
    assert_eq!(checked, MAX_FAILURES_PER_ACCOUNT, "statuses: {statuses:?}");
    assert_eq!(refused, GUESSES - MAX_FAILURES_PER_ACCOUNT, "statuses: {statuses:?}");
    // The right password is refused too, until the window ends.
    assert_eq!(ConsoleClient::for_app(&app).sign_in(7, PASSWORD).await.status, 429);
}

/// A right password gives the address its attempt back: an office behind one NAT can sign
/// in more often than the per-IP failure limit.
#[tokio::test]
async fn sign_ins_that_succeed_do_not_use_up_the_ip_limit() {
    let app = spawn_console(&[]).await;
    create_gm_with_password(&app, 7, "Alice", PASSWORD, Role::Gm).await;
    for i in 0..=MAX_FAILURES_PER_IP {
        let mut c = ConsoleClient::for_app(&app);
        assert_eq!(c.sign_in(7, PASSWORD).await.status, 200, "sign-in {i}");
    }
}

/// Writes that take no body cannot be sent as a form (what another site can make a browser
/// do): marking read and signing out need the JSON content type like every other write.
#[tokio::test]
async fn bodyless_writes_cannot_be_forged_as_forms() {
    let app = spawn_console(&[]).await;
    let c = signed_in(&app, 7, Role::Gm).await;
    app.add(7, 3, 1001).await;
    assert_eq!(app.gs_send(1001, "p1").await.res(), 1);
    let unread = |me: Value| me["view"]["players"][0]["unread"].clone();
    assert_eq!(unread(c.get("/console/api/me").await.json), json!(1));

    let forged = c.post_form("/console/api/players/1001/read").await;
    assert_eq!(
        (forged.status, forged.json["error"].as_str()),
        (415, Some("writes must be JSON (Content-Type: application/json)"))
    );
    assert_eq!(unread(c.get("/console/api/me").await.json), json!(1), "still unread");
    assert_eq!(c.post_form("/console/api/signout").await.status, 415);
    assert_eq!(c.get("/console/api/me").await.status, 200, "still signed in");

    assert_eq!(c.post("/console/api/players/1001/read", json!({})).await.status, 204);
    assert_eq!(unread(c.get("/console/api/me").await.json), json!(0));
}

/// One account cannot take every live feed of a relay: past its own limit it is told to
/// close some, while other GMs still get theirs.
#[tokio::test]
async fn one_account_cannot_take_every_live_feed() {
    let app = spawn_console(&[]).await;
    let alice = signed_in(&app, 7, Role::Gm).await;
    let bob = signed_in(&app, 8, Role::Gm).await;
    let mut open = Vec::new();
    for _ in 0..MAX_LIVE_FEEDS_PER_ACCOUNT {
        open.push(alice.events("/console/api/live", None).await);
    }
    let refused = alice.get("/console/api/live").await;
    assert_eq!(refused.status, 429, "{refused:?}");
    let _bobs = bob.events("/console/api/live", None).await;
    // A closed feed gives its place back.
    drop(open.pop());
    // The relay notices a closed feed at its next write at the latest (a keep-alive).
    wait_until_async(2 * WAIT, "a closed feed's place is free again", || async {
        alice.status_only("/console/api/live").await == 200
    })
    .await;
}

#[tokio::test]
async fn roster_unread_history_send_and_delivery_status() {
    let app = spawn_console(&[]).await;
    let c = signed_in(&app, 7, Role::Gm).await;
    app.add(7, 3, 1001).await;
    app.add(7, 4, 2001).await;
    for text in ["p1", "p2", "p3"] {
        assert_eq!(app.gs_send(1001, text).await.res(), 1);
    }

    let me = c.get("/console/api/me").await.json;
    let players = me["view"]["players"].as_array().unwrap().clone();
    assert_eq!(players.len(), 2);
    assert_eq!(players[0], json!({"uid": "1001", "host": "3", "unread": 3, "unread_more": false}));
    assert_eq!(players[1], json!({"uid": "2001", "host": "4", "unread": 0, "unread_more": false}));

    let page = c.get("/console/api/players/1001/history").await.json;
    let texts: Vec<&str> =
        page["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["p1", "p2", "p3"]);
    assert_eq!(page["more"], json!(false));
    assert_eq!(c.post("/console/api/players/1001/read", json!({})).await.status, 204);
    let me = c.get("/console/api/me").await.json;
    assert_eq!(me["view"]["players"][0]["unread"], json!(0));

    // A reply goes through the GM send path: the legacy host poll receives it.
    let sent = c.post("/console/api/players/1001/messages", json!({"text": "你好 from the console"})).await;
    assert_eq!(sent.status, 200, "{sent:?}");
    let delivery_seq = sent.json["delivery_seq"].as_u64().unwrap();
    assert_eq!(sent.json["host"], json!("3"));
    let page = c.get("/console/api/players/1001/history").await.json;
    let last = page["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["from"].as_str(), last["text"].as_str()), (Some("gm"), Some("你好 from the console")));
    assert_eq!(last["delivery_seq"].as_u64(), Some(delivery_seq));
    assert_eq!(app.gs_receive(3).await, vec![("1001".to_owned(), vec!["你好 from the console".to_owned()])]);

    // Once the host's poll acknowledged it, the message shows as taken.
    wait_until_async(WAIT, "the host figures show the message taken", || async {
        let h = c.get("/console/api/hosts/3").await.json;
        h["figures"]["acked_through"].as_u64().is_some_and(|s| s >= delivery_seq)
    })
    .await;
    let page = c.get("/console/api/players/1001/history").await.json;
    assert_eq!(page["messages"].as_array().unwrap().last().unwrap()["taken"], json!(true));

    // The send path's checks apply: not this GM's player, empty text, too long.
    assert_eq!(
        c.post("/console/api/players/5555/messages", json!({"text": "x"})).await.json["errno"],
        json!(4)
    );
    assert_eq!(c.post("/console/api/players/1001/messages", json!({"text": ""})).await.status, 400);
    assert_eq!(
        c.post("/console/api/players/1001/messages", json!({"text": "x".repeat(501)})).await.status,
        400
    );
}

#[tokio::test]
async fn history_pages_go_back_through_one_conversation_only() {
    let app = spawn_console(&[]).await;
    let c = signed_in(&app, 7, Role::Gm).await;
    app.add(7, 3, 1001).await;
    app.add(7, 3, 1002).await;
    for i in 0..70 {
        assert_eq!(app.gs_send(1001, &format!("m{i}")).await.res(), 1);
        // Other traffic in between, which a page must not contain.
        assert_eq!(app.gs_send(1002, &format!("other{i}")).await.res(), 1);
        if i % 10 == 0 {
            assert_eq!(app.gm_send(7, 1001, &format!("reply{i}")).await.res(), 1);
        }
    }
    let mut all: Vec<String> = Vec::new();
    let mut before: Option<u64> = None;
    let mut pages = 0;
    loop {
        let q = before.map(|b| format!("?before={b}")).unwrap_or_default();
        let page = c.get(&format!("/console/api/players/1001/history{q}")).await.json;
        let messages = page["messages"].as_array().unwrap();
        pages += 1;
        let texts: Vec<String> = messages.iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect();
        all.splice(0..0, texts);
        if page["more"] == json!(false) || messages.is_empty() {
            break;
        }
        before = messages.first().and_then(|m| m["seq"].as_u64());
        assert!(pages < 10, "paging does not end");
    }
    let mut expected = Vec::new();
    for i in 0..70 {
        expected.push(format!("m{i}"));
        if i % 10 == 0 {
            expected.push(format!("reply{i}"));
        }
    }
    assert_eq!(all, expected);
    assert_eq!(pages, 3, "77 messages in pages of 30");
}

/// Copies are written behind the sends, in batches: many sends at once must each land in
/// their conversation's history exactly once, and a page read right after the replies sees
/// them all.
#[tokio::test]
async fn concurrent_sends_are_each_recorded_once_and_visible_right_after_their_replies() {
    const PLAYERS: i64 = 4;
    const PER_PLAYER: usize = 25;
    let app = spawn_console(&[("GM_RELAY_RATE_PLAYER_PER_S", "0"), ("GM_RELAY_RATE_GM_PER_S", "0")]).await;
    let c = signed_in(&app, 7, Role::Gm).await;
    for p in 0..PLAYERS {
        app.add(7, 3, 1001 + p).await;
    }
    let sends = (0..PLAYERS).flat_map(|p| (0..PER_PLAYER).map(move |i| (1001 + p, i))).map(|(uid, i)| {
        let app = &app;
        async move {
            let reply = if i % 5 == 0 {
                app.gm_send(7, uid, &format!("gm {uid} {i}")).await
            } else {
                app.gs_send(uid, &format!("player {uid} {i}")).await
            };
            assert_eq!(reply.res(), 1, "{reply:?}");
        }
    });
    futures::future::join_all(sends).await;

    for p in 0..PLAYERS {
        let uid = 1001 + p;
        let mut texts: Vec<String> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut before: Option<u64> = None;
        for _ in 0..10 {
            let q = before.map(|b| format!("?before={b}")).unwrap_or_default();
            let page = c.get(&format!("/console/api/players/{uid}/history{q}")).await.json;
            let messages = page["messages"].as_array().unwrap().clone();
            for m in &messages {
                assert!(ids.insert(m["id"].as_str().unwrap().to_owned()), "recorded twice: {m}");
                texts.push(m["text"].as_str().unwrap().to_owned());
            }
            if page["more"] == json!(false) || messages.is_empty() {
                break;
            }
            before = messages.first().and_then(|m| m["seq"].as_u64());
        }
        texts.sort();
        let mut expected: Vec<String> = (0..PER_PLAYER)
            .map(|i| if i % 5 == 0 { format!("gm {uid} {i}") } else { format!("player {uid} {i}") })
            .collect();
        expected.sort();
        assert_eq!(texts, expected, "history of {uid}");
    }
    let metrics = app.get("/metrics").await.text();
    assert!(metrics.contains("gm_relay_history_lost_total 0"), "{metrics}");
}

/// Thousands of sends at once go through the writer's queue and batches: each copy is
/// stored exactly once, and a flush afterwards finds nothing left behind.
#[tokio::test]
async fn every_copy_of_many_concurrent_sends_is_stored_once() {
    use gm_relay::domain::ports::{EventBus, Route};
    use gm_relay::domain::{Envelope, GmId, HostId, Uid};
    const SENDS: usize = 2000;
    let app = spawn_console(&[]).await;
    let relay = app.relay();
    let bus = relay.bus();
    let sends = (0..SENDS).map(|i| async move {
        let event =
            Envelope::chat(format!("flush-{i}"), HostId(3), Uid(1001 + (i % 7) as i64), GmId(7), "x", 0);
        bus.publish_chat(Route::ToGm(GmId(7)), &event).await.expect("delivered");
    });
    futures::future::join_all(sends).await;
    assert!(bus.flush_history(Duration::from_secs(10)).await, "flush timed out");
    let js = app.jetstream().await;
    let mut history = js.get_stream("GM_HISTORY").await.unwrap();
    assert_eq!(history.info().await.unwrap().state.messages, SENDS as u64);
}

#[tokio::test]
async fn live_feed_pushes_new_messages_and_resumes_after_a_reconnect_without_gaps() {
    let app = spawn_console(&[]).await;
    let c = signed_in(&app, 7, Role::Gm).await;
    app.add(7, 3, 1001).await;
    app.create_gm(8, "Bob").await;
    app.add(8, 3, 1002).await;
    assert_eq!(app.gs_send(1001, "before the page").await.res(), 1);
    let after = c.get("/console/api/me").await.json["view"]["live_after"].as_u64().unwrap();

    let mut feed = c.events(&format!("/console/api/live?after={after}"), None).await;
    assert_eq!(app.gs_send(1002, "for another GM").await.res(), 1);
    assert_eq!(app.gs_send(1001, "one").await.res(), 1);
    assert_eq!(app.gs_send(1001, "two").await.res(), 1);
    let one = feed.next().await;
    let two = feed.next().await;
    assert_eq!((one.event.as_deref(), one.json()["text"].as_str()), (Some("chat"), Some("one")));
    assert_eq!(two.json()["text"], json!("two"));
    assert_eq!(two.json()["uid"], json!("1001"));
    drop(feed);

    // Offline for a while: the browser comes back with the last id it got.
    for text in ["three", "four"] {
        assert_eq!(app.gs_send(1001, text).await.res(), 1);
    }
    let mut feed = c.events(&format!("/console/api/live?after={after}"), two.id.as_deref()).await;
    assert_eq!(feed.next().await.json()["text"], json!("three"));
    assert_eq!(feed.next().await.json()["text"], json!("four"));
    assert_eq!(app.gs_send(1001, "five").await.res(), 1);
    assert_eq!(feed.next().await.json()["text"], json!("five"));
}

#[tokio::test]
async fn players_and_presence_from_the_console() {
    let app = spawn_console(&[]).await;
    let c = signed_in(&app, 7, Role::Gm).await;
    assert_eq!(c.post("/console/api/players", json!({"host": "3", "uid": "1001"})).await.status, 204);
    assert_eq!(app.relation(3).await.0, json!({"1001": ["7", "GM 7"]}));
    let taken = c.post("/console/api/players", json!({"host": "3", "uid": "1001"})).await;
    assert_eq!((taken.status, taken.json["errno"].as_i64()), (409, Some(3)));
    assert_eq!(c.post("/console/api/players", json!({"host": "x", "uid": "1"})).await.status, 400);

    assert_eq!(c.post("/console/api/presence", json!({"online": false})).await.status, 204);
    assert_eq!(app.gs("action=online&host=3").await.b64_json("data"), json!([]));
    assert_eq!(c.post("/console/api/presence", json!({"online": true})).await.status, 204);
    assert_eq!(app.gs("action=online&host=3").await.b64_json("data"), json!(["7"]));

    assert_eq!(c.delete("/console/api/players/1001").await.status, 204);
    assert_eq!(app.relation(3).await.1, json!(["1001"]));
    assert_eq!(c.get("/console/api/me").await.json["view"]["players"], json!([]));
}

#[tokio::test]
async fn dashboard_shows_host_lag_and_its_cost_does_not_grow_with_open_pages() {
    let app = spawn_console(&[]).await;
    let sup = signed_in(&app, 1, Role::Supervisor).await;
    app.create_gm(7, "Alice").await;
    app.add(7, 3, 1001).await;
    app.gs_receive(3).await; // host 3 is a legacy host: its chat consumer exists.

    let lag_of = |snapshot: &Value, host: &str| {
        snapshot["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == json!(host))
            .map(|h| h["lag"].as_u64().unwrap())
    };
    wait_until_async(WAIT, "host 3 shows as legacy with no lag", || async {
        let s = sup.get("/console/api/ops").await.json;
        s["hosts"].as_array().unwrap().iter().any(|h| h["host"] == json!("3") && h["kind"] == json!("legacy"))
            && lag_of(&s, "3") == Some(0)
    })
    .await;
    for i in 0..3 {
        assert_eq!(app.gm_send(7, 1001, &format!("m{i}")).await.res(), 1);
    }
    wait_until_async(WAIT, "host 3's lag shows the 3 messages", || async {
        lag_of(&sup.get("/console/api/ops").await.json, "3") == Some(3)
    })
    .await;
    app.gs_receive(3).await;
    wait_until_async(WAIT, "host 3's lag is back to 0", || async {
        lag_of(&sup.get("/console/api/ops").await.json, "3") == Some(0)
    })
    .await;
    let s = sup.get("/console/api/ops").await.json;
    assert_eq!(s["nats"]["ok"], json!(true));
    assert_eq!(s["redis"]["ok"], json!(true));
    assert!(s["online_gms"].as_array().unwrap().iter().any(|g| g["gm"] == json!("7")));

    // Many open dashboards: JetStream still sees one consumer listing per refresh.
    let observer = async_nats::connect(app.nats.url()).await.expect("connect to NATS");
    let mut listings = observer.subscribe("$JS.API.CONSUMER.LIST.>").await.expect("subscribe");
    observer.flush().await.expect("flush");
    // Several supervisors: one account holds at most MAX_LIVE_FEEDS_PER_ACCOUNT feeds.
    let mut supervisors = vec![sup];
    for gm in 2..=3 {
        supervisors.push(signed_in(&app, gm, Role::Supervisor).await);
    }
    let mut pages = Vec::new();
    for i in 0..20 {
        pages.push(supervisors[i % supervisors.len()].events("/console/api/ops/live", None).await);
    }
    for page in &mut pages {
        page.next().await;
    }
    let window = Duration::from_secs(3);
    let started = tokio::time::Instant::now();
    let mut calls = 0;
    while let Ok(Some(_)) =
        tokio::time::timeout_at(started + window, futures::StreamExt::next(&mut listings)).await
    {
        calls += 1;
    }
    assert!(calls >= 1, "the refresher runs while dashboards are open");
    assert!(calls <= 4, "{calls} consumer listings in {window:?} with 20 dashboards open");
    assert!(s["api_calls"].as_u64().unwrap() <= MAX_API_CALLS_PER_REFRESH as u64);
}

#[tokio::test]
async fn stopping_the_relay_ends_open_live_feeds_promptly() {
    let mut app = spawn_console(&[]).await;
    let c = signed_in(&app, 7, Role::Supervisor).await;
    app.add(7, 3, 1001).await;
    let mut feed = c.events("/console/api/live", None).await;
    let mut figures = c.events("/console/api/ops/live", None).await;
    figures.next().await;
    assert_eq!(app.gs_send(1001, "hi").await.res(), 1);
    assert_eq!(feed.next().await.json()["text"], json!("hi"));
    let started = std::time::Instant::now();
    app.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "stop took {:?}", started.elapsed());
    assert!(feed.next_or_end(Duration::from_secs(5)).await.is_none());
}

fn set_password_cmd(app: &TestApp, args: &[&str], password: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gm-relay"))
        .arg("gm")
        .args(args)
        .env_clear()
        .env("GM_RELAY_REDIS_URL", app.redis.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gm-relay runs");
    // A refused command may exit before reading: a broken pipe is its answer, not ours.
    let _ = child.stdin.take().unwrap().write_all(password.as_bytes());
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_set_password_command() {
    let app = spawn_console(&[]).await;
    app.create_gm(7, "Alice").await;

    let out = set_password_cmd(&app, &["set-password", "7"], "a good password\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut c = ConsoleClient::for_app(&app);
    assert_eq!(
        c.sign_in(7, "a good password").await.json["role"],
        json!("gm"),
        "the newline is not part of it"
    );
    let mut redis = app.redis_conn().await;
    let phc: String =
        redis::cmd("HGET").arg("gmr:gm:7:password").arg("phc").query_async(&mut redis).await.unwrap();
    assert!(phc.starts_with("$argon2id$"), "{phc}");

    for (args, password, says) in [
        (&["set-password", "7"][..], "short\n", "at least 8 characters"),
        (&["set-password", "9"][..], "a good password\n", "does not exist"),
        (&["set-password", "07"][..], "a good password\n", "not a GM account id"),
        (&["reset", "7"][..], "a good password\n", "usage"),
    ] {
        let out = set_password_cmd(&app, args, password);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An ops-only supervisor needs no GM account.
    let out = set_password_cmd(&app, &["set-password", "900", "--supervisor"], "supervisor password\n");
    assert!(out.status.success());
    let r = c.sign_in(900, "supervisor password").await;
    assert_eq!(r.json, json!({"gm": "900", "role": "supervisor", "home": "/console/ops"}));
    assert_eq!(c.get("/console/api/me").await.json["view"], Value::Null);
}

#[test]
fn a_short_session_key_stops_start_up_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_gm-relay"))
        .arg("serve")
        .env_clear()
        .env("GM_RELAY_SESSION_KEY", "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("GM_RELAY_SESSION_KEY") && stderr.contains("32 bytes"), "{stderr}");
}

#[tokio::test]
async fn native_sends_are_recorded_once_in_the_history_stream_of_their_own() {
    let app = spawn_console(&[]).await;
    let c = signed_in(&app, 7, Role::Gm).await;
    app.add(7, 3, 1001).await;
    let client = async_nats::connect(app.nats.url()).await.expect("connect to NATS");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "retry-me");
    let body = json!({"uid": "1001", "text": "native hello"}).to_string();
    for _ in 0..2 {
        let reply = client
            .request_with_headers("gm.relay.gs.3.send", headers.clone(), body.clone().into())
            .await
            .unwrap();
        let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(reply["ok"], json!(true), "{reply}");
    }
    let page = c.get("/console/api/players/1001/history").await.json;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "the retry is stored once: {page}");
    assert_eq!(page["messages"][0]["id"], json!("h3-retry-me"));

    // The history is a stream on its own subjects; the contract streams are untouched.
    let js = app.jetstream().await;
    let mut history = js.get_stream("GM_HISTORY").await.unwrap();
    let config = history.info().await.unwrap().config.clone();
    assert_eq!((config.subjects, config.allow_direct), (vec!["gm.hist.*.*.*".to_owned()], true));
    for (stream, subjects) in [("GM_TO_HOST", "gm.to.host.*"), ("GS_TO_GM", "gs.to.gm.*")] {
        let mut s = js.get_stream(stream).await.unwrap();
        assert_eq!(s.info().await.unwrap().config.subjects, vec![subjects.to_owned()]);
    }
}
