//! A relay restarting in the middle of a conversation loses nothing and repeats nothing;
//! a relay taking over consumers an earlier version created brings them up to date.

use serde_json::json;

use crate::common::*;
use crate::support::app::TestApp;

const HOST: i64 = 3;
const OTHER_HOST: i64 = 4;

/// What happened before the restart and must come out after it.
struct Before {
    /// Sent to 1001 and polled before the restart (more than one poll's 10).
    polled_1001: Vec<String>,
}

/// Friendships 1001, 1002 on host 3 and 2001 on host 4, seen by their hosts; chat both ways,
/// part of it polled. Then, not polled: friend 1003 added, 1002 removed, more chat.
async fn before_restart(app: &TestApp) -> Before {
    app.create_gm(GM, GM_NAME).await;
    app.add(GM, HOST, 1001).await;
    app.add(GM, HOST, 1002).await;
    app.add(GM, OTHER_HOST, 2001).await;
    assert_eq!(
        app.relation(HOST).await,
        (json!({"1001": ["7", "Alice"], "1002": ["7", "Alice"]}), json!([]))
    );
    assert_eq!(app.relation(OTHER_HOST).await, (json!({"2001": ["7", "Alice"]}), json!([])));

    // More than a poll returns per uid (10), so the rest waits nak'd across the restart.
    for t in texts("a", 0..14) {
        gm_send_ok(app, 1001, &t).await;
    }
    for t in texts("b", 0..3) {
        gm_send_ok(app, 1002, &t).await;
    }
    for t in texts("c", 0..2) {
        gm_send_ok(app, 2001, &t).await;
    }
    for t in texts("p", 0..3) {
        gs_send_ok(app, 1001, &t).await;
    }
    let first = app.gs_receive(HOST).await;
    assert_eq!(
        first,
        vec![("1001".to_owned(), texts("a", 0..10)), ("1002".to_owned(), texts("b", 0..3)),],
        "first poll: 10 of 1001's 14, all of 1002's"
    );
    let inbox = app.gm_receive().await;
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    assert_eq!(inbox["7"], vec![("1001".to_owned(), texts("p", 0..3))]);

    // Not polled before the restart.
    app.add(GM, HOST, 1003).await;
    del_ok(app, 1002).await;
    for t in texts("a", 14..16) {
        gm_send_ok(app, 1001, &t).await;
    }
    gs_send_ok(app, 1001, "p3").await;
    Before { polled_1001: texts("a", 0..10) }
}

/// After the restart: more chat, then every feed drained; each message exactly once, in
/// order, and the friend events made before the restart.
async fn after_restart(app: &TestApp, before: Before) {
    for t in texts("a", 16..18) {
        gm_send_ok(app, 1001, &t).await;
    }
    gm_send_ok(app, 1003, "d0").await;
    gs_send_ok(app, 1003, "q0").await;
    let r = app.gm_send(GM, 1002, "to a removed friend").await;
    assert_eq!(r.errno(), Some(4), "{}", r.text());

    let host = drain_host_chat(app, HOST, 9).await;
    let mut all_1001 = before.polled_1001;
    all_1001.extend(host["1001"].iter().cloned());
    assert_eq!(all_1001, texts("a", 0..18), "1001: each message once, in order");
    assert_eq!(host["1003"], vec!["d0".to_owned()]);
    assert_eq!(host.len(), 2, "{host:?}");

    let other = drain_host_chat(app, OTHER_HOST, 2).await;
    assert_eq!(other["2001"], texts("c", 0..2));

    let gms = drain_gm_chat(app, 2).await;
    assert_eq!(gms[&("7".to_owned(), "1001".to_owned())], vec!["p3".to_owned()]);
    assert_eq!(gms[&("7".to_owned(), "1003".to_owned())], vec!["q0".to_owned()]);

    assert_eq!(
        next_relation(app, HOST).await,
        (json!({"1003": ["7", "Alice"]}), json!(["1002"])),
        "friend events from before the restart"
    );
    assert_eq!(app.relation(HOST).await, no_changes(), "relation events repeated");
    assert_eq!(app.relation(OTHER_HOST).await, no_changes());

    for (stream, durable) in [
        ("GM_TO_HOST", "legacy_chat_3"),
        ("GM_TO_HOST", "legacy_chat_4"),
        ("GM_TO_HOST", "legacy_rel_3"),
        ("GM_TO_HOST", "legacy_rel_4"),
        ("GS_TO_GM", "legacy_gm"),
    ] {
        assert_consumer_drained(app, stream, durable).await;
    }
}

#[tokio::test]
async fn graceful_restart_mid_conversation_delivers_everything_once_in_order() {
    let mut app = TestApp::spawn().await;
    let before = before_restart(&app).await;
    app.stop().await;
    app.start().await;
    after_restart(&app, before).await;
}

#[tokio::test]
async fn kill_9_between_polls_loses_and_repeats_nothing() {
    let mut app = TestApp::servers_only(&[]);
    app.start_process(&[]).await;
    let before = before_restart(&app).await;
    // Between polls: every answered poll's acks are confirmed (its lease released).
    app.wait_polls_settled(DEADLINE).await;
    app.kill_process();
    app.start_process(&[]).await;
    after_restart(&app, before).await;

    // And once more, right after sends and friend changes that got `res: 1`.
    app.add(GM, HOST, 1004).await;
    del_ok(&app, 1003).await;
    gm_send_ok(&app, 1001, "last").await;
    gs_send_ok(&app, 1004, "q1").await;
    app.wait_polls_settled(DEADLINE).await;
    app.kill_process();
    app.start_process(&[]).await;
    let host = drain_host_chat(&app, HOST, 1).await;
    assert_eq!(host["1001"], vec!["last".to_owned()]);
    let gms = drain_gm_chat(&app, 1).await;
    assert_eq!(gms[&("7".to_owned(), "1004".to_owned())], vec!["q1".to_owned()]);
    assert_eq!(next_relation(&app, HOST).await, (json!({"1004": ["7", "Alice"]}), json!(["1003"])));
    assert_eq!(app.relation(HOST).await, no_changes());
    assert_consumer_drained(&app, "GM_TO_HOST", "legacy_rel_3").await;
}

/// A legacy consumer created by an earlier relay version, with the old 30 s ack wait, is
/// brought to the current ack wait when a relay first uses it.
#[tokio::test]
async fn a_legacy_consumer_with_the_old_ack_wait_is_updated() {
    use async_nats::jetstream::consumer;
    let app = TestApp::spawn().await;
    app.create_gm(GM, GM_NAME).await;
    let js = app.jetstream().await;
    let durable = "legacy_rel_3";
    let old = consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subject: "gm.to.host.3".to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: std::time::Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 20_000,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    js.create_consumer_on_stream(old, "GM_TO_HOST").await.expect("the old consumer");
    app.add(GM, 3, 1001).await;
    assert_eq!(app.relation(3).await, (json!({"1001": ["7", "Alice"]}), json!([])), "served as before");
    let mut c: consumer::PullConsumer = js.get_consumer_from_stream(durable, "GM_TO_HOST").await.unwrap();
    assert_eq!(c.info().await.unwrap().config.ack_wait, gm_relay::adapters::nats::LEGACY_ACK_WAIT);
}
