//! Two relays over one nats-server and one redis-server, as behind nginx: requests of one
//! conversation land on either relay, polls of one feed hit both at the same time, and
//! both start consumers and drain the outbox. Nothing may be lost, repeated or reordered:
//! - legacy polls of one feed are serialised across relays by a Redis lease, so every
//!   message is served exactly once, and each player's messages in the order sent;
//! - one outbox drainer at a time (a Redis lease) publishes friend events in commit order,
//!   and never twice (no duplicate acknowledgements on either relay);
//! - two relays creating the same consumer at once both succeed and share it.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use support::app::{consumer_backlog, consumer_names, stored_events, wait_stored_for_host};
use support::relays::{base_settings, Legacy, RelayInstance};
use support::{wait_until_async, NatsServer, RedisServer};

const GM: i64 = 7;
const HOST: i64 = 3;
const UIDS: std::ops::Range<i64> = 1001..1006;

/// Messages per player and direction: several polls' worth (10 per player per poll), so
/// a conversation spans many polls served by both relays.
const MESSAGES_PER_UID: usize = 60;

/// Of those, queued before anyone polls: polls then serve 10 per player and leave the rest
/// for the next poll, while the senders add more — where two polls of one feed at once
/// (were they not serialised) would serve later messages before the remainder.
const BACKLOG_PER_UID: usize = 30;

/// Backlog-then-concurrent rounds: each gives unserialised polls another chance to show.
const ROUNDS: usize = 3;

/// Bound on all messages arriving; they normally take a few seconds on 2 cores.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

/// One poll as the client saw it: when it was sent and answered, and what it held per
/// conversation (the key names the conversation, the texts are in reply order).
struct Poll {
    sent: Instant,
    got: Instant,
    conversations: Vec<(String, Vec<String>)>,
}

/// The text of message `k` of conversation `key`; [`index_of`] reads `k` back.
fn text(key: &str, k: usize) -> String {
    format!("{key}#{k}")
}

fn index_of(text: &str) -> usize {
    text.rsplit('#').next().and_then(|k| k.parse().ok()).unwrap_or_else(|| panic!("not a test text: {text}"))
}

/// Every conversation got messages 0..n exactly once, each poll held a contiguous run of
/// them in order, and a poll answered before another was sent never holds later messages.
fn check_exactly_once_in_order(polls: &[Poll], expected: &BTreeMap<String, usize>) {
    let mut runs: BTreeMap<&str, Vec<(usize, Vec<usize>)>> = BTreeMap::new();
    for (p, poll) in polls.iter().enumerate() {
        for (key, texts) in &poll.conversations {
            let run: Vec<usize> = texts.iter().map(|t| index_of(t)).collect();
            assert!(
                run.windows(2).all(|w| w[1] == w[0] + 1),
                "conversation {key}: one poll held {run:?}, not a contiguous run in order"
            );
            runs.entry(key.as_str()).or_default().push((p, run));
        }
    }
    for (key, &n) in expected {
        let mut got = runs.remove(key.as_str()).unwrap_or_default();
        got.sort_by_key(|(_, run)| run[0]);
        let all: Vec<usize> = got.iter().flat_map(|(_, run)| run.iter().copied()).collect();
        assert_eq!(
            all,
            (0..n).collect::<Vec<_>>(),
            "conversation {key}: each message exactly once, in order"
        );
        for (i, (p, _)) in got.iter().enumerate() {
            for (q, _) in &got[i + 1..] {
                assert!(
                    polls[*q].got >= polls[*p].sent,
                    "conversation {key}: a poll sent after another one was answered served \
                     earlier messages than it"
                );
            }
        }
    }
    assert!(runs.is_empty(), "unexpected conversations: {:?}", runs.keys().collect::<Vec<_>>());
}

