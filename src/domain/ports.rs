//! The small interfaces the relay's rules need from the outside world. Adapters implement
//! them: Redis for [`FriendStore`], NATS JetStream for [`EventBus`], HTTP for
//! [`RoleService`]. Nothing here knows which.

use std::future::Future;
use std::time::Duration;

use super::error::RelayError;
use super::event::Envelope;
use super::ids::{GmId, HostId, Uid};
use super::text::GmName;

/// A chat message the broker has stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its sequence in its stream.
    pub seq: u64,
    /// The broker already had a message with this event id (a retry within the
    /// de-duplication window): nothing new was stored.
    pub duplicate: bool,
}

/// Where an event goes; the bus turns it into a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `gm.to.host.<host>`: chat to players and friend/presence events for a host.
    ToHost(HostId),
    /// `gs.to.gm.<gm>`: players' chat to a GM.
    ToGm(GmId),
}

/// A durable feed a legacy poll reads from. Each has its own consumer, so the feeds never
/// steal each other's events (nor the native `host_<n>` consumers').
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feed {
    /// Chat to players of one host (GS `receive`).
    HostChat(HostId),
    /// Friend events of one host (GS `relation`).
    HostRelation(HostId),
    /// Chat from players to every GM (GM `receive`).
    GmChat,
}

impl Feed {
    /// Stable name for locks, leases and metrics.
    pub fn key(&self) -> String {
        match self {
            Feed::HostChat(h) => format!("host_chat:{h}"),
            Feed::HostRelation(h) => format!("host_relation:{h}"),
            Feed::GmChat => "gm_chat".to_owned(),
        }
    }
}

/// One fetched message. `event` is `None` when the payload is not a valid envelope: such a
/// message is acknowledged and logged, never served and never allowed to block a feed.
#[derive(Debug)]
pub struct Delivery<H> {
    pub stream_seq: u64,
    pub event: Option<Envelope>,
    pub handle: H,
}

/// A fetch round that failed.
#[derive(Debug)]
pub struct FetchFailed {
    pub error: RelayError,
    /// The request may have reached the broker, which may then have handed out messages
    /// that never arrived: they stay unsettled until the consumer's ack wait.
    pub requested: bool,
}

/// What to tell the broker about one delivery once the reply is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done: never deliver again.
    Ack,
    /// Not served this time: deliver again first, in order.
    Nak,
}

pub trait EventBus: Send + Sync + 'static {
    /// A fetched message's handle for acknowledging it.
    type Handle: Send + 'static;

    /// Publishes and waits for the broker's acknowledgement (stored), with the event id as
    /// de-duplication key. Returns the event's sequence in its stream.
    fn publish(&self, route: Route, event: &Envelope)
        -> impl Future<Output = Result<u64, RelayError>> + Send;

    /// Publishes a chat message as [`EventBus::publish`] does, then records a copy in the
    /// conversation's history (best effort: the delivery is what the reply promises).
    fn publish_chat(
        &self,
        route: Route,
        event: &Envelope,
    ) -> impl Future<Output = Result<Stored, RelayError>> + Send;

    /// Publishes several events given in commit order and waits for their acknowledgements,
    /// never sending an event before the earlier ones it must stay behind were acknowledged
    /// (see [`crate::domain::order::publish_rounds`]). Returns how many of the leading
    /// events were acknowledged, so the caller knows the safe prefix.
    fn publish_ordered(
        &self,
        events: &[(Route, Envelope)],
    ) -> impl Future<Output = (usize, Option<RelayError>)> + Send;

    /// Fetches what is waiting on a feed, at most `max`, without waiting for more, and
    /// ends by `until` (a round still running then fails, `requested` telling whether the
    /// broker may have handed anything out). Each message is appended to `into` as it
    /// arrives, so a round that fails or is dropped part-way leaves what it received with
    /// the caller, to be served or nak'd.
    fn fetch<'a>(
        &'a self,
        feed: Feed,
        max: usize,
        into: &'a mut Vec<Delivery<Self::Handle>>,
        until: tokio::time::Instant,
    ) -> impl Future<Output = Result<(), FetchFailed>> + Send + 'a;

    /// Makes sure the native consumer `host_<n>` exists, so a game server can bind it.
    fn ensure_host_consumer(&self, host: HostId) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// Acks and naks, and returns once the broker has applied them, so a following fetch
    /// sees their effect.
    fn settle(
        &self,
        settles: Vec<(Self::Handle, Settle)>,
    ) -> impl Future<Output = Result<(), RelayError>> + Send;
}

/// Where the GM may send: the player's host, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayerLink {
    pub gm: GmId,
    pub host: HostId,
}

/// A player of a host, as a game server that lost its state needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RosterEntry {
    pub uid: Uid,
    pub gm: GmId,
    pub gm_name: String,
    pub gm_online: bool,
    /// The player's latest friend-event revision.
    pub rev: u64,
}

