//! Receivers that measure send-to-receipt latency by the stamped text of a chat message
//! (`<tag> <seq> <ns>`, see `load::Req`): native game servers bound to their durable
//! consumer `host_<n>` (as `examples/game_server.rs` does), and a JetStream consumer on
//! `GS_TO_GM` standing for the GM side.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer};
use futures::{Stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::load::{new_hist, now_ns, record};

pub struct Receipts {
    tag: Mutex<String>,
    hist: Mutex<Histogram<u64>>,
    count: AtomicU64,
    /// Flips to `true` once: the readers end. A watch, not a flag checked on a timer, so
    /// that a reader taking 30,000 messages a second arms no timer per message.
    stop: watch::Sender<bool>,
}

impl Receipts {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            tag: Mutex::new(String::new()),
            hist: Mutex::new(new_hist()),
            count: AtomicU64::new(0),
            stop: watch::channel(false).0,
        })
    }

    /// Starts counting messages whose text begins with `tag`, from zero.
    pub fn reset(&self, tag: &str) {
        *self.tag.lock().unwrap_or_else(|p| p.into_inner()) = format!("{tag} ");
        *self.hist.lock().unwrap_or_else(|p| p.into_inner()) = new_hist();
        self.count.store(0, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn hist(&self) -> Histogram<u64> {
        self.hist.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Waits (bounded) until `n` messages arrived.
    pub async fn wait_for(&self, n: u64, bound: Duration) {
        let give_up = tokio::time::Instant::now() + bound;
        while self.count() < n && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn take(&self, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Env<'a> {
            #[serde(borrow)]
            text: Option<Cow<'a, str>>,
        }
        let Ok(Env { text: Some(text) }) = serde_json::from_slice::<Env>(payload) else { return };
        let stamp = {
            let tag = self.tag.lock().unwrap_or_else(|p| p.into_inner());
            if tag.is_empty() || !text.starts_with(tag.as_str()) {
                return;
            }
            text.rsplit(' ').next().and_then(|s| s.parse::<u64>().ok())
        };
        if let Some(sent) = stamp {
            let latency = Duration::from_nanos(now_ns().saturating_sub(sent));
            record(&mut self.hist.lock().unwrap_or_else(|p| p.into_inner()), latency);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Native game servers `hosts`, each bound to its consumer `host_<n>`, acking every event.
pub async fn host_readers(js: &jetstream::Context, hosts: &[i64]) -> Result<Arc<Receipts>> {
    let receipts = Receipts::new();
    for &host in hosts {
        let consumer: consumer::PullConsumer = js
            .get_consumer_from_stream(format!("host_{host}"), "GM_TO_HOST")
            .await
            .with_context(|| format!("bind host_{host}"))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(500)
            .expires(Duration::from_secs(2))
            .heartbeat(Duration::from_secs(1))
            .messages()
            .await
            .with_context(|| format!("pull from host_{host}"))?;
        let r = Arc::clone(&receipts);
        let mut stopped = r.stop.subscribe();
        tokio::spawn(async move {
            while let Some(message) = next_until_stopped(&mut stopped, &mut messages).await {
                if let Ok(message) = message {
                    r.take(&message.payload);
                    let _ = message.ack().await;
                }
            }
        });
    }
    Ok(receipts)
}

/// A consumer over all of `GS_TO_GM` from now on (no filter, no acks): the GM side.
pub async fn gm_reader(js: &jetstream::Context) -> Result<Arc<Receipts>> {
    let receipts = Receipts::new();
    let stream = js.get_stream("GS_TO_GM").await.context("GS_TO_GM")?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .context("create the GS_TO_GM reader")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .expires(Duration::from_secs(2))
        .heartbeat(Duration::from_secs(1))
        .messages()
        .await
        .context("pull from GS_TO_GM")?;
    let r = Arc::clone(&receipts);
    let mut stopped = r.stop.subscribe();
    tokio::spawn(async move {
        while let Some(message) = next_until_stopped(&mut stopped, &mut messages).await {
            if let Ok(message) = message {
                r.take(&message.payload);
            }
        }
    });
    Ok(receipts)
}

/// The stream's next item, or `None` once the stream ends or the receipts are stopped.
async fn next_until_stopped<S: Stream + Unpin>(
    stopped: &mut watch::Receiver<bool>,
    messages: &mut S,
) -> Option<S::Item> {
    tokio::select! {
        biased;
        _ = stopped.wait_for(|s| *s) => None,
        item = messages.next() => item,
    }
}
