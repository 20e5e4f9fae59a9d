//! `gm-relay import-legacy`: moves a deployment of the original Python system onto
//! gm-relay, reading the original's Redis (its keys are listed in the README, "Migrating
//! from the original system") and writing the relay's Redis and streams.
//!
//! Three steps, so that each can be looked at on its own:
//! 1. [`read_source`] reads every key of the original's layout with read-only commands
//!    (`SCAN`, `GET`, `SMEMBERS`, `LRANGE`, `HGETALL`): the source is never written.
//! 2. [`plan`] turns that into what the relay should hold — a pure function. The original
//!    accepted ids Python's `int()` took (`"007"`, `" 5"`), so such items are reported and
//!    skipped, as are queued messages of players without a GM (nobody to deliver them to)
//!    and texts the relay would refuse (not base64 of 1-500 UTF-8 characters).
//! 3. [`execute`] writes it. GMs and players go through Lua scripts that write exactly the
//!    keys `create` and `add` write and put pending friend-adds and -removes into the
//!    outbox as `friend_add` / `friend_remove` events with a `rev`, atomically with a
//!    marker per item; the outbox is then drained as the relay drains it. Queued messages
//!    are published in order per conversation (`gm.to.host.<host>` / `gs.to.gm.<gm>`), each
//!    marked once acknowledged.
//!
//! Idempotent: a second run finds every marker and writes nothing. Event ids derive from
//! the source (`legacy-gm-<uid>-<n>-<hash>` for the n-th oldest message to a player, ...),
//! so a message published by a run that died before marking it is dropped as a duplicate
//! by the stream when the next run publishes it again — if that run starts within the
//! streams' 2-minute de-duplication window; later, at most the messages in flight at the
//! interruption (one per conversation being imported) can be stored twice.
//!
//! The original must not take traffic while it is imported (its polls pop queued messages
//! and would shift the positions the ids derive from); a dry run can be done at any time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};

use crate::adapters::nats::{JetStreamBus, StreamLimits};
use crate::adapters::redis::import::{Imported, PlayerState};
use crate::adapters::redis::RedisStore;
use crate::adapters::role::RoleClient;
use crate::config::Config;
use crate::domain::event::now_ms;
use crate::domain::ports::{EventBus, FriendStore, Route};
use crate::domain::text::ChatText;
use crate::domain::{Envelope, GmId, GmName, HostId, RelayError, Uid};
use crate::metrics::Metrics;
use crate::relay::{ChatLimits, Relay};

/// Keys asked for per `SCAN` round trip.
const SCAN_COUNT: usize = 1000;

/// Commands per read pipeline on the source: large enough to read a big keyspace in
/// seconds, small enough that one reply stays far below the response timeout.
const READ_BATCH: usize = 500;

/// Elements per `LRANGE` of a queued-message list: a player may have queued thousands.
const LIST_PAGE: isize = 1000;

/// A source command that takes longer than this means the source is unwell: stop.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Conversations published at once. Messages of one conversation go one after another
/// (their order is the delivery order); across conversations many PubAcks are in flight.
const PUBLISH_CONCURRENCY: usize = 32;

/// How long the import waits for the outbox to empty (another relay may be draining it).
const OUTBOX_DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// Bound on writing the last history copies before the import reports: the queue holds
/// at most a few seconds of copies.
const HISTORY_FLUSH_WAIT: Duration = Duration::from_secs(30);

/// Bound on the last flush of the import's connection before it reports.
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Pause between looks at an outbox that another relay is draining.
const OUTBOX_RECHECK: Duration = Duration::from_millis(50);

/// Skipped items listed one per line in a report; the rest are counted.
pub const REPORT_MAX_SKIPPED: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot read the original's Redis at {url}: {source}")]
    Source { url: String, source: redis::RedisError },
    #[error("--from is the relay's own Redis ({0}); import from the original system's")]
    SameRedis(String),
    #[error("cannot connect to NATS at {url}: {source}")]
    Nats { url: String, source: async_nats::ConnectError },
    #[error("cannot connect to the relay's Redis at {url}: {source}")]
    Target { url: String, source: redis::RedisError },
    #[error("cannot set up JetStream streams: {0}")]
    Streams(crate::adapters::nats::StreamSetupError),
    #[error("writing to the relay failed (run the import again; it continues where it stopped): {0}")]
    Write(RelayError),
    #[error("the outbox did not empty within {0:?}; is a relay draining it? run the import again")]
    OutboxStuck(Duration),
}

