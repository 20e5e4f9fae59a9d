//! The relay's use cases: every legacy action as one method, written against the ports of
//! [`crate::domain::ports`] only. The order of checks here is the protocol's order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, OwnedMutexGuard};

use crate::domain::event::{new_event_id, now_ms};
use crate::domain::poll::{plan_chat, plan_relation, Conversation, Grouping, PollReply, RelationChanges};
use crate::domain::ports::{
    Delivery, EventBus, Feed, FetchFailed, FriendStore, LeaseToken, RoleService, RoleVerdict, RosterEntry,
    Route, Settle,
};
use crate::domain::rate::RateLimiter;
use crate::domain::recent::RecentIds;
use crate::domain::{ChatText, Envelope, Errno, GmId, GmName, HostId, RelayError, Uid};

/// Hosts numbered from here on are "external" servers whose players the role service must
/// confirm (the original's `is_inter_server`).
pub const ROLE_CHECK_FROM_HOST: i64 = 1000;

pub use crate::domain::poll::MAX_ENTRIES_PER_POLL as POLL_MAX;

/// Messages fetched per round trip of a poll.
const FETCH_BATCH: usize = 1000;

/// Messages one poll may fetch. A poll keeps fetching while its reply has room and the
/// feed has more, so one player's backlog (nak'd beyond 10, and redelivered first) does
/// not crowd out everyone else's messages while it is under this many; a larger one
/// does, until it drains 10 per poll. A relation poll pages through chat it does not serve
/// quickly. The bound keeps a poll's cost (and the consumer's unacked count, see the NATS
/// adapter's `LEGACY_MAX_ACK_PENDING`) limited.
const MAX_FETCH_PER_POLL: usize = 10_000;

/// Every fetch round of a poll ends within this of asking for the feed's lease (a round
/// still running then is cut short), so whatever the broker handed out is due again (the
/// NATS adapter's `LEGACY_ACK_WAIT`, 10 s) before the lease expires ([`POLL_LEASE_TTL`]):
/// 3 + 10 s leaves 2 s for the broker's own delays.
const POLL_FETCH_BUDGET: Duration = Duration::from_secs(3);

/// Players per resync reply page: about 100 bytes each, far below NATS's payload limit.
pub const RESYNC_PAGE: usize = 1000;

/// Resync pages one host may ask for per second (bursts as large). A page is one Redis
/// script that holds Redis for its 1,000 players, so a game server looping on resync
/// would otherwise stall every host's polls and sends; 20 pages a second still reads a
/// 100,000-player roster in 5 s.
pub const RESYNC_PAGES_PER_HOST_PER_S: u32 = 20;

/// How long a poll waits for the previous poll of the same feed (in this relay or another)
/// to finish. Past it the poll answers empty: nothing was taken, so nothing is lost.
const POLL_TURN_WAIT: Duration = Duration::from_secs(2);

/// First pause between attempts to take a poll lease held by another poll; it doubles
/// up to [`POLL_LEASE_RETRY_MAX`]. A poll holds its lease for milliseconds, so the first
/// retries come quickly, and a waiting poll asks Redis a few dozen times at most.
const POLL_LEASE_RETRY: Duration = Duration::from_millis(5);

/// Longest pause between attempts to take a held poll lease.
const POLL_LEASE_RETRY_MAX: Duration = Duration::from_millis(100);

/// A poll starts no further fetch round after this much of [`POLL_FETCH_BUDGET`]: each
/// round takes at most the NATS adapter's 2 s fetch bound, so a healthy round is never cut
/// by the budget (which would leave the lease to expire), only one that hangs.
const POLL_ROUND_START_BUDGET: Duration = Duration::from_secs(1);

/// How long a GM send or a friend add waits to make sure the host's native consumer
/// exists. The consumer delivers from the start of the stream whenever it is created, so
/// neither needs it in place: a JetStream API that is slow or without a leader delays
/// their replies by at most this.
const HOST_CONSUMER_WAIT: Duration = Duration::from_millis(500);

/// A poll lease outlives the longest poll (the fetch budget and the settle are each bounded
/// well below this), so a relay that dies mid-poll blocks its feed for at most this long.
/// It also outlives the ack wait of everything the poll fetched: a poll that cannot tell
/// what the broker handed out or applied (a fetch round failed or was cut, its acks failed)
/// leaves the lease to expire instead of releasing it, so the next poll starts only once
/// those messages are due again, and gets them first, in stream order.
pub const POLL_LEASE_TTL: Duration = Duration::from_secs(15);

