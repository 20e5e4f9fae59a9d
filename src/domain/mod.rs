//! The relay's model and rules: ids, validated text, the event envelope, errors, the pure
//! planning of legacy polls, and the ports (traits) adapters implement. No I/O here and no
//! HTTP, NATS or Redis types.

pub mod error;
pub mod event;
pub mod ids;
pub mod order;
pub mod poll;
pub mod ports;
pub mod rate;
pub mod recent;
pub mod session;
pub mod text;

pub use error::{Backend, Errno, RelayError};
pub use event::{Envelope, EventKind};
pub use ids::{GmId, HostId, Uid};
pub use text::{ChatText, GmName};