// ---------------------------------------------------------------------------------------
// 1. Reading the source

/// Everything of the original's layout, as raw bytes (ids are whatever it stored).
#[derive(Debug, Default, Clone)]
pub struct LegacyData {
    /// `gm_account:<gm>:name`.
    pub gm_names: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `gm_account:<gm>:friend`.
    pub gm_friends: BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>>,
    /// `gm_online_list`.
    pub online: BTreeSet<Vec<u8>>,
    /// `gs_usernum:<uid>:hostnum`.
    pub player_host: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `gs_usernum:<uid>:friend`: the player's GM.
    pub player_gm: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `gs_usernum:<uid>:msg_from_gm`, oldest first.
    pub to_player: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
    /// `gs_usernum:<uid>:msg_from_gs`, oldest first.
    pub to_gm: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
    /// `apply_frd_list`.
    pub pending_add: BTreeSet<Vec<u8>>,
    /// `remove_frd_list`: uid → host.
    pub pending_remove: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Keys of no interest (`gs_hostnum:*`, the never-cleared `*_newmsg_list` sets, the
    /// relay's own `gmr:*` keys when both share a server, anything else).
    pub other_keys: u64,
}

/// Which part of the layout a key is.
enum SourceKey {
    GmName(Vec<u8>),
    GmFriends(Vec<u8>),
    PlayerHost(Vec<u8>),
    PlayerGm(Vec<u8>),
    ToPlayer(Vec<u8>),
    ToGm(Vec<u8>),
    Online,
    PendingAdd,
    PendingRemove,
    Other,
}

fn classify(key: &[u8]) -> SourceKey {
    let between = |prefix: &[u8], suffix: &[u8]| {
        key.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(suffix)).map(<[u8]>::to_vec)
    };
    match key {
        b"gm_online_list" => return SourceKey::Online,
        b"apply_frd_list" => return SourceKey::PendingAdd,
        b"remove_frd_list" => return SourceKey::PendingRemove,
        _ => {}
    }
    if let Some(id) = between(b"gm_account:", b":name") {
        SourceKey::GmName(id)
    } else if let Some(id) = between(b"gm_account:", b":friend") {
        SourceKey::GmFriends(id)
    } else if let Some(id) = between(b"gs_usernum:", b":hostnum") {
        SourceKey::PlayerHost(id)
    } else if let Some(id) = between(b"gs_usernum:", b":friend") {
        SourceKey::PlayerGm(id)
    } else if let Some(id) = between(b"gs_usernum:", b":msg_from_gm") {
        SourceKey::ToPlayer(id)
    } else if let Some(id) = between(b"gs_usernum:", b":msg_from_gs") {
        SourceKey::ToGm(id)
    } else {
        SourceKey::Other
    }
}

