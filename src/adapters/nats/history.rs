//! The writer of the console's history copies (`GM_HISTORY`, see `nats/HISTORY.md`).
//!
//! A chat send answers once its delivery is acknowledged; the copy is handed to this
//! writer and written behind it. One task takes the queued copies in batches, publishes a
//! whole batch before awaiting its PubAcks (one round trip per batch, not per message) and
//! sends failed copies again, with the same `Nats-Msg-Id`, for up to 15 s. A reader that
//! must see its own writes (the console's history pages and unread counts) first waits for
//! a [`HistoryWriter::flush`], which resolves once everything queued before it is written.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::console::DELIVERY_SEQ_HEADER;
use crate::metrics::Metrics;

/// Copies waiting for the writer. At the highest send rates measured (~30,000 messages/s)
/// this is a third of a second of chat; a full queue holds senders back (see
/// [`ENQUEUE_TIMEOUT`]) rather than growing without bound.
const QUEUE: usize = 10_000;

/// Copies published before their PubAcks are awaited: well under the context's limit of
/// 5,000 unacknowledged publishes, large enough that a batch is one round trip at full load.
const BATCH: usize = 512;

/// How long a send waits for room in a full queue before its copy is given up (and
/// counted as lost). Bounded because the delivery, which the reply promises, is done.
const ENQUEUE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Bound on one attempt at a batch: sending it and receiving its PubAcks.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(750);

/// How long the writer keeps trying the failed copies of a batch before giving them up:
/// long enough to ride out a stream leader election or a NATS restart (pauses of 4–13 s
/// in `tests/failover.rs`); meanwhile new copies wait in the queue. Each resend keeps the
/// event id as `Nats-Msg-Id`, so a copy whose PubAck was lost is still stored once.
const RETRY_WINDOW: Duration = Duration::from_secs(15);

/// Pause between attempts at a batch's failed copies.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Ids named in the log line of a batch with lost copies (the count is always complete).
const LOGGED_IDS: usize = 5;

/// One history copy: the delivered envelope's bytes on its conversation's subject.
pub struct Copy {
    pub subject: String,
    pub id: String,
    pub payload: Bytes,
    /// The delivery's sequence in `GM_TO_HOST` (GM messages only).
    pub delivery_seq: Option<u64>,
}

enum Job {
    Copy(Copy),
    Flush(oneshot::Sender<()>),
}

/// Handle to the writer task; the task ends once every handle is dropped and the queue is
/// drained.
pub struct HistoryWriter {
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl HistoryWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(client: async_nats::Client, js: jetstream::Context, metrics: Arc<Metrics>) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        tokio::spawn(run(client, js, queue, Arc::clone(&metrics)));
        Self { jobs, metrics }
    }

    /// Queues a copy; waits only while the queue is full. A copy that is not queued is
    /// counted and logged, also when the caller stops waiting (its request went away).
    pub async fn record(&self, copy: Copy) {
        // The id is copied only on the slow path, for the loss report.
        let (job, id) = match self.jobs.try_send(Job::Copy(copy)) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => {
                let id = match &job {
                    Job::Copy(copy) => copy.id.clone(),
                    Job::Flush(_) => unreachable!("record sends copies only"),
                };
                (job, id)
            }
        };
        let mut unrecorded =
            Unrecorded { id: Some(id), reason: "its request went away", metrics: &self.metrics };
        unrecorded.reason = match self.jobs.send_timeout(job, ENQUEUE_TIMEOUT).await {
            Ok(()) => {
                unrecorded.id = None;
                return;
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => "the history writer is behind",
            Err(mpsc::error::SendTimeoutError::Closed(_)) => "the history writer stopped",
        };
    }

    /// Resolves once every copy queued before this call was written (or given up), or at
    /// `bound`. Returns whether it got there in time.
    pub async fn flush(&self, bound: Duration) -> bool {
        let (done, written) = oneshot::channel();
        tokio::time::timeout(bound, async {
            self.jobs.send(Job::Flush(done)).await.is_ok() && written.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

/// A copy that is not queued: counted and logged when dropped, which happens also when the
/// request waiting to queue it is cancelled.
struct Unrecorded<'a> {
    /// None once the copy is queued after all.
    id: Option<String>,
    reason: &'static str,
    metrics: &'a Metrics,
}

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            self.metrics.history_lost.inc();
            tracing::error!(%id, reason = self.reason, "chat message delivered but not recorded in the console history");
        }
    }
}

