//! gm-relay: lets GM (customer-service) staff chat with players on many game servers.
//!
//! Chat messages and friend events travel through NATS JetStream (`gm.to.host.<host>`,
//! `gs.to.gm.<gm>`); Redis keeps only account and friendship state; an HTTP adapter answers
//! the legacy game servers and GM clients with the original polling protocol.
//!
//! - [`domain`]: ids, text, events, errors, poll rules and the ports (no I/O).
//! - [`relay`]: the use cases, written against the ports.
//! - [`outbox`]: publishes committed friend events in order, exactly once per id.
//! - [`adapters`]: HTTP (axum), NATS, Redis and role-service implementations.
//! - [`console`]: the GM web console and ops dashboard (accounts, views, figures).
//! - [`startup`]: wiring and graceful shutdown; [`config`]: the typed settings.
//! - [`migrate`]: `gm-relay import-legacy`, moving the original system's Redis data over.

/// Parks the current task at `$name` when armed on `$relay.faults`; compiled out otherwise.
#[macro_export]
#[doc(hidden)]
macro_rules! fault_point {
    ($relay:expr, $name:literal) => {
        #[cfg(feature = "fault-injection")]
        $relay.faults.park_if_armed($name).await;
    };
}

pub mod adapters;
pub mod config;
pub mod console;
pub mod domain;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod metrics;
pub mod migrate;
pub mod nats_auth;
pub mod outbox;
pub mod relay;
pub mod startup;
pub mod telemetry;