/// A poll's reply must be written within this of asking for the lease, or the poll naks
/// it (and the connection is given up, so the client never reads it): the acks that
/// follow a written reply take at most the NATS adapter's `SETTLE_TIMEOUT` (2 s), and
/// 12 + 2 s ends the turn within its lease ([`POLL_LEASE_TTL`]) with 1 s to spare. A
/// reply of up to 1,000 entries is written in milliseconds to a client that reads.
pub const POLL_REPLY_BUDGET: Duration = Duration::from_secs(12);

/// A friend change answers once committed; it waits up to this long for its event to be
/// published, so that a client's next poll sees it. Past it the drainer still publishes it.
const PUBLISH_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// How often a waiter re-reads the published position kept in the store, for when another
/// relay holds the outbox lease.
const FLUSH_RECHECK: Duration = Duration::from_millis(20);

/// Poll locks kept before the unused ones are dropped: more than a deployment's hosts
/// (two feeds each), so pruning is rare; feeds of host ids that come and go (a
/// misconfigured game server) cannot grow the map past it for long.
const POLL_LOCKS_PRUNE_AT: usize = 50_000;

/// Chat rate limits (per second; 0 = off).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatLimits {
    pub gm_per_s: u32,
    pub player_per_s: u32,
}

pub struct Relay<S, B, R> {
    pub(crate) store: S,
    pub(crate) bus: B,
    roles: R,
    gm_rate: RateLimiter<GmId>,
    player_rate: RateLimiter<Uid>,
    resync_rate: RateLimiter<HostId>,
    /// Keyed native sends stored lately: their retries skip the rate limit.
    native_stored: RecentIds,
    /// Wakes the outbox drainer after a commit.
    pub(crate) outbox_kick: Notify,
    /// Newest outbox seq this relay knows to be published.
    pub(crate) outbox_published: watch::Sender<u64>,
    /// One lock per feed: polls of one feed are serialised inside this relay (the Redis
    /// lease does it across relays). One small entry per feed polled; unused entries are
    /// dropped past [`POLL_LOCKS_PRUNE_AT`].
    poll_locks: Mutex<HashMap<Feed, Arc<tokio::sync::Mutex<()>>>>,
    #[cfg(feature = "fault-injection")]
    pub faults: crate::faults::Faults,
}

/// A chat poll's reply.
pub type ChatReply = Vec<Conversation>;

/// A GM's message the broker stored: its event id, the player's host and its sequence in
/// the host's stream (the host has taken it once its consumer's ack floor reaches it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub id: String,
    pub host: HostId,
    pub seq: u64,
}

