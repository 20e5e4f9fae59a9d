//! Prometheus metrics of one relay, served at `/metrics`. Each relay instance has its own
//! registry (no globals), so tests can run many relays in one process.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by side (`gm`/`gs` legacy, `native`), action and result (`ok`, `errno_N`,
    /// `refused`, ...).
    pub requests: IntCounterVec,
    /// Time from publish to the broker's acknowledgement, by subject kind.
    pub publish_seconds: HistogramVec,
    /// Events or uids returned per legacy poll, by feed kind.
    pub poll_size: HistogramVec,
    /// Events waiting in the outbox when last looked at.
    pub outbox_depth: IntGauge,
    /// Requests refused with errno 8, by limit: `ip`, `gm` (GM sends), `gs` (player sends).
    pub rate_limited: IntCounterVec,
    /// Publish attempts that got no acknowledgement in time and were sent again with the
    /// same `Nats-Msg-Id` (a stream leader change, a lost packet), by route.
    pub publish_retries: IntCounterVec,
    /// Acknowledgements saying the stream already held that `Nats-Msg-Id` (a retry or an
    /// outbox republish whose first copy was stored), by route: dropped, not stored twice.
    pub publish_duplicates: IntCounterVec,
    /// Publishes that ended without the broker's acknowledgement — refused, timed out or
    /// disconnected — by route (`to_host`, `to_gm`, `outbox`). A chat send answered errno
    /// 10; an outbox event stays in the outbox and is published again by the next drain.
    pub publish_failures: IntCounterVec,
    /// History copies of delivered chat messages that could not be written (the console's
    /// history misses them; the delivery streams still hold the messages).
    pub history_lost: IntCounter,
    /// Log lines dropped because stderr could not keep up (process-wide; brought up to
    /// date at each scrape).
    log_lines_dropped: IntCounter,
    /// The dropped count already added to `log_lines_dropped`.
    log_lines_synced: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("gm_relay".into()), None).expect("static prefix is valid");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Legacy HTTP and native NATS requests by side, action and result"),
            &["side", "action", "result"],
        )
        .expect("static metric definition");
        let publish_seconds = HistogramVec::new(
            HistogramOpts::new("publish_seconds", "Publish to JetStream acknowledgement")
                .buckets(vec![0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0]),
            &["route"],
        )
        .expect("static metric definition");
        let poll_size = HistogramVec::new(
            HistogramOpts::new("poll_size", "Entries returned by a legacy poll")
                .buckets(vec![0.0, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0]),
            &["feed"],
        )
        .expect("static metric definition");
        let outbox_depth = IntGauge::new("outbox_depth", "Friend and presence events not yet published")
            .expect("static metric definition");
        let rate_limited = IntCounterVec::new(
            Opts::new("rate_limited_total", "Requests refused by a rate limit (errno 8)"),
            &["limit"],
        )
        .expect("static metric definition");
        let publish_retries = IntCounterVec::new(
            Opts::new("publish_retries_total", "Publishes sent again with the same Nats-Msg-Id"),
            &["route"],
        )
        .expect("static metric definition");
        let publish_duplicates = IntCounterVec::new(
            Opts::new("publish_duplicates_total", "Publishes the stream dropped as duplicates"),
            &["route"],
        )
        .expect("static metric definition");
        let publish_failures = IntCounterVec::new(
            Opts::new("publish_failures_total", "Publishes that ended without the broker's acknowledgement"),
            &["route"],
        )
        .expect("static metric definition");
        let history_lost = IntCounter::new(
            "history_lost_total",
            "Delivered chat messages whose console history copy could not be written",
        )
        .expect("static metric definition");
        let log_lines_dropped = IntCounter::new(
            "log_lines_dropped_total",
            "Log lines dropped because stderr could not keep up with them",
        )
        .expect("static metric definition");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(publish_seconds.clone()),
            Box::new(poll_size.clone()),
            Box::new(outbox_depth.clone()),
            Box::new(rate_limited.clone()),
            Box::new(publish_retries.clone()),
            Box::new(publish_duplicates.clone()),
            Box::new(publish_failures.clone()),
            Box::new(history_lost.clone()),
            Box::new(log_lines_dropped.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            requests,
            publish_seconds,
            poll_size,
            outbox_depth,
            rate_limited,
            publish_retries,
            publish_duplicates,
            publish_failures,
            history_lost,
            log_lines_dropped,
            log_lines_synced: AtomicU64::new(0),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        // fetch_max: concurrent scrapes each add only the part they were first to see.
        let dropped = crate::telemetry::dropped_log_lines();
        let synced = self.log_lines_synced.fetch_max(dropped, Ordering::Relaxed);
        self.log_lines_dropped.inc_by(dropped.saturating_sub(synced));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