/// Reads the original's keys from `url` with read-only commands.
pub async fn read_source(url: &str) -> Result<LegacyData, MigrateError> {
    let err = |source| MigrateError::Source { url: url.to_owned(), source };
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(SOURCE_TIMEOUT))
        .set_response_timeout(Some(SOURCE_TIMEOUT));
    let client = redis::Client::open(url).map_err(err)?;
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await.map_err(err)?;

    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SCAN may return a key more than once.
    keys.sort();
    keys.dedup();

    let mut data = LegacyData::default();
    let mut strings = Vec::new();
    let mut sets = Vec::new();
    let mut lists = Vec::new();
    for key in keys {
        match classify(&key) {
            SourceKey::GmName(_) | SourceKey::PlayerHost(_) | SourceKey::PlayerGm(_) => strings.push(key),
            SourceKey::GmFriends(_) | SourceKey::Online | SourceKey::PendingAdd => sets.push(key),
            SourceKey::ToPlayer(_) | SourceKey::ToGm(_) => lists.push(key),
            SourceKey::PendingRemove => {
                let pairs: Vec<(Vec<u8>, Vec<u8>)> =
                    redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.map_err(err)?;
                data.pending_remove.extend(pairs);
            }
            SourceKey::Other => data.other_keys += 1,
        }
    }
    for chunk in strings.chunks(READ_BATCH) {
        let mut pipe = redis::pipe();
        chunk.iter().for_each(|k| {
            pipe.cmd("GET").arg(k);
        });
        let values: Vec<Option<Vec<u8>>> = pipe.query_async(&mut conn).await.map_err(err)?;
        for (key, value) in chunk.iter().zip(values) {
            let Some(value) = value else { continue };
            match classify(key) {
                SourceKey::GmName(id) => data.gm_names.insert(id, value),
                SourceKey::PlayerHost(id) => data.player_host.insert(id, value),
                SourceKey::PlayerGm(id) => data.player_gm.insert(id, value),
                _ => None,
            };
        }
    }
    for chunk in sets.chunks(READ_BATCH) {
        let mut pipe = redis::pipe();
        chunk.iter().for_each(|k| {
            pipe.cmd("SMEMBERS").arg(k);
        });
        let members: Vec<BTreeSet<Vec<u8>>> = pipe.query_async(&mut conn).await.map_err(err)?;
        for (key, members) in chunk.iter().zip(members) {
            match classify(key) {
                SourceKey::GmFriends(id) => {
                    data.gm_friends.insert(id, members);
                }
                SourceKey::Online => data.online = members,
                SourceKey::PendingAdd => data.pending_add = members,
                _ => {}
            }
        }
    }
    for key in lists {
        // LPUSH in, RPOP out: the oldest is at the end.
        let mut items: Vec<Vec<u8>> = Vec::new();
        let mut start = 0isize;
        loop {
            let page: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&key)
                .arg(start)
                .arg(start + LIST_PAGE - 1)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            let full = page.len() as isize == LIST_PAGE;
            items.extend(page);
            if !full {
                break;
            }
            start += LIST_PAGE;
        }
        items.reverse();
        match classify(&key) {
            SourceKey::ToPlayer(id) => data.to_player.insert(id, items),
            SourceKey::ToGm(id) => data.to_gm.insert(id, items),
            _ => None,
        };
    }
    Ok(data)
}

// ---------------------------------------------------------------------------------------
// 2. Planning

/// A GM to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmImport {
    pub gm: GmId,
    pub name: GmName,
    pub online: bool,
}

/// The queued messages of one conversation, oldest first.
#[derive(Debug, Clone)]
pub struct ConversationImport {
    pub route: Route,
    pub uid: Uid,
    pub events: Vec<Envelope>,
}

/// Something in the source that will not be imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The source key (and element) it came from.
    pub source: String,
    pub reason: String,
}

/// What the relay should hold after the import.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub gms: Vec<GmImport>,
    pub players: Vec<PlayerState>,
    pub conversations: Vec<ConversationImport>,
    pub skipped: Vec<Skipped>,
    /// Inconsistencies of the source that the import settles (e.g. a player whose GM's
    /// friend set lacks it), one line each.
    pub notes: Vec<String>,
    /// `ts` of every imported event.
    pub ts: i64,
}

/// The source's bytes as a readable, quoted string.
fn show(raw: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(raw))
}

fn skip(plan: &mut Plan, source: String, reason: impl Into<String>) {
    plan.skipped.push(Skipped { source, reason: reason.into() });
}

const NOT_CANONICAL: &str = "not a canonical decimal id (the original accepted what Python's int() took, \
                             e.g. \"007\" or \" 5\"; the relay accepts only canonical ids)";

/// FNV-1a: a stable hash of a message's bytes for its event id (std's hasher may change
/// between Rust releases; ids must not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Marker and event ids, derived from the source so that every run computes the same.
pub mod ids {
    use crate::domain::{GmId, HostId, Uid};

    pub fn gm_marker(gm: GmId) -> String {
        format!("gm:{gm}")
    }

    pub fn player_marker(uid: Uid) -> String {
        format!("player:{uid}")
    }

    pub fn chat_marker(event_id: &str) -> String {
        format!("chat:{event_id}")
    }

    pub fn add_event(uid: Uid, gm: GmId, host: HostId) -> String {
        format!("legacy-add-{uid}-{gm}-{host}")
    }

    pub fn remove_event(uid: Uid, host: HostId) -> String {
        format!("legacy-remove-{uid}-{host}")
    }

    /// The `n`-th oldest queued message of a player, `dir` `gm` (to the player) or `gs`.
    pub fn chat_event(dir: &str, uid: Uid, n: usize, hash: u64) -> String {
        format!("legacy-{dir}-{uid}-{n}-{hash:016x}")
    }
}

