//! `gm-relay replay`: delivers a host's events again after a game-server bug, by moving the
//! host's durable consumer back to a stream sequence (or to the first event since a time).
//!
//! It uses the server's consumer reset (`$JS.API.CONSUMER.RESET.<stream>.<consumer>`,
//! nats-server ≥ 2.14): the consumer keeps its name, config and filter, and everything on
//! its subject from that sequence on is delivered again, in order, to whoever pulls it —
//! the game server binding `host_<n>`, or the relay's legacy polls (`legacy_chat_<n>`,
//! `legacy_rel_<n>`). Nothing is deleted or re-created, so no relay can race to re-create
//! the consumer from the start of the stream meanwhile. Retention (`GM_RELAY_RETENTION_*`)
//! bounds how far back events exist.

use std::time::Duration;

use serde::Deserialize;

use super::names;
use crate::domain::ports::{Feed, Route};
use crate::domain::HostId;

/// Bound on each JetStream API call of a replay.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Which of a host's consumers to move back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFeed {
    /// `host_<n>`: a native game server's consumer.
    Native,
    /// `legacy_chat_<n>`: what a legacy game server's `receive` polls return.
    LegacyChat,
    /// `legacy_rel_<n>`: what its `relation` polls return.
    LegacyRelation,
}

impl ReplayFeed {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(Self::Native),
            "chat" => Some(Self::LegacyChat),
            "relation" => Some(Self::LegacyRelation),
            _ => None,
        }
    }

    fn durable(self, host: HostId) -> String {
        match self {
            Self::Native => names::host_consumer(host),
            Self::LegacyChat => names::feed_consumer(Feed::HostChat(host)).1,
            Self::LegacyRelation => names::feed_consumer(Feed::HostRelation(host)).1,
        }
    }
}

/// Where the replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// This stream sequence (as in the `stream_seq` a game server saw).
    Sequence(u64),
    /// The host's first event no older than this.
    Since(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("NATS did not answer: {0}")]
    Nats(String),
    #[error(
        "host {host} has no consumer {consumer} (it is created with the host's first player, or at the \
         host's first poll once something was sent to it)"
    )]
    NoSuchConsumer { host: HostId, consumer: String },
    #[error("the server refused the reset of {consumer}: {description} (code {code})")]
    Refused { consumer: String, code: u64, description: String },
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub consumer: String,
    /// The first stream sequence delivered again (None: no event of the host in range).
    pub from_seq: Option<u64>,
    /// Events the consumer now has to deliver.
    pub pending: u64,
}

#[derive(Deserialize)]
struct ApiError {
    code: u64,
    description: String,
}

#[derive(Deserialize)]
struct ResetReply {
    error: Option<ApiError>,
    #[serde(default)]
    num_pending: u64,
}

fn nats(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Nats(e.to_string())
}

/// Moves `feed`'s consumer of `host` back to `from`.
pub async fn replay(
    client: &async_nats::Client,
    host: HostId,
    feed: ReplayFeed,
    from: ReplayFrom,
) -> Result<Replayed, ReplayError> {
    let consumer = feed.durable(host);
    let js = async_nats::jetstream::new(client.clone());
    let stream = tokio::time::timeout(API_TIMEOUT, js.get_stream(names::STREAM_TO_HOST))
        .await
        .map_err(nats)?
        .map_err(nats)?;
    match tokio::time::timeout(API_TIMEOUT, stream.consumer_info(&consumer)).await.map_err(nats)? {
        Ok(_) => {}
        Err(e) if e.to_string().contains("not found") => {
            return Err(ReplayError::NoSuchConsumer { host, consumer })
        }
        Err(e) => return Err(nats(e)),
    }
    let seq = match from {
        ReplayFrom::Sequence(seq) => Some(seq),
        ReplayFrom::Since(age) => first_since(&stream, host, age).await?,
    };
    let Some(seq) = seq else {
        return Ok(Replayed { consumer, from_seq: None, pending: 0 });
    };
    let subject = format!("$JS.API.CONSUMER.RESET.{}.{consumer}", names::STREAM_TO_HOST);
    let body = serde_json::to_vec(&serde_json::json!({ "seq": seq })).map_err(nats)?;
    let reply = tokio::time::timeout(API_TIMEOUT, client.request(subject, body.into()))
        .await
        .map_err(nats)?
        .map_err(nats)?;
    let reply: ResetReply = serde_json::from_slice(&reply.payload).map_err(nats)?;
    if let Some(e) = reply.error {
        return Err(ReplayError::Refused { consumer, code: e.code, description: e.description });
    }
    Ok(Replayed { consumer, from_seq: Some(seq), pending: reply.num_pending })
}

/// The sequence of the host's first event at most `age` old, by binary search over the
/// stream (a message's time grows with its sequence): about log2(messages) lookups.
async fn first_since(
    stream: &async_nats::jetstream::stream::Stream,
    host: HostId,
    age: Duration,
) -> Result<Option<u64>, ReplayError> {
    let state = stream.cached_info().state.clone();
    let subject = names::subject(Route::ToHost(host));
    let since = time::OffsetDateTime::now_utc() - age;
    // The host's first event at or after `seq`, with its time; None past the last.
    let next = |seq: u64| {
        let (stream, subject) = (stream.clone(), subject.clone());
        async move {
            match tokio::time::timeout(API_TIMEOUT, stream.get_first_raw_message_by_subject(&subject, seq))
                .await
            {
                Ok(Ok(m)) => Ok(Some((m.sequence, m.time))),
                Ok(Err(e)) if e.to_string().contains("no message found") => Ok(None),
                Ok(Err(e)) => Err(nats(e)),
                Err(e) => Err(nats(e)),
            }
        }
    };
    let (mut lo, mut hi) = (state.first_sequence, state.last_sequence + 1);
    let mut found = None;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match next(mid).await? {
            Some((seq, at)) if at >= since => {
                found = Some(seq);
                hi = mid;
            }
            Some((seq, _)) => lo = seq + 1,
            None => hi = mid,
        }
    }
    Ok(found)
}