impl<S: FriendStore, B: EventBus, R: RoleService> Relay<S, B, R> {
    pub fn new(store: S, bus: B, roles: R, limits: ChatLimits) -> Self {
        Self {
            store,
            bus,
            roles,
            gm_rate: RateLimiter::new(limits.gm_per_s),
            player_rate: RateLimiter::new(limits.player_per_s),
            resync_rate: RateLimiter::new(RESYNC_PAGES_PER_HOST_PER_S),
            native_stored: RecentIds::default(),
            outbox_kick: Notify::new(),
            outbox_published: watch::channel(0).0,
            poll_locks: Mutex::new(HashMap::new()),
            #[cfg(feature = "fault-injection")]
            faults: Default::default(),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn bus(&self) -> &B {
        &self.bus
    }

    pub async fn create(&self, gm: GmId, name: &GmName) -> Result<(), RelayError> {
        self.store.create_gm(gm, name).await
    }

    pub async fn add(&self, gm: GmId, host: HostId, uid: Uid) -> Result<(), RelayError> {
        if host.0 >= ROLE_CHECK_FROM_HOST {
            self.store.check_add(gm, uid).await?;
            match self.roles.check(host, uid).await {
                Ok(RoleVerdict::Exists) => {}
                Ok(RoleVerdict::Unknown) => return Err(Errno::RoleRefused.into()),
                Err(e) => {
                    tracing::warn!(%host, %uid, error = %e, "role service failed");
                    return Err(Errno::RoleUnavailable.into());
                }
            }
        }
        let seq = self.store.add_friend(gm, host, uid, &new_event_id(), now_ms()).await?;
        crate::fault_point!(self, "add_after_commit");
        // Before the host's first event reaches a reader, its native consumer must exist;
        // it delivers everything from the start of the stream, so creating it here, right
        // after the commit, misses nothing.
        self.ensure_host_consumer(host).await;
        self.await_published(seq).await;
        Ok(())
    }

    pub async fn remove(&self, gm: GmId, uid: Uid) -> Result<(), RelayError> {
        let seq = self.store.remove_friend(gm, uid, &new_event_id(), now_ms()).await?;
        self.await_published(seq).await;
        Ok(())
    }

    pub async fn online(&self, gm: GmId) -> Result<(), RelayError> {
        if let Some(seq) = self.store.set_online(gm, &new_event_id(), now_ms()).await? {
            self.await_published(seq).await;
        }
        Ok(())
    }

    pub async fn offline(&self, gm: GmId) -> Result<(), RelayError> {
        if let Some(seq) = self.store.set_offline(gm, &new_event_id(), now_ms()).await? {
            self.await_published(seq).await;
        }
        Ok(())
    }

    /// GM to player. Answers once the broker stored the message.
    pub async fn gm_send(&self, gm: GmId, uid: Uid, msg: &[u8]) -> Result<Sent, RelayError> {
        let host = self.store.gm_chat_target(gm, uid).await?;
        let text = ChatText::from_base64(msg).ok_or(Errno::BadMsg)?;
        if !self.gm_rate.allow(&gm) {
            return Err(Errno::RateLimited.into());
        }
        self.ensure_host_consumer(host).await;
        let event = Envelope::chat(new_event_id(), host, uid, gm, text.as_str(), now_ms());
        let stored = self.bus.publish_chat(Route::ToHost(host), &event).await?;
        Ok(Sent { id: event.id, host, seq: stored.seq })
    }

    /// Player to GM, from a legacy game server. Answers once the broker stored the message.
    pub async fn gs_send(&self, uid: Uid, msg: &[u8]) -> Result<String, RelayError> {
        let link = self.store.player_link(uid).await?;
        let text = ChatText::from_base64(msg).ok_or(Errno::BadMsg)?;
        if !self.player_rate.allow(&uid) {
            return Err(Errno::RateLimited.into());
        }
        let event = Envelope::chat(new_event_id(), link.host, uid, link.gm, text.as_str(), now_ms());
        self.bus.publish_chat(Route::ToGm(link.gm), &event).await?;
        Ok(event.id)
    }

    /// Player to GM, from a native game server. `key` (the request's `Nats-Msg-Id`) makes
    /// a retried request publish the same event id, which the stream de-duplicates. Returns
    /// the event id and whether the stream already had it (a retry, or a reused key).
    pub async fn native_send(
        &self,
        host: HostId,
        uid: Uid,
        text: String,
        key: Option<&str>,
    ) -> Result<(String, bool), RelayError> {
        let link = self.store.player_link(uid).await?;
        if link.host != host {
            return Err(Errno::WrongHost.into());
        }
        let text = ChatText::new(text).ok_or(Errno::BadMsg)?;
        // Keys are the host's own: prefix them so two hosts' keys never collide.
        let keyed = key.map(|k| format!("h{host}-{k}"));
        if let Some(id) = keyed.as_ref().filter(|id| self.native_stored.contains(id)) {
            // A retry of a send this relay stored: answered without taking the player's
            // rate-limit token, which its first attempt already took.
            return Ok((id.clone(), true));
        }
        if !self.player_rate.allow(&uid) {
            return Err(Errno::RateLimited.into());
        }
        let event =
            Envelope::chat(keyed.unwrap_or_else(new_event_id), host, uid, link.gm, text.as_str(), now_ms());
        let stored = self.bus.publish_chat(Route::ToGm(link.gm), &event).await?;
        if key.is_some() {
            self.native_stored.insert(event.id.clone());
        }
        Ok((event.id, stored.duplicate))
    }

    /// One page of a host's players, for a game server that restarted without state.
    pub async fn resync(&self, host: HostId, cursor: u64) -> Result<(Vec<RosterEntry>, u64), RelayError> {
        if !self.resync_rate.allow(&host) {
            return Err(Errno::RateLimited.into());
        }
        self.store.host_roster(host, cursor, RESYNC_PAGE).await
    }

    pub async fn gs_online(&self, host: HostId) -> Result<Vec<GmId>, RelayError> {
        self.store.online_gms_on_host(host, POLL_MAX).await
    }

    /// GS `receive`: chat for the players of `host`.
    pub async fn gs_receive(
        self: &Arc<Self>,
        host: HostId,
    ) -> Result<PollTicket<ChatReply, S, B, R>, RelayError> {
        self.poll(Feed::HostChat(host), |d| plan_chat(d, Grouping::ByPlayer)).await
    }

    /// GM `receive`: chat from players to every GM.
    pub async fn gm_receive(self: &Arc<Self>) -> Result<PollTicket<ChatReply, S, B, R>, RelayError> {
        self.poll(Feed::GmChat, |d| plan_chat(d, Grouping::ByConversation)).await
    }

    /// GS `relation`: friend changes of the players of `host`, coalesced.
    pub async fn gs_relation(
        self: &Arc<Self>,
        host: HostId,
    ) -> Result<PollTicket<RelationChanges, S, B, R>, RelayError> {
        self.poll(Feed::HostRelation(host), plan_relation).await
    }

    /// Takes this feed's turn (local lock, then the cross-relay lease), fetches and plans.
    /// The ticket holds the turn until the reply is out and the broker applied the acks.
    async fn poll<T: PollReply>(
        self: &Arc<Self>,
        feed: Feed,
        plan: impl Fn(&[Delivery<B::Handle>]) -> (T, Vec<Settle>),
    ) -> Result<PollTicket<T, S, B, R>, RelayError> {
        let Some(turn) = self.take_turn(feed).await? else {
            tracing::warn!(feed = %feed.key(), "poll gave up waiting for its turn");
            return Ok(PollTicket::empty());
        };
        let give_up = turn.asked_at + POLL_FETCH_BUDGET;
        let last_start = turn.asked_at + POLL_ROUND_START_BUDGET;
        // From here the turn and whatever is fetched are owned by a settlement, so a
        // request dropped mid-fetch (the client went away, the request timed out) naks
        // what it received and ends the turn, leaving the lease to expire: a round cut
        // part-way may have been handed more than it received.
        let mut fetching = Fetching {
            settlement: Some(Settlement {
                relay: Arc::clone(self),
                settles: Vec::new(),
                turn: Some(turn),
                in_doubt: false,
            }),
            deliveries: Vec::new(),
        };
        let mut planned = None;
        while fetching.deliveries.len() < MAX_FETCH_PER_POLL {
            let before = fetching.deliveries.len();
            let want = FETCH_BATCH.min(MAX_FETCH_PER_POLL - before);
            // The round appends each message as it arrives, so one that fails or is cut
            // part-way still leaves what it received to be served or nak'd.
            // The round ends by the poll's budget (the port bounds itself).
            let round = self.bus.fetch(feed, want, &mut fetching.deliveries, give_up).await;
            if let Err(FetchFailed { error, requested }) = round {
                if requested {
                    // The broker may have handed out messages that never arrived here:
                    // they are due again only after the ack wait, so the lease must run
                    // out before the next poll, or it would serve newer events first.
                    fetching.mark_in_doubt();
                }
                if fetching.deliveries.is_empty() {
                    fetching.end().await;
                    return Err(error);
                }
                tracing::warn!(feed = %feed.key(), error = %error, "poll fetch round failed; serving what it has");
                // The failed round may have added messages: plan again, with them.
                planned = None;
                break;
            }
            let more = fetching.deliveries.len() - before == FETCH_BATCH;
            crate::fault_point!(self, "poll_after_fetch");
            let planned_now = plan_in_order(&mut fetching.deliveries, &plan);
            let full = planned_now.0.entries() >= POLL_MAX;
            planned = Some(planned_now);
            if !more || full || tokio::time::Instant::now() >= last_start {
                break;
            }
        }
        let (reply, settles) = match planned {
            Some(planned) => planned,
            None => plan_in_order(&mut fetching.deliveries, &plan),
        };
        let deliveries = std::mem::take(&mut fetching.deliveries);
        let mut settlement = fetching.settlement.take().expect("the settlement is taken once, here");
        settlement.settles = deliveries.into_iter().zip(settles).map(|(d, s)| (d.handle, s)).collect();
        Ok(PollTicket { reply, settlement: Some(settlement) })
    }

    /// Makes sure `host`'s native consumer exists, within [`HOST_CONSUMER_WAIT`]; a failure
    /// is logged, not returned: the consumer delivers from the start of the stream whenever
    /// the next send, friend change or outbox drain creates it, so nothing is missed.
    async fn ensure_host_consumer(&self, host: HostId) {
        match tokio::time::timeout(HOST_CONSUMER_WAIT, self.bus.ensure_host_consumer(host)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(%host, error = %e, "could not create the host's native consumer; will retry");
            }
            Err(_) => {
                tracing::warn!(%host, "the host's native consumer was not confirmed in time; will retry")
            }
        }
    }

    async fn take_turn(&self, feed: Feed) -> Result<Option<Turn>, RelayError> {
        let lock = {
            let mut locks = self.poll_locks.lock().unwrap_or_else(|p| p.into_inner());
            if locks.len() >= POLL_LOCKS_PRUNE_AT {
                // Held only by the map: no poll holds or awaits it. At most one per request
                // in flight is in use, far fewer than the bound, so pruning is rare.
                locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            Arc::clone(locks.entry(feed).or_default())
        };
        let deadline = tokio::time::Instant::now() + POLL_TURN_WAIT;
        let Ok(guard) = tokio::time::timeout_at(deadline, lock.lock_owned()).await else {
            return Ok(None);
        };
        let lease_name = format!("poll:{}", feed.key());
        let mut pause = POLL_LEASE_RETRY;
        loop {
            // Taken before asking: the lease's time runs from when the store set it, which
            // is no earlier than this.
            let asked_at = tokio::time::Instant::now();
            if let Some(token) = self.store.try_lease(&lease_name, POLL_LEASE_TTL).await? {
                return Ok(Some(Turn { _guard: guard, lease_name, token, asked_at }));
            }
            // A lease left to expire (see POLL_LEASE_TTL) is held for seconds: when it
            // outlasts this poll's wait, answer now rather than ask again until then.
            let now = tokio::time::Instant::now();
            let left = self.store.lease_time_left(&lease_name).await?;
            if left.is_some_and(|left| now + left > deadline) || now + pause > deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_LEASE_RETRY_MAX);
        }
    }

    /// Ends a turn: releases its lease, or, when the poll cannot tell what the broker
    /// handed out or applied, leaves the lease to expire (see [`POLL_LEASE_TTL`]).
    async fn end_turn(&self, turn: Turn, in_doubt: bool) {
        if in_doubt {
            tracing::warn!(lease = %turn.lease_name, "poll lease left to expire: the broker may hold this poll's events unsettled until their ack wait");
            return;
        }
        if let Err(e) = self.store.release_lease(&turn.lease_name, &turn.token).await {
            // The lease expires by itself; the next poll of this feed waits at most its TTL.
            tracing::warn!(lease = %turn.lease_name, error = %e, "could not release poll lease");
        }
    }

    /// Waits (bounded) until the outbox has published through `seq`.
    pub(crate) async fn await_published(&self, seq: u64) {
        self.outbox_kick.notify_one();
        let mut published = self.outbox_published.subscribe();
        let deadline = tokio::time::Instant::now() + PUBLISH_FLUSH_WAIT;
        if *published.borrow() >= seq {
            // Normally the drainer was quicker. But a sequence committed just now is past
            // the store's published position, unless that was published: if Redis lost
            // its last writes (a crash, a failover) and its sequence restarted below ours,
            // the store says so, and the wait goes on from its position.
            match tokio::time::timeout_at(deadline, self.store.outbox_published_seq()).await {
                Ok(Ok(done)) if done < seq => {
                    self.outbox_published.send_replace(done);
                }
                _ => return,
            }
        }
        loop {
            if *published.borrow_and_update() >= seq {
                return;
            }
            let wait = tokio::time::timeout(FLUSH_RECHECK, published.changed());
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(seq, "event committed but not yet published; the outbox will publish it");
                return;
            }
            if wait.await.is_err() {
                // Another relay may hold the outbox lease: its progress is in the store.
                // The store is the truth either way: a position below ours means Redis
                // lost its last writes (a crash, a failover), and the sequence restarted.
                let read = tokio::time::timeout_at(deadline, self.store.outbox_published_seq()).await;
                if let Ok(Ok(done)) = read {
                    self.outbox_published.send_if_modified(|cur| {
                        let moved = done != *cur;
                        *cur = done;
                        moved
                    });
                }
            }
        }
    }
}

