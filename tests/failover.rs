//! Failover on a 3-node JetStream cluster (loopback, free ports, the shipped
//! `nats/cluster/` configs) with two relay processes, both on every node's URL, R3 streams
//! and R3 consumers. Under steady traffic — legacy GM sends and game-server polls, native
//! player sends with a `Nats-Msg-Id`, GM polls — the test kills (`kill -9`) the node
//! leading `GM_TO_HOST`, then one relay, and checks:
//! - traffic continues after a bounded pause (measured and printed: the longest time no
//!   send was acknowledged at all, and the longest one conversation waited);
//! - nothing acknowledged is lost: every send that got `res: 1` / `ok: true` is delivered;
//! - retried publishes are de-duplicated: no `Nats-Msg-Id` is stored twice, although
//!   native requests are retried with the same key and the relay retries unacknowledged
//!   publishes itself.
//!
//! Clients behave as behind nginx: a request that fails on one relay (connection refused,
//! errno 10, timeout) is sent again through the other. A legacy send retried after an
//! uncertain failure may be stored twice (errno 10 promises nothing changed only when the
//! publish never reached the stream; see the README), so such texts may repeat; polls
//! deliver at least once (acks lost with a dying node mean redelivery after the ack wait).
//! The relay is killed between polls (the test holds the pollers back for the moment):
//! a relay killed mid-poll delays that feed by its poll lease (15 s), which the
//! durability suite covers with a single relay.
//!
//! Bounded: 10-16 s on 2 cores (most of it the stream leader election), up to 15 s more
//! when a poll during the election leaves its lease to expire; every wait has a deadline.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::join_all;
use gm_relay::relay::POLL_LEASE_TTL;
use support::app::{stored_events, wait_poll_leases_released};
use support::cluster::NatsCluster;
use support::relays::{base_settings, Legacy, RelayInstance};
use support::{wait_until_async, RedisServer};
use tokio::sync::RwLock;

const GM: i64 = 7;
/// A legacy game server (polls over HTTP) and a native one (sends over NATS).
const LEGACY_HOST: i64 = 3;
const NATIVE_HOST: i64 = 4;
const LEGACY_UIDS: std::ops::Range<i64> = 1001..1004;
const NATIVE_UIDS: std::ops::Range<i64> = 2001..2004;

/// Pace of each sender and poller: steady traffic (~120 sends/s in all) that leaves the
/// 2 cores to the three servers and two relays.
const PACE: Duration = Duration::from_millis(50);

/// Acknowledged sends per kind wanted in each phase (before the first kill, after each).
const SENDS_PER_PHASE: usize = 30;

/// Bound on a phase reaching its sends; traffic resuming within it is the bounded pause.
const PHASE_DEADLINE: Duration = Duration::from_secs(30);

/// Bound on a native request: the relay answers within its 2 s publish bound.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(2500);

/// Bound on every acknowledged message arriving at the end. Messages whose acks died with
/// the killed node come back after the consumers' ack wait (10 s for the legacy ones).
const DELIVERY_DEADLINE: Duration = Duration::from_secs(40);

/// A pause longer than this fails the test. Electing a stream's new leader takes 4-9 s
/// (randomised Raft election timeouts); a split vote costs another round.
const MAX_PAUSE: Duration = Duration::from_secs(25);

/// Every this many native sends, the game server sends the request again with the same
/// key after it was acknowledged, as a client does when the reply is lost: the stream must
/// drop the second copy.
const RESEND_EVERY: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Legacy,
    Native,
}

/// One acknowledged send.
struct Acked {
    kind: Kind,
    conversation: i64,
    text: String,
    at: Instant,
    /// Failed attempts before the acknowledged one.
    failed_attempts: usize,
    /// Whether a failed attempt may still have been stored (a legacy retry then stores a
    /// second copy under a new id; a native retry reuses the key and cannot).
    uncertain: bool,
}

