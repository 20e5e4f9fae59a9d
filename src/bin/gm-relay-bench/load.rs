//! Load generation: open loop (requests due at a fixed rate, latency measured from the due
//! time, so a stalled server is not hidden by the client waiting — no coordinated
//! omission) and closed loop (N requests in flight, as fast as answered). Every stream is
//! bounded in count and in time. Latencies go into HDR histograms, one per request kind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Mutex;

use crate::http::{enc, errno, res_ok, HttpConn};

/// How long in-flight requests may take to finish once a stream stops dispatching.
const DRAIN: Duration = Duration::from_secs(5);

/// Bound on a native request.
const NATIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Tokio's timer wheel ticks in milliseconds and rounds every deadline up to the next
/// tick, so an open-loop request due at a fixed rate leaves up to this late. With a
/// period that is a whole number of milliseconds that lag is the same for every request
/// of a stream (it depends only on when the stream started) and moved a 1 ms p50 by most
/// of a millisecond between otherwise equal runs. It is the generator's, not the relay's:
/// latency counts from the wake-up when it is within this of the due time; any later
/// wake-up still counts from the due time plus this.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Largest latency recorded, microseconds.
const MAX_US: u64 = 60_000_000;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the benchmark started: the clock stamped into message texts.
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).clamp(1, MAX_US));
}

/// What a request does. Chat texts are `<tag> <seq> <ns>`, stamped just before the request
/// leaves, so a receiver can measure send-to-receipt latency by the text alone.
#[derive(Debug, Clone)]
pub enum Req {
    Get(String),
    GmSend { gm: i64, uid: i64, tag: Arc<str> },
    GsSend { uid: i64, tag: Arc<str> },
    NativeSend { host: i64, uid: i64, tag: Arc<str> },
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: usize,
    pub req: Req,
}

pub type Gen = Arc<dyn Fn(u64) -> Op + Send + Sync>;

pub struct Spec {
    pub name: String,
    pub kinds: Vec<&'static str>,
    /// Requests per second; `None`: closed loop with `workers` in flight.
    pub rate: Option<f64>,
    pub workers: usize,
    pub duration: Duration,
    pub max_ops: u64,
    pub gen: Gen,
}

#[derive(Clone)]
pub struct Target {
    pub http: SocketAddr,
    pub nats: Option<async_nats::Client>,
}

pub struct KindResult {
    pub kind: &'static str,
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub err: u64,
    pub errors: BTreeMap<String, u64>,
}

impl KindResult {
    fn new(kind: &'static str) -> Self {
        Self { kind, hist: new_hist(), ok: 0, err: 0, errors: BTreeMap::new() }
    }

    fn merge(&mut self, o: &KindResult) {
        let _ = self.hist.add(&o.hist);
        self.ok += o.ok;
        self.err += o.err;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.ok + self.err
    }
}

pub struct StreamResult {
    pub name: String,
    pub kinds: Vec<KindResult>,
    /// From the first due time to the last completion.
    pub elapsed: Duration,
    pub dispatched: u64,
    /// Dispatched but not answered within the drain bound.
    pub unfinished: u64,
}

impl StreamResult {
    pub fn ok(&self) -> u64 {
        self.kinds.iter().map(|k| k.ok).sum()
    }

    pub fn rate(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }

    /// All kinds in one histogram.
    pub fn merged(&self) -> KindResult {
        let mut all = KindResult::new("all");
        for k in &self.kinds {
            all.merge(k);
        }
        all
    }
}

pub fn progress(len: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(msg.to_owned());
    bar
}

struct Worker {
    target: Target,
    conn: Option<HttpConn>,
    results: Vec<KindResult>,
}

impl Worker {
    async fn exec(&mut self, op: Op, seq: u64, started: Instant) {
        let outcome = self.request(&op.req, seq).await;
        let r = &mut self.results[op.kind];
        match outcome {
            Ok(()) => {
                r.ok += 1;
                record(&mut r.hist, started.elapsed());
            }
            Err(e) => {
                r.err += 1;
                *r.errors.entry(e).or_default() += 1;
            }
        }
    }

