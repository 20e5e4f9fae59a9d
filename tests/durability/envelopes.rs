//! The event envelope as other subscribers see it: read straight from the streams and from
//! a plain NATS subscription, not through the relay.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::*;
use crate::support::app::{stored_events, StoredEvent, TestApp};
use crate::support::wait_until_async;

const HOST: i64 = 3;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The fields every envelope carries, checked on one stored message.
fn assert_common(e: &StoredEvent, kind: &str, since_ms: i64, until_ms: i64) {
    let b = &e.body;
    assert_eq!(b["v"], 1, "{b}");
    assert_eq!(b["type"], kind, "{b}");
    let id = b["id"].as_str().unwrap_or_else(|| panic!("id is a string: {b}"));
    assert!(!id.is_empty());
    assert_eq!(e.msg_id.as_deref(), Some(id), "Nats-Msg-Id is the envelope id");
    let presence = kind.starts_with("gm_");
    for field in ["host", "uid", "gm"].into_iter().filter(|f| !(presence && *f == "uid")) {
        assert!(b[field].is_string(), "{field} is a string: {b}");
    }
    assert_eq!(b["host"], HOST.to_string());
    assert_eq!(b["gm"], GM.to_string());
    let ts = b["ts"].as_i64().unwrap_or_else(|| panic!("ts is an integer: {b}"));
    assert!(
        (since_ms..=until_ms).contains(&ts),
        "ts {ts} is ms since the epoch, within the test ({since_ms}..={until_ms})"
    );
}

#[tokio::test]
async fn chat_and_friend_envelopes_follow_the_contract() {
    let app = TestApp::spawn().await;
    let client = async_nats::connect(app.nats.url()).await.expect("connect");
    let live = client.subscribe("gm.to.host.>").await.expect("subscribe");
    client.flush().await.expect("flush");

    let since = now_ms();
    app.create_gm(GM, GM_NAME).await;
    app.add(GM, HOST, 1001).await; // rev 1
    app.add(GM, HOST, 1002).await;
    let to_player = "héllo, 你好 🎉 a+b/c=";
    gm_send_ok(&app, 1001, to_player).await;
    gs_send_ok(&app, 1001, "from the player").await;
    del_ok(&app, 1001).await; // rev 2
    app.add(GM, HOST, 1001).await; // rev 3
    del_ok(&app, 1002).await;
    let until = now_ms();

    let js = app.jetstream().await;
    let to_host = stored_events(&js, "GM_TO_HOST", "gm.to.host.>").await;
    let to_gm = stored_events(&js, "GS_TO_GM", "gs.to.gm.>").await;
    let kinds: Vec<&str> = to_host.iter().map(|e| e.body["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        // The GM's first player on the host brings the GM's presence.
        ["friend_add", "gm_online", "friend_add", "chat", "friend_remove", "friend_add", "friend_remove"],
        "GM_TO_HOST in commit order"
    );
    assert!(to_host.iter().all(|e| e.subject == "gm.to.host.3"));
    assert_eq!(to_gm.len(), 1);
    assert_eq!(to_gm[0].subject, "gs.to.gm.7");

    // Chat, both directions: text as UTF-8, exactly as sent (not base64).
    let chat = &to_host[3];
    assert_common(chat, "chat", since, until);
    assert_eq!(chat.body["uid"], "1001");
    assert_eq!(chat.body["text"], to_player);
    assert_common(&to_gm[0], "chat", since, until);
    assert_eq!(to_gm[0].body["uid"], "1001");
    assert_eq!(to_gm[0].body["text"], "from the player");

    // The presence event: the GM, its name, no player.
    let presence = &to_host[1];
    assert_common(presence, "gm_online", since, until);
    assert_eq!((&presence.body["gm"], &presence.body["gm_name"]), (&json!(GM.to_string()), &json!(GM_NAME)));
    assert_eq!(presence.body.get("uid"), None, "{}", presence.body);

    // Friend events: gm_name, and rev growing per uid.
    let mut revs: HashMap<String, Vec<u64>> = HashMap::new();
    for e in to_host.iter().filter(|e| e.body["type"].as_str().is_some_and(|t| t.starts_with("friend_"))) {
        let kind = e.body["type"].as_str().unwrap();
        assert_common(e, kind, since, until);
        assert_eq!(e.body["gm_name"], GM_NAME, "{}", e.body);
        let rev = e.body["rev"].as_u64().unwrap_or_else(|| panic!("rev is a number: {}", e.body));
        revs.entry(e.body["uid"].as_str().unwrap().to_owned()).or_default().push(rev);
    }
    assert_eq!(revs["1001"], [1, 2, 3], "rev of 1001 grows with each event");
    assert_eq!(revs["1002"], [1, 2]);

    let all: Vec<&StoredEvent> = to_host.iter().chain(&to_gm).collect();
    let ids: HashSet<&str> = all.iter().map(|e| e.body["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "ids are unique");

    // A plain subscriber got the same envelopes, with the same Nats-Msg-Id.
    let seen = Mutex::new(Vec::<(Option<String>, Value)>::new());
    let live = tokio::sync::Mutex::new(live);
    let want = to_host.len();
    wait_until_async(DEADLINE, "the live subscriber saw every event", || {
        let (seen, live) = (&seen, &live);
        async move {
            if let Some(m) = live.lock().await.next().await {
                let id = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_owned());
                let body: Value = serde_json::from_slice(&m.payload).expect("JSON");
                seen.lock().unwrap().push((id, body));
            }
            seen.lock().unwrap().len() >= want
        }
    })
    .await;
    let seen = seen.into_inner().unwrap();
    let stored: Vec<(Option<String>, Value)> =
        to_host.iter().map(|e| (e.msg_id.clone(), e.body.clone())).collect();
    assert_eq!(seen, stored);
}
