//! `gm-relay-bench soak`: mixed traffic at a fixed total rate for a long time, optionally
//! with `kill -9` of the relay or of nats-server at a period, and an account of every
//! message by its id (README, "Performance": soak).
//!
//! ```text
//! gm-relay-bench soak [--duration 10m] [--rate 200] [--fault relay-kill|nats-kill|none]
//!                     [--fault-every 60s] [--out var/bench/soak.json]
//! ```
//! Traffic, round robin over the message ids: GM HTTP send to a legacy-host player, GM HTTP
//! send to a native-host player, legacy GS HTTP send (player → GM), native NATS send
//! (`gm.relay.gs.<host>.send` with `Nats-Msg-Id`). Consumers: GS `receive` polls of the
//! legacy host, GM `receive` polls, and a native game server bound to `host_<n>`.
//!
//! Kills land only between legacy polls: the pollers pause around a kill (the fault waits
//! for the poll in flight to finish and its acks to settle). A relay killed mid-poll would
//! hold that feed for its 15 s poll lease (its messages come again after the 10 s ack
//! wait, first); pausing keeps the drain at the end short. Senders and the native consumer
//! keep running through a kill.
//!
//! Exit code 1 when an acknowledged message (`res: 1` / `ok: true`) was never delivered
//! within the drain bound.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::consumer::PullConsumer;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::http::{enc, res_ok, HttpConn};
use crate::procs::SyncMode;
use crate::report::{f, Table};
use crate::stack::Stack;

pub const USAGE: &str =
    "usage: gm-relay-bench soak [--duration 10m] [--rate 200] [--fault relay-kill|nats-kill|none]
                            [--fault-every 60s] [--out var/bench/soak.json]";

const LEGACY_HOST: i64 = 1;
const NATIVE_HOST: i64 = 2;
const GMS: i64 = 3;
const PLAYERS_PER_HOST: i64 = 6;
const LEGACY_UID_BASE: i64 = 1001;
const NATIVE_UID_BASE: i64 = 2001;

/// Upper bound on the wait for acknowledged messages after the traffic stops (a feed whose
/// poll died with the relay waits out its 15 s lease; legacy consumers redeliver after
/// their 10 s ack wait).
const DRAIN_BOUND: Duration = Duration::from_secs(45);
/// Listening on after the last acknowledged message arrived, to catch late repeats.
const DRAIN_TAIL: Duration = Duration::from_secs(2);
/// Sends in flight at once.
const MAX_IN_FLIGHT: usize = 64;
/// Bound on one native request.
const NATIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between legacy polls of one feed when the last reply was empty.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Bound on the wait for a poll in flight before a kill.
const PAUSE_BOUND: Duration = Duration::from_secs(15);
/// After the last poll answered, before the kill: the relay applies its acks.
const SETTLE: Duration = Duration::from_millis(300);
/// Most messages one run may send.
const MAX_MESSAGES: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    RelayKill,
    NatsKill,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::RelayKill => "relay-kill",
            Fault::NatsKill => "nats-kill",
        }
    }
}

pub struct SoakArgs {
    pub duration: Duration,
    pub rate: f64,
    pub fault: Fault,
    pub fault_every: Duration,
    pub out: PathBuf,
}