/// A feed's turn: the local lock and the cross-relay lease.
struct Turn {
    _guard: OwnedMutexGuard<()>,
    lease_name: String,
    token: LeaseToken,
    /// When the lease was asked for: the poll's fetching is timed from here.
    asked_at: tokio::time::Instant,
}

/// Sorts a poll's deliveries into stream order (a fetch hands out redeliveries before new
/// messages; stream order is what the protocol promises) and plans the reply.
fn plan_in_order<H, T>(
    deliveries: &mut [Delivery<H>],
    plan: &impl Fn(&[Delivery<H>]) -> (T, Vec<Settle>),
) -> (T, Vec<Settle>) {
    deliveries.sort_by_key(|d| d.stream_seq);
    plan(deliveries)
}

/// A planned poll reply, and the acks that must follow it once it is written.
pub struct PollTicket<T, S: FriendStore, B: EventBus, R: RoleService> {
    pub reply: T,
    settlement: Option<Settlement<S, B, R>>,
}

impl<T: PollReply, S: FriendStore, B: EventBus, R: RoleService> PollTicket<T, S, B, R> {
    fn empty() -> Self {
        Self { reply: T::default(), settlement: None }
    }

    pub fn into_parts(self) -> (T, Option<Settlement<S, B, R>>) {
        (self.reply, self.settlement)
    }
}

