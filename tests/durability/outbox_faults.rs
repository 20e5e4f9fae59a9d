//! The outbox's fault points: a relay that dies between committing a friend change and
//! publishing its event, or between publishing and removing the outbox entry, loses nothing
//! and publishes nothing twice. Also a relay that dies in the middle of a relation poll,
//! and a broker that refuses one event of a batch.

use std::time::{Duration, Instant};

use gm_relay::domain::text::GM_NAME_MAX_CHARS;
use gm_relay::relay::POLL_LEASE_TTL;

use serde_json::json;

use crate::common::*;
use crate::support::app::{consumer_backlog, stored_events, StoredEvent, TestApp};
use crate::support::wait_until_async;

const HOST: i64 = 3;
const UID: i64 = 1001;

/// The outbox lease a dead drainer leaves behind lives this long.
const OUTBOX_LEASE_TTL: Duration = Duration::from_secs(5);

/// The friend events stored for `HOST`.
async fn friend_events(app: &TestApp) -> Vec<StoredEvent> {
    let js = app.jetstream().await;
    stored_events(&js, "GM_TO_HOST", &format!("gm.to.host.{HOST}"))
        .await
        .into_iter()
        .filter(|e| e.body["type"].as_str().is_some_and(|t| t.starts_with("friend_")))
        .collect()
}

/// Outbox entries of a GM's first add on a host: the `friend_add`, then the GM's presence.
const FIRST_ADD_EVENTS: u64 = 2;

/// A relay process with the fault point `fault` armed, and GM `GM` created.
async fn process_with_fault(fault: &str) -> TestApp {
    let mut app = TestApp::servers_only(&[]);
    app.start_process(&[("GM_RELAY_FAULTS", fault)]).await;
    app.create_gm(GM, GM_NAME).await;
    app
}

/// Sends a relation poll of `HOST` to a relay with `poll_after_fetch` armed and waits until
/// it has fetched the events of the one add waiting and parked; its client waits, so nothing
/// cancels it. Returns the client's task.
async fn park_relation_poll(app: &TestApp) -> tokio::task::JoinHandle<reqwest::Result<reqwest::StatusCode>> {
    let url = format!("{}/gs?action=relation&host={HOST}", app.base_url());
    let parked = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
    let js = app.jetstream().await;
    let durable = format!("legacy_rel_{HOST}");
    wait_until_async(DEADLINE, "the parked poll fetched the add", || {
        let (js, durable) = (&js, &durable);
        async move {
            consumer_backlog(js, "GM_TO_HOST", durable)
                .await
                .is_some_and(|(_, acking)| acking as u64 == FIRST_ADD_EVENTS)
        }
    })
    .await;
    parked
}

async fn player_gm(app: &TestApp, uid: i64) -> Option<String> {
    redis_query(app, &["HGET", &format!("gmr:player:{uid}"), "gm"]).await
}

/// Waits until the outbox is empty; returns how long that took.
async fn wait_outbox_drained(app: &TestApp, deadline: Duration) -> Duration {
    let started = Instant::now();
    wait_until_async(deadline, "the outbox is drained", || async { outbox_len(app).await == 0 }).await;
    started.elapsed()
}

/// After the restart: the relation poll shows the add once, the next poll nothing, and the
/// stream holds exactly one friend_add.
async fn assert_applied_once(app: &TestApp) {
    assert_eq!(next_relation(app, HOST).await, (json!({"1001": ["7", "Alice"]}), json!([])));
    assert_eq!(app.relation(HOST).await, no_changes(), "the apply came twice");
    let events = friend_events(app).await;
    assert_eq!(events.len(), 1, "stored friend events: {events:?}");
    assert_eq!(events[0].body["type"], "friend_add");
    assert_eq!(events[0].body["uid"], "1001");
    assert_eq!(events[0].msg_id.as_deref(), events[0].body["id"].as_str());
    assert_consumer_drained(app, "GM_TO_HOST", &format!("legacy_rel_{HOST}")).await;
}

