//! What a legacy poll returns and what it acknowledges, decided from the fetched events
//! alone. Pure functions, so the rules of the protocol are tested without any server.
//!
//! Chat polls return at most [`MAX_PER_CONVERSATION`] messages of one conversation, oldest
//! first; the rest are nak'd so the broker hands them out first, in order, next poll.
//! Everything else that was fetched is acked: served events because the reply holds them,
//! other event types because this feed does not serve them (another consumer does).

use std::collections::HashMap;

use super::event::EventKind;
use super::ids::{GmId, Uid};
use super::ports::{Delivery, Settle};

/// The original system's `MAX_RECV_AMOUNT`: messages of one uid per poll.
pub const MAX_PER_CONVERSATION: usize = 10;

/// A poll returns at most this many uids or events (the protocol's bound); what does not
/// fit is nak'd and comes first next poll.
pub const MAX_ENTRIES_PER_POLL: usize = 1000;

/// The number of entries a planned reply holds, so a poll knows when it is full.
pub trait PollReply: Default {
    fn entries(&self) -> usize;
}

impl PollReply for Vec<Conversation> {
    fn entries(&self) -> usize {
        self.len()
    }
}

impl PollReply for RelationChanges {
    fn entries(&self) -> usize {
        self.apply.len() + self.remove.len()
    }
}

/// One entry of a chat poll's reply: a conversation's messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub gm: GmId,
    pub uid: Uid,
    pub texts: Vec<String>,
}

/// How chat is grouped into reply entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// GS `receive`: one entry per player.
    ByPlayer,
    /// GM `receive`: one entry per (GM, player) conversation.
    ByConversation,
}

/// Plans a chat poll. `deliveries` must be in stream order.
pub fn plan_chat<H>(deliveries: &[Delivery<H>], grouping: Grouping) -> (Vec<Conversation>, Vec<Settle>) {
    let mut entries: Vec<Conversation> = Vec::new();
    let mut index: HashMap<(Option<GmId>, Uid), usize> = HashMap::new();
    let settles = deliveries
        .iter()
        .map(|d| {
            let Some(event) = d.event.as_ref().filter(|e| e.kind == EventKind::Chat) else {
                return Settle::Ack;
            };
            let (Some(uid), Some(text)) = (event.uid, event.text.as_ref()) else {
                return Settle::Ack;
            };
            let key = match grouping {
                Grouping::ByPlayer => (None, uid),
                Grouping::ByConversation => (Some(event.gm), uid),
            };
            let slot = match index.get(&key) {
                Some(slot) => *slot,
                None if entries.len() >= MAX_ENTRIES_PER_POLL => return Settle::Nak,
                None => {
                    entries.push(Conversation { gm: event.gm, uid, texts: Vec::new() });
                    index.insert(key, entries.len() - 1);
                    entries.len() - 1
                }
            };
            let entry = &mut entries[slot];
            if entry.texts.len() < MAX_PER_CONVERSATION {
                entry.texts.push(text.clone());
                Settle::Ack
            } else {
                Settle::Nak
            }
        })
        .collect();
    (entries, settles)
}

/// A relation poll's reply: each uid in at most one of the two lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelationChanges {
    /// uid, its GM and the GM's name, in order of the deciding event.
    pub apply: Vec<(Uid, GmId, String)>,
    pub remove: Vec<Uid>,
}

