//! W0, the limit: raw JetStream on the same nats-server, no relay. One connection
//! publishes 200-byte JSON envelopes over 1,000 subjects with 256 PubAcks in flight and a
//! `Nats-Msg-Id`; another runs one durable consumer (no filter) fetching up to 500 and
//! acking each. The end-to-end rate (messages consumed / time to the last one) is "W0".

use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::load::progress;
use crate::procs::cpu_of;
use crate::report::{f, n, Table};
use crate::stack::Stack;

const STREAM: &str = "BENCH_W0";
const SUBJECTS: u64 = 1000;
const IN_FLIGHT: usize = 256;
const FETCH: usize = 500;

pub struct W0 {
    pub published: u64,
    pub consumed: u64,
    pub publish_rate: f64,
    pub e2e_rate: f64,
    pub nats_cpu_pct: Option<f64>,
}

impl W0 {
    pub fn json(&self) -> Value {
        json!({
            "published": self.published,
            "consumed": self.consumed,
            "publish_rate_per_s": self.publish_rate,
            "e2e_rate_per_s": self.e2e_rate,
            "nats_server_cpu_pct": self.nats_cpu_pct,
        })
    }

    pub fn table(&self, title: &str) -> Table {
        let mut t =
            Table::new(title, &["messages", "publish msg/s", "end-to-end msg/s (W0)", "nats-server CPU %"]);
        t.row(vec![
            n(self.consumed as f64),
            n(self.publish_rate),
            n(self.e2e_rate),
            self.nats_cpu_pct.map(f).unwrap_or_else(|| "-".into()),
        ]);
        t
    }
}

/// A 200-byte chat envelope.
fn payload(i: u64) -> Vec<u8> {
    let mut v = format!(
        r#"{{"v":1,"id":"w0-{i:012}","type":"chat","host":"{}","uid":"{}","gm":"7","ts":1764078000000,"text":""#,
        i % SUBJECTS,
        100_000 + i
    )
    .into_bytes();
    while v.len() < 198 {
        v.push(b'x');
    }
    v.extend_from_slice(b"\"}");
    v
}

pub async fn run(stack: &Stack, count: u64, bound: Duration, show: bool) -> Result<W0> {
    let publisher = async_nats::connect(&stack.nats_url).await?;
    let reader = async_nats::connect(&stack.nats_url).await?;
    let js = jetstream::new(publisher.clone());
    let _ = js.delete_stream(STREAM).await;
    let created = js
        .create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["bench.w0.*".to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("create the W0 stream")?;
    created
        .create_consumer::<consumer::pull::Config>(consumer::pull::Config {
            durable_name: Some("w0".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    // Bind the consumer on the reader's own connection.
    let consumer: consumer::PullConsumer =
        jetstream::new(reader.clone()).get_consumer_from_stream("w0", STREAM).await?;

    let cpu = stack.cpu_watch();
    let start = Instant::now();
    let deadline = start + bound;
    let published = Arc::new(AtomicU64::new(0));
    let publishing_done = Arc::new(AtomicU64::new(0));
    let bar = show.then(|| progress(count, "W0 raw JetStream"));

    let pub_task = {
        let (published, done) = (Arc::clone(&published), Arc::clone(&publishing_done));
        tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            let mut i = 0;
            while i < count && Instant::now() < deadline {
                while pending.len() >= IN_FLIGHT {
                    if let Some(Ok(Ok(_))) = pending.next().await {
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let msg = PublishMessage::build().payload(payload(i).into()).message_id(format!("w0-{i}"));
                match js.send_publish(format!("bench.w0.{}", i % SUBJECTS), msg).await {
                    Ok(ack) => pending.push(tokio::time::timeout(Duration::from_secs(10), ack.into_future())),
                    Err(_) => break,
                }
                i += 1;
            }
            while let Some(r) = pending.next().await {
                if let Ok(Ok(_)) = r {
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }
            done.store(1, Ordering::Relaxed);
            start.elapsed()
        })
    };

    let mut consumed = 0u64;
    let mut last = start;
    // Bounded: stops at the count, or when publishing ended and everything was read, or
    // at the time bound plus a grace period to catch up.
    while Instant::now() < deadline + Duration::from_secs(10) {
        let all_published = publishing_done.load(Ordering::Relaxed) == 1;
        if all_published && consumed >= published.load(Ordering::Relaxed) {
            break;
        }
        let batch = consumer.batch().max_messages(FETCH).expires(Duration::from_millis(100)).messages().await;
        let Ok(mut batch) = batch else { continue };
        while let Some(Ok(m)) = batch.next().await {
            let _ = m.ack().await;
            consumed += 1;
            last = Instant::now();
        }
        if let Some(bar) = &bar {
            bar.set_position(consumed);
        }
    }
    let publish_elapsed = pub_task.await.unwrap_or(bound);
    let published = published.load(Ordering::Relaxed);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let nats_cpu = cpu_of(&cpu.stop(), "nats-server");
    let _ = jetstream::new(reader).delete_stream(STREAM).await;
    Ok(W0 {
        published,
        consumed,
        publish_rate: published as f64 / publish_elapsed.as_secs_f64().max(1e-6),
        e2e_rate: consumed as f64 / (last - start).as_secs_f64().max(1e-6),
        nats_cpu_pct: nats_cpu.map(|(pct, _, _)| pct),
    })
}
