//! Per-host NATS security: with the authorization `gm-relay nats-auth` writes, host 1 can
//! read only its own events and send only as itself.

mod support;

#[allow(dead_code)]
#[path = "../examples/game_server.rs"]
mod game_server;

use std::time::Duration;

use futures::StreamExt;
use game_server::GameServer;
use gm_relay::domain::HostId;
use serde_json::json;
use support::app::TestApp;
use support::NatsServer;

const WAIT: Duration = Duration::from_secs(5);

fn seed(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.nk"))).expect("seed written")
}

async fn connect_as(url: &str, seed: &str, inbox: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_nkey(seed.trim().to_owned())
        .custom_inbox_prefix(inbox)
        .connect(url)
        .await
        .expect("an authorized user connects")
}

#[tokio::test]
async fn a_host_reads_and_sends_only_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("auth.conf");
    gm_relay::nats_auth::generate(&[HostId(1), HostId(2)], &conf, dir.path()).expect("auth config written");
    let nats = NatsServer::start_with_config(&std::fs::read_to_string(&conf).unwrap());
    let relay_seed = dir.path().join("relay.nk");
    let app = TestApp::spawn_on(nats, &[("GM_RELAY_NATS_NKEY_FILE", relay_seed.to_str().unwrap())]).await;
    app.create_gm(7, "Alice").await;
    app.add(7, 1, 1001).await;
    app.add(7, 2, 2001).await;
    let url = app.nats.url();

    // No credentials, no entry.
    assert!(async_nats::connect(&url).await.is_err(), "an anonymous client is refused");

    // Host 1 binds its own consumer and gets its own events.
    let host1 =
        GameServer::connect(&url, 1, Some(&seed(dir.path(), "host_1"))).await.expect("host 1 binds host_1");
    let event = host1.next_event(WAIT).await.unwrap().expect("host 1 gets its friend_add");
    assert_eq!((event["type"].clone(), event["uid"].clone()), (json!("friend_add"), json!("1001")));
    assert_eq!(host1.send(1001, "hello", "k1").await.unwrap()["ok"], true);
    assert_eq!(app.gm_receive().await["7"], vec![("1001".to_owned(), vec!["hello".to_owned()])]);

    // Host 1 cannot bind host_2.
    let as_host1 = connect_as(&url, &seed(dir.path(), "host_1"), "_INBOX_host_1").await;
    let mut js = async_nats::jetstream::new(as_host1.clone());
    // A refused request is never answered: don't wait the default 5 s for it.
    js.set_timeout(Duration::from_secs(1));
    assert!(js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "host_2",
            "GM_TO_HOST"
        )
        .await
        .is_err());

    // Host 1 cannot read host 2's subject: its subscription sees nothing of a message that
    // host 2 provably receives.
    let mut spy = as_host1.subscribe("gm.to.host.2").await.expect("subscribe is sent");
    let mut wide = as_host1.subscribe("gm.to.host.>").await.expect("subscribe is sent");
    as_host1.flush().await.unwrap();
    assert_eq!(app.gm_send(7, 2001, "for host 2 only").await.json(), json!({"res": 1}));
    let host2 =
        GameServer::connect(&url, 2, Some(&seed(dir.path(), "host_2"))).await.expect("host 2 binds host_2");
    let mut got = Vec::new();
    for _ in 0..10 {
        match host2.next_event(WAIT).await.unwrap() {
            Some(e) if e["type"] == "chat" => {
                got.push(e);
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert_eq!(got.len(), 1, "host 2 receives its chat");
    let leaked =
        tokio::time::timeout(Duration::from_millis(300), futures::future::select(spy.next(), wide.next()))
            .await;
    let leaked = match leaked {
        Ok(futures::future::Either::Left((m, _))) | Ok(futures::future::Either::Right((m, _))) => m,
        Err(_) => None,
    };
    assert!(leaked.is_none(), "host 1 read a host 2 event: {leaked:?}");

    // Host 1 cannot send as host 2.
    let forged = as_host1
        .send_request(
            "gm.relay.gs.2.send",
            async_nats::Request::new()
                .payload(serde_json::to_vec(&json!({"uid": "2001", "text": "forged"})).unwrap().into())
                .timeout(Some(Duration::from_secs(1))),
        )
        .await;
    assert!(forged.is_err(), "a request as host 2 must not be answered: {forged:?}");
    assert!(app.gm_receive().await.is_empty(), "no forged message reached the GM");
}

#[tokio::test]
async fn the_console_reads_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("auth.conf");
    gm_relay::nats_auth::generate(&[HostId(1)], &conf, dir.path()).expect("auth config written");
    let nats = NatsServer::start_with_config(&std::fs::read_to_string(&conf).unwrap());
    let relay_seed = dir.path().join("relay.nk");
    let app = TestApp::spawn_on(nats, &[("GM_RELAY_NATS_NKEY_FILE", relay_seed.to_str().unwrap())]).await;
    app.create_gm(7, "Alice").await;
    app.add(7, 1, 1001).await;
    let url = app.nats.url();
    let console = connect_as(&url, &seed(dir.path(), "console"), "_INBOX_console").await;
    let mut js = async_nats::jetstream::new(console.clone());
    // A refused request is never answered: don't wait the default 5 s for it.
    js.set_timeout(Duration::from_secs(1));

    // It reads: stream state, a stored message, and chat live.
    let mut to_host = js.get_stream("GM_TO_HOST").await.expect("stream info");
    let stored = to_host.info().await.expect("stream info").state.messages;
    assert!(stored > 0, "the add's event is stored");
    let first = to_host.info().await.unwrap().state.first_sequence;
    assert!(to_host.get_raw_message(first).await.is_ok(), "a stored message by sequence");
    let mut live = console.subscribe("gs.to.gm.*").await.expect("subscribe is sent");
    console.flush().await.unwrap();
    assert_eq!(app.gs_send(1001, "hello").await.res(), 1);
    let seen = tokio::time::timeout(WAIT, live.next())
        .await
        .unwrap_or_else(|_| panic!("no live message; server log:\n{}", app.nats.log()))
        .unwrap();
    assert_eq!(seen.subject.as_str(), "gs.to.gm.7");

    // It changes nothing: no purge, no consumer deleted or created, no pull from a feed.
    assert!(to_host.purge().await.is_err(), "a purge must be refused");
    assert!(to_host.delete_consumer("host_1").await.is_err(), "a consumer delete must be refused");
    let created = to_host
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("spy".to_owned()),
            ..Default::default()
        })
        .await;
    assert!(created.is_err(), "a consumer create must be refused");
    // Refused requests leave the relay's view as it was.
    let js = async_nats::jetstream::new(connect_as(&url, &seed(dir.path(), "relay"), "_INBOX").await);
    let state = js.get_stream("GM_TO_HOST").await.unwrap().info().await.unwrap().state.clone();
    assert_eq!(state.messages, stored, "nothing purged");
    assert!(support::app::consumer_names(&js, "GM_TO_HOST").await.contains("host_1"));
    assert!(!support::app::consumer_names(&js, "GM_TO_HOST").await.contains("spy"));
}
