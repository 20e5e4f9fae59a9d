//! The native NATS interface: a game server on NATS beside a legacy one, on one relay.

mod support;

#[allow(dead_code)]
#[path = "../examples/game_server.rs"]
mod game_server;

use std::time::Duration;

use futures::StreamExt;
use game_server::GameServer;
use serde_json::{json, Value};
use support::app::TestApp;

const WAIT: Duration = Duration::from_secs(5);

async fn next(server: &GameServer) -> Value {
    let event = server.next_event(WAIT).await.expect("fetch works").expect("an event arrives in time");
    assert_matches_schema(&event);
    event
}

/// Checks an envelope against `nats/schema/<type>.schema.json`: required fields, no
/// others, constants, JSON types, and ids in canonical form. (The schemas use only these.)
fn assert_matches_schema(event: &Value) {
    let kind = event["type"].as_str().expect("type is a string");
    let path = format!("{}/nats/schema/{kind}.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("schema exists")).unwrap();
    let fields = event.as_object().expect("envelope is an object");
    let props = schema["properties"].as_object().unwrap();
    for required in schema["required"].as_array().unwrap() {
        assert!(fields.contains_key(required.as_str().unwrap()), "{kind}: {required} missing in {event}");
    }
    for (key, value) in fields {
        let prop = props.get(key).unwrap_or_else(|| panic!("{kind}: field {key} not in the schema"));
        if let Some(c) = prop.get("const") {
            assert_eq!(value, c, "{kind}.{key}");
        }
        match prop["type"].as_str() {
            Some("string") => {
                let s = value.as_str().unwrap_or_else(|| panic!("{kind}.{key} is not a string"));
                if prop.get("pattern").is_some() {
                    assert!(
                        gm_relay::domain::ids::parse_canonical(s.as_bytes()).is_some(),
                        "{kind}.{key} = {s:?}"
                    );
                }
            }
            Some("integer") => assert!(value.is_i64() || value.is_u64(), "{kind}.{key} is not an integer"),
            _ => {}
        }
    }
}

/// Events until none arrives for a short while.
async fn drain(server: &GameServer) -> Vec<Value> {
    let mut events = Vec::new();
    // Bounded: these tests produce a handful of events.
    for _ in 0..100 {
        match server.next_event(Duration::from_millis(300)).await.expect("fetch works") {
            Some(e) => {
                assert_matches_schema(&e);
                events.push(e)
            }
            None => break,
        }
    }
    events
}

#[tokio::test]
async fn native_and_legacy_hosts_share_one_relay() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "客服").await;
    app.add(7, 4, 1001).await; // native host 4
    app.add(7, 3, 2001).await; // legacy host 3

    let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4");
    let added = next(&native).await;
    assert_eq!(added["type"], "friend_add");
    assert_eq!(
        (added["uid"].clone(), added["gm"].clone(), added["gm_name"].clone()),
        (json!("1001"), json!("7"), json!("客服"))
    );
    assert_eq!(added["v"], 1);
    assert!(added["rev"].as_u64().unwrap() >= 1);
    // The GM's first player here: the GM's presence follows.
    let presence = next(&native).await;
    assert_eq!((&presence["type"], &presence["gm"]), (&json!("gm_online"), &json!("7")));

    // GM over legacy HTTP → native host.
    assert_eq!(app.gm_send(7, 1001, "你好 native").await.json(), json!({"res": 1}));
    let chat = next(&native).await;
    assert_eq!(
        (chat["type"].clone(), chat["uid"].clone(), chat["text"].clone()),
        (json!("chat"), json!("1001"), json!("你好 native"))
    );

    // The legacy adapter's own consumer of host 4 still sees the same message: nobody steals.
    assert_eq!(app.gs_receive(4).await, vec![("1001".to_owned(), vec!["你好 native".to_owned()])]);
    // And the legacy host only gets its own players' events.
    assert_eq!(app.relation(3).await.0, json!({"2001": ["7", "客服"]}));

    // Native player → legacy GM poll.
    let reply = native.send(1001, "hi from native", "k-1").await.expect("send answers");
    assert_eq!(reply["ok"], true, "{reply}");
    let inbox = app.gm_receive().await;
    assert_eq!(inbox["7"], vec![("1001".to_owned(), vec!["hi from native".to_owned()])]);
}