    async fn request(&mut self, req: &Req, seq: u64) -> Result<(), String> {
        let text = |tag: &str| format!("{tag} {seq} {}", now_ns());
        let b64 = |t: &str| enc(&base64::engine::general_purpose::STANDARD.encode(t));
        let path = match req {
            Req::Get(path) => path.clone(),
            Req::GmSend { gm, uid, tag } => {
                format!("/gm?action=send&gm_account={gm}&uid={uid}&msg={}", b64(&text(tag)))
            }
            Req::GsSend { uid, tag } => format!("/gs?action=send&uid={uid}&msg={}", b64(&text(tag))),
            Req::NativeSend { host, uid, tag } => return self.native(*host, *uid, &text(tag), seq).await,
        };
        if self.conn.is_none() {
            self.conn = Some(HttpConn::connect(self.target.http).await.map_err(|e| format!("connect: {e}"))?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        match conn.get(&path).await {
            Ok((200, body)) if res_ok(&body) => Ok(()),
            Ok((200, body)) => Err(match errno(&body) {
                Some(n) => format!("errno {n}"),
                None => format!("reply {}", String::from_utf8_lossy(&body[..body.len().min(60)])),
            }),
            Ok((status, _)) => Err(format!("status {status}")),
            Err(e) => {
                self.conn = None;
                Err(format!("http: {e}"))
            }
        }
    }

    async fn native(&mut self, host: i64, uid: i64, text: &str, seq: u64) -> Result<(), String> {
        let client = self.target.nats.as_ref().ok_or("no NATS client")?;
        #[derive(serde::Serialize)]
        struct Body<'a> {
            uid: &'a str,
            text: &'a str,
        }
        #[derive(serde::Deserialize)]
        struct Reply {
            ok: bool,
            errno: Option<i64>,
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("b{}-{seq}", now_ns()).as_str());
        let body = Body { uid: &uid.to_string(), text };
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(serde_json::to_vec(&body).unwrap_or_default().into())
            .timeout(Some(NATIVE_TIMEOUT));
        let reply = client
            .send_request(format!("gm.relay.gs.{host}.send"), request)
            .await
            .map_err(|e| format!("request: {}", e.kind()))?;
        match serde_json::from_slice::<Reply>(&reply.payload) {
            Ok(Reply { ok: true, .. }) => Ok(()),
            Ok(Reply { errno: Some(n), .. }) => Err(format!("errno {n}")),
            _ => Err("bad reply".to_owned()),
        }
    }
}

/// Runs one stream to its count or time bound and returns its figures.
pub async fn run(spec: Spec, target: Target, bar: Option<ProgressBar>) -> StreamResult {
    let done = Arc::new(AtomicU64::new(0));
    let expected = match spec.rate {
        Some(rate) => spec.max_ops.min((rate * spec.duration.as_secs_f64()).ceil() as u64),
        None => spec.max_ops,
    };
    if let Some(bar) = &bar {
        bar.set_length(expected);
    }
    let ticker = bar.clone().map(|bar| {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let start = Instant::now();
    let end = start + spec.duration;
    let last_done = Arc::new(AtomicU64::new(0));
    let dispatched = Arc::new(AtomicU64::new(0));
    let kinds = spec.kinds.clone();
    let new_worker = |target: &Target| Worker {
        target: target.clone(),
        conn: None,
        results: kinds.iter().map(|k| KindResult::new(k)).collect(),
    };
    let mut handles = Vec::new();
    let mut dispatcher = None;
    match spec.rate {
        Some(rate) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
            let rx = Arc::new(Mutex::new(rx));
            let (max, dispatched) = (spec.max_ops, Arc::clone(&dispatched));
            dispatcher = Some(tokio::spawn(async move {
                for i in 0..max {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if due >= end {
                        break;
                    }
                    let stamp = if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                        Instant::now().min(due + TIMER_TICK)
                    } else {
                        due
                    };
                    if tx.send((i, stamp)).is_err() {
                        break;
                    }
                    dispatched.fetch_add(1, Ordering::Relaxed);
                }
            }));
            for _ in 0..spec.workers {
                let (rx, gen, done, last_done) =
                    (Arc::clone(&rx), Arc::clone(&spec.gen), Arc::clone(&done), Arc::clone(&last_done));
                let mut worker = new_worker(&target);
                handles.push(tokio::spawn(async move {
                    loop {
                        let next = rx.lock().await.recv().await;
                        let Some((i, due)) = next else { break };
                        worker.exec(gen(i), i, due).await;
                        done.fetch_add(1, Ordering::Relaxed);
                        last_done.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    worker.results
                }));
            }
        }
        None => {
            let next = Arc::new(AtomicU64::new(0));
            for _ in 0..spec.workers {
                let (next, gen, done, last_done, dispatched) = (
                    Arc::clone(&next),
                    Arc::clone(&spec.gen),
                    Arc::clone(&done),
                    Arc::clone(&last_done),
                    Arc::clone(&dispatched),
                );
                let max = spec.max_ops;
                let mut worker = new_worker(&target);
                handles.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= max || Instant::now() >= end {
                            break;
                        }
                        dispatched.fetch_add(1, Ordering::Relaxed);
                        worker.exec(gen(i), i, Instant::now()).await;
                        done.fetch_add(1, Ordering::Relaxed);
                        last_done.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    worker.results
                }));
            }
        }
    }
    if let Some(d) = dispatcher {
        let _ = d.await;
    }
    let give_up = tokio::time::Instant::from_std(end.max(Instant::now()) + DRAIN);
    let mut kinds: Vec<KindResult> = spec.kinds.iter().map(|k| KindResult::new(k)).collect();
    for h in handles {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(give_up, h).await {
            Ok(Ok(results)) => {
                for (k, r) in kinds.iter_mut().zip(&results) {
                    k.merge(r);
                }
            }
            _ => abort.abort(),
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let dispatched = dispatched.load(Ordering::Relaxed);
    let completed: u64 = kinds.iter().map(KindResult::total).sum();
    StreamResult {
        name: spec.name,
        kinds,
        elapsed: Duration::from_micros(last_done.load(Ordering::Relaxed)).max(Duration::from_millis(1)),
        dispatched,
        unfinished: dispatched.saturating_sub(completed),
    }
}

/// Runs several streams at once.
pub async fn run_all(specs: Vec<Spec>, target: &Target, show: bool) -> Vec<StreamResult> {
    let multi = indicatif::MultiProgress::new();
    let futures = specs.into_iter().map(|spec| {
        let bar = show.then(|| multi.add(progress(spec.max_ops, &spec.name)));
        run(spec, target.clone(), bar)
    });
    futures::future::join_all(futures).await
}