#[tokio::test]
async fn killed_before_publish_the_next_relay_publishes_at_start_up() {
    let mut app = process_with_fault("outbox_before_publish").await;
    // Committed: answers after the bounded flush wait although nothing was published.
    app.add(GM, HOST, UID).await;
    assert_eq!(app.relation(HOST).await, no_changes(), "nothing published yet");
    assert!(friend_events(&app).await.is_empty());
    assert_eq!(player_gm(&app, UID).await.as_deref(), Some("7"), "committed in Redis");
    assert_eq!(outbox_len(&app).await, FIRST_ADD_EVENTS, "the events wait in the outbox");
    app.wait_polls_settled(DEADLINE).await;

    app.kill_process();
    assert_eq!(outbox_len(&app).await, FIRST_ADD_EVENTS);
    app.start_process(&[]).await;
    let took = wait_outbox_drained(&app, OUTBOX_LEASE_TTL + Duration::from_secs(3)).await;
    eprintln!("outbox drained {took:?} after the restart");
    assert_applied_once(&app).await;
    // The friendship is the one committed before the kill.
    let r = app.gm(&format!("action=add&gm_account={GM}&host={HOST}&uid={UID}")).await;
    assert_eq!(r.errno(), Some(3), "{}", r.text());
}

#[tokio::test]
async fn killed_after_publish_the_republish_is_deduplicated() {
    let mut app = process_with_fault("outbox_after_publish").await;
    app.add(GM, HOST, UID).await;
    // Published and acknowledged, but still in the outbox.
    let stored = friend_events(&app).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(outbox_len(&app).await, FIRST_ADD_EVENTS, "the entries are not removed yet");
    let published: Option<u64> = redis_query(&app, &["GET", "gmr:outbox:published"]).await;
    assert_eq!(published, None, "nothing recorded as published");

    app.kill_process();
    app.start_process(&[]).await;
    wait_outbox_drained(&app, OUTBOX_LEASE_TTL + Duration::from_secs(3)).await;
    let published: Option<u64> = redis_query(&app, &["GET", "gmr:outbox:published"]).await;
    assert_eq!(published, Some(FIRST_ADD_EVENTS), "the republish was acknowledged");
    assert_applied_once(&app).await;
    assert_eq!(
        friend_events(&app).await[0].body["id"],
        stored[0].body["id"],
        "the stored event is the first publish"
    );
}

#[tokio::test]
async fn request_parked_after_commit_then_restart_keeps_the_friendship_and_its_event() {
    let mut app = TestApp::spawn_with(&[("GM_RELAY_SHUTDOWN_TIMEOUT_S", "1")]).await;
    app.create_gm(GM, GM_NAME).await;
    app.relay().faults.arm("add_after_commit");
    let url = format!("{}/gm?action=add&gm_account={GM}&host={HOST}&uid={UID}", app.base_url());
    // The request never answers: the task serving it is parked for good.
    let pending =
        tokio::spawn(
            async move { reqwest::Client::new().get(url).timeout(Duration::from_secs(10)).send().await },
        );
    let relay = app.relay();
    wait_until_async(DEADLINE, "the add reaches add_after_commit", || {
        let relay = relay.clone();
        async move { relay.faults.hits().contains(&"add_after_commit") }
    })
    .await;
    drop(relay);
    assert_eq!(player_gm(&app, UID).await.as_deref(), Some("7"), "committed");

    app.stop().await;
    pending.abort();
    app.start().await;
    let r = app.gm(&format!("action=add&gm_account={GM}&host={HOST}&uid={UID}")).await;
    assert_eq!(r.errno(), Some(3), "the friendship survived: {}", r.text());
    wait_outbox_drained(&app, OUTBOX_LEASE_TTL + Duration::from_secs(3)).await;
    assert_applied_once(&app).await;
}

/// A relay killed after a relation poll fetched a friend add, before it answered: by the
/// time its poll lease expires the add is due again (the ack wait is shorter than the
/// lease), so the next relay's poll gets it together with the remove that undid it and
/// answers the latest state, leaving nothing to come back later out of order.
#[tokio::test]
async fn killed_mid_poll_the_next_relay_serves_the_feed_in_order() {
    let mut app = process_with_fault("poll_after_fetch").await;
    app.add(GM, HOST, UID).await;
    let parked = park_relation_poll(&app).await;
    let durable = format!("legacy_rel_{HOST}");
    app.kill_process();
    assert!(parked.await.expect("joined").is_err(), "the parked poll never answered");

    app.start_process(&[]).await;
    del_ok(&app, UID).await;
    // Polls answer empty until the dead relay's lease expires.
    let served = next_relation_within(&app, HOST, POLL_LEASE_TTL + DEADLINE).await;
    assert_eq!(served, (json!({}), json!(["1001"])), "the latest state");
    assert_consumer_drained(&app, "GM_TO_HOST", &durable).await;
    assert_eq!(app.relation(HOST).await, no_changes(), "nothing comes back later");
}

/// Sets `GM_TO_HOST`'s `max_msg_size` (-1: no limit): a broker that refuses some events
/// and stores others, as a stream limit or a leader change mid-batch does.
async fn set_max_msg_size(app: &TestApp, bytes: i32) {
    let js = app.jetstream().await;
    let mut stream = js.get_stream("GM_TO_HOST").await.expect("GM_TO_HOST");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_message_size = bytes;
    js.update_stream(config).await.expect("update GM_TO_HOST");
}

