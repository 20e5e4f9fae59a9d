//! The ops dashboard's figures, kept by one task per relay whatever the number of open
//! pages: every host's consumers (lag, last delivery and ack, legacy or native), the
//! streams' message rates, online GMs, NATS and Redis status and recent errors.
//!
//! Cost is bounded twice: the figures are refreshed at most once per [`REFRESH_PERIOD`]
//! with at most [`MAX_API_CALLS_PER_REFRESH`] JetStream API calls (stream infos and
//! consumer list pages of 256 consumers each; with more hosts than that covers, a pass
//! over all consumers spans several refreshes), and nothing is refreshed while nobody has
//! looked for [`IDLE_AFTER`]. Pages read the shared snapshot and never call JetStream.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::adapters::http::AppRelay;
use crate::adapters::nats::names;
use crate::domain::event::now_ms;
use crate::domain::{GmId, HostId};
use crate::telemetry::LogLine;

/// Figures are at most this old while someone watches, and never refreshed more often.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// JetStream API calls per refresh, so per second: 2 stream infos plus up to 6 consumer
/// pages (1,536 consumers, i.e. 512 legacy hosts or 1,536 native ones per second). A
/// cluster's meta leader answers these; this keeps the dashboard a rounding error there.
pub const MAX_API_CALLS_PER_REFRESH: usize = 8;

/// Nobody looked at the figures for this long: stop refreshing until somebody does.
pub const IDLE_AFTER: Duration = Duration::from_secs(15);

/// Hosts listed, those with the most lag first: a page stays small with thousands of hosts.
pub const MAX_HOSTS_SHOWN: usize = 500;

/// Online GMs listed by name; the total is always shown.
pub const MAX_ONLINE_GMS_SHOWN: usize = 200;

/// Consumers remembered between passes; past it a pass starts over (10,000 hosts × 3).
const MAX_CONSUMERS_TRACKED: usize = 30_000;

/// Bound on each NATS or Redis status check.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// A backing service as the dashboard shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BackendStatus {
    pub ok: bool,
    pub detail: String,
    pub latency_ms: Option<f64>,
}

/// One consumer of a host.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConsumerRow {
    pub name: String,
    /// Not yet delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Every message up to this stream sequence is acknowledged.
    pub acked_through: u64,
    pub last_delivery_ms: Option<i64>,
    pub last_ack_ms: Option<i64>,
}

/// How a host reads its events.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// Polls `GET /gs` (consumers `legacy_chat_<n>` and `legacy_rel_<n>`).
    Legacy,
    /// Pulls `host_<n>` over NATS.
    Native,
    /// Has players but has not read anything yet.
    Waiting,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostRow {
    pub host: HostId,
    pub kind: HostKind,
    /// Events not yet taken by the host's active reader (pending plus unacknowledged).
    pub lag: u64,
    /// The host has taken every chat message up to this `GM_TO_HOST` sequence.
    pub acked_through: u64,
    pub last_delivery_ms: Option<i64>,
    pub last_ack_ms: Option<i64>,
    pub consumers: Vec<ConsumerRow>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OnlineGm {
    pub gm: GmId,
    pub name: String,
}

/// Everything the dashboard shows.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Snapshot {
    /// When the figures were taken, ms since the epoch; 0 before the first refresh.
    pub at_ms: i64,
    pub nats: BackendStatus,
    pub redis: BackendStatus,
    /// Messages per second into `GM_TO_HOST` (chat to players and friend events).
    pub to_hosts_per_s: f64,
    /// Messages per second into `GS_TO_GM` (players' chat).
    pub to_gms_per_s: f64,
    /// The [`MAX_HOSTS_SHOWN`] hosts with the most lag.
    pub hosts: Vec<HostRow>,
    pub hosts_total: usize,
    /// Every host, for lookups (a GM's message status); not sent to pages.
    #[serde(skip)]
    pub all_hosts: HashMap<HostId, HostRow>,
    /// False while a pass over all consumers is still under way (many hosts).
    pub hosts_complete: bool,
    pub online_gms: Vec<OnlineGm>,
    pub online_gms_total: u64,
    pub recent_errors: Vec<LogLine>,
    /// JetStream API calls the last refresh made.
    pub api_calls: usize,
}