/// Decides what to import from `data`; `ts` stamps the imported events.
pub fn plan(data: &LegacyData, ts: i64) -> Plan {
    let mut plan = Plan { ts, ..Plan::default() };

    // GMs: a GM exists when its name is non-empty (as the original's is_gm_account_exist).
    let mut gms: BTreeMap<GmId, GmName> = BTreeMap::new();
    for (raw, name) in &data.gm_names {
        let source = format!("gm_account:{}:name", String::from_utf8_lossy(raw));
        if name.is_empty() {
            continue;
        }
        let Some(gm) = GmId::parse(raw) else {
            skip(&mut plan, source, format!("GM {}: {NOT_CANONICAL}", show(raw)));
            continue;
        };
        let Some(name) = GmName::parse(name) else {
            skip(&mut plan, source, format!("name {} is not UTF-8 of 1-64 characters", show(name)));
            continue;
        };
        gms.insert(gm, name.clone());
        plan.gms.push(GmImport { gm, name, online: data.online.contains(raw) });
    }
    for raw in &data.online {
        if data.gm_names.get(raw).is_none_or(|n| n.is_empty()) {
            plan.notes.push(format!("gm_online_list holds {} which is no GM: ignored", show(raw)));
        }
    }

    // Players: `gs_usernum:<uid>:friend` is the original's record of a player's GM (what
    // made it refuse a second GM and route the player's messages).
    let mut linked: BTreeMap<Vec<u8>, (Uid, GmId, HostId)> = BTreeMap::new();
    for (raw_uid, raw_gm) in &data.player_gm {
        let source = format!("gs_usernum:{}:friend", String::from_utf8_lossy(raw_uid));
        let Some(uid) = Uid::parse(raw_uid) else {
            skip(&mut plan, source, format!("player {}: {NOT_CANONICAL}", show(raw_uid)));
            continue;
        };
        let Some(gm) = GmId::parse(raw_gm).filter(|gm| gms.contains_key(gm)) else {
            skip(&mut plan, source, format!("player {uid}: its GM {} is not an imported GM", show(raw_gm)));
            continue;
        };
        let host = data.player_host.get(raw_uid);
        let Some(host) = host.and_then(|h| HostId::parse(h)) else {
            let why = match host {
                None => "has no gs_usernum:<uid>:hostnum".to_owned(),
                Some(h) => format!("host {}: {NOT_CANONICAL}", show(h)),
            };
            skip(&mut plan, source, format!("player {uid}: {why}"));
            continue;
        };
        if !data.gm_friends.get(raw_gm).is_some_and(|f| f.contains(raw_uid)) {
            plan.notes.push(format!(
                "player {uid}: GM {gm} owns it but its gm_account:{gm}:friend set lacks it; imported as GM {gm}'s"
            ));
        }
        linked.insert(raw_uid.clone(), (uid, gm, host));
    }
    for (raw_gm, friends) in &data.gm_friends {
        for raw_uid in friends {
            if data.player_gm.get(raw_uid) != Some(raw_gm) {
                plan.notes.push(format!(
                    "gm_account:{}:friend lists {} whose GM is {}: stale (a lost race in the original), ignored",
                    String::from_utf8_lossy(raw_gm),
                    show(raw_uid),
                    data.player_gm.get(raw_uid).map_or("none".to_owned(), |g| show(g))
                ));
            }
        }
    }

    // Pending friend events, per player.
    let mut players: BTreeMap<Uid, PlayerState> = BTreeMap::new();
    for (uid, gm, host) in linked.values() {
        players.insert(
            *uid,
            PlayerState {
                uid: *uid,
                friendship: Some((*gm, *host)),
                pending_add: false,
                pending_remove: None,
            },
        );
    }
    for raw_uid in &data.pending_add {
        let source = format!("apply_frd_list {}", show(raw_uid));
        match linked.get(raw_uid) {
            Some((uid, _, _)) => players.get_mut(uid).expect("linked players are planned").pending_add = true,
            None if Uid::parse(raw_uid).is_none() => skip(&mut plan, source, NOT_CANONICAL),
            // The original's relation poll skips these too (no GM to announce).
            None => skip(&mut plan, source, "pending friend-add of a player with no (importable) GM"),
        }
    }
    for (raw_uid, raw_host) in &data.pending_remove {
        let source = format!("remove_frd_list {} → {}", show(raw_uid), show(raw_host));
        let (Some(uid), Some(host)) = (Uid::parse(raw_uid), HostId::parse(raw_host)) else {
            skip(&mut plan, source, NOT_CANONICAL);
            continue;
        };
        players
            .entry(uid)
            .or_insert(PlayerState { uid, friendship: None, pending_add: false, pending_remove: None })
            .pending_remove = Some(host);
    }
    plan.players = players.into_values().collect();

    // Queued messages: delivered to the conversation the player is in now (the original
    // handed them to whoever owned the uid when the host polled).
    for (dir, queues) in [("gm", &data.to_player), ("gs", &data.to_gm)] {
        for (raw_uid, messages) in queues {
            let key = format!("gs_usernum:{}:msg_from_{dir}", String::from_utf8_lossy(raw_uid));
            let Some(&(uid, gm, host)) = linked.get(raw_uid) else {
                let reason = if Uid::parse(raw_uid).is_none() {
                    format!("player {}: {NOT_CANONICAL}", show(raw_uid))
                } else {
                    format!("player {} has no (importable) GM to deliver to", show(raw_uid))
                };
                skip(&mut plan, key, format!("{} queued message(s): {reason}", messages.len()));
                continue;
            };
            let route = if dir == "gm" { Route::ToHost(host) } else { Route::ToGm(gm) };
            let mut events = Vec::new();
            for (n, raw) in messages.iter().enumerate() {
                let Some(text) = ChatText::from_base64(raw) else {
                    skip(
                        &mut plan,
                        format!("{key}[{n}]"),
                        format!("message {} is not base64 of 1-500 UTF-8 characters", show(raw)),
                    );
                    continue;
                };
                let id = ids::chat_event(dir, uid, n, fnv1a(raw));
                events.push(Envelope::chat(id, host, uid, gm, text.as_str(), ts));
            }
            if !events.is_empty() {
                plan.conversations.push(ConversationImport { route, uid, events });
            }
        }
    }
    plan
}

