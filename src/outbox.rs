//! The outbox drainer: publishes committed friend and presence events, in commit order.
//!
//! A friend change commits its state and its event to the store in one atomic step; this
//! task moves events from there to the broker. One drainer at a time across all relays
//! (a store lease) keeps the order; entries are removed only after the broker acknowledged
//! them, and every event keeps its id as `Nats-Msg-Id`, so a drainer that dies after
//! publishing and before removing causes a de-duplicated republish, never a loss.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::ports::{EventBus, FriendStore, LeaseToken, RoleService, Route};
use crate::domain::{Envelope, EventKind, RelayError};
use crate::relay::Relay;

/// Name of the store lease that makes one relay the drainer.
pub const OUTBOX_LEASE: &str = "outbox";

/// Long enough to publish a full batch on a slow broker; a dead drainer blocks others at
/// most this long.
const OUTBOX_LEASE_TTL: Duration = Duration::from_secs(5);

/// Time a batch may spend creating its hosts' native consumers before it publishes anyway
/// (a consumer delivers from the start of the stream whenever it is created): with the
/// batch's publish bound (3 s, NATS adapter) it keeps a drain round inside the lease.
const CONSUMER_SETUP_BUDGET: Duration = Duration::from_secs(1);

/// Events taken from the outbox per drain round: enough to keep many publishes in flight
/// (one round trip when no two of them must keep an order, see
/// `domain::order::publish_rounds`), small enough that a batch finishes well within the
/// lease.
const OUTBOX_BATCH: usize = 256;

/// Without a local kick the drainer still looks this often, to pick up events committed
/// by other relays whose drainer is gone.
const OUTBOX_IDLE_CHECK: Duration = Duration::from_millis(250);

/// Pause after a failed round, so a broker outage is not hammered. Longer than
/// [`OUTBOX_IDLE_CHECK`]: a relay whose own connection is what fails (half-open, say) lets
/// the others, which look every 250 ms, take the lease first.
const OUTBOX_RETRY_BACKOFF: Duration = Duration::from_millis(500);

impl<S: FriendStore, B: EventBus, R: RoleService> Relay<S, B, R> {
    /// Drains the outbox until `shutdown` flips, then drains once more.
    pub async fn run_outbox(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let failed = match self.drain_outbox().await {
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox drain failed; will retry");
                    true
                }
            };
            if *shutdown.borrow() {
                break;
            }
            let pause = if failed { OUTBOX_RETRY_BACKOFF } else { OUTBOX_IDLE_CHECK };
            tokio::select! {
                _ = self.outbox_kick.notified(), if !failed => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
        if let Err(e) = self.drain_outbox().await {
            tracing::warn!(error = %e, "final outbox drain failed; the next relay to start will publish");
        }
    }

    /// Publishes everything waiting, if this relay can take the lease. Returns how many
    /// events were published.
    pub async fn drain_outbox(&self) -> Result<usize, RelayError> {
        let Some(token) = self.store.try_lease(OUTBOX_LEASE, OUTBOX_LEASE_TTL).await? else {
            return Ok(0);
        };
        let result = self.drain_with_lease(&token).await;
        if let Err(e) = self.store.release_lease(OUTBOX_LEASE, &token).await {
            tracing::warn!(error = %e, "could not release the outbox lease; it will expire");
        }
        result
    }

    async fn drain_with_lease(&self, token: &LeaseToken) -> Result<usize, RelayError> {
        let mut total = 0;
        loop {
            let items = self.store.outbox_peek(OUTBOX_BATCH).await?;
            if items.is_empty() {
                return Ok(total);
            }
            let seqs: Vec<u64> = items.iter().map(|i| i.seq).collect();
            let batch: Vec<(Route, Envelope)> =
                items.into_iter().map(|i| (Route::ToHost(i.event.host), i.event)).collect();
            // The add that committed a friend_add created its host's native consumer; if
            // that failed (NATS was down), this is the next chance. Only friend_add: every
            // other event of a host comes after one. A failure is logged, not fatal: the
            // consumer delivers from the start of the stream whenever it is created, and one
            // host must not hold up every other host's events.
            let mut hosts: Vec<_> =
                batch.iter().filter(|(_, e)| e.kind == EventKind::FriendAdd).map(|(_, e)| e.host).collect();
            hosts.sort();
            hosts.dedup();
            let give_up = tokio::time::Instant::now() + CONSUMER_SETUP_BUDGET;
            for host in hosts {
                let created = tokio::time::timeout_at(give_up, self.bus.ensure_host_consumer(host)).await;
                match created {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(%host, error = %e, "could not create the host's native consumer; publishing anyway");
                    }
                    Err(_) => {
                        tracing::warn!(%host, "creating native consumers took too long; publishing anyway");
                        break;
                    }
                }
            }
            crate::fault_point!(self, "outbox_before_publish");
            let (acked, error) = self.bus.publish_ordered(&batch).await;
            crate::fault_point!(self, "outbox_after_publish");
            if acked > 0 {
                let seq = seqs[acked - 1];
                if !self.store.outbox_remove(OUTBOX_LEASE, token, acked, seq).await? {
                    tracing::warn!("outbox lease lost mid-drain; another relay continues");
                    return Ok(total);
                }
                self.outbox_published.send_if_modified(|cur| {
                    let advanced = seq > *cur;
                    if advanced {
                        *cur = seq;
                    }
                    advanced
                });
                total += acked;
            }
            if let Some(e) = error {
                return Err(e);
            }
            if !self.store.renew_lease(OUTBOX_LEASE, token, OUTBOX_LEASE_TTL).await? {
                return Ok(total);
            }
        }
    }
}