/// The shared figures and the task that keeps them.
pub struct Monitor {
    snapshot: watch::Sender<Arc<Snapshot>>,
    last_watched_ms: AtomicI64,
    wake: Notify,
}

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl Monitor {
    pub fn new() -> Self {
        Self {
            snapshot: watch::channel(Arc::new(Snapshot::default())).0,
            last_watched_ms: AtomicI64::new(0),
            wake: Notify::new(),
        }
    }

    /// Somebody looks at the figures: keep (or start) refreshing them.
    pub fn watch(&self) {
        let before = self.last_watched_ms.swap(now_ms(), Ordering::Relaxed);
        if now_ms() - before > IDLE_AFTER.as_millis() as i64 {
            self.wake.notify_one();
        }
    }

    /// The latest figures.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Changes of the figures, for a live page.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// The host's row in the latest figures.
    pub fn host(&self, host: HostId) -> Option<HostRow> {
        self.snapshot.borrow().all_hosts.get(&host).cloned()
    }

    fn idle(&self) -> bool {
        now_ms() - self.last_watched_ms.load(Ordering::Relaxed) > IDLE_AFTER.as_millis() as i64
    }

    /// Refreshes while watched, until `stop` flips.
    pub async fn run(self: Arc<Self>, relay: Arc<AppRelay>, mut stop: watch::Receiver<bool>) {
        let mut state = RefreshState::default();
        loop {
            if *stop.borrow() {
                return;
            }
            if self.idle() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            let started = tokio::time::Instant::now();
            let snapshot = state.refresh(&relay).await;
            self.snapshot.send_replace(Arc::new(snapshot));
            tokio::select! {
                _ = tokio::time::sleep_until(started + REFRESH_PERIOD) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// What a refresh carries over to the next: consumers seen so far in the current pass,
/// where the pass stands, and the stream positions the rates are computed from.
#[derive(Default)]
struct RefreshState {
    consumers: HashMap<String, ConsumerRow>,
    /// Consumers seen by the pass under way; replaces `consumers` when the pass ends.
    pass: HashMap<String, ConsumerRow>,
    next_offset: usize,
    complete: bool,
    last_seqs: Option<(Instant, u64, u64)>,
    rates: (f64, f64),
}

fn ms(t: consumer::SequenceInfo) -> Option<i64> {
    t.last_active.map(|d| (d.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn row(info: consumer::Info) -> ConsumerRow {
    ConsumerRow {
        pending: info.num_pending,
        ack_pending: info.num_ack_pending as u64,
        acked_through: info.ack_floor.stream_sequence,
        last_delivery_ms: ms(info.delivered),
        last_ack_ms: ms(info.ack_floor),
        name: info.name,
    }
}

/// Groups consumers by host and decides each host's kind, lag and ack floor.
pub fn hosts_from(consumers: &HashMap<String, ConsumerRow>) -> Vec<HostRow> {
    #[derive(Default)]
    struct Of {
        native: Option<ConsumerRow>,
        chat: Option<ConsumerRow>,
        rel: Option<ConsumerRow>,
    }
    let mut by_host: BTreeMap<HostId, Of> = BTreeMap::new();
    for (name, c) in consumers {
        let (slot, host): (fn(&mut Of) -> &mut Option<ConsumerRow>, &str) =
            if let Some(h) = name.strip_prefix("legacy_chat_") {
                (|o| &mut o.chat, h)
            } else if let Some(h) = name.strip_prefix("legacy_rel_") {
                (|o| &mut o.rel, h)
            } else if let Some(h) = name.strip_prefix("host_") {
                (|o| &mut o.native, h)
            } else {
                continue;
            };
        if let Some(host) = HostId::parse(host.as_bytes()) {
            *slot(by_host.entry(host).or_default()) = Some(c.clone());
        }
    }
    let latest = |c: &ConsumerRow| c.last_delivery_ms.max(c.last_ack_ms);
    by_host
        .into_iter()
        .map(|(host, of)| {
            // A native consumer exists for every host with players (the relay creates it);
            // it is the host's reader only once something pulled from it.
            let native_used = of.native.as_ref().filter(|c| c.last_delivery_ms.is_some());
            let legacy_used = of.chat.as_ref().or(of.rel.as_ref());
            let kind = match (native_used, legacy_used) {
                (Some(n), Some(l)) if latest(n) >= latest(l) => HostKind::Native,
                (_, Some(_)) => HostKind::Legacy,
                (Some(_), None) => HostKind::Native,
                (None, None) => HostKind::Waiting,
            };
            let lag_of = |c: &Option<ConsumerRow>| c.as_ref().map_or(0, |c| c.pending + c.ack_pending);
            // The chat feed is what takes a GM's message (a relation poll skips chat).
            let (lag, reader) = match kind {
                HostKind::Legacy => (lag_of(&of.chat).max(lag_of(&of.rel)), of.chat.as_ref()),
                HostKind::Native | HostKind::Waiting => (lag_of(&of.native), of.native.as_ref()),
            };
            let consumers: Vec<ConsumerRow> =
                [of.chat.clone(), of.rel.clone(), of.native.clone()].into_iter().flatten().collect();
            HostRow {
                host,
                kind,
                lag,
                acked_through: reader.map_or(0, |c| c.acked_through),
                last_delivery_ms: consumers.iter().filter_map(|c| c.last_delivery_ms).max(),
                last_ack_ms: consumers.iter().filter_map(|c| c.last_ack_ms).max(),
                consumers,
            }
        })
        .collect()
}

impl RefreshState {
    async fn refresh(&mut self, relay: &AppRelay) -> Snapshot {
        let bus = relay.bus();
        let store = relay.store();
        let mut calls = 0;

        let nats = match tokio::time::timeout(STATUS_TIMEOUT, async {
            let started = Instant::now();
            bus.ping().await.map(|()| started.elapsed())
        })
        .await
        {
            Ok(Ok(rtt)) => BackendStatus {
                ok: true,
                detail: format!("connected, server {}", bus.client().server_info().version),
                latency_ms: Some(rtt.as_secs_f64() * 1000.0),
            },
            Ok(Err(e)) => BackendStatus { ok: false, detail: e.to_string(), latency_ms: None },
            Err(_) => BackendStatus { ok: false, detail: "no answer within 1 s".into(), latency_ms: None },
        };
        let redis = match tokio::time::timeout(STATUS_TIMEOUT, store.ping_latency()).await {
            Ok(Ok(rtt)) => BackendStatus {
                ok: true,
                detail: "answering".into(),
                latency_ms: Some(rtt.as_secs_f64() * 1000.0),
            },
            Ok(Err(e)) => BackendStatus { ok: false, detail: e.to_string(), latency_ms: None },
            Err(_) => BackendStatus { ok: false, detail: "no answer within 1 s".into(), latency_ms: None },
        };

        if nats.ok {
            let to_host = bus.stream_figures(names::STREAM_TO_HOST).await;
            let to_gm = bus.stream_figures(names::STREAM_TO_GM).await;
            calls += 2;
            if let (Ok(h), Ok(g)) = (to_host, to_gm) {
                let now = Instant::now();
                if let Some((then, h0, g0)) = self.last_seqs {
                    let secs = now.duration_since(then).as_secs_f64().max(0.001);
                    self.rates = (
                        h.last_seq.saturating_sub(h0) as f64 / secs,
                        g.last_seq.saturating_sub(g0) as f64 / secs,
                    );
                }
                self.last_seqs = Some((now, h.last_seq, g.last_seq));
            }
            while calls < MAX_API_CALLS_PER_REFRESH {
                calls += 1;
                match bus.consumer_page(names::STREAM_TO_HOST, self.next_offset).await {
                    Ok(page) => {
                        let got = page.consumers.len();
                        for info in page.consumers {
                            let r = row(info);
                            self.pass.insert(r.name.clone(), r);
                        }
                        self.next_offset = page.offset + got;
                        if got == 0
                            || self.next_offset >= page.total
                            || self.pass.len() >= MAX_CONSUMERS_TRACKED
                        {
                            // The pass is over: what it saw is the truth (deleted consumers drop out).
                            self.consumers = std::mem::take(&mut self.pass);
                            self.next_offset = 0;
                            self.complete = true;
                            break;
                        }
                        self.complete = false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dashboard: listing consumers failed");
                        break;
                    }
                }
            }
        }
        // While a pass is under way, what it saw so far is newer than the last pass.
        let mut merged = self.consumers.clone();
        merged.extend(self.pass.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut hosts = hosts_from(&merged);
        let hosts_total = hosts.len();
        let all_hosts = hosts.iter().map(|h| (h.host, h.clone())).collect();
        hosts.sort_by(|a, b| b.lag.cmp(&a.lag).then(a.host.cmp(&b.host)));
        hosts.truncate(MAX_HOSTS_SHOWN);

        let (online_gms_total, online_gms) = if redis.ok {
            match store.online_gms(MAX_ONLINE_GMS_SHOWN).await {
                Ok((total, gms)) => {
                    (total, gms.into_iter().map(|(gm, name)| OnlineGm { gm, name }).collect())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard: reading online GMs failed");
                    (0, Vec::new())
                }
            }
        } else {
            (0, Vec::new())
        };

        Snapshot {
            at_ms: now_ms(),
            nats,
            redis,
            to_hosts_per_s: self.rates.0,
            to_gms_per_s: self.rates.1,
            hosts,
            hosts_total,
            all_hosts,
            hosts_complete: self.complete,
            online_gms,
            online_gms_total,
            recent_errors: crate::telemetry::recent_errors(),
            api_calls: calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, pending: u64, delivered: Option<i64>, acked_through: u64) -> (String, ConsumerRow) {
        (
            name.to_owned(),
            ConsumerRow {
                name: name.to_owned(),
                pending,
                ack_pending: 0,
                acked_through,
                last_delivery_ms: delivered,
                last_ack_ms: delivered,
            },
        )
    }

    #[test]
    fn kinds_lags_and_floors() {
        let consumers: HashMap<String, ConsumerRow> = [
            // Host 1: legacy; its never-pulled native consumer piles up and is not the lag.
            c("host_1", 40, None, 0),
            c("legacy_chat_1", 2, Some(100), 7),
            c("legacy_rel_1", 5, Some(90), 6),
            // Host 2: native.
            c("host_2", 3, Some(50), 9),
            // Host 3: has players, nobody read yet.
            c("host_3", 1, None, 0),
            c("legacy_gm", 9, Some(1), 1),
        ]
        .into_iter()
        .collect();
        let hosts = hosts_from(&consumers);
        let by = |h: i64| hosts.iter().find(|r| r.host == HostId(h)).unwrap();
        assert_eq!((by(1).kind, by(1).lag, by(1).acked_through), (HostKind::Legacy, 5, 7));
        assert_eq!((by(2).kind, by(2).lag, by(2).acked_through), (HostKind::Native, 3, 9));
        assert_eq!((by(3).kind, by(3).lag), (HostKind::Waiting, 1));
        assert_eq!(hosts.len(), 3, "legacy_gm is not a host");
    }
}