/// The acks of a poll and its turn. [`Settlement::finish`] applies them in the
/// background; dropping it unfinished counts as "the reply was not written".
pub struct Settlement<S: FriendStore, B: EventBus, R: RoleService> {
    relay: Arc<Relay<S, B, R>>,
    settles: Vec<(B::Handle, Settle)>,
    /// None once finished.
    turn: Option<Turn>,
    /// The broker may hold messages of this poll that the relay never received.
    in_doubt: bool,
}

impl<S: FriendStore, B: EventBus, R: RoleService> Settlement<S, B, R> {
    /// When the reply must be written by (see [`POLL_REPLY_BUDGET`]).
    pub fn reply_deadline(&self) -> Option<tokio::time::Instant> {
        self.turn.as_ref().map(|turn| turn.asked_at + POLL_REPLY_BUDGET)
    }

    /// `written`: the reply reached the client, so ack as planned; otherwise nak everything
    /// so the next poll gets it all again, in order.
    pub fn finish(mut self, written: bool) -> tokio::task::JoinHandle<()> {
        let mut settles = std::mem::take(&mut self.settles);
        let turn = self.turn.take();
        let relay = Arc::clone(&self.relay);
        let mut in_doubt = self.in_doubt;
        if !written {
            settles.iter_mut().for_each(|(_, s)| *s = Settle::Nak);
        }
        tokio::spawn(async move {
            if !settles.is_empty() {
                if let Err(e) = relay.bus.settle(settles).await {
                    // Some acks or naks may not have been applied: those messages are
                    // redelivered after the consumer's ack wait, which the lease outlasts.
                    tracing::warn!(error = %e, "poll acks failed; events will be redelivered");
                    in_doubt = true;
                }
            }
            if let Some(turn) = turn {
                relay.end_turn(turn, in_doubt).await;
            }
        })
    }
}