/// Polls with `poll` on every client in turn (one task per client, all at once) until
/// `total` messages arrived; returns the polls and how many served something, per client.
async fn poll_until<F, Fut>(clients: &[Legacy], total: usize, poll: F) -> (Vec<Poll>, Vec<usize>)
where
    F: Fn(Legacy) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<(String, Vec<String>)>, String>> + Send,
{
    let polls = Arc::new(Mutex::new(Vec::<Poll>::new()));
    let received = Arc::new(Mutex::new(0usize));
    let tasks = clients.iter().cloned().map(|client| {
        let (polls, received, poll) = (Arc::clone(&polls), Arc::clone(&received), poll.clone());
        tokio::spawn(async move {
            let mut served = 0;
            let deadline = Instant::now() + DELIVERY_DEADLINE;
            while *received.lock().unwrap() < total {
                assert!(
                    Instant::now() < deadline,
                    "messages did not all arrive within {DELIVERY_DEADLINE:?}"
                );
                let sent = Instant::now();
                let conversations = poll(client.clone()).await.expect("poll succeeds");
                let got = Instant::now();
                if conversations.is_empty() {
                    // Nothing waiting: let the senders and the other poller run.
                    tokio::task::yield_now().await;
                    continue;
                }
                served += 1;
                *received.lock().unwrap() += conversations.iter().map(|(_, t)| t.len()).sum::<usize>();
                polls.lock().unwrap().push(Poll { sent, got, conversations });
            }
            served
        })
    });
    let served = join_all(tasks).await.into_iter().map(|r| r.expect("poller did not panic")).collect();
    let polls = std::mem::take(&mut *polls.lock().unwrap());
    (polls, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_both_relays_is_delivered_exactly_once_in_order() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let settings = base_settings(&nats.url(), &redis.url());
    let relays = [RelayInstance::in_process(&settings).await, RelayInstance::in_process(&settings).await];
    let clients: Vec<Legacy> = relays.iter().map(RelayInstance::client).collect();
    clients[0].create_gm(GM, "Alice").await;
    for (i, uid) in UIDS.enumerate() {
        assert_eq!(clients[i % 2].add(GM, HOST, uid).await.res(), 1);
    }

    // Both directions, each message through the other relay than the one before.
    let send = |range: std::ops::Range<usize>| {
        UIDS.map(|uid| {
            let (clients, range) = (clients.clone(), range.clone());
            tokio::spawn(async move {
                for k in range {
                    let to_player = Legacy::gm_send_query(GM, uid, &text(&uid.to_string(), k));
                    let r = clients[k % 2].get(&to_player).await;
                    assert_eq!(r.res(), 1, "GM send {uid}#{k}: {}", r.text());
                    let to_gm = Legacy::gs_send_query(uid, &text(&format!("{GM}/{uid}"), k));
                    let r = clients[(k + 1) % 2].get(&to_gm).await;
                    assert_eq!(r.res(), 1, "player send {uid}#{k}: {}", r.text());
                }
            })
        })
        .collect::<Vec<_>>()
    };
    let (mut host_polls, mut gm_polls) = (Vec::new(), Vec::new());
    let (mut host_served, mut gm_served) = (vec![0; 2], vec![0; 2]);
    for round in 0..ROUNDS {
        let base = round * MESSAGES_PER_UID;
        join_all(send(base..base + BACKLOG_PER_UID)).await.into_iter().for_each(|r| r.expect("sender"));
        let senders = send(base + BACKLOG_PER_UID..base + MESSAGES_PER_UID);
        let total = UIDS.count() * MESSAGES_PER_UID;
        let host = poll_until(&clients, total, |c: Legacy| async move { c.try_gs_receive(HOST).await });
        let gm = poll_until(&clients, total, |c: Legacy| async move {
            c.try_gm_receive()
                .await
                .map(|v| v.into_iter().map(|(gm, uid, texts)| (format!("{gm}/{uid}"), texts)).collect())
        });
        let ((host, host_by_relay), (gm, gm_by_relay), sent) = tokio::join!(host, gm, join_all(senders));
        sent.into_iter().for_each(|r| r.expect("sender did not panic"));
        host_polls.extend(host);
        gm_polls.extend(gm);
        (0..2).for_each(|i| {
            host_served[i] += host_by_relay[i];
            gm_served[i] += gm_by_relay[i];
        });
    }

    let per_uid = ROUNDS * MESSAGES_PER_UID;
    let to_players: BTreeMap<String, usize> = UIDS.map(|u| (u.to_string(), per_uid)).collect();
    let to_gm: BTreeMap<String, usize> = UIDS.map(|u| (format!("{GM}/{u}"), per_uid)).collect();
    check_exactly_once_in_order(&host_polls, &to_players);
    check_exactly_once_in_order(&gm_polls, &to_gm);
    println!(
        "polls serving messages, relay A / relay B: host feed {host_served:?}, GM feed {gm_served:?} \
         ({} and {} polls)",
        host_polls.len(),
        gm_polls.len()
    );
    assert!(
        host_served.iter().chain(&gm_served).filter(|&&n| n > 0).count() >= 3,
        "both relays served polls: {host_served:?} {gm_served:?}"
    );

    // Nothing left behind: no unacked or undelivered message on the legacy consumers.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    for (stream, durable) in
        [("GM_TO_HOST", format!("legacy_chat_{HOST}")), ("GS_TO_GM", "legacy_gm".to_owned())]
    {
        wait_until_async(Duration::from_secs(5), &format!("{durable} has nothing pending"), || {
            let (js, stream, durable) = (js.clone(), stream, durable.clone());
            async move { consumer_backlog(&js, stream, &durable).await == Some((0, 0)) }
        })
        .await;
    }
}

type Observed = Mutex<HashMap<String, BTreeSet<&'static str>>>;

/// Notes which kinds of change a relation poll reported per uid.
fn record(observed: &Observed, apply: &serde_json::Value, remove: &serde_json::Value) {
    let mut seen = observed.lock().unwrap();
    for uid in apply.as_object().expect("apply is an object").keys() {
        seen.entry(uid.clone()).or_default().insert("apply");
    }
    for uid in remove.as_array().expect("remove is a list") {
        seen.entry(uid.as_str().expect("uid string").to_owned()).or_default().insert("remove");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friend_changes_through_both_relays_publish_once_in_commit_order() {
    const FRIEND_HOST: i64 = 5;
    const FRIEND_UIDS: std::ops::Range<i64> = 2001..2011;
    /// add + del per round; GMs alternate, and so do relays.
    const ROUNDS: usize = 6;
    const GMS: [i64; 2] = [8, 9];

    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let settings = base_settings(&nats.url(), &redis.url());
    let relays = [RelayInstance::in_process(&settings).await, RelayInstance::in_process(&settings).await];
    let clients: Vec<Legacy> = relays.iter().map(RelayInstance::client).collect();
    clients[0].create_gm(GMS[0], "Eight").await;
    clients[1].create_gm(GMS[1], "Nine").await;

    let changers = FRIEND_UIDS.map(|uid| {
        let clients = clients.clone();
        tokio::spawn(async move {
            for r in 0..ROUNDS {
                let gm = GMS[r % 2];
                let via = (uid as usize + r) % 2;
                let add = clients[via].add(gm, FRIEND_HOST, uid).await;
                assert_eq!(add.res(), 1, "add {uid} round {r}: {}", add.text());
                let del = clients[1 - via].del(gm, uid).await;
                assert_eq!(del.res(), 1, "del {uid} round {r}: {}", del.text());
            }
        })
    });
    // Relation polls on both relays meanwhile. The removal is each player's last change, so
    // the poll that serves it reports the player as removed, whatever it coalesced.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observed = Arc::new(Observed::default());
    let pollers: Vec<_> = clients
        .iter()
        .cloned()
        .map(|client| {
            let (stop, observed) = (Arc::clone(&stop), Arc::clone(&observed));
            tokio::spawn(async move {
                loop {
                    let done = stop.load(std::sync::atomic::Ordering::SeqCst);
                    let (apply, remove) = client.relation(FRIEND_HOST).await;
                    record(&observed, &apply, &remove);
                    if done {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    join_all(changers).await.into_iter().for_each(|r| r.expect("changer did not panic"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    join_all(pollers).await.into_iter().for_each(|r| r.expect("poller did not panic"));

    // The stream holds every change once, each player's in revision order.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let events = stored_events(&js, "GM_TO_HOST", &format!("gm.to.host.{FRIEND_HOST}")).await;
    let ids: BTreeSet<_> =
        events.iter().map(|e| e.msg_id.clone().expect("every event has a Nats-Msg-Id")).collect();
    assert_eq!(ids.len(), events.len(), "no event stored twice");
    for uid in FRIEND_UIDS {
        let uid_text = uid.to_string();
        let mine: Vec<_> = events.iter().filter(|e| e.body["uid"] == uid_text.as_str()).collect();
        let revs: Vec<u64> = mine.iter().map(|e| e.body["rev"].as_u64().expect("rev")).collect();
        assert_eq!(
            revs,
            (1..=2 * ROUNDS as u64).collect::<Vec<_>>(),
            "uid {uid}: every revision once, in order"
        );
        for (i, e) in mine.iter().enumerate() {
            let kind = if i % 2 == 0 { "friend_add" } else { "friend_remove" };
            assert_eq!(e.body["type"], kind, "uid {uid} event {i}");
            assert_eq!(e.body["gm"], GMS[(i / 2) % 2].to_string(), "uid {uid} event {i}");
        }
    }
    // One drainer at a time: two drainers at once would have published the same entries
    // twice, which the stream acknowledges as duplicates.
    for client in &clients {
        assert_eq!(client.metric("gm_relay_publish_duplicates_total{route=\"outbox\"}").await, 0);
    }
    let mut conn =
        redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let (len, seq, published): (u64, u64, u64) = redis::pipe()
        .cmd("LLEN")
        .arg("gmr:outbox")
        .cmd("GET")
        .arg("gmr:outbox:seq")
        .cmd("GET")
        .arg("gmr:outbox:published")
        .query_async(&mut conn)
        .await
        .expect("outbox keys");
    assert_eq!((len, published), (0, seq), "the outbox is drained and its position recorded");

    // The game server heard of every player's removal, and nothing is left to serve.
    let observed = std::mem::take(&mut *observed.lock().unwrap());
    for uid in FRIEND_UIDS {
        let kinds = observed.get(&uid.to_string()).unwrap_or_else(|| panic!("uid {uid} never observed"));
        assert!(kinds.contains("remove"), "uid {uid}: the host was told of the removal ({kinds:?})");
    }
    let durable = format!("legacy_rel_{FRIEND_HOST}");
    assert_eq!(consumer_backlog(&js, "GM_TO_HOST", &durable).await, Some((0, 0)), "all served and acked");
    for client in &clients {
        let (apply, remove) = client.relation(FRIEND_HOST).await;
        assert_eq!((apply, remove), (serde_json::json!({}), serde_json::json!([])), "nothing served twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_relays_creating_the_same_consumers_at_once_share_them() {
    const HOSTS: std::ops::Range<i64> = 100..116;
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let settings = base_settings(&nats.url(), &redis.url());
    let relays = [RelayInstance::in_process(&settings).await, RelayInstance::in_process(&settings).await];
    let clients: Vec<Legacy> = relays.iter().map(RelayInstance::client).collect();
    clients[0].create_gm(GM, "Alice").await;

    // Per new host, at the same moment: an add on each relay, each creating the host's
    // native consumer.
    let adders = HOSTS.map(|host| {
        let clients = clients.clone();
        tokio::spawn(async move {
            let (a0, a1) =
                tokio::join!(clients[0].add(GM, host, host * 100), clients[1].add(GM, host, host * 100 + 1));
            assert_eq!((a0.res(), a1.res()), (1, 1), "adds on host {host}: {} / {}", a0.text(), a1.text());
        })
    });
    join_all(adders).await.into_iter().for_each(|r| r.expect("adder did not panic"));

    // A legacy consumer is made once something is stored for its host: once the adds'
    // friend events are, a chat poll and a relation poll on each relay, at the same
    // moment, each create the host's legacy consumers.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    for host in HOSTS {
        wait_stored_for_host(&js, host).await;
    }
    let pollers = HOSTS.map(|host| {
        let clients = clients.clone();
        tokio::spawn(async move {
            let (r0, r1, l0, l1) = tokio::join!(
                clients[0].try_gs_receive(host),
                clients[1].try_gs_receive(host),
                clients[0].relation(host),
                clients[1].relation(host),
            );
            r0.expect("chat poll on relay A");
            r1.expect("chat poll on relay B");
            let _ = (l0, l1);
        })
    });
    join_all(pollers).await.into_iter().for_each(|r| r.expect("poller did not panic"));

    let found = consumer_names(&js, "GM_TO_HOST").await;
    let expected: BTreeSet<String> = HOSTS
        .flat_map(|h| [format!("host_{h}"), format!("legacy_chat_{h}"), format!("legacy_rel_{h}")])
        .collect();
    assert_eq!(found, expected, "each consumer exactly once");

    // And they work: a message to each host arrives once, through either relay.
    for host in HOSTS {
        let r =
            clients[(host % 2) as usize].get(&Legacy::gm_send_query(GM, host * 100, "after the race")).await;
        assert_eq!(r.res(), 1, "{}", r.text());
    }
    for host in HOSTS {
        let got = clients[((host + 1) % 2) as usize].try_gs_receive(host).await.expect("poll");
        assert_eq!(got, vec![((host * 100).to_string(), vec!["after the race".to_owned()])], "host {host}");
    }
}