#[tokio::test]
async fn native_send_checks_and_idempotency() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    app.add(7, 3, 2001).await;
    let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4");

    let errno = |v: Value| (v["ok"].clone(), v["errno"].clone());
    assert_eq!(
        errno(native.send(2001, "x", "a").await.unwrap()),
        (json!(false), json!(9)),
        "player on another host"
    );
    assert_eq!(
        errno(native.send(5555, "x", "b").await.unwrap()),
        (json!(false), json!(5)),
        "player without GM"
    );
    assert_eq!(errno(native.send(1001, "", "c").await.unwrap()), (json!(false), json!(6)), "empty text");
    assert_eq!(errno(native.send(1001, &"x".repeat(501), "d").await.unwrap()), (json!(false), json!(6)));
    // A body over 8 KiB is not parsed: a send that large can only hold too long a text, a
    // resync that large is malformed.
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    let huge = json!({"uid": "1001", "text": "x".repeat(9000), "cursor": 0}).to_string();
    for (verb, expected) in [("send", 6), ("resync", -1)] {
        let reply = client.request(format!("gm.relay.gs.4.{verb}"), huge.clone().into()).await.unwrap();
        let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(errno(reply), (json!(false), json!(expected)), "{verb} over 8 KiB");
    }

    // A key the relay cannot use is refused, not dropped (a retry would be stored twice).
    for bad in ["order 42", &"k".repeat(65), ""] {
        assert_eq!(
            errno(native.send(1001, "x", bad).await.unwrap()),
            (json!(false), json!(-1)),
            "key {bad:?}"
        );
    }

    let first = native.send(1001, "once", "same-key").await.unwrap();
    let retry = native.send(1001, "once", "same-key").await.unwrap();
    assert_eq!(first["ok"], true);
    assert_eq!(first["id"], retry["id"], "a retry names the same event");
    assert_eq!((first.get("duplicate"), &retry["duplicate"]), (None, &json!(true)), "{first} {retry}");
    let inbox = app.gm_receive().await;
    assert_eq!(inbox["7"], vec![("1001".to_owned(), vec!["once".to_owned()])], "stored once");
}

/// A game server that retries a stored send (its reply was lost) is told "duplicate",
/// not refused by the player's rate limit, which the first attempt already charged.
#[tokio::test]
async fn a_retried_send_is_not_refused_by_the_rate_limit() {
    let app = TestApp::spawn_with(&[("GM_RELAY_RATE_PLAYER_PER_S", "1")]).await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4");
    let first = native.send(1001, "once", "k1").await.unwrap();
    assert_eq!(first["ok"], true, "{first}");
    let retry = native.send(1001, "once", "k1").await.unwrap();
    assert_eq!(
        (&retry["ok"], &retry["duplicate"], &retry["id"]),
        (&json!(true), &json!(true), &first["id"]),
        "{retry}"
    );
    // A new message is still held to the limit.
    let next = native.send(1001, "twice", "k2").await.unwrap();
    assert_eq!((&next["ok"], &next["errno"]), (&json!(false), &json!(8)), "{next}");
    let inbox = app.gm_receive().await;
    assert_eq!(inbox["7"], vec![("1001".to_owned(), vec!["once".to_owned()])], "stored once");
}

#[tokio::test]
async fn presence_and_friend_changes_arrive_as_events() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    app.add(7, 4, 1002).await;
    let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4");
    let kinds = |events: &[serde_json::Value]| -> Vec<String> {
        events.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
    };
    let events = drain(&native).await;
    // The GM's first player on the host brings the GM's presence with it.
    assert_eq!(kinds(&events), ["friend_add", "gm_online", "friend_add"], "{events:?}");

    assert_eq!(app.gm("action=offline&gm_account=7").await.json(), json!({"res": 1}));
    assert_eq!(app.gm("action=online&gm_account=7").await.json(), json!({"res": 1}));
    assert_eq!(app.gm("action=del&gm_account=7&uid=1002").await.json(), json!({"res": 1}));
    let events = drain(&native).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["gm_offline", "gm_online", "friend_remove"], "{events:?}");
    assert_eq!(events[0]["gm"], "7");
    assert_eq!(events[2]["uid"], "1002");

    // Resync: the host's current friend list.
    let players = native.resync().await.expect("resync answers");
    assert_eq!(players.len(), 1);
    assert_eq!(players[0]["uid"], "1001");
    assert_eq!(players[0]["gm"], "7");
    assert_eq!(players[0]["gm_name"], "Alice");
    assert_eq!(players[0]["gm_online"], true);
    assert_eq!(players[0]["rev"], 1);
}