impl Plan {
    pub fn messages(&self) -> usize {
        self.conversations.iter().map(|c| c.events.len()).sum()
    }

    /// Items the import writes: GMs, players and messages (the progress bar's length).
    pub fn items(&self) -> u64 {
        (self.gms.len() + self.players.len() + self.messages()) as u64
    }

    fn markers(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        (
            self.gms.iter().map(|g| ids::gm_marker(g.gm)).collect(),
            self.players.iter().map(|p| ids::player_marker(p.uid)).collect(),
            self.conversations
                .iter()
                .flat_map(|c| c.events.iter().map(|e| ids::chat_marker(&e.id)))
                .collect(),
        )
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let friendships = self.players.iter().filter(|p| p.friendship.is_some()).count();
        let hosts: BTreeSet<HostId> =
            self.players.iter().filter_map(|p| p.friendship.map(|(_, h)| h)).collect();
        let to_host: usize = self
            .conversations
            .iter()
            .filter(|c| matches!(c.route, Route::ToHost(_)))
            .map(|c| c.events.len())
            .sum();
        writeln!(
            f,
            "{} GMs ({} online); {friendships} befriended players on {} hosts; \
             {} pending friend-adds, {} pending friend-removes (as events with their rev); \
             {to_host} queued messages to players (gm.to.host.<host>), {} to GMs (gs.to.gm.<gm>)",
            self.gms.len(),
            self.gms.iter().filter(|g| g.online).count(),
            hosts.len(),
            // A friendship beside a pending removal from its own host is published as an
            // add too (the import script's rule), so hosts end with the friendship.
            self.players
                .iter()
                .filter(|p| {
                    p.friendship.is_some_and(|(_, host)| p.pending_add || p.pending_remove == Some(host))
                })
                .count(),
            self.players.iter().filter(|p| p.pending_remove.is_some()).count(),
            self.messages() - to_host,
        )?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        writeln!(f, "skipped: {}", self.skipped.len())?;
        for s in self.skipped.iter().take(REPORT_MAX_SKIPPED) {
            writeln!(f, "  {}: {}", s.source, s.reason)?;
        }
        if self.skipped.len() > REPORT_MAX_SKIPPED {
            writeln!(f, "  ... and {} more", self.skipped.len() - REPORT_MAX_SKIPPED)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// 3. Executing

/// Per kind of item: written now, found already imported, refused by the target.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub imported: u64,
    pub already: u64,
    pub conflicts: u64,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    pub gms: Tally,
    pub players: Tally,
    pub messages: Tally,
    /// Items the target refused (e.g. a player that already has a GM there), with why.
    pub conflicts: Vec<Skipped>,
    /// Friend events published from the outbox by this run.
    pub events_published: u64,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (what, t) in [("GMs", self.gms), ("players", self.players), ("queued messages", self.messages)] {
            writeln!(
                f,
                "{what}: {} imported, {} already imported by an earlier run, {} refused by the target",
                t.imported, t.already, t.conflicts
            )?;
        }
        for c in self.conflicts.iter().take(REPORT_MAX_SKIPPED) {
            writeln!(f, "  refused {}: {}", c.source, c.reason)?;
        }
        if self.conflicts.len() > REPORT_MAX_SKIPPED {
            writeln!(f, "  ... and {} more", self.conflicts.len() - REPORT_MAX_SKIPPED)?;
        }
        Ok(())
    }
}

/// What a run would find already imported (for a dry run).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AlreadyImported {
    pub gms: usize,
    pub players: usize,
    pub messages: usize,
}