#[derive(Default)]
struct Ledger {
    acked: Vec<Acked>,
    /// Every text each feed delivered, repeats included.
    delivered: BTreeMap<String, usize>,
    /// When each poll that delivered something answered.
    deliveries_at: Vec<Instant>,
    /// Native requests repeated after their acknowledgement (and acknowledged again).
    resent: usize,
}

struct Traffic {
    clients: Vec<Legacy>,
    nats: async_nats::Client,
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
    /// Set once every sender has returned, so no acknowledgement can still be recorded:
    /// a poller that found everything delivered before that could miss a send that was in
    /// flight when `stop` was set.
    senders_done: AtomicBool,
    /// Pollers hold it shared during a poll; the test takes it to kill a relay between polls.
    poll_gate: RwLock<()>,
}

impl Traffic {
    fn acked_count(&self, kind: Kind, since: Instant) -> usize {
        self.ledger.lock().unwrap().acked.iter().filter(|a| a.kind == kind && a.at >= since).count()
    }

    fn record(&self, acked: Acked) {
        self.ledger.lock().unwrap().acked.push(acked);
    }

    /// A legacy GM sends texts to `uid`, alternating relays; a failure goes to the other.
    async fn legacy_sender(self: Arc<Self>, uid: i64) {
        let mut pace = tokio::time::interval(PACE);
        for k in 0.. {
            pace.tick().await;
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let text = format!("{uid}#{k}");
            let query = Legacy::gm_send_query(GM, uid, &text);
            let (mut failed_attempts, mut uncertain) = (0, false);
            let started = Instant::now();
            loop {
                let client = &self.clients[(k + failed_attempts) % self.clients.len()];
                match client.try_get(&query).await {
                    Ok(r) if r.status == 200 && r.res() == 1 => break,
                    Ok(r) if r.errno() == Some(10) => uncertain = true,
                    Ok(r) => panic!("GM send {text}: unexpected reply {}", r.text()),
                    // Refused: nothing was sent. A timeout or reset: it may have arrived.
                    Err(e) => uncertain |= !e.is_connect(),
                }
                failed_attempts += 1;
                assert!(started.elapsed() < PHASE_DEADLINE, "GM send {text} failed for {PHASE_DEADLINE:?}");
                pace.tick().await;
            }
            let at = Instant::now();
            self.record(Acked {
                kind: Kind::Legacy,
                conversation: uid,
                text,
                at,
                failed_attempts,
                uncertain,
            });
        }
    }