/// A host hears of a GM's presence changes only while the GM has players there; the GM's
/// first player on a host brings the GM's presence as it is then, so what the host heard
/// while it had none is not its last word.
#[tokio::test]
async fn a_gms_first_player_on_a_host_brings_the_gms_presence() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4");
    let ok = json!({"res": 1});
    assert_eq!(app.gm("action=offline&gm_account=7").await.json(), ok);
    assert_eq!(app.gm("action=del&gm_account=7&uid=1001").await.json(), ok);
    // Online with no player on host 4: nothing goes there.
    assert_eq!(app.gm("action=online&gm_account=7").await.json(), ok);
    app.add(7, 4, 1002).await;
    assert_eq!(app.gm("action=offline&gm_account=7").await.json(), ok);
    assert_eq!(app.gm("action=del&gm_account=7&uid=1002").await.json(), ok);
    assert_eq!(app.gm("action=online&gm_account=7").await.json(), ok);
    assert_eq!(app.gm("action=offline&gm_account=7").await.json(), ok);
    // Added while offline: the host learns it is offline, though it last heard "online".
    app.add(7, 4, 1003).await;
    let events = drain(&native).await;
    let seen: Vec<(&str, &str)> =
        events.iter().map(|e| (e["type"].as_str().unwrap(), e["uid"].as_str().unwrap_or("-"))).collect();
    assert_eq!(
        seen,
        [
            ("friend_add", "1001"),
            ("gm_online", "-"),
            ("gm_offline", "-"),
            ("friend_remove", "1001"),
            ("friend_add", "1002"),
            ("gm_online", "-"),
            ("gm_offline", "-"),
            ("friend_remove", "1002"),
            ("friend_add", "1003"),
            ("gm_offline", "-"),
        ],
        "{events:?}"
    );
    // The legacy view agrees: an offline GM is not listed as online on the host.
    let online = app.gs("action=online&host=4").await;
    assert_eq!(online.res(), 1, "{}", online.text());
    assert_eq!(online.b64_json("data"), json!([]), "{}", online.text());
}

#[tokio::test]
async fn a_server_that_was_down_gets_everything_it_missed_in_order() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    {
        let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4");
        assert_eq!(next(&native).await["type"], "friend_add");
        assert_eq!(next(&native).await["type"], "gm_online");
    } // the game server goes away
    for i in 0..5 {
        assert_eq!(app.gm_send(7, 1001, &format!("m{i}")).await.json(), json!({"res": 1}));
    }
    assert_eq!(app.gm("action=del&gm_account=7&uid=1001").await.json(), json!({"res": 1}));

    let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4 again");
    let events = drain(&native).await;
    let seen: Vec<String> = events
        .iter()
        .map(|e| {
            e["text"].as_str().map(str::to_owned).unwrap_or_else(|| e["type"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(seen, vec!["m0", "m1", "m2", "m3", "m4", "friend_remove"]);
}

#[tokio::test]
async fn the_service_shows_in_discovery() {
    let app = TestApp::spawn().await;
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    let info = client.request("$SRV.INFO.gm-relay", "".into()).await.expect("service answers INFO");
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["name"], "gm-relay");
    let subjects: Vec<&str> =
        info["endpoints"].as_array().unwrap().iter().map(|e| e["subject"].as_str().unwrap()).collect();
    assert!(subjects.contains(&"gm.relay.gs.*.send") && subjects.contains(&"gm.relay.gs.*.resync"), "{info}");
}

/// The service reads requests on a connection of its own whose subscription buffers are
/// bounded: a burst it has not read yet is held up to `REQUEST_BUFFER` requests and the rest
/// dropped in the client (their senders time out and retry), not kept in memory; the
/// subscription goes on working after.
#[tokio::test]
async fn the_service_connection_holds_a_bounded_number_of_unread_requests() {
    use gm_relay::adapters::native::{connect, REQUEST_BUFFER};
    let nats = support::NatsServer::start();
    let service = connect(&nats.url(), None).await.expect("connects");
    let mut requests = service.subscribe("gm.relay.gs.*.send").await.unwrap();
    let mut marker = service.subscribe("test.marker").await.unwrap();
    let sender = async_nats::connect(nats.url()).await.unwrap();
    // Both subscriptions are in place on the server once the service's own request
    // round trip is answered.
    service.request("$JS.API.INFO", "".into()).await.unwrap();
    let burst = 2 * REQUEST_BUFFER + 100;
    for i in 0..burst {
        sender.publish("gm.relay.gs.1.send", i.to_string().into()).await.unwrap();
    }
    // The server delivers one sender's messages in order, so once the marker (in a
    // subscription of its own, empty) is read, the client has read the whole burst.
    sender.publish("test.marker", "".into()).await.unwrap();
    tokio::time::timeout(WAIT, marker.next()).await.expect("the marker arrives");
    let mut held = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), requests.next()).await {
        held += 1;
    }
    assert_eq!(held, REQUEST_BUFFER, "{burst} sent without reading");
    sender.publish("gm.relay.gs.1.send", "after".into()).await.unwrap();
    let next = tokio::time::timeout(WAIT, requests.next()).await.expect("a request after the burst arrives");
    assert_eq!(next.expect("subscription open").payload, "after");
}