/// Counts the plan's items whose markers the target already holds. Reads only.
pub async fn already_imported(plan: &Plan, target: &RedisStore) -> Result<AlreadyImported, MigrateError> {
    let (gms, players, messages) = plan.markers();
    let count = |set: Vec<bool>| set.into_iter().filter(|b| *b).count();
    Ok(AlreadyImported {
        gms: count(target.import_markers(&gms).await.map_err(MigrateError::Write)?),
        players: count(target.import_markers(&players).await.map_err(MigrateError::Write)?),
        messages: count(target.import_markers(&messages).await.map_err(MigrateError::Write)?),
    })
}

/// Connects to the relay's Redis (`config`), e.g. for [`already_imported`].
pub async fn connect_target(config: &Config) -> Result<RedisStore, MigrateError> {
    RedisStore::connect(&config.redis_url)
        .await
        .map_err(|source| MigrateError::Target { url: config.redis_url.clone(), source })
}

/// Refuses a source that is the relay's own Redis: the import must never write to the
/// original's database.
pub fn check_source(from: &str, config: &Config) -> Result<(), MigrateError> {
    let normalise = |u: &str| u.trim().trim_end_matches('/').to_owned();
    if normalise(from) == normalise(&config.redis_url) {
        return Err(MigrateError::SameRedis(config.redis_url.clone()));
    }
    Ok(())
}

type ImportRelay = Relay<RedisStore, JetStreamBus, RoleClient>;