async fn run(
    client: async_nats::Client,
    js: jetstream::Context,
    mut queue: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let mut jobs = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut jobs, BATCH).await > 0 {
        let mut copies = Vec::with_capacity(jobs.len());
        let mut flushes = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Copy(c) => copies.push(c),
                Job::Flush(done) => flushes.push(done),
            }
        }
        let lost = write(&client, &js, copies).await;
        if !lost.is_empty() {
            metrics.history_lost.inc_by(lost.len() as u64);
            let ids: Vec<&str> = lost.iter().take(LOGGED_IDS).map(|(c, _)| c.id.as_str()).collect();
            tracing::error!(
                count = lost.len(), ?ids, error = %lost[0].1,
                "chat messages delivered but not recorded in the console history"
            );
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// Writes a batch, retrying what fails for [`RETRY_WINDOW`]; returns the copies given
/// up, each with its last error.
async fn write(
    client: &async_nats::Client,
    js: &jetstream::Context,
    copies: Vec<Copy>,
) -> Vec<(Copy, String)> {
    let give_up = tokio::time::Instant::now() + RETRY_WINDOW;
    let mut pending: Vec<(Copy, String)> = copies.into_iter().map(|c| (c, String::new())).collect();
    loop {
        match connected(client) {
            // A publish now would wait in the client's buffer with no bound of ours; the
            // copies are sent once the connection is back.
            Err(state) => {
                for (_, error) in &mut pending {
                    error.clone_from(&state);
                }
            }
            Ok(()) => {
                let results = attempt(js, &pending, tokio::time::Instant::now() + ATTEMPT_TIMEOUT).await;
                pending = pending
                    .into_iter()
                    .zip(results)
                    .filter_map(|((copy, _), result)| result.err().map(|e| (copy, e)))
                    .collect();
            }
        }
        if pending.is_empty() || tokio::time::Instant::now() + RETRY_PAUSE >= give_up {
            return pending;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Publishes every copy, then awaits the PubAcks until `until`; one result per copy, in
/// order. A copy acknowledged before `until` counts as written even if others were not,
/// so a slow batch is not sent again whole.
async fn attempt(
    js: &jetstream::Context,
    copies: &[(Copy, String)],
    until: tokio::time::Instant,
) -> Vec<Result<(), String>> {
    const LATE: &str = "no PubAck in time";
    let mut acks: Vec<Result<PublishAckFuture, String>> = Vec::with_capacity(copies.len());
    for (copy, _) in copies {
        let mut message = PublishMessage::build().payload(copy.payload.clone()).message_id(&copy.id);
        if let Some(seq) = copy.delivery_seq {
            message = message.header(DELIVERY_SEQ_HEADER, seq.to_string().as_str());
        }
        // Copies not sent by `until` (the client's buffer full) keep the "late" result.
        acks.push(
            match tokio::time::timeout_at(until, js.send_publish(copy.subject.clone(), message)).await {
                Ok(sent) => sent.map_err(|e| e.to_string()),
                Err(_) => Err(LATE.to_owned()),
            },
        );
    }
    join_all(acks.into_iter().map(|ack| async move {
        match ack {
            Ok(ack) => match tokio::time::timeout_at(until, ack.into_future()).await {
                Ok(acked) => acked.map(drop).map_err(|e| e.to_string()),
                Err(_) => Err(LATE.to_owned()),
            },
            Err(e) => Err(e),
        }
    }))
    .await
}

fn connected(client: &async_nats::Client) -> Result<(), String> {
    use async_nats::connection::State;
    match client.connection_state() {
        State::Connected => Ok(()),
        state => Err(format!("NATS connection is {state:?}")),
    }
}