/// One item waiting in the outbox; `seq` grows by one per committed change.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub seq: u64,
    pub event: Envelope,
}

/// A held lease; only the holder's token can renew or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken(pub String);

/// Account and friendship state. Every mutating call is atomic and, where the change must
/// be announced, writes its event to the outbox in the same step, returning the outbox seq.
pub trait FriendStore: Send + Sync + 'static {
    /// errno 1 if the GM exists. Marks the GM online.
    fn create_gm(&self, gm: GmId, name: &GmName) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// The checks `add` makes before asking the role service: errno 2, then 3.
    fn check_add(&self, gm: GmId, uid: Uid) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// Re-checks (2, 3) and claims the player for the GM; returns the outbox seq.
    fn add_friend(
        &self,
        gm: GmId,
        host: HostId,
        uid: Uid,
        event_id: &str,
        ts: i64,
    ) -> impl Future<Output = Result<u64, RelayError>> + Send;

    /// Checks 2, 5, 4 in that order, then ends the friendship; returns the outbox seq.
    fn remove_friend(
        &self,
        gm: GmId,
        uid: Uid,
        event_id: &str,
        ts: i64,
    ) -> impl Future<Output = Result<u64, RelayError>> + Send;

    /// errno 2 if the GM does not exist. Returns the last outbox seq written, if the GM was
    /// offline and has players (one presence event per host).
    fn set_online(
        &self,
        gm: GmId,
        event_id: &str,
        ts: i64,
    ) -> impl Future<Output = Result<Option<u64>, RelayError>> + Send;

    /// [`RelayError::NotOnline`] if the GM was not online.
    fn set_offline(
        &self,
        gm: GmId,
        event_id: &str,
        ts: i64,
    ) -> impl Future<Output = Result<Option<u64>, RelayError>> + Send;

    /// GM `send` checks: errno 4 (not in the GM's friends), then 5 (owned by another GM).
    fn gm_chat_target(&self, gm: GmId, uid: Uid) -> impl Future<Output = Result<HostId, RelayError>> + Send;

    /// The player's GM and host; errno 5 if the player has no GM.
    fn player_link(&self, uid: Uid) -> impl Future<Output = Result<PlayerLink, RelayError>> + Send;

    /// Online GMs with at least one player on `host`, at most `limit`.
    fn online_gms_on_host(
        &self,
        host: HostId,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<GmId>, RelayError>> + Send;

    /// Takes the named lease if free.
    fn try_lease(
        &self,
        name: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<LeaseToken>, RelayError>> + Send;

    /// How much longer the named lease is held, if it is.
    fn lease_time_left(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Duration>, RelayError>> + Send;

    /// Extends a held lease; false if it was lost.
    fn renew_lease(
        &self,
        name: &str,
        token: &LeaseToken,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, RelayError>> + Send;

    fn release_lease(
        &self,
        name: &str,
        token: &LeaseToken,
    ) -> impl Future<Output = Result<(), RelayError>> + Send;

    /// The oldest outbox items, in order, at most `max`.
    fn outbox_peek(&self, max: usize) -> impl Future<Output = Result<Vec<OutboxItem>, RelayError>> + Send;

    /// Removes the oldest `count` items, ending at `last_seq`, if `token` still holds the
    /// outbox lease named `lease`. False if the lease was lost (nothing removed).
    fn outbox_remove(
        &self,
        lease: &str,
        token: &LeaseToken,
        count: usize,
        last_seq: u64,
    ) -> impl Future<Output = Result<bool, RelayError>> + Send;

    /// The seq of the newest item known published (0 if none yet).
    fn outbox_published_seq(&self) -> impl Future<Output = Result<u64, RelayError>> + Send;

    /// Items waiting.
    fn outbox_len(&self) -> impl Future<Output = Result<u64, RelayError>> + Send;

    /// One page of a host's players with their GM, from `cursor` (0 = start); returns the
    /// next cursor, 0 when done.
    fn host_roster(
        &self,
        host: HostId,
        cursor: u64,
        page: usize,
    ) -> impl Future<Output = Result<(Vec<RosterEntry>, u64), RelayError>> + Send;

    /// Whether the store answers.
    fn ping(&self) -> impl Future<Output = Result<(), RelayError>> + Send;
}

/// The answer of the role service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleVerdict {
    Exists,
    Unknown,
}

#[derive(Debug, thiserror::Error)]
#[error("role service unavailable: {0}")]
pub struct RoleUnavailable(pub String);

/// Asks the game's role service whether a player exists on a host (hosts >= 1000 only).
pub trait RoleService: Send + Sync + 'static {
    fn check(
        &self,
        host: HostId,
        uid: Uid,
    ) -> impl Future<Output = Result<RoleVerdict, RoleUnavailable>> + Send;
}
