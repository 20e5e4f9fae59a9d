//! `gm-relay replay`: after a game server lost what it had processed, its consumer is moved
//! back and the events come again, in order — by stream sequence or by age, for the native
//! consumer and for a legacy feed.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use support::app::{consumer_backlog, stored_events, TestApp};
use support::wait_until_async;

const GM: i64 = 7;
const HOST: i64 = 3;
const UID: i64 = 1001;

/// Bound on a fetch of what is waiting (no-wait pulls answer at once normally).
const FETCH_DEADLINE: Duration = Duration::from_secs(5);

fn replay(app: &TestApp, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gm-relay"))
        .arg("replay")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GM_RELAY_NATS_URL", app.nats.url())
        .env("GM_RELAY_LOG_FORMAT", "pretty")
        .output()
        .expect("gm-relay runs")
}

/// What the native game server gets now: event types and chat texts, acked.
async fn drain_native(consumer: &PullConsumer) -> Vec<String> {
    let mut out = Vec::new();
    let mut batch = tokio::time::timeout(FETCH_DEADLINE, consumer.fetch().max_messages(100).messages())
        .await
        .expect("fetch in time")
        .expect("fetch");
    while let Some(m) = batch.next().await {
        let m = m.expect("message");
        let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("envelope");
        out.push(
            body["text"].as_str().map_or_else(|| body["type"].as_str().unwrap().to_owned(), str::to_owned),
        );
        m.double_ack().await.expect("ack");
    }
    out
}

#[tokio::test]
async fn a_hosts_events_come_again_from_a_sequence_or_an_age() {
    let app = TestApp::spawn().await;
    app.create_gm(GM, "Alice").await;
    app.add(GM, HOST, UID).await;
    for k in 0..5 {
        assert_eq!(app.gm_send(GM, UID, &format!("m{k}")).await.res(), 1);
    }
    let js = app.jetstream().await;
    let native: PullConsumer =
        js.get_stream("GM_TO_HOST").await.unwrap().get_consumer(&format!("host_{HOST}")).await.unwrap();
    assert_eq!(drain_native(&native).await, ["friend_add", "gm_online", "m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(consumer_backlog(&js, "GM_TO_HOST", &format!("host_{HOST}")).await, Some((0, 0)));

    // The game server lost m2 onwards: replay from m2's stream sequence.
    let events = stored_events(&js, "GM_TO_HOST", &format!("gm.to.host.{HOST}")).await;
    let m2 = events.iter().find(|e| e.body["text"] == "m2").expect("m2 stored").stream_seq;
    let out = replay(&app, &["--host", &HOST.to_string(), "--from-seq", &m2.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&format!("host_{HOST}: delivering again from stream sequence {m2} (3 events pending)")),
        "{text}"
    );
    assert_eq!(drain_native(&native).await, ["m2", "m3", "m4"]);

    // A legacy game server's chat feed, by age: everything of the last hour again.
    assert_eq!(
        app.gs_receive(HOST).await,
        vec![(UID.to_string(), (0..5).map(|k| format!("m{k}")).collect())]
    );
    assert_eq!(app.gs_receive(HOST).await, vec![]);
    let out = replay(&app, &["--host", &HOST.to_string(), "--since", "1h", "--feed", "chat"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        app.gs_receive(HOST).await,
        vec![(UID.to_string(), (0..5).map(|k| format!("m{k}")).collect())]
    );

    // Nothing of the host in range: once its last event is over a second old.
    let host = HOST.to_string();
    wait_until_async(Duration::from_secs(15), "the host has no event in the last second", || {
        let out = replay(&app, &["--host", &host, "--since", "1s", "--feed", "chat"]);
        async move { String::from_utf8_lossy(&out.stdout).contains("nothing changed") }
    })
    .await;
    // Hosts without the consumer: polled but never sent anything (no legacy consumer is
    // made for them), never heard of.
    assert_eq!(app.gs_receive(98).await, vec![]);
    let out = replay(&app, &["--host", "98", "--since", "1h", "--feed", "chat"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host 98 has no consumer legacy_chat_98"),
        "{out:?}"
    );
    let out = replay(&app, &["--host", "99", "--from-seq", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("host 99 has no consumer host_99"), "{out:?}");
    for bad in [
        &["--host", "03", "--since", "1h"][..],
        &["--host", "3"],
        &["--host", "3", "--since", "1h", "--feed", "x"],
    ] {
        assert_eq!(replay(&app, bad).status.code(), Some(2), "{bad:?}");
    }
}