    /// A native game server sends players' texts with a `Nats-Msg-Id`; a failed request is
    /// repeated with the same key (whichever relay takes it).
    async fn native_sender(self: Arc<Self>, uid: i64) {
        let mut pace = tokio::time::interval(PACE);
        let subject = format!("gm.relay.gs.{NATIVE_HOST}.send");
        for k in 0.. {
            pace.tick().await;
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let text = format!("{uid}#{k}");
            let body =
                serde_json::to_vec(&serde_json::json!({"uid": uid.to_string(), "text": text})).unwrap();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("failover-{uid}-{k}").as_str());
            let mut failed_attempts = 0;
            let started = Instant::now();
            loop {
                let request =
                    self.nats.request_with_headers(subject.clone(), headers.clone(), body.clone().into());
                // No responders while reconnecting, or no reply in time: try again.
                if let Ok(Ok(reply)) = tokio::time::timeout(REQUEST_TIMEOUT, request).await {
                    let reply: serde_json::Value =
                        serde_json::from_slice(&reply.payload).expect("JSON reply");
                    if reply["ok"] == true {
                        break;
                    }
                    assert_eq!(reply["errno"], 10, "native send {text}: {reply}");
                }
                failed_attempts += 1;
                assert!(
                    started.elapsed() < PHASE_DEADLINE,
                    "native send {text} failed for {PHASE_DEADLINE:?}"
                );
                pace.tick().await;
            }
            let at = Instant::now();
            if k % RESEND_EVERY == 0 {
                let again =
                    self.nats.request_with_headers(subject.clone(), headers.clone(), body.clone().into());
                if let Ok(Ok(reply)) = tokio::time::timeout(REQUEST_TIMEOUT, again).await {
                    let reply: serde_json::Value =
                        serde_json::from_slice(&reply.payload).expect("JSON reply");
                    if reply["ok"] == true {
                        self.ledger.lock().unwrap().resent += 1;
                    }
                }
            }
            let acked =
                Acked { kind: Kind::Native, conversation: uid, text, at, failed_attempts, uncertain: false };
            self.record(acked);
        }
    }

    /// Polls one feed, alternating relays, until stopped and everything acknowledged has
    /// arrived.
    async fn poller(self: Arc<Self>, feed: Kind) {
        let mut pace = tokio::time::interval(PACE);
        for n in 0.. {
            pace.tick().await;
            if self.senders_done.load(Ordering::SeqCst) && self.all_delivered(feed) {
                return;
            }
            let gate = self.poll_gate.read().await;
            let client = &self.clients[n % self.clients.len()];
            let texts: Vec<String> = match feed {
                Kind::Legacy => client
                    .try_gs_receive(LEGACY_HOST)
                    .await
                    .map(|v| v.into_iter().flat_map(|(_, texts)| texts).collect()),
                Kind::Native => client
                    .try_gm_receive()
                    .await
                    .map(|v| v.into_iter().flat_map(|(_, _, texts)| texts).collect()),
            }
            .unwrap_or_default();
            drop(gate);
            if !texts.is_empty() {
                let mut ledger = self.ledger.lock().unwrap();
                ledger.deliveries_at.push(Instant::now());
                for t in texts {
                    *ledger.delivered.entry(t).or_default() += 1;
                }
            }
        }
    }

    fn all_delivered(&self, kind: Kind) -> bool {
        let ledger = self.ledger.lock().unwrap();
        ledger.acked.iter().filter(|a| a.kind == kind).all(|a| ledger.delivered.contains_key(&a.text))
    }
}

/// The longest stretch around `kill` in which no send of `kind` was acknowledged, and the
/// longest one conversation waited across it.
fn pauses(acked: &[Acked], kind: Kind, kill: Instant) -> (Duration, Duration) {
    let mut all: Vec<Instant> = acked.iter().filter(|a| a.kind == kind).map(|a| a.at).collect();
    all.sort();
    let gap = |times: &[Instant]| {
        let before = times.iter().rev().find(|t| **t < kill);
        let after = times.iter().find(|t| **t >= kill);
        match (before, after) {
            (Some(b), Some(a)) => a.duration_since(*b),
            _ => Duration::ZERO,
        }
    };
    let overall = gap(&all);
    let conversations: BTreeSet<i64> =
        acked.iter().filter(|a| a.kind == kind).map(|a| a.conversation).collect();
    let worst = conversations
        .iter()
        .map(|c| {
            let times: Vec<Instant> =
                acked.iter().filter(|a| a.kind == kind && a.conversation == *c).map(|a| a.at).collect();
            gap(&times)
        })
        .max()
        .unwrap_or_default();
    (overall, worst)
}

