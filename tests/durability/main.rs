//! Durability of gm-relay against real nats-server and redis-server: relay restarts
//! (graceful and kill -9), the outbox's fault points, the event envelope on the wire,
//! NATS and Redis outages, and the GS server-list refresh.
//!
//! Run: `GM_RELAY_NATS_SERVER=$PWD/var/venv/bin/nats-server cargo test --test durability`.
//!
//! Timing: the outbox lease lives 5 s, a poll lease 15 s and the legacy consumers' ack wait
//! is 10 s. Tests that kill a relay do it between polls (after the poll leases are gone, so
//! every answered poll's acks are applied); then nothing has to wait for a redelivery.

#[path = "../support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "../../examples/game_server.rs"]
mod game_server;

mod common;
mod crash_under_load;
mod envelopes;
mod gs_list;
mod outages;
mod outbox_faults;
mod restart;
