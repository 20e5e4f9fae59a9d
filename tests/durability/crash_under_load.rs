//! kill -9 of the relay in the middle of steady legacy and native traffic: every message
//! that got `res: 1` / `ok: true` is delivered; the only repeats allowed are the contents
//! of a poll reply that reached the client just before the kill (its acks died with the
//! relay, so they are redelivered: at least once).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;
use tokio::sync::watch;

use crate::common::{GM, GM_NAME};
use crate::game_server::GameServer;
use crate::support::app::{b64, decode_joined, enc, TestApp};
use crate::support::wait_until_async;

const LEGACY_HOST: i64 = 3;
const NATIVE_HOST: i64 = 4;
const LEGACY_UIDS: std::ops::Range<i64> = 1001..1006;
const NATIVE_UIDS: std::ops::Range<i64> = 2001..2006;

/// Messages each sender sends; the kill comes after a third of them.
const SENDS: usize = 90;

/// Pace of each sender: steady traffic, gentle on a 2-core machine.
const SEND_EVERY: Duration = Duration::from_millis(15);

/// Redelivery of what the dead relay fetched but never acked takes the legacy consumers'
/// ack wait (10 s); the dead relay's poll leases expire after 15 s.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Ledger {
    /// Texts whose send was acknowledged (`res: 1` / `ok: true`).
    acked: BTreeSet<String>,
    /// Every text each feed delivered, with repeats.
    delivered: BTreeMap<&'static str, Vec<String>>,
    /// Per feed, each poll reply in order: the relay that answered (its base URL) and the
    /// texts (to find the last reply of the relay that was killed).
    replies: BTreeMap<&'static str, Vec<(String, Vec<String>)>>,
}

type Shared = Arc<Mutex<Ledger>>;

async fn get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    let resp = http.get(url).send().await.ok()?;
    serde_json::from_slice(&resp.bytes().await.ok()?).ok()
}

fn b64_field(v: &Value, field: &str) -> Value {
    let raw = STANDARD.decode(v[field].as_str().unwrap_or_default()).unwrap_or_default();
    serde_json::from_slice(&raw).unwrap_or(Value::Null)
}

