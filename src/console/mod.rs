//! The GM web console and the ops dashboard, apart from HTTP: accounts and sign-in, the
//! GM view's reads (roster with unread counts, history pages with delivery status), and
//! the dashboard's figures. The routes, pages and live feeds are in
//! [`crate::adapters::http::console`].
//!
//! The console is on exactly when `GM_RELAY_SESSION_KEY` is set. It sends, adds, removes
//! and changes presence through the same use cases as the legacy endpoints
//! ([`crate::relay`]), so it obeys the same checks, rate limits and acknowledgements.

pub mod accounts;
pub mod cli;
pub mod gm_view;
pub mod monitor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::adapters::http::access::Access;
use crate::adapters::http::AppRelay;
use crate::domain::session::SessionKey;
use crate::domain::GmId;
use accounts::SignIn;
use monitor::Monitor;

/// Live feeds (one JetStream consumer each) open at once on one relay: a few per GM on
/// duty, with room; past it a page is told to retry later instead of piling consumers up.
pub const MAX_LIVE_FEEDS: usize = 512;

/// Live feeds one account may hold open on one relay: a GM's tabs and devices, with room.
/// Without it one session (a stuck script, a stolen cookie) could take every slot of
/// [`MAX_LIVE_FEEDS`] and shut every other GM out.
pub const MAX_LIVE_FEEDS_PER_ACCOUNT: usize = 8;

/// Why no live feed could be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveFeedRefused {
    /// The relay holds [`MAX_LIVE_FEEDS`].
    RelayFull,
    /// The account holds [`MAX_LIVE_FEEDS_PER_ACCOUNT`] on this relay.
    AccountFull,
}

/// One open live feed's place: released when the feed ends.
pub struct LiveFeedSlot {
    _relay: OwnedSemaphorePermit,
    gm: GmId,
    per_account: Arc<Mutex<HashMap<GmId, usize>>>,
}

impl Drop for LiveFeedSlot {
    fn drop(&mut self) {
        let mut counts = self.per_account.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.gm) {
            *n -= 1;
            if *n == 0 {
                // The map holds only accounts with a feed open: at most MAX_LIVE_FEEDS.
                counts.remove(&self.gm);
            }
        }
    }
}

/// The console's shared state.
pub struct Console {
    relay: Arc<AppRelay>,
    access: Arc<Access>,
    signin: SignIn,
    monitor: Arc<Monitor>,
    live_feeds: Arc<Semaphore>,
    live_feeds_per_account: Arc<Mutex<HashMap<GmId, usize>>>,
    closing: watch::Sender<bool>,
}

impl Console {
    /// Builds the console and starts the dashboard's refresher (idle until watched).
    pub fn start(relay: Arc<AppRelay>, access: Arc<Access>, key: SessionKey) -> Arc<Self> {
        let (closing, stop) = watch::channel(false);
        let monitor = Arc::new(Monitor::new());
        tokio::spawn(Arc::clone(&monitor).run(Arc::clone(&relay), stop));
        Arc::new(Self {
            relay,
            access,
            signin: SignIn::new(key),
            monitor,
            live_feeds: Arc::new(Semaphore::new(MAX_LIVE_FEEDS)),
            live_feeds_per_account: Arc::default(),
            closing,
        })
    }

    pub fn relay(&self) -> &Arc<AppRelay> {
        &self.relay
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    pub fn signin(&self) -> &SignIn {
        &self.signin
    }

    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// A place for one more live feed of `gm`'s session, if the relay and the account
    /// have one free.
    pub fn live_feed_slot(&self, gm: GmId) -> Result<LiveFeedSlot, LiveFeedRefused> {
        let mut counts = self.live_feeds_per_account.lock().unwrap_or_else(|p| p.into_inner());
        let open = counts.entry(gm).or_insert(0);
        if *open >= MAX_LIVE_FEEDS_PER_ACCOUNT {
            return Err(LiveFeedRefused::AccountFull);
        }
        let Ok(permit) = Arc::clone(&self.live_feeds).try_acquire_owned() else {
            if *open == 0 {
                counts.remove(&gm);
            }
            return Err(LiveFeedRefused::RelayFull);
        };
        *open += 1;
        Ok(LiveFeedSlot { _relay: permit, gm, per_account: Arc::clone(&self.live_feeds_per_account) })
    }

    /// The relay is shutting down: live feeds end (pages reconnect to another relay) and
    /// the refresher stops. Without it, open feeds would hold the shutdown to its bound.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Flips to true when the console closes.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}