/// A friend event the broker refuses holds back the player's next one: a remove that does
/// not fit the stream, then another GM's add of the same player, are stored in the order
/// they were committed once the broker takes them. Sent together, the add would be stored
/// first and the remove after it, and a host reading in stream order would end with the
/// player removed while Redis says it is the other GM's.
#[tokio::test]
async fn a_refused_friend_event_is_not_overtaken_by_the_players_next_one() {
    const OTHER_GM: i64 = 8;
    let app = TestApp::spawn().await;
    // Names of very different sizes make the events differ in size by far more than their
    // headers: a limit at the first add's payload refuses the remove and stores the new add.
    app.create_gm(GM, &"😀".repeat(GM_NAME_MAX_CHARS)).await;
    app.create_gm(OTHER_GM, "B").await;
    app.add(GM, HOST, UID).await;
    wait_outbox_drained(&app, DEADLINE).await;
    let first = friend_events(&app).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let limit = serde_json::to_vec(&first[0].body).expect("JSON").len();
    set_max_msg_size(&app, i32::try_from(limit).expect("small")).await;

    // Both committed; each reply waited its bounded 2 s for a publish that did not come.
    del_ok(&app, UID).await;
    app.add(OTHER_GM, HOST, UID).await;
    let failures = r#"gm_relay_publish_failures_total{route="outbox"}"#;
    let before = app.legacy().metric(failures).await;
    // Two more refused drains, both begun after the add was committed: each had the remove
    // and the add in its batch. (Or the add was stored: the failure the test looks for.)
    wait_until_async(DEADLINE, "two more refused drains", || async {
        app.legacy().metric(failures).await >= before + 2 || friend_events(&app).await.len() > 1
    })
    .await;
    let stored = friend_events(&app).await;
    assert_eq!(stored.len(), 1, "the add was stored ahead of the refused remove: {stored:?}");
    // The remove, the other GM's add and that GM's presence (its first player here).
    assert_eq!(outbox_len(&app).await, 3);

    set_max_msg_size(&app, -1).await;
    wait_outbox_drained(&app, DEADLINE).await;
    let order: Vec<(String, String, u64)> = friend_events(&app)
        .await
        .iter()
        .map(|e| {
            let field = |k: &str| e.body[k].as_str().unwrap_or_default().to_owned();
            (field("type"), field("gm"), e.body["rev"].as_u64().unwrap_or_default())
        })
        .collect();
    let want = [("friend_add", "7", 1), ("friend_remove", "7", 2), ("friend_add", "8", 3)]
        .map(|(t, gm, rev)| (t.to_owned(), gm.to_owned(), rev));
    assert_eq!(order, want, "stored in commit order");
    assert_eq!(player_gm(&app, UID).await.as_deref(), Some("8"));
}

/// On SIGTERM the native service leaves its queue group at once, even while a legacy poll
/// keeps the HTTP side busy: from then on other relays (or "no responders") answer game
/// servers, instead of this relay taking requests it may not have time to answer.
#[tokio::test]
async fn a_stopping_relay_leaves_the_native_queue_group_at_once() {
    let mut app = TestApp::servers_only(&[]);
    // A long bound: the parked poll keeps the HTTP side busy for most of it.
    app.start_process(&[("GM_RELAY_FAULTS", "poll_after_fetch"), ("GM_RELAY_SHUTDOWN_TIMEOUT_S", "60")])
        .await;
    app.create_gm(GM, GM_NAME).await;
    app.add(GM, HOST, UID).await;
    // A request the stopping relay took but never answers must end well within DEADLINE
    // (the client's default bound is 10 s), so that the wait below asks again.
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(1)))
        .connect(app.nats.url())
        .await
        .expect("connect");
    let resync = format!("gm.relay.gs.{HOST}.resync");
    let answered = client.request(resync.clone(), "{}".into()).await.expect("the native service answers");
    assert!(answered.status.is_none(), "{answered:?}");
    let parked = park_relation_poll(&app).await;

    app.signal_process(libc::SIGTERM);
    // The HTTP side waits for the parked poll for up to 45 s; the native service must not.
    wait_until_async(DEADLINE, "native requests find no responder", || {
        let (client, resync) = (&client, &resync);
        async move {
            matches!(
                client.request(resync.clone(), "{}".into()).await,
                Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders
            )
        }
    })
    .await;
    app.kill_process();
    parked.abort();
}
