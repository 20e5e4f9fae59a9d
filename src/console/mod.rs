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

use std::sync::Arc;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::adapters::http::access::Access;
use crate::adapters::http::AppRelay;
use crate::domain::session::SessionKey;
use accounts::SignIn;
use monitor::Monitor;

/// Live feeds (one JetStream consumer each) open at once on one relay: a few per GM on
/// duty, with room; past it a page is told to retry later instead of piling consumers up.
pub const MAX_LIVE_FEEDS: usize = 512;

/// The console's shared state.
pub struct Console {
    relay: Arc<AppRelay>,
    access: Arc<Access>,
    signin: SignIn,
    monitor: Arc<Monitor>,
    live_feeds: Arc<Semaphore>,
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

    /// A slot for one more live feed, if any is free.
    pub fn live_feed_slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.live_feeds).try_acquire_owned().ok()
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