/// A poll between taking its turn and planning its reply: what it has fetched so far, and
/// the settlement that will own the turn and the acks.
struct Fetching<S: FriendStore, B: EventBus, R: RoleService> {
    /// None once handed to the reply.
    settlement: Option<Settlement<S, B, R>>,
    deliveries: Vec<Delivery<B::Handle>>,
}

impl<S: FriendStore, B: EventBus, R: RoleService> Fetching<S, B, R> {
    fn mark_in_doubt(&mut self) {
        if let Some(settlement) = &mut self.settlement {
            settlement.in_doubt = true;
        }
    }

    /// Ends the turn of a poll that received nothing, and waits for it.
    async fn end(mut self) {
        if let Some(mut settlement) = self.settlement.take() {
            if let Some(turn) = settlement.turn.take() {
                settlement.relay.end_turn(turn, settlement.in_doubt).await;
            }
        }
    }
}

impl<S: FriendStore, B: EventBus, R: RoleService> Drop for Fetching<S, B, R> {
    fn drop(&mut self) {
        // Dropped mid-fetch: the settlement (dropped right after) naks what was received;
        // a round cut short may have been handed more by the broker.
        if let Some(settlement) = &mut self.settlement {
            settlement.in_doubt = true;
            settlement.settles.extend(self.deliveries.drain(..).map(|d| (d.handle, Settle::Nak)));
        }
    }
}

impl<S: FriendStore, B: EventBus, R: RoleService> Drop for Settlement<S, B, R> {
    fn drop(&mut self) {
        // Without a runtime (it is shutting down) the lease expires and the broker
        // redelivers after its ack wait: late, but nothing is lost.
        if self.turn.is_some() && tokio::runtime::Handle::try_current().is_ok() {
            let unfinished = Settlement {
                relay: Arc::clone(&self.relay),
                settles: std::mem::take(&mut self.settles),
                turn: self.turn.take(),
                in_doubt: self.in_doubt,
            };
            unfinished.finish(false);
        }
    }
}
