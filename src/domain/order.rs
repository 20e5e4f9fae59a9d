//! Which outbox events must reach the broker in the order they were committed, and the
//! publish rounds that keep that order when one publish of a batch fails.

use std::collections::HashMap;

use super::event::{Envelope, EventKind};
use super::ids::{GmId, HostId, Uid};

/// The first round after the latest one recorded for `key`; 0 when there is none.
fn after<K: std::hash::Hash + Eq>(latest: &HashMap<K, usize>, key: K) -> usize {
    latest.get(&key).map_or(0, |round| round + 1)
}

/// The publish round of each event of a batch given in commit order: one past the latest
/// round of the earlier events it must follow, so no round holds two events whose order
/// matters.
///
/// A host applies events in stream order, so these must be stored in commit order: one
/// player's friend events on a host (an add, then the remove that undid it), one GM's
/// presence on a host, and a GM's presence against that GM's friend events there (a host
/// may ignore the presence of a GM it has no player of, so an add must not fall behind
/// the `gm_offline` that followed it). Friend events of different players, and presence
/// on different hosts, change different state: one GM adding many players, or one
/// presence change fanned out to many hosts, is a single round.
///
/// Publishing round after round, and stopping after a round in which a publish failed,
/// never sends an event while an earlier one it must follow is unacknowledged. Sending a
/// whole batch at once could store a later event while the earlier one was refused (a
/// leader change in a cluster, a stream limit), and the retry would then store the two
/// the wrong way round.
pub fn publish_rounds<'a>(events: impl IntoIterator<Item = &'a Envelope>) -> Vec<usize> {
    // The latest round given so far to: a player's friend events on a host; a GM's
    // presence on a host; the friend events of a GM's players on a host.
    let mut player: HashMap<(HostId, Uid), usize> = HashMap::new();
    let mut presence: HashMap<(HostId, GmId), usize> = HashMap::new();
    let mut friends_of: HashMap<(HostId, GmId), usize> = HashMap::new();
    events
        .into_iter()
        .map(|event| {
            let gm = (event.host, event.gm);
            match (event.kind, event.uid) {
                (EventKind::FriendAdd | EventKind::FriendRemove | EventKind::Chat, Some(uid)) => {
                    let round = after(&player, (event.host, uid)).max(after(&presence, gm));
                    player.insert((event.host, uid), round);
                    let latest = friends_of.entry(gm).or_insert(round);
                    *latest = (*latest).max(round);
                    round
                }
                _ => {
                    let round = after(&presence, gm).max(after(&friends_of, gm));
                    presence.insert(gm, round);
                    round
                }
            }
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
    fn an_event_waits_for_the_earlier_ones_it_must_follow_and_no_others() {
        use EventKind::*;
        let batch = [
            event(FriendAdd, 1, 7, Some(100)),    // 0: player 100 on host 1
            event(FriendRemove, 1, 7, Some(100)), // 1: after the add
            event(FriendAdd, 1, 7, Some(101)),    // 0: another player
            event(FriendAdd, 2, 7, Some(100)),    // 0: the same uid on another host
            event(GmOffline, 1, 7, None),         // 2: after GM 7's friend events on host 1
            event(GmOnline, 1, 7, None),          // 3: after the offline
            event(FriendAdd, 1, 8, Some(100)),    // 2: after the remove; GM 7's presence is not its own
            event(GmOnline, 2, 8, None),          // 0: GM 8 has nothing earlier on host 2
        ];
        assert_eq!(publish_rounds(&batch), vec![0, 1, 0, 0, 2, 3, 2, 0]);
    }

    #[test]
    fn a_first_add_and_its_presence_keep_their_order_and_the_other_adds_stay_together() {
        use EventKind::*;
        let mut batch = vec![event(FriendAdd, 1, 7, Some(100)), event(GmOnline, 1, 7, None)];
        batch.extend((101..400).map(|uid| event(FriendAdd, 1, 7, Some(uid))));
        let rounds = publish_rounds(&batch);
        assert_eq!(&rounds[..2], &[0, 1]);
        assert!(rounds[2..].iter().all(|&r| r == 2), "{rounds:?}");
    }

    #[test]
    fn distinct_hosts_are_one_round() {
        let batch: Vec<Envelope> = (0..300).map(|h| event(EventKind::GmOnline, h, 7, None)).collect();
        assert!(publish_rounds(&batch).iter().all(|&r| r == 0));
        assert!(publish_rounds(&[]).is_empty());
    }
}