async fn metric_sum(client: &Legacy, name: &str) -> u64 {
    let Ok(reply) = client.try_get("/metrics").await else { return 0 };
    reply
        .text()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_and_a_relay_pauses_traffic_briefly_and_loses_nothing() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start();
    let redis = RedisServer::start();
    let mut settings = base_settings(&cluster.urls(), &redis.url());
    settings.insert("GM_RELAY_STREAM_REPLICAS".into(), "3".into());
    settings.insert("GM_RELAY_CONSUMER_REPLICAS".into(), "3".into());
    let mut relays = [RelayInstance::process(&settings).await, RelayInstance::process(&settings).await];
    let clients: Vec<Legacy> = relays.iter().map(RelayInstance::client).collect();
    let urls: Vec<String> = cluster.urls().split(',').map(str::to_owned).collect();
    let nats = async_nats::connect(urls).await.expect("connect to the cluster");
    let js = jetstream::new(nats.clone());

    clients[0].create_gm(GM, "Alice").await;
    for uid in LEGACY_UIDS {
        assert_eq!(clients[0].add(GM, LEGACY_HOST, uid).await.res(), 1);
    }
    for uid in NATIVE_UIDS {
        assert_eq!(clients[1].add(GM, NATIVE_HOST, uid).await.res(), 1);
    }
    println!("cluster, Redis and two relays up in {:?}", started.elapsed());

    let traffic = Arc::new(Traffic {
        clients: clients.clone(),
        nats: nats.clone(),
        ledger: Mutex::default(),
        stop: AtomicBool::new(false),
        senders_done: AtomicBool::new(false),
        poll_gate: RwLock::new(()),
    });
    let mut senders = Vec::new();
    for uid in LEGACY_UIDS {
        senders.push(tokio::spawn(Arc::clone(&traffic).legacy_sender(uid)));
    }
    for uid in NATIVE_UIDS {
        senders.push(tokio::spawn(Arc::clone(&traffic).native_sender(uid)));
    }
    let pollers = vec![
        tokio::spawn(Arc::clone(&traffic).poller(Kind::Legacy)),
        tokio::spawn(Arc::clone(&traffic).poller(Kind::Native)),
    ];

    let phase = |since: Instant, what: &'static str| {
        let traffic = Arc::clone(&traffic);
        async move {
            wait_until_async(PHASE_DEADLINE, what, || {
                let traffic = Arc::clone(&traffic);
                async move {
                    traffic.acked_count(Kind::Legacy, since) >= SENDS_PER_PHASE
                        && traffic.acked_count(Kind::Native, since) >= SENDS_PER_PHASE
                }
            })
            .await;
        }
    };
    phase(started, "traffic flows before any kill").await;

    // 1. Kill the node leading GM_TO_HOST.
    let leader =
        js.get_stream("GM_TO_HOST").await.expect("stream").info().await.expect("info").cluster.clone();
    let leader = leader.and_then(|c| c.leader).expect("GM_TO_HOST has a leader");
    let node = cluster.index_of(&leader);
    let node_killed = Instant::now();
    cluster.kill(node);
    phase(node_killed, "traffic resumes after the stream leader's node was killed").await;
    let new_leader =
        js.get_stream("GM_TO_HOST").await.expect("stream").info().await.expect("info").cluster.clone();
    println!("killed node {leader} (GM_TO_HOST leader); new leader {:?}", new_leader.and_then(|c| c.leader));

    // 2. Kill relay B between polls; its metrics die with it, so read them first.
    let b_retries = metric_sum(&clients[1], "gm_relay_publish_retries_total").await;
    let b_duplicates = metric_sum(&clients[1], "gm_relay_publish_duplicates_total").await;
    let relay_killed = {
        let _no_polls = traffic.poll_gate.write().await;
        let mut conn =
            redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        // The last poll's acks are applied once its lease is released. A poll that could
        // not confirm its acks during the election leaves its lease to expire instead.
        wait_poll_leases_released(&conn, POLL_LEASE_TTL + Duration::from_secs(5)).await;
        let _: () = redis::cmd("PING").query_async(&mut conn).await.expect("Redis answers");
        relays[1].kill();
        Instant::now()
    };
    phase(relay_killed, "traffic resumes after relay B was killed").await;

    // 3. Stop sending; every acknowledged text must arrive.
    traffic.stop.store(true, Ordering::SeqCst);
    let senders = tokio::time::timeout(PHASE_DEADLINE, join_all(senders)).await.expect("senders stop");
    senders.into_iter().for_each(|r| r.expect("sender did not panic"));
    traffic.senders_done.store(true, Ordering::SeqCst);
    let drained = tokio::time::timeout(DELIVERY_DEADLINE, join_all(pollers)).await;
    let missing: Vec<String> = {
        let ledger = traffic.ledger.lock().unwrap();
        ledger
            .acked
            .iter()
            .filter(|a| !ledger.delivered.contains_key(&a.text))
            .map(|a| a.text.clone())
            .collect()
    };
    assert!(missing.is_empty(), "acknowledged but never delivered: {missing:?}");
    drained.expect("everything delivered in time").into_iter().for_each(|r| r.expect("task did not panic"));

    // No Nats-Msg-Id twice in either stream, and every acknowledged native key stored once.
    let mut stored_ids = BTreeMap::<String, usize>::new();
    for (stream, subject) in
        [("GM_TO_HOST", format!("gm.to.host.{LEGACY_HOST}")), ("GS_TO_GM", format!("gs.to.gm.{GM}"))]
    {
        for e in stored_events(&js, stream, &subject).await {
            *stored_ids.entry(e.msg_id.expect("every message has a Nats-Msg-Id")).or_default() += 1;
        }
    }
    let twice: Vec<_> = stored_ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");

    let a_retries = metric_sum(&clients[0], "gm_relay_publish_retries_total").await;
    let a_duplicates = metric_sum(&clients[0], "gm_relay_publish_duplicates_total").await;
    let ledger = traffic.ledger.lock().unwrap();
    let count = |kind: Kind, f: &dyn Fn(&Acked) -> bool| {
        ledger.acked.iter().filter(|a| a.kind == kind && f(a)).count()
    };
    for a in ledger.acked.iter().filter(|a| a.kind == Kind::Native) {
        let (uid, k) = a.text.split_once('#').unwrap();
        let id = format!("h{NATIVE_HOST}-failover-{uid}-{k}");
        assert_eq!(stored_ids.get(&id), Some(&1), "native send {} stored exactly once", a.text);
    }
    // Repeats: legacy texts whose first attempt was uncertain may be stored twice; any text
    // may be delivered again when a poll's acks died with the node.
    let repeated: Vec<(&String, &usize)> = ledger.delivered.iter().filter(|(_, n)| **n > 1).collect();

    let mut report = Vec::new();
    for (what, kill) in [("stream leader node killed", node_killed), ("relay B killed", relay_killed)] {
        for kind in [Kind::Legacy, Kind::Native] {
            let (overall, worst) = pauses(&ledger.acked, kind, kill);
            report.push(format!(
                "{what}: {kind:?} sends — no acknowledgement for {overall:?}, worst conversation waited {worst:?}"
            ));
            assert!(worst < MAX_PAUSE, "{what}: {kind:?} sends paused {worst:?}");
        }
    }
    let deliveries = &ledger.deliveries_at;
    let delivery_gap = deliveries.windows(2).map(|w| w[1].duration_since(w[0])).max().unwrap_or_default();
    for kind in [Kind::Legacy, Kind::Native] {
        report.push(format!(
            "{kind:?}: {} sends acknowledged, {} needed a retry ({} failed attempts; {} uncertain)",
            count(kind, &|_| true),
            count(kind, &|a| a.failed_attempts > 0),
            ledger.acked.iter().filter(|a| a.kind == kind).map(|a| a.failed_attempts).sum::<usize>(),
            count(kind, &|a| a.uncertain),
        ));
    }
    report.push(format!(
        "relay publish retries with the same Nats-Msg-Id: A {a_retries}, B {b_retries}; \
         acknowledged as duplicates (dropped by the stream): A {a_duplicates}, B {b_duplicates}, \
         for {} native requests repeated with their key",
        ledger.resent
    ));
    assert!(ledger.resent > 0 && a_duplicates + b_duplicates > 0, "repeated requests were de-duplicated");
    report.push(format!(
        "delivered {} distinct texts, {} delivered more than once; longest gap between deliveries {delivery_gap:?}; \
         {} messages stored, none twice; whole test {:?}",
        ledger.delivered.len(),
        repeated.len(),
        stored_ids.len(),
        started.elapsed()
    ));
    println!("failover report:\n  {}", report.join("\n  "));
    cluster.assert_no_crash();
}