/// Writes `plan` to the relay's Redis and streams (settings from `config`, as `serve`
/// uses them); `progress` is told of every item done.
pub async fn execute(
    plan: &Plan,
    config: &Config,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ImportReport, MigrateError> {
    let client =
        crate::adapters::nats::connect(&config.nats_url, config.nats_nkey_seed.as_deref(), "gm-relay-import")
            .await
            .map_err(|source| MigrateError::Nats { url: config.nats_url.clone(), source })?;
    let bus =
        JetStreamBus::new(client, Arc::new(Metrics::new())).with_consumer_replicas(config.consumer_replicas);
    let limits = StreamLimits {
        max_age: config.retention_max_age,
        max_bytes: config.retention_max_bytes,
        replicas: config.stream_replicas,
    };
    bus.ensure_streams(&limits).await.map_err(MigrateError::Streams)?;
    let store = connect_target(config).await?;
    // The relay's own outbox drainer publishes the friend events (the role check is off:
    // nothing here adds a friend through `add`).
    let relay: ImportRelay = Relay::new(store, bus, RoleClient::off(), ChatLimits::default());
    let mut report = ImportReport::default();

    let mut usable_gms = BTreeSet::new();
    for g in &plan.gms {
        match relay.store().import_gm(&ids::gm_marker(g.gm), g.gm, &g.name, g.online, plan.ts).await {
            Ok(Imported::Now(_)) => report.gms.imported += 1,
            Ok(Imported::Already) => report.gms.already += 1,
            // Only a refusal is a conflict; an outage ends the run, to be run again.
            Err(RelayError::Rejected(_)) => {
                report.gms.conflicts += 1;
                report.conflicts.push(Skipped {
                    source: format!("GM {}", g.gm),
                    reason: format!("exists in the relay with another name than {:?}", g.name.as_str()),
                });
                progress(1);
                continue;
            }
            Err(e) => return Err(MigrateError::Write(e)),
        }
        usable_gms.insert(g.gm);
        progress(1);
    }

    let mut usable_players = BTreeSet::new();
    let mut hosts = BTreeSet::new();
    for p in &plan.players {
        let refused = |reason: String| Skipped { source: format!("player {}", p.uid), reason };
        if let Some((gm, _)) = p.friendship.filter(|(gm, _)| !usable_gms.contains(gm)) {
            report.players.conflicts += 1;
            report.conflicts.push(refused(format!("its GM {gm} was refused")));
            progress(1);
            continue;
        }
        let remove_id = p.pending_remove.map(|h| ids::remove_event(p.uid, h)).unwrap_or_default();
        let add_id = p.friendship.map(|(gm, h)| ids::add_event(p.uid, gm, h)).unwrap_or_default();
        match relay.store().import_player(&ids::player_marker(p.uid), p, &remove_id, &add_id, plan.ts).await {
            Ok(Imported::Now(_)) => report.players.imported += 1,
            Ok(Imported::Already) => report.players.already += 1,
            Err(e @ RelayError::Rejected(_)) => {
                report.players.conflicts += 1;
                report.conflicts.push(refused(format!("the relay refused it: {e}")));
                progress(1);
                continue;
            }
            Err(e) => return Err(MigrateError::Write(e)),
        }
        usable_players.insert(p.uid);
        if let Some((_, host)) = p.friendship {
            hosts.insert(host);
        }
        progress(1);
    }

    report.events_published = drain_outbox(&relay).await? as u64;
    // A native game server binds its host's consumer; the relay creates it with a host's
    // first player, so the import does too.
    for host in hosts {
        relay.bus().ensure_host_consumer(host).await.map_err(MigrateError::Write)?;
    }

    let (_, _, chat_markers) = plan.markers();
    let done: BTreeSet<String> = chat_markers
        .iter()
        .zip(relay.store().import_markers(&chat_markers).await.map_err(MigrateError::Write)?)
        .filter(|(_, done)| *done)
        .map(|(m, _)| m.clone())
        .collect();
    let (relay, done, usable_players) = (&relay, &done, &usable_players);
    let tallies: Vec<Tally> = futures::stream::iter(&plan.conversations)
        .map(|conversation| async move {
            let mut tally = Tally::default();
            if !usable_players.contains(&conversation.uid) {
                tally.conflicts = conversation.events.len() as u64;
                progress(tally.conflicts);
                return Ok(tally);
            }
            for event in &conversation.events {
                let marker = ids::chat_marker(&event.id);
                if done.contains(&marker) {
                    tally.already += 1;
                } else {
                    relay.bus().publish_chat(conversation.route, event).await.map_err(MigrateError::Write)?;
                    relay.store().set_import_marker(&marker, plan.ts).await.map_err(MigrateError::Write)?;
                    tally.imported += 1;
                }
                progress(1);
            }
            Ok::<_, MigrateError>(tally)
        })
        .buffer_unordered(PUBLISH_CONCURRENCY)
        .try_collect()
        .await?;
    for t in tallies {
        report.messages.imported += t.imported;
        report.messages.already += t.already;
        report.messages.conflicts += t.conflicts;
    }
    if report.messages.conflicts > 0 {
        report.conflicts.push(Skipped {
            source: format!("{} queued messages", report.messages.conflicts),
            reason: "their player was refused".to_owned(),
        });
    }
    if !relay.bus().flush_history(HISTORY_FLUSH_WAIT).await {
        tracing::warn!("some imported messages may be missing from the console history");
    }
    // Bounded: without a connection the flush would wait for one forever, and the import's
    // work (every PubAck) is already done.
    if tokio::time::timeout(FINAL_FLUSH_WAIT, relay.bus().client().flush()).await.is_err() {
        tracing::warn!("NATS did not confirm the final flush; every import write was already acknowledged");
    }
    Ok(report)
}

/// Publishes the outbox (this run's friend events and anything left before) as a relay
/// does, waiting while another relay holds the drainer's lease.
async fn drain_outbox(relay: &ImportRelay) -> Result<usize, MigrateError> {
    let deadline = tokio::time::Instant::now() + OUTBOX_DRAIN_DEADLINE;
    let mut published = 0;
    loop {
        published += relay.drain_outbox().await.map_err(MigrateError::Write)?;
        if relay.store().outbox_len().await.map_err(MigrateError::Write)? == 0 {
            return Ok(published);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(MigrateError::OutboxStuck(OUTBOX_DRAIN_DEADLINE));
        }
        tokio::time::sleep(OUTBOX_RECHECK).await;
    }
}

/// The ms timestamp imported events carry: when the import ran (the original kept none).
pub fn import_ts() -> i64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    fn sample() -> LegacyData {
        let mut d = LegacyData::default();
        d.gm_names.insert(b("7"), b("Alice"));
        d.gm_names.insert(b("007"), b("Bond"));
        d.gm_names.insert(b("8"), b(""));
        d.online.insert(b("7"));
        d.gm_friends.insert(b("7"), [b("1001"), b("1002"), b("1005")].into());
        d.player_gm.insert(b("1001"), b("7"));
        d.player_host.insert(b("1001"), b("3"));
        d.player_gm.insert(b("1002"), b("7"));
        d.player_host.insert(b("1002"), b("03"));
        d.player_gm.insert(b("1003"), b("7"));
        d.player_host.insert(b("1003"), b("4"));
        d.pending_add.insert(b("1001"));
        d.pending_add.insert(b("1009"));
        d.pending_remove.insert(b("1004"), b("3"));
        d.to_player.insert(b("1001"), vec![b("aGk="), b("bm90IGJhc2U2NA"), b("dGhlcmU=")]);
        d.to_player.insert(b("1004"), vec![b("aGk=")]);
        d.to_gm.insert(b("1003"), vec![b("eW8=")]);
        d
    }

    #[test]
    fn plans_what_the_relay_should_hold() {
        let plan = plan(&sample(), 5);
        assert_eq!(
            plan.gms,
            vec![GmImport { gm: GmId(7), name: GmName::parse(b"Alice").unwrap(), online: true }]
        );
        let state = |uid: i64| plan.players.iter().find(|p| p.uid == Uid(uid)).cloned();
        assert_eq!(
            state(1001),
            Some(PlayerState {
                uid: Uid(1001),
                friendship: Some((GmId(7), HostId(3))),
                pending_add: true,
                pending_remove: None
            })
        );
        assert_eq!(state(1002), None, "host 03 is not canonical");
        assert_eq!(state(1003).and_then(|p| p.friendship), Some((GmId(7), HostId(4))));
        assert_eq!(state(1004).and_then(|p| p.pending_remove), Some(HostId(3)));
        let texts: Vec<(Route, Vec<&str>)> = plan
            .conversations
            .iter()
            .map(|c| (c.route, c.events.iter().map(|e| e.text.as_deref().unwrap()).collect()))
            .collect();
        assert_eq!(
            texts,
            vec![(Route::ToHost(HostId(3)), vec!["hi", "there"]), (Route::ToGm(GmId(7)), vec!["yo"])]
        );
        let reasons: Vec<&str> = plan.skipped.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(
            reasons,
            vec![
                "gm_account:007:name",
                "gs_usernum:1002:friend",
                "apply_frd_list \"1009\"",
                "gs_usernum:1001:msg_from_gm[1]",
                "gs_usernum:1004:msg_from_gm",
            ]
        );
        assert!(plan.notes.iter().any(|n| n.contains("1003") && n.contains("lacks it")), "{:?}", plan.notes);
        assert!(plan.notes.iter().any(|n| n.contains("\"1005\"") && n.contains("stale")), "{:?}", plan.notes);
    }

    #[test]
    fn ids_are_stable_across_runs() {
        let (a, b) = (plan(&sample(), 5), plan(&sample(), 9));
        let ids = |p: &Plan| {
            p.conversations.iter().flat_map(|c| c.events.iter().map(|e| e.id.clone())).collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_eq!(ids(&a)[0], format!("legacy-gm-1001-0-{:016x}", fnv1a(b"aGk=")));
        assert_ne!(fnv1a(b"aGk="), fnv1a(b"aGl="));
    }
}
