//! Adapters: the outside world (HTTP, NATS JetStream, Redis, the role service) behind the
//! domain's ports.

pub mod http;
pub mod native;
pub mod nats;
pub mod redis;
pub mod role;
