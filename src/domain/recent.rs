//! Ids of keyed native sends this relay stored lately. A game server that retries a send
//! (its reply was lost) is told "already stored" from here, without taking a token from
//! the player's rate limit: the retry of a stored message must not be refused as too many.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an id is remembered: the streams' de-duplication window, past which the
/// broker would store a retry again too.
const WINDOW: Duration = Duration::from_secs(120);

/// Ids remembered at once (about 100 bytes each): past it the oldest are forgotten first,
/// and their retries take a rate-limit token again (the broker still stores them once).
const MAX_REMEMBERED: usize = 100_000;

#[derive(Default)]
pub struct RecentIds {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Oldest first.
    order: VecDeque<(Instant, String)>,
    ids: HashSet<String>,
}

impl RecentIds {
    pub fn contains(&self, id: &str) -> bool {
        self.contains_at(id, Instant::now())
    }

    pub fn insert(&self, id: String) {
        self.insert_at(id, Instant::now())
    }

    fn contains_at(&self, id: &str, now: Instant) -> bool {
        let mut inner = self.lock();
        inner.forget_before(now);
        inner.ids.contains(id)
    }

    fn insert_at(&self, id: String, now: Instant) {
        let mut inner = self.lock();
        inner.forget_before(now);
        if inner.ids.insert(id.clone()) {
            inner.order.push_back((now, id));
        }
        while inner.order.len() > MAX_REMEMBERED {
            inner.forget_oldest();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn forget_before(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(at, _)| *at + WINDOW <= now) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, id)) = self.order.pop_front() {
            self.ids.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_for_the_window_and_within_its_bound() {
        let recent = RecentIds::default();
        let t0 = Instant::now();
        recent.insert_at("h3-a".into(), t0);
        assert!(recent.contains_at("h3-a", t0 + WINDOW - Duration::from_millis(1)));
        assert!(!recent.contains_at("h3-b", t0));
        assert!(!recent.contains_at("h3-a", t0 + WINDOW), "remembered past the window");
        assert!(recent.lock().order.is_empty(), "forgotten ids are dropped");

        for i in 0..=MAX_REMEMBERED {
            recent.insert_at(format!("h3-{i}"), t0);
        }
        let inner = recent.lock();
        assert_eq!((inner.order.len(), inner.ids.len()), (MAX_REMEMBERED, MAX_REMEMBERED));
        assert!(!inner.ids.contains("h3-0"), "the oldest goes first");
    }
}
