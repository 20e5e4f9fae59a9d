//! Helpers shared by the durability tests: draining legacy feeds and checking that nothing
//! is left behind that could still be redelivered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::app::{consumer_backlog, ChatEntries, TestApp};
use crate::support::wait_until_async;

/// Generous bound on anything that should happen "soon" (a reconnect, a drain).
pub const DEADLINE: Duration = Duration::from_secs(15);

pub const GM: i64 = 7;
pub const GM_NAME: &str = "Alice";

/// `texts("a", 0..3)` = `["a0", "a1", "a2"]`.
pub fn texts(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

pub async fn gm_send_ok(app: &TestApp, uid: i64, text: &str) {
    let r = app.gm_send(GM, uid, text).await;
    assert_eq!(r.json(), json!({"res": 1}), "GM send {text:?} to {uid}");
}

pub async fn gs_send_ok(app: &TestApp, uid: i64, text: &str) {
    let r = app.gs_send(uid, text).await;
    assert_eq!(r.json(), json!({"res": 1}), "player {uid} sends {text:?}");
}

pub async fn del_ok(app: &TestApp, uid: i64) {
    let r = app.gm(&format!("action=del&gm_account={GM}&uid={uid}")).await;
    assert_eq!(r.json(), json!({"res": 1}), "del {uid}");
}

/// Adds one poll's `gs_receive` reply to `acc` (uid → texts in arrival order).
pub fn absorb_host(acc: &mut BTreeMap<String, Vec<String>>, reply: Vec<(String, Vec<String>)>) {
    for (uid, msgs) in reply {
        acc.entry(uid).or_default().extend(msgs);
    }
}

fn total<K>(acc: &BTreeMap<K, Vec<String>>) -> usize {
    acc.values().map(Vec::len).sum()
}

/// Polls `GS receive` of `host` until `want` messages arrived, then once more, which must
/// be empty. Returns uid → texts in arrival order, over all polls.
pub async fn drain_host_chat(app: &TestApp, host: i64, want: usize) -> BTreeMap<String, Vec<String>> {
    let acc = Mutex::new(BTreeMap::new());
    wait_until_async(DEADLINE, &format!("{want} messages reach host {host}"), || {
        let acc = &acc;
        async move {
            let reply = app.gs_receive(host).await;
            let mut acc = acc.lock().unwrap();
            absorb_host(&mut acc, reply);
            total(&acc) >= want
        }
    })
    .await;
    let acc = acc.into_inner().unwrap();
    assert_eq!(total(&acc), want, "host {host} got more than sent: {acc:?}");
    assert_eq!(app.gs_receive(host).await, vec![], "host {host}: a poll after the drain");
    acc
}

/// Adds a GM poll's messages to what the GMs received so far.
fn absorb_gm(acc: &mut BTreeMap<(String, String), Vec<String>>, inbox: HashMap<String, ChatEntries>) {
    for (gm, entries) in inbox {
        for (uid, msgs) in entries {
            acc.entry((gm.clone(), uid)).or_default().extend(msgs);
        }
    }
}

/// Polls `GM receive` until `want` messages arrived, then once more, which must be empty.
/// Returns (gm, uid) → texts in arrival order, over all polls.
pub async fn drain_gm_chat(app: &TestApp, want: usize) -> BTreeMap<(String, String), Vec<String>> {
    drain_gm_chat_within(app, want, DEADLINE).await
}

/// [`drain_gm_chat`], for when the messages come only after `deadline`'s first seconds.
pub async fn drain_gm_chat_within(
    app: &TestApp,
    want: usize,
    deadline: Duration,
) -> BTreeMap<(String, String), Vec<String>> {
    let acc = Mutex::new(BTreeMap::<(String, String), Vec<String>>::new());
    wait_until_async(deadline, &format!("{want} messages reach the GMs"), || {
        let acc = &acc;
        async move {
            let inbox = app.gm_receive().await;
            let mut acc = acc.lock().unwrap();
            absorb_gm(&mut acc, inbox);
            total(&acc) >= want
        }
    })
    .await;
    let acc = acc.into_inner().unwrap();
    assert_eq!(total(&acc), want, "GMs got more than was sent: {acc:?}");
    assert!(app.gm_receive().await.is_empty(), "GM poll after the drain");
    acc
}

/// Polls `GS receive` of `host` until a message `last` arrived, then once more, which must
/// be empty. For when the exact count is not the point.
pub async fn drain_host_chat_until(app: &TestApp, host: i64, last: &str) -> BTreeMap<String, Vec<String>> {
    let acc = Mutex::new(BTreeMap::new());
    wait_until_async(DEADLINE, &format!("{last:?} reaches host {host}"), || {
        let acc = &acc;
        async move {
            let reply = app.gs_receive(host).await;
            let mut acc = acc.lock().unwrap();
            absorb_host(&mut acc, reply);
            acc.values().flatten().any(|t| t == last)
        }
    })
    .await;
    assert_eq!(app.gs_receive(host).await, vec![], "host {host}: a poll after the drain");
    acc.into_inner().unwrap()
}

/// Polls `GM receive` until a message `last` arrived, then once more, which must be empty.
pub async fn drain_gm_chat_until(app: &TestApp, last: &str) -> BTreeMap<(String, String), Vec<String>> {
    let acc = Mutex::new(BTreeMap::<(String, String), Vec<String>>::new());
    wait_until_async(DEADLINE, &format!("{last:?} reaches the GMs"), || {
        let acc = &acc;
        async move {
            let inbox = app.gm_receive().await;
            let mut acc = acc.lock().unwrap();
            absorb_gm(&mut acc, inbox);
            acc.values().flatten().any(|t| t == last)
        }
    })
    .await;
    assert!(app.gm_receive().await.is_empty(), "GM poll after the drain");
    acc.into_inner().unwrap()
}

/// One relation poll, as `(apply, remove)`.
pub type Relation = (Value, Value);

pub fn no_changes() -> Relation {
    (json!({}), json!([]))
}

/// Relation polls of `host` until one is not empty; returns it.
pub async fn next_relation(app: &TestApp, host: i64) -> Relation {
    next_relation_within(app, host, DEADLINE).await
}

/// [`next_relation`] with a deadline of its own.
pub async fn next_relation_within(app: &TestApp, host: i64, deadline: Duration) -> Relation {
    let got = Mutex::new(None);
    wait_until_async(deadline, &format!("a friend event reaches host {host}"), || {
        let got = &got;
        async move {
            let r = app.relation(host).await;
            if r == no_changes() {
                return false;
            }
            *got.lock().unwrap() = Some(r);
            true
        }
    })
    .await;
    got.into_inner().unwrap().unwrap()
}

/// Waits until the legacy consumer `durable` has nothing unacked (the last poll's acks
/// landed), then asserts nothing is pending either: nothing more can ever be delivered
/// from it, so nothing can turn up twice later (e.g. after the 10 s ack wait).
pub async fn assert_consumer_drained(app: &TestApp, stream: &str, durable: &str) {
    let js = app.jetstream().await;
    wait_until_async(DEADLINE, &format!("{durable} has no unacked message"), || {
        let js = &js;
        async move {
            consumer_backlog(js, stream, durable)
                .await
                .is_some_and(|(_, ack_pending)| ack_pending == 0)
        }
    })
    .await;
    let backlog = consumer_backlog(&js, stream, durable).await;
    assert_eq!(backlog, Some((0, 0)), "{durable}: (pending, ack pending)");
}

/// A Redis command on the test's own connection.
pub async fn redis_query<T: redis::FromRedisValue>(app: &TestApp, args: &[&str]) -> T {
    let mut conn = app.redis_conn().await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
}

pub async fn outbox_len(app: &TestApp) -> u64 {
    redis_query(app, &["LLEN", "gmr:outbox"]).await
}