/// Plans a relation poll: per uid the event with the highest `rev` wins (later in the
/// stream on a tie), so add-then-remove before a poll reports only the remove and
/// remove-then-add only the add. Events of uids past [`MAX_ENTRIES_PER_POLL`] are nak'd;
/// everything else fetched is acked.
pub fn plan_relation<H>(deliveries: &[Delivery<H>]) -> (RelationChanges, Vec<Settle>) {
    let mut latest: HashMap<Uid, usize> = HashMap::new();
    let mut order: Vec<Uid> = Vec::new();
    let mut settles = vec![Settle::Ack; deliveries.len()];
    for (i, d) in deliveries.iter().enumerate() {
        let Some(event) = d.event.as_ref() else {
            continue;
        };
        if !matches!(event.kind, EventKind::FriendAdd | EventKind::FriendRemove) {
            continue;
        }
        let Some(uid) = event.uid else { continue };
        if !latest.contains_key(&uid) && order.len() >= MAX_ENTRIES_PER_POLL {
            settles[i] = Settle::Nak;
            continue;
        }
        match latest.get(&uid) {
            Some(&j) if deliveries[j].event.as_ref().and_then(|e| e.rev) > event.rev => {}
            Some(_) => {
                latest.insert(uid, i);
            }
            None => {
                latest.insert(uid, i);
                order.push(uid);
            }
        }
    }
    let mut changes = RelationChanges::default();
    for uid in order {
        let Some(event) = deliveries[latest[&uid]].event.as_ref() else {
            continue;
        };
        if event.kind == EventKind::FriendAdd {
            changes.apply.push((uid, event.gm, event.gm_name.clone().unwrap_or_default()));
        } else {
            changes.remove.push(uid);
        }
    }
    (changes, settles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::Envelope;
    use crate::domain::ids::HostId;

    fn chat(seq: u64, gm: i64, uid: i64, text: &str) -> Delivery<()> {
        Delivery {
            stream_seq: seq,
            event: Some(Envelope::chat(format!("c{seq}"), HostId(1), Uid(uid), GmId(gm), text, 0)),
            handle: (),
        }
    }

    fn friend(seq: u64, kind: EventKind, gm: i64, uid: i64, rev: u64) -> Delivery<()> {
        let mut e = Envelope::chat(format!("f{seq}"), HostId(1), Uid(uid), GmId(gm), "", 0);
        e.kind = kind;
        e.text = None;
        e.gm_name = Some(format!("gm{gm}"));
        e.rev = Some(rev);
        Delivery { stream_seq: seq, event: Some(e), handle: () }
    }

    #[test]
    fn ten_per_uid_rest_nakd_in_order() {
        let mut ds: Vec<_> = (0..25).map(|i| chat(i, 7, 5, &format!("m{i}"))).collect();
        ds.insert(3, chat(100, 7, 6, "other"));
        let (entries, settles) = plan_chat(&ds, Grouping::ByPlayer);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].texts, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
        assert_eq!(entries[1].texts, vec!["other"]);
        assert_eq!(settles.iter().filter(|s| **s == Settle::Ack).count(), 11);
        assert!(settles[12..].iter().all(|s| *s == Settle::Nak));
    }

    #[test]
    fn gm_feed_groups_by_conversation_and_acks_foreign_types() {
        let ds = vec![chat(1, 7, 5, "a"), friend(2, EventKind::FriendAdd, 7, 5, 1), chat(3, 8, 5, "b")];
        let (entries, settles) = plan_chat(&ds, Grouping::ByConversation);
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[1].gm, entries[1].texts.clone()), (GmId(8), vec!["b".to_owned()]));
        assert_eq!(settles, vec![Settle::Ack; 3]);
    }

    #[test]
    fn entries_past_the_poll_bound_are_nakd() {
        let ds: Vec<_> = (0..MAX_ENTRIES_PER_POLL as i64 + 5).map(|u| chat(u as u64, 7, u, "x")).collect();
        let (entries, settles) = plan_chat(&ds, Grouping::ByPlayer);
        assert_eq!(entries.len(), MAX_ENTRIES_PER_POLL);
        assert_eq!(settles.iter().filter(|s| **s == Settle::Nak).count(), 5);
        let ds: Vec<_> = (0..MAX_ENTRIES_PER_POLL as i64 + 5)
            .map(|u| friend(u as u64, EventKind::FriendAdd, 7, u, 1))
            .collect();
        let (changes, settles) = plan_relation(&ds);
        assert_eq!(changes.apply.len(), MAX_ENTRIES_PER_POLL);
        assert_eq!(settles[MAX_ENTRIES_PER_POLL..], [Settle::Nak; 5]);
    }

    #[test]
    fn relation_latest_revision_wins() {
        let ds = vec![
            friend(1, EventKind::FriendAdd, 7, 5, 1),
            friend(2, EventKind::FriendRemove, 7, 5, 2),
            friend(3, EventKind::FriendRemove, 7, 6, 4),
            chat(4, 7, 6, "x"),
            friend(5, EventKind::FriendAdd, 8, 6, 5),
            // published out of order: the older revision must not win
            friend(6, EventKind::FriendAdd, 9, 5, 1),
        ];
        let (changes, settles) = plan_relation(&ds);
        assert_eq!(changes.remove, vec![Uid(5)]);
        assert_eq!(changes.apply, vec![(Uid(6), GmId(8), "gm8".to_owned())]);
        assert_eq!(settles.len(), 6);
    }
}
