//! Which outbox events must reach the broker in the order they were committed, and the
//! publish rounds that keep that order when one publish of a batch fails.

use std::collections::HashMap;

use super::event::{Envelope, EventKind};
use super::ids::{GmId, HostId, Uid};

/// What an outbox event changes on its host. A host applies one player's friend events,
/// and one GM's presence events, in stream order, so two events with the same key must be
/// stored in commit order. Events with different keys change different state and may be
/// stored either way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderKey {
    Player(HostId, Uid),
    Presence(HostId, GmId),
}

impl OrderKey {
    pub fn of(event: &Envelope) -> Self {
        match (event.kind, event.uid) {
            (EventKind::GmOnline | EventKind::GmOffline, _) | (_, None) => {
                Self::Presence(event.host, event.gm)
            }
            (EventKind::FriendAdd | EventKind::FriendRemove | EventKind::Chat, Some(uid)) => {
                Self::Player(event.host, uid)
            }
        }
    }
}

/// The publish round of each event of a batch given in commit order: one past the round of
/// the previous event with the same key, so no round holds a key twice.
///
/// Publishing round after round, and stopping after a round in which a publish failed,
/// never sends an event while an earlier one of its key is unacknowledged. Sending a whole
/// batch at once could store a later event of a key while the earlier one was refused (a
/// leader change in a cluster, a stream limit): the retry would then store the two the
/// wrong way round, and a host would apply an add after the remove that undid it. A batch
/// whose keys all differ — one GM's add of many players, one presence change fanned out to
/// many hosts — is a single round.
pub fn publish_rounds<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> Vec<usize> {
    let mut next: HashMap<OrderKey, usize> = HashMap::new();
    events
        .into_iter()
        .map(|event| {
            let slot = next.entry(OrderKey::of(event)).or_insert(0);
            let round = *slot;
            *slot += 1;
            round
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, host: i64, gm: i64, uid: Option<i64>) -> Envelope {
        let mut e = Envelope::chat("x".into(), HostId(host), Uid(uid.unwrap_or(0)), GmId(gm), "t", 0);
        e.kind = kind;
        e.uid = uid.map(Uid);
        e
    }

    #[test]
    fn a_key_seen_again_waits_one_round_more_and_other_keys_do_not() {
        use EventKind::*;
        let batch = [
            event(FriendAdd, 1, 7, Some(100)),    // player 100 on host 1
            event(FriendRemove, 1, 7, Some(100)), // again: after the add
            event(FriendAdd, 1, 7, Some(101)),    // another player: first round
            event(FriendAdd, 2, 7, Some(100)),    // the same uid on another host: its own key
            event(GmOffline, 1, 7, None),         // presence is keyed by GM, apart from players
            event(GmOnline, 1, 7, None),          // after the offline
            event(FriendAdd, 1, 8, Some(100)),    // the player's third event, whoever the GM
        ];
        assert_eq!(publish_rounds(&batch), vec![0, 1, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn distinct_keys_are_one_round() {
        let batch: Vec<Envelope> = (0..300).map(|h| event(EventKind::GmOnline, h, 7, None)).collect();
        assert!(publish_rounds(&batch).iter().all(|&r| r == 0));
        assert!(publish_rounds(&[]).is_empty());
    }
}