/// The relay serves the native requests on that connection, not on its main one.
#[tokio::test]
async fn the_relay_serves_native_requests_on_its_own_connection() {
    let monitor = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nats = support::NatsServer::start_with_config(&format!("http: \"127.0.0.1:{monitor}\"\n"));
    let app = TestApp::spawn_on(nats, &[]).await;
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    support::wait_until_async(WAIT, "the native service answers", || async {
        client.request("gm.relay.gs.4.resync", "{}".into()).await.is_ok()
    })
    .await;
    let connz: Value = reqwest::get(format!("http://127.0.0.1:{monitor}/connz?subs=1"))
        .await
        .expect("the monitoring port answers")
        .text()
        .await
        .unwrap()
        .parse()
        .expect("connz is JSON");
    let subscriptions = |name: &str| -> Vec<String> {
        let connections = connz["connections"].as_array().expect("a connection list");
        let conn =
            connections.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name} in {connz}"));
        conn["subscriptions_list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let native = subscriptions(gm_relay::adapters::native::CONNECTION_NAME);
    assert!(
        native.iter().any(|s| s == "gm.relay.gs.*.send"),
        "the native connection subscribes to {native:?}"
    );
    assert!(!subscriptions("gm-relay").iter().any(|s| s.starts_with("gm.relay.gs.")));
}

/// A host that loops on resync gets errno 8 past its rate instead of holding Redis.
#[tokio::test]
async fn resync_is_rate_limited_per_host() {
    const REQUESTS: usize = 100;
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    app.add(7, 5, 2001).await;
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    support::wait_until_async(WAIT, "the native service answers", || async {
        client.request("gm.relay.gs.5.resync", "{}".into()).await.is_ok()
    })
    .await;
    let replies =
        futures::future::join_all((0..REQUESTS).map(|_| client.request("gm.relay.gs.4.resync", "{}".into())))
            .await;
    let errnos: Vec<Value> = replies
        .into_iter()
        .map(|r| serde_json::from_slice::<Value>(&r.expect("answered").payload).unwrap()["errno"].clone())
        .collect();
    let limited = errnos.iter().filter(|e| **e == json!(8)).count();
    let served = errnos.iter().filter(|e| e.is_null()).count();
    assert_eq!(limited + served, REQUESTS, "{errnos:?}");
    assert!(served >= 20 && limited > 0, "{served} served, {limited} limited");
    // Another host has its own allowance.
    let other: Value =
        serde_json::from_slice(&client.request("gm.relay.gs.5.resync", "{}".into()).await.unwrap().payload)
            .unwrap();
    assert_eq!(other["ok"], true, "{other}");
}

/// The relay may publish anywhere, so it must not answer into a subject the requester
/// chose outside its inboxes: that would let one game server write into another host's
/// feed or call JetStream's API with the relay's rights.
#[tokio::test]
async fn replies_go_only_to_the_requesters_inbox() {
    let app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    let js = app.jetstream().await;
    support::app::wait_stored_for_host(&js, 4).await;
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    let body = || serde_json::to_vec(&json!({"uid": "1001", "text": "injected"})).unwrap().into();
    let headers = |key: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", key);
        h
    };
    let targets = ["gm.to.host.5", "$JS.API.STREAM.PURGE.GM_TO_HOST", "_INBOX_host_5.x"];
    for (i, reply) in targets.iter().enumerate() {
        client
            .publish_with_reply_and_headers(
                "gm.relay.gs.4.send",
                reply.to_string(),
                headers(&format!("bad-{i}")),
                body(),
            )
            .await
            .unwrap();
    }
    // And one nobody waits for.
    client.publish_with_headers("gm.relay.gs.4.send", headers("bad-none"), body()).await.unwrap();
    client.flush().await.unwrap();
    let legacy = app.legacy();
    let refused = r#"gm_relay_requests_total{action="send",result="refused",side="native"}"#;
    support::wait_until_async(WAIT, "the four requests are refused", || async {
        legacy.metric(refused).await == 4
    })
    .await;
    // Refused before anything was done: no message reached the GM, nothing was written
    // to host 5's feed, and host 4's feed was not purged.
    assert!(app.gm_receive().await.is_empty(), "a refused request was sent on");
    assert!(support::app::stored_events(&js, "GM_TO_HOST", "gm.to.host.5").await.is_empty());
    assert!(!support::app::stored_events(&js, "GM_TO_HOST", "gm.to.host.4").await.is_empty());
    // The same request with an inbox is served.
    let native = GameServer::connect(&app.nats.url(), 4, None).await.expect("binds host_4");
    assert_eq!(native.send(1001, "fine", "good").await.unwrap()["ok"], true);
}