/// `30s`, `10m`, `1h`, `500ms` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let x: f64 = num.parse().with_context(|| format!("bad duration {text:?} (like 30s, 10m)"))?;
    let secs = match unit {
        "ms" => x / 1000.0,
        "s" => x,
        "m" => x * 60.0,
        "h" => x * 3600.0,
        _ => bail!("bad duration unit in {text:?} (ms, s, m, h)"),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 7.0 * 86_400.0 {
        bail!("duration {text:?} out of range");
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_args(args: impl Iterator<Item = String>) -> Result<SoakArgs> {
    let mut a = SoakArgs {
        duration: Duration::from_secs(600),
        rate: 200.0,
        fault: Fault::None,
        fault_every: Duration::from_secs(60),
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("var/bench/soak.json"),
    };
    let mut it = args;
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--duration" => a.duration = parse_duration(&value()?)?,
            "--fault-every" => a.fault_every = parse_duration(&value()?)?,
            "--rate" => {
                a.rate = value()?.parse().context("--rate: messages per second")?;
                if !(a.rate > 0.0 && a.rate <= 100_000.0) {
                    bail!("--rate must be in (0, 100000]");
                }
            }
            "--fault" => {
                a.fault = match value()?.as_str() {
                    "none" => Fault::None,
                    "relay-kill" => Fault::RelayKill,
                    "nats-kill" => Fault::NatsKill,
                    other => bail!("unknown fault {other}; known: relay-kill, nats-kill, none"),
                }
            }
            "--out" => a.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// The four traffic paths, by message id modulo 4.
const PATHS: [(&str, &str); 4] = [
    ("gm_http→legacy", "gs_receive"),
    ("gm_http→native", "native"),
    ("gs_http→gm", "gm_receive"),
    ("native→gm", "gm_receive"),
];

#[derive(Default, Clone, Copy)]
struct Entry {
    sent: bool,
    acked: bool,
    delivered: u32,
    wrong_feed: u32,
}

struct Ledger {
    entries: Mutex<Vec<Entry>>,
    /// Delivered texts that are not of this run.
    strays: AtomicUsize,
}

impl Ledger {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<Entry>) -> R) -> R {
        f(&mut self.entries.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn delivered(&self, feed: &str, text: &str) {
        let id = text.strip_prefix("soak-").and_then(|s| s.parse::<usize>().ok());
        let ok = self.with(|e| match id.and_then(|i| e.get_mut(i).map(|x| (i, x))) {
            Some((i, x)) => {
                x.delivered += 1;
                if PATHS[i % 4].1 != feed {
                    x.wrong_feed += 1;
                }
                true
            }
            None => false,
        });
        if !ok {
            self.strays.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Who the player of message `i` is: (gm, host, uid).
fn player(i: u64, native: bool) -> (i64, i64, i64) {
    let k = ((i / 4) as i64) % PLAYERS_PER_HOST;
    let (host, base) = if native { (NATIVE_HOST, NATIVE_UID_BASE) } else { (LEGACY_HOST, LEGACY_UID_BASE) };
    (k % GMS + 1, host, base + k)
}

/// Keep-alive connections shared by the send tasks.
struct Pool {
    addr: std::net::SocketAddr,
    idle: Mutex<Vec<HttpConn>>,
}

impl Pool {
    async fn get_ok(&self, path: &str) -> bool {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match idle {
            Some(c) => c,
            None => match HttpConn::connect(self.addr).await {
                Ok(c) => c,
                Err(_) => return false,
            },
        };
        match conn.get(path).await {
            Ok((200, body)) => {
                self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
                res_ok(&body)
            }
            Ok(_) => {
                self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
                false
            }
            Err(_) => false,
        }
    }
}

async fn send_one(i: u64, pool: &Pool, nats: &async_nats::Client) -> bool {
    let text = format!("soak-{i}");
    let b64 = || enc(&STANDARD.encode(&text));
    match i % 4 {
        0 | 1 => {
            let (gm, _, uid) = player(i, i % 4 == 1);
            pool.get_ok(&format!("/gm?action=send&gm_account={gm}&uid={uid}&msg={}", b64())).await
        }
        2 => {
            let (_, _, uid) = player(i, false);
            pool.get_ok(&format!("/gs?action=send&uid={uid}&msg={}", b64())).await
        }
        _ => {
            let (_, host, uid) = player(i, true);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, text.as_str());
            let body = json!({"uid": uid.to_string(), "text": text});
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(serde_json::to_vec(&body).unwrap_or_default().into())
                .timeout(Some(NATIVE_TIMEOUT));
            match nats.send_request(format!("gm.relay.gs.{host}.send"), request).await {
                Ok(reply) => serde_json::from_slice::<Value>(&reply.payload).is_ok_and(|v| v["ok"] == true),
                Err(_) => false,
            }
        }
    }
}

/// Texts of a legacy `receive` reply: `data` is base64 JSON, entries' `msg` is base64
/// texts joined by `,`. `None` when the poll failed.
fn poll_texts(body: &[u8], gm_side: bool) -> Option<Vec<String>> {
    let reply: Value = serde_json::from_slice(body).ok()?;
    if reply["res"] != 1 {
        return None;
    }
    let raw = STANDARD.decode(reply["data"].as_str()?).ok()?;
    let data: Value = serde_json::from_slice(&raw).ok()?;
    let entries: Vec<Value> = if gm_side {
        data.as_object()?.values().flat_map(|v| v.as_array().cloned().unwrap_or_default()).collect()
    } else {
        data.as_array()?.clone()
    };
    let mut texts = Vec::new();
    for e in entries {
        for part in e["msg"].as_str().unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
            let bytes = STANDARD.decode(part).unwrap_or_default();
            texts.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    Some(texts)
}

/// Pollers stop polling while a kill is prepared.
#[derive(Default)]
struct Gate {
    stop: AtomicBool,
    paused: AtomicBool,
    in_flight: AtomicUsize,
}

impl Gate {
    /// Pauses the pollers and waits (bounded) for the polls in flight.
    async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let give_up = Instant::now() + PAUSE_BOUND;
        while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(SETTLE).await;
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

fn legacy_poller(
    addr: std::net::SocketAddr,
    feed: &'static str,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
) -> tokio::task::JoinHandle<u64> {
    let (path, gm_side) = match feed {
        "gs_receive" => (format!("/gs?action=receive&host={LEGACY_HOST}"), false),
        _ => ("/gm?action=receive".to_owned(), true),
    };
    tokio::spawn(async move {
        let mut conn: Option<HttpConn> = None;
        let mut polls = 0u64;
        // Bounded by the stop flag, set after the drain (itself bounded).
        while !gate.stop.load(Ordering::SeqCst) {
            if gate.paused.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            gate.in_flight.fetch_add(1, Ordering::SeqCst);
            if gate.paused.load(Ordering::SeqCst) {
                gate.in_flight.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            if conn.is_none() {
                conn = HttpConn::connect(addr).await.ok();
            }
            let mut got = 0;
            if let Some(c) = conn.as_mut() {
                polls += 1;
                match c.get(&path).await {
                    Ok((200, body)) => {
                        for t in poll_texts(&body, gm_side).unwrap_or_default() {
                            got += 1;
                            ledger.delivered(feed, &t);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => conn = None,
                }
            }
            gate.in_flight.fetch_sub(1, Ordering::SeqCst);
            if got == 0 {
                tokio::time::sleep(POLL_EVERY).await;
            }
        }
        polls
    })
}

fn native_consumer(
    consumer: PullConsumer,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut fetches = 0u64;
        while !gate.stop.load(Ordering::SeqCst) {
            fetches += 1;
            let batch =
                consumer.fetch().max_messages(200).expires(Duration::from_millis(500)).messages().await;
            let Ok(mut batch) = batch else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            // A fetch ends at its expiry; the timeout only guards against a hung stream.
            while let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(5), batch.next()).await {
                let Ok(message) = next else { break };
                if let Ok(v) = serde_json::from_slice::<Value>(&message.payload) {
                    if let Some(text) = v["text"].as_str() {
                        ledger.delivered("native", text);
                    }
                }
                let _ = message.double_ack().await;
            }
        }
        fetches
    })
}

async fn call(conn: &mut HttpConn, path: &str) -> Result<()> {
    let (status, body) = conn.get(path).await?;
    if status != 200 || !res_ok(&body) {
        bail!("{path}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// GMs 1..=3 and six players on each host, added over legacy HTTP (which also creates the
/// hosts' consumers).
async fn setup(stack: &Stack) -> Result<()> {
    let mut conn = HttpConn::connect(stack.relay_addr).await?;
    for gm in 1..=GMS {
        call(&mut conn, &format!("/gm?action=create&gm_account={gm}&gm_name=soak{gm}")).await?;
    }
    for (host, base) in [(LEGACY_HOST, LEGACY_UID_BASE), (NATIVE_HOST, NATIVE_UID_BASE)] {
        for k in 0..PLAYERS_PER_HOST {
            let gm = k % GMS + 1;
            call(&mut conn, &format!("/gm?action=add&gm_account={gm}&host={host}&uid={}", base + k)).await?;
        }
    }
    Ok(())
}

/// Runs the soak; `Ok(true)` when no acknowledged message was lost.
pub async fn run(args: &SoakArgs) -> Result<bool> {
    let started = Instant::now();
    eprintln!("soak: starting nats-server, redis-server and gm-relay ...");
    let mut stack = Stack::start(SyncMode::Default, None).await?;
    setup(&stack).await?;
    let consumer: PullConsumer = stack
        .js
        .get_consumer_from_stream(format!("host_{NATIVE_HOST}"), "GM_TO_HOST")
        .await
        .with_context(|| format!("bind host_{NATIVE_HOST}"))?;

    let total = ((args.rate * args.duration.as_secs_f64()).ceil() as u64).min(MAX_MESSAGES);
    let ledger = Arc::new(Ledger {
        entries: Mutex::new(vec![Entry::default(); total as usize]),
        strays: AtomicUsize::new(0),
    });
    let gate = Arc::new(Gate::default());
    let relay_addr = stack.relay_addr;
    let pollers = vec![
        legacy_poller(relay_addr, "gs_receive", Arc::clone(&ledger), Arc::clone(&gate)),
        legacy_poller(relay_addr, "gm_receive", Arc::clone(&ledger), Arc::clone(&gate)),
        native_consumer(consumer, Arc::clone(&ledger), Arc::clone(&gate)),
    ];

    eprintln!(
        "soak: {total} messages at {}/s for {:?}, fault {} every {:?}",
        args.rate,
        args.duration,
        args.fault.label(),
        args.fault_every
    );
    // Senders: open loop at the fixed rate, at most MAX_IN_FLIGHT at once.
    let pool = Arc::new(Pool { addr: relay_addr, idle: Mutex::new(Vec::new()) });
    let nats = stack.client.clone();
    let sender = {
        let (ledger, rate) = (Arc::clone(&ledger), args.rate);
        tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
            let start = tokio::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..total {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { break };
                let (pool, nats, ledger) = (Arc::clone(&pool), nats.clone(), Arc::clone(&ledger));
                tasks.spawn(async move {
                    ledger.with(|e| e[i as usize].sent = true);
                    let acked = send_one(i, &pool, &nats).await;
                    if acked {
                        ledger.with(|e| e[i as usize].acked = true);
                    }
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            // Every request is bounded (HTTP 10 s + reconnect, NATS 5 s).
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
        })
    };

    // Faults at the period, while the senders run.
    let mut faults = Vec::new();
    let traffic_end = Instant::now() + args.duration;
    if args.fault != Fault::None {
        let mut next = Instant::now() + args.fault_every;
        while next < traffic_end {
            tokio::time::sleep_until(next.into()).await;
            gate.pause().await;
            let t = Instant::now();
            let r = match args.fault {
                Fault::RelayKill => match stack.relay.as_mut() {
                    Some(relay) => relay.kill_and_restart().await,
                    None => Ok(()),
                },
                Fault::NatsKill => match stack.nats.as_mut() {
                    Some(nats) => nats.kill_and_restart().await,
                    None => Ok(()),
                },
                Fault::None => Ok(()),
            };
            gate.resume();
            let down = t.elapsed().as_secs_f64();
            r.with_context(|| format!("restart after {}", args.fault.label()))?;
            eprintln!(
                "soak: {} at {:.1} s, back after {:.2} s",
                args.fault.label(),
                started.elapsed().as_secs_f64(),
                down
            );
            faults.push(json!({"at_s": started.elapsed().as_secs_f64(), "down_s": down}));
            next += args.fault_every;
        }
    }
    sender.await.context("sender task")?;
    stack.check_alive()?;

    // Drain: until every acknowledged message arrived (then a short tail), bounded.
    eprintln!("soak: traffic done; draining (up to {DRAIN_BOUND:?}) ...");
    let drain_start = Instant::now();
    let mut all_in_at = None;
    while drain_start.elapsed() < DRAIN_BOUND {
        let missing = ledger.with(|e| e.iter().filter(|x| x.acked && x.delivered == 0).count());
        match (missing, all_in_at) {
            (0, None) => all_in_at = Some(Instant::now()),
            (0, Some(at)) if at.elapsed() >= DRAIN_TAIL => break,
            (m, _) if m > 0 => all_in_at = None,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    gate.stop.store(true, Ordering::SeqCst);
    let mut counts = Vec::new();
    for p in pollers {
        counts.push(
            tokio::time::timeout(Duration::from_secs(15), p).await.ok().and_then(|r| r.ok()).unwrap_or(0),
        );
    }

    // The account.
    let entries = ledger.with(|e| e.clone());
    let mut t = Table::new(
        format!(
            "Soak: {} msg/s for {:.0} s, fault {} every {:.0} s ({} faults), drain {:.1} s",
            f(args.rate),
            args.duration.as_secs_f64(),
            args.fault.label(),
            args.fault_every.as_secs_f64(),
            faults.len(),
            drain_s
        ),
        &[
            "path",
            "sent",
            "acknowledged",
            "delivered",
            "lost",
            "duplicated",
            "delivered, not acknowledged",
            "wrong feed",
        ],
    );
    let mut rows = serde_json::Map::new();
    let mut sums = [0u64; 7];
    let mut lost_ids = Vec::new();
    for (p, (name, feed)) in PATHS.iter().enumerate() {
        let mut c = [0u64; 7];
        for (i, e) in entries.iter().enumerate().filter(|(i, _)| i % 4 == p) {
            c[0] += e.sent as u64;
            c[1] += e.acked as u64;
            c[2] += (e.delivered > 0) as u64;
            if e.acked && e.delivered == 0 {
                c[3] += 1;
                if lost_ids.len() < 20 {
                    lost_ids.push(i);
                }
            }
            c[4] += (e.delivered > 1) as u64;
            c[5] += (!e.acked && e.delivered > 0) as u64;
            c[6] += (e.wrong_feed > 0) as u64;
        }
        for (s, x) in sums.iter_mut().zip(c) {
            *s += x;
        }
        t.row(std::iter::once(format!("{name} ({feed})")).chain(c.iter().map(|x| x.to_string())).collect());
        rows.insert((*name).into(), counts_json(&c));
    }
    t.row(std::iter::once("**all**".to_owned()).chain(sums.iter().map(|x| format!("**{x}**"))).collect());
    let text = t.markdown();
    println!("{text}");
    let strays = ledger.strays.load(Ordering::Relaxed);
    let note = format!(
        "polls: gs_receive {}, gm_receive {}, native fetches {}; stray texts {strays}; run took {:.0} s\n",
        counts.first().unwrap_or(&0),
        counts.get(1).unwrap_or(&0),
        counts.get(2).unwrap_or(&0),
        started.elapsed().as_secs_f64()
    );
    println!("{note}");
    if !lost_ids.is_empty() {
        println!("lost (first ids): {lost_ids:?}\n");
    }
    let result = json!({
        "version": 1,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "duration_s": args.duration.as_secs_f64(),
        "rate_per_s": args.rate,
        "fault": args.fault.label(),
        "fault_every_s": args.fault_every.as_secs_f64(),
        "faults": faults,
        "drain_s": drain_s,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "paths": Value::Object(rows),
        "total": counts_json(&sums),
        "stray_texts": strays,
        "lost_ids_first": lost_ids,
    });
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let md_path = args.out.with_extension("md");
    std::fs::write(&md_path, format!("{text}\n{note}"))
        .with_context(|| format!("write {}", md_path.display()))?;
    eprintln!("wrote {} and {}", args.out.display(), md_path.display());
    Ok(sums[3] == 0)
}

fn counts_json(c: &[u64; 7]) -> Value {
    let keys = [
        "sent",
        "acknowledged",
        "delivered",
        "lost",
        "duplicated",
        "delivered_not_acknowledged",
        "wrong_feed",
    ];
    Value::Object(
        keys.iter()
            .zip(c)
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
    )
}