/// Sends `SENDS` messages with `send`, recording the acknowledged ones.
async fn sender<F, Fut>(ledger: Shared, prefix: &'static str, send: F)
where
    F: Fn(usize, String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut tick = tokio::time::interval(SEND_EVERY);
    for i in 0..SENDS {
        tick.tick().await;
        let text = format!("{prefix}{i}");
        if send(i, text.clone()).await {
            ledger.lock().unwrap().acked.insert(text);
        }
    }
}

/// One legacy poll of `feed` against whichever relay is up; records the reply.
async fn poll_legacy(http: &reqwest::Client, base: &str, feed: &'static str, ledger: &Shared) {
    let (url, gm_side) = match feed {
        "gs_receive" => (format!("{base}/gs?action=receive&host={LEGACY_HOST}"), false),
        _ => (format!("{base}/gm?action=receive"), true),
    };
    let Some(reply) = get_json(http, &url).await else { return };
    if reply["res"] != 1 {
        return;
    }
    let data = b64_field(&reply, "data");
    let mut texts = Vec::new();
    let entries: Vec<Value> = if gm_side {
        data.as_object().map(|m| m.values().flat_map(|v| v.as_array().cloned().unwrap_or_default()).collect())
    } else {
        data.as_array().cloned()
    }
    .unwrap_or_default();
    for e in entries {
        texts.extend(decode_joined(e["msg"].as_str().unwrap_or_default()));
    }
    let mut l = ledger.lock().unwrap();
    l.delivered.entry(feed).or_default().extend(texts.iter().cloned());
    l.replies.entry(feed).or_default().push((base.to_owned(), texts));
}

#[tokio::test]
async fn kill_9_under_steady_traffic_loses_nothing_acknowledged() {
    let mut app = TestApp::servers_only(&[]);
    app.start_process(&[]).await;
    app.create_gm(GM, GM_NAME).await;
    for uid in LEGACY_UIDS {
        app.add(GM, LEGACY_HOST, uid).await;
    }
    for uid in NATIVE_UIDS {
        app.add(GM, NATIVE_HOST, uid).await;
    }
    let native =
        Arc::new(GameServer::connect(&app.nats.url(), NATIVE_HOST, None).await.expect("binds host_4"));
    let (base_tx, base_rx) = watch::channel(app.base_url());
    let ledger: Shared = Arc::default();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);

    // Senders: GM → legacy host and native host over HTTP, legacy players over HTTP, native
    // players over NATS.
    let gm_sender = {
        let (ledger, http, base) = (ledger.clone(), http.clone(), base_rx.clone());
        tokio::spawn(sender(ledger, "g", move |i, text| {
            let (http, base) = (http.clone(), base.borrow().clone());
            let uid = if i % 2 == 0 {
                LEGACY_UIDS.start + (i as i64 % 5)
            } else {
                NATIVE_UIDS.start + (i as i64 % 5)
            };
            async move {
                let url = format!("{base}/gm?action=send&gm_account={GM}&uid={uid}&msg={}", enc(&b64(&text)));
                get_json(&http, &url).await.is_some_and(|r| r == serde_json::json!({"res": 1}))
            }
        }))
    };
    let player_sender = {
        let (ledger, http, base) = (ledger.clone(), http.clone(), base_rx.clone());
        tokio::spawn(sender(ledger, "p", move |i, text| {
            let (http, base) = (http.clone(), base.borrow().clone());
            let uid = LEGACY_UIDS.start + (i as i64 % 5);
            async move {
                let url = format!("{base}/gs?action=send&uid={uid}&msg={}", enc(&b64(&text)));
                get_json(&http, &url).await.is_some_and(|r| r == serde_json::json!({"res": 1}))
            }
        }))
    };
    let native_sender = {
        let (ledger, native) = (ledger.clone(), native.clone());
        tokio::spawn(sender(ledger, "n", move |i, text| {
            let native = native.clone();
            let uid = NATIVE_UIDS.start + (i as i64 % 5);
            async move { native.send(uid, &text, &text).await.is_ok_and(|r| r["ok"] == true) }
        }))
    };
    // Pollers: the legacy host, the legacy GM inbox, and the native host's consumer.
    let mut pollers = Vec::new();
    for feed in ["gs_receive", "gm_receive"] {
        let (ledger, http, base, mut stop) = (ledger.clone(), http.clone(), base_rx.clone(), stop_rx.clone());
        pollers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(40));
            while !*stop.borrow_and_update() {
                tick.tick().await;
                let base = base.borrow().clone();
                poll_legacy(&http, &base, feed, &ledger).await;
            }
        }));
    }
    {
        let (ledger, native, mut stop) = (ledger.clone(), native.clone(), stop_rx.clone());
        pollers.push(tokio::spawn(async move {
            while !*stop.borrow_and_update() {
                if let Ok(Some(event)) = native.next_event(Duration::from_millis(200)).await {
                    if let Some(text) = event["text"].as_str() {
                        ledger.lock().unwrap().delivered.entry("native").or_default().push(text.to_owned());
                    }
                }
            }
        }));
    }

    // The kill: once a third of the GM's sends were acknowledged.
    wait_until_async(Duration::from_secs(30), "a third of the GM sends are acknowledged", || {
        let n = ledger.lock().unwrap().acked.iter().filter(|t| t.starts_with('g')).count();
        async move { n >= SENDS / 3 }
    })
    .await;
    let killed_base = app.base_url();
    app.kill_process();
    app.start_process(&[]).await;
    base_tx.send(app.base_url()).unwrap();

    for task in [gm_sender, player_sender, native_sender] {
        tokio::time::timeout(Duration::from_secs(60), task).await.expect("senders finish").unwrap();
    }
    let acked = ledger.lock().unwrap().acked.clone();
    assert!(acked.len() > SENDS, "most sends were acknowledged: {}", acked.len());

    // Every acknowledged message arrives where it was addressed.
    let expected_feed = |text: &str, i: usize| match text.as_bytes()[0] {
        b'g' if i % 2 == 0 => "gs_receive",
        b'g' => "native",
        _ => "gm_receive",
    };
    wait_until_async(DELIVERY_DEADLINE, "every acknowledged message is delivered", || {
        let l = ledger.lock().unwrap();
        let missing = acked
            .iter()
            .filter(|t| {
                let i: usize = t[1..].parse().unwrap();
                !l.delivered.get(expected_feed(t, i)).is_some_and(|d| d.contains(t))
            })
            .count();
        async move { missing == 0 }
    })
    .await;
    stop_tx.send(true).unwrap();
    for p in pollers {
        tokio::time::timeout(Duration::from_secs(10), p).await.expect("pollers stop").unwrap();
    }

    // Repeats: only what the killed relay's last reply held, on that feed. (Taken from the
    // ledger now, not at the kill: a reply already on its way may be read by the poller
    // only after the kill.) A send that failed at the kill may still be delivered: the
    // relay can die between the PubAck and its reply. That is not a repeat.
    let l = ledger.lock().unwrap();
    let last_replies: BTreeMap<&'static str, &Vec<String>> = l
        .replies
        .iter()
        .filter_map(|(feed, r)| Some((*feed, &r.iter().rev().find(|(base, _)| *base == killed_base)?.1)))
        .collect();
    for (feed, delivered) in &l.delivered {
        let mut seen = BTreeSet::new();
        for text in delivered {
            if !seen.insert(text) {
                let allowed = last_replies.get(feed).is_some_and(|r| r.contains(text));
                assert!(
                    allowed,
                    "{feed} delivered {text} twice, and it was not in the reply in flight at the kill"
                );
            }
        }
    }
}