/// On a graceful stop the relay leaves the queue group first and answers every request
/// NATS had already given it, including those still waiting for a slot: a game server
/// gets an answer or, once no relay listens, "no responders" at once, never silence.
#[tokio::test]
async fn a_stopping_relay_answers_the_requests_it_was_given() {
    // More than the relay handles at once (1,024), so that some wait in its subscription,
    // and no more than that holds, so that none is dropped when all arrive in one read.
    const REQUESTS: usize = 1100;
    const { assert!(REQUESTS <= gm_relay::adapters::native::REQUEST_BUFFER) };
    const HOSTS: usize = 60;
    let mut app = TestApp::spawn().await;
    app.create_gm(7, "Alice").await;
    app.add(7, 4, 1001).await;
    let client = async_nats::connect(app.nats.url()).await.unwrap();
    // The native service subscribes just after the relay starts.
    support::wait_until_async(WAIT, "the native service answers", || async {
        client.request("gm.relay.gs.4.resync", "{}".into()).await.is_ok()
    })
    .await;
    let mut replies = client.subscribe("_INBOX.stop-test.>").await.unwrap();
    // Redis holds every resync for a while, so the relay's slots are all taken.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("ALL")
        .query_async(&mut app.redis_conn().await)
        .await
        .unwrap();
    // Spread over hosts, under each host's resync rate, so that every one reaches Redis.
    for i in 0..REQUESTS {
        let subject = format!("gm.relay.gs.{}.resync", i % HOSTS);
        client.publish_with_reply(subject, format!("_INBOX.stop-test.{i}"), "{}".into()).await.unwrap();
    }
    // Sent after them on the same connection, the relay's answer to a ping shows that it
    // has read them all: they are taken or waiting in its subscription.
    client.request("$SRV.PING.gm-relay", "".into()).await.expect("the service answers a ping");
    app.stop().await;
    let mut seen = std::collections::HashSet::new();
    let (mut answered, mut no_responders) = (0, 0);
    while seen.len() < REQUESTS {
        let Ok(Some(reply)) = tokio::time::timeout(WAIT, replies.next()).await else {
            panic!("{} requests left unanswered ({answered} answered)", REQUESTS - seen.len());
        };
        assert!(seen.insert(reply.subject.to_string()), "answered twice: {}", reply.subject);
        if reply.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            no_responders += 1;
        } else {
            let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
            assert_eq!(reply["ok"], true, "{reply}");
            answered += 1;
        }
    }
    assert!(
        answered > 0,
        "the relay stopped before any request reached it ({no_responders} without responders)"
    );
}
