//! What the GM view reads: the GM's players grouped by host with unread counts, history
//! pages with each message's delivery status, and read marks.
//!
//! Unread counts come from the history stream, not from a counter the send path would
//! have to keep: a conversation is unread past its read mark (a `GM_HISTORY` sequence in
//! Redis). One direct get finds the newest player message of every conversation; only
//! conversations with something past their mark are counted, and only up to a cap.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use super::Console;
use crate::adapters::nats::names;
use crate::domain::session::{Role, Session};
use crate::domain::{GmId, HostId, RelayError, Uid};

/// Players listed for one GM; a GM with more sees this many and the total.
pub const MAX_ROSTER: usize = 1000;

/// Unread messages counted per conversation; past it the count shows as "20+".
pub const UNREAD_COUNT_CAP: usize = 20;

/// Conversations whose unread messages are counted exactly per roster load; past it they
/// show as at least one, so a GM back from leave does not make one load cost hundreds of
/// requests.
pub const MAX_UNREAD_COUNTED: usize = 50;

/// Messages per history page.
pub const HISTORY_PAGE: usize = 30;

/// A history read first waits at most this for this relay's own pending history copies
/// (they are written just behind the sends), so that what it answers includes the
/// messages this relay has already confirmed.
const HISTORY_SETTLE_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlayerView {
    pub uid: Uid,
    pub host: HostId,
    /// Player messages past the read mark, at most [`UNREAD_COUNT_CAP`].
    pub unread: usize,
    /// There may be more than `unread`.
    pub unread_more: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GmView {
    pub gm: GmId,
    pub name: String,
    pub role: Role,
    pub online: bool,
    /// Sorted by host, then uid.
    pub players: Vec<PlayerView>,
    pub players_total: u64,
    /// `GS_TO_GM` sequence when the view was read: the live feed starts after it.
    pub live_after: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MessageView {
    /// `GM_HISTORY` sequence (pages are cut there).
    pub seq: u64,
    pub id: String,
    /// `gm` or `player`.
    pub from: &'static str,
    pub text: String,
    pub ts: i64,
    pub host: HostId,
    /// For GM messages: the sequence in `GM_TO_HOST`.
    pub delivery_seq: Option<u64>,
    /// For GM messages: whether the player's server has taken it; None while unknown.
    pub taken: Option<bool>,
}

impl Console {
    /// The signed-in GM's view, or None when the account is not a GM (an ops-only
    /// supervisor).
    pub async fn gm_view(&self, session: &Session) -> Result<Option<GmView>, RelayError> {
        let store = self.relay.store();
        let bus = self.relay.bus();
        let gm = session.gm;
        let Some(profile) = store.gm_profile(gm).await? else {
            return Ok(None);
        };
        self.settle_history().await;
        // Read first: a message arriving while the rest is read is then counted twice
        // (unread and live), never missed.
        let live_after = bus.stream_figures(names::STREAM_TO_GM).await?.last_seq;
        let (players_total, mut players) = store.gm_players(gm, MAX_ROSTER).await?;
        players.sort_by_key(|(uid, host)| (*host, *uid));
        let marks = store.read_marks(gm).await?;
        let uids: Vec<Uid> = players.iter().map(|(uid, _)| *uid).collect();
        let last = bus.last_player_messages(gm, &uids).await?;
        let mut counted = 0;
        let mut views = Vec::with_capacity(players.len());
        for (uid, host) in players {
            let mark = marks.get(&uid).copied().unwrap_or(0);
            let (unread, unread_more) = match last.get(&uid) {
                Some(&newest) if newest > mark => {
                    if counted < MAX_UNREAD_COUNTED {
                        counted += 1;
                        let n = bus.count_player_messages_after(gm, uid, mark, UNREAD_COUNT_CAP).await?;
                        (n.max(1), n >= UNREAD_COUNT_CAP)
                    } else {
                        (1, true)
                    }
                }
                _ => (0, false),
            };
            views.push(PlayerView { uid, host, unread, unread_more });
        }
        Ok(Some(GmView {
            gm,
            name: profile.name,
            role: session.role,
            online: profile.online,
            players: views,
            players_total,
            live_after,
        }))
    }

    /// Whether the host has taken the GM message at `delivery_seq`, from the dashboard's
    /// figures (refreshed about once a second while looked at); None while unknown.
    pub fn taken(&self, host: HostId, delivery_seq: u64) -> Option<bool> {
        self.monitor.watch();
        if self.monitor.snapshot().at_ms == 0 {
            return None;
        }
        Some(self.monitor.host(host).is_some_and(|h| h.acked_through >= delivery_seq))
    }

    /// A page of the conversation with `uid`, older than `before` (None = newest), oldest
    /// first, and whether older messages may exist.
    pub async fn history(
        &self,
        gm: GmId,
        uid: Uid,
        before: Option<u64>,
    ) -> Result<(Vec<MessageView>, bool), RelayError> {
        self.settle_history().await;
        let (entries, more) = self.relay.bus().history_page(gm, uid, before, HISTORY_PAGE).await?;
        let mut taken_cache: HashMap<(HostId, u64), Option<bool>> = HashMap::new();
        let messages = entries
            .into_iter()
            .map(|e| {
                let taken = e.delivery_seq.filter(|_| e.from_gm).and_then(|seq| {
                    *taken_cache.entry((e.event.host, seq)).or_insert_with(|| self.taken(e.event.host, seq))
                });
                MessageView {
                    seq: e.seq,
                    id: e.event.id,
                    from: if e.from_gm { "gm" } else { "player" },
                    text: e.event.text.unwrap_or_default(),
                    ts: e.event.ts,
                    host: e.event.host,
                    delivery_seq: e.delivery_seq,
                    taken,
                }
            })
            .collect();
        Ok((messages, more))
    }

    /// Marks the conversation with `uid` read up to its newest player message.
    pub async fn mark_read(&self, gm: GmId, uid: Uid) -> Result<(), RelayError> {
        self.settle_history().await;
        let last = self.relay.bus().last_player_messages(gm, &[uid]).await?;
        if let Some(&seq) = last.get(&uid) {
            self.relay.store().mark_read(gm, uid, seq).await?;
        }
        Ok(())
    }

    async fn settle_history(&self) {
        if !self.relay.bus().flush_history(HISTORY_SETTLE_WAIT).await {
            tracing::warn!("history copies still being written; this read may miss the newest messages");
        }
    }
}
