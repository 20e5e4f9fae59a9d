//! The console's use of JetStream: the history copy written beside every chat message,
//! the history pages and unread counts read back from it, a GM's live feed, and the
//! stream and consumer figures of the ops dashboard.
//!
//! History lives in its own stream, `GM_HISTORY`, on `gm.hist.<gm>.<uid>.<from>`
//! (`nats/HISTORY.md` says why). Reading a conversation names its subjects, so the
//! server's per-subject index answers it without reading anybody else's traffic. Pages go
//! backwards with direct gets (`multi_last` with `up_to_seq`): one request per message,
//! each answered from the index, which makes a page cost what it returns.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::{names, unavailable, JetStreamBus};
use crate::domain::event::ENVELOPE_VERSION;
use crate::domain::ports::Route;
use crate::domain::{Envelope, GmId, RelayError, Uid};

/// Header of a history copy: the message's sequence in its delivery stream, so the console
/// can tell whether the player's server has taken it (its consumer's ack floor passed it).
pub const DELIVERY_SEQ_HEADER: &str = "Gm-Relay-Delivery-Seq";

/// Bound on one direct get (request to last message of its batch).
const DIRECT_GET_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on a stream or consumer listing request of the dashboard.
const FIGURES_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest history page: each message is one direct get, so this bounds a page's cost.
pub const MAX_HISTORY_PAGE: usize = 100;

/// Subjects per `multi_last` request when looking up many conversations at once; well
/// under the server's limit on one request's results.
const MULTI_LAST_CHUNK: usize = 256;

/// One stored message as a direct get returns it.
struct Stored {
    seq: u64,
    subject: String,
    headers: Option<HeaderMap>,
    payload: Bytes,
}

/// A message of a conversation's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// Sequence in `GM_HISTORY`: the position pages are cut at.
    pub seq: u64,
    pub event: Envelope,
    /// Written by the GM (else by the player).
    pub from_gm: bool,
    /// The sequence of the delivered message in `GM_TO_HOST` (GM messages only).
    pub delivery_seq: Option<u64>,
}

/// A message for a GM on their live feed.
#[derive(Debug, Clone)]
pub struct LiveMessage {
    /// Sequence in `GS_TO_GM`: the SSE event id a reconnecting page resumes after.
    pub seq: u64,
    pub event: Envelope,
}

/// A stream's size and position, for the dashboard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamFigures {
    pub messages: u64,
    pub last_seq: u64,
}

/// One page of a stream's consumers.
#[derive(Debug, Deserialize)]
pub struct ConsumerPage {
    pub total: usize,
    pub offset: usize,
    #[serde(default)]
    pub consumers: Vec<consumer::Info>,
}

fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

fn envelope(payload: &[u8]) -> Option<Envelope> {
    serde_json::from_slice::<Envelope>(payload).ok().filter(|e| e.v == ENVELOPE_VERSION)
}

impl JetStreamBus {
    /// A direct get of `stream` that answers with a batch ending in an end-of-batch status
    /// (`multi_last`, or `batch` with `next_by_subj`); at most `max` messages are kept.
    async fn direct_batch(
        &self,
        stream: &str,
        request: serde_json::Value,
        max: usize,
    ) -> Result<Vec<Stored>, RelayError> {
        self.ensure_connected()?;
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(inbox.clone()).await.map_err(unavailable)?;
        let body = serde_json::to_vec(&request).map_err(unavailable)?;
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body.into())
            .await
            .map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + DIRECT_GET_TIMEOUT;
        let mut out = Vec::new();
        loop {
            let message = tokio::time::timeout_at(deadline, replies.next())
                .await
                .map_err(unavailable)?
                .ok_or_else(|| unavailable("direct get subscription closed"))?;
            match message.status.map(|s| s.as_u16()) {
                // End of batch, or nothing matched.
                Some(204) | Some(404) => break,
                Some(code) if code >= 300 => {
                    let why = message.description.unwrap_or_default();
                    return Err(unavailable(format!("direct get on {stream} failed: {code} {why}")));
                }
                _ => {}
            }
            let headers = message.headers.as_ref();
            let seq = header_u64(headers, "Nats-Sequence")
                .ok_or_else(|| unavailable("direct get reply has no sequence"))?;
            let subject = headers
                .and_then(|h| h.get("Nats-Subject"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            if out.len() < max {
                out.push(Stored { seq, subject, headers: message.headers.clone(), payload: message.payload });
            }
        }
        Ok(out)
    }

    /// Up to `limit` messages of the conversation of `gm` and `uid` older than `before`
    /// (a `GM_HISTORY` sequence; None = the newest), oldest first, and whether older ones
    /// may exist.
    pub async fn history_page(
        &self,
        gm: GmId,
        uid: Uid,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<HistoryEntry>, bool), RelayError> {
        let filter = names::history_subject(gm, uid, "*");
        let mut up_to = match before {
            Some(0 | 1) => return Ok((Vec::new(), false)),
            Some(b) => Some(b - 1),
            None => None,
        };
        let mut page = Vec::new();
        let mut more = true;
        while page.len() < limit.min(MAX_HISTORY_PAGE) {
            // The newest message of each direction at or below `up_to`; the newer of the
            // two is the next message going back.
            let mut request = json!({ "multi_last": [filter] });
            if let Some(u) = up_to {
                request["up_to_seq"] = u.into();
            }
            let found = self.direct_batch(names::STREAM_HISTORY, request, 2).await?;
            let Some(newest) = found.into_iter().max_by_key(|m| m.seq) else {
                more = false;
                break;
            };
            up_to = Some(newest.seq - 1);
            match envelope(&newest.payload) {
                Some(event) => page.push(HistoryEntry {
                    seq: newest.seq,
                    from_gm: newest.subject.ends_with(".gm"),
                    delivery_seq: header_u64(newest.headers.as_ref(), DELIVERY_SEQ_HEADER),
                    event,
                }),
                None => tracing::warn!(
                    seq = newest.seq,
                    "skipping a history message that is not a valid envelope"
                ),
            }
            if newest.seq <= 1 {
                more = false;
                break;
            }
        }
        page.reverse();
        Ok((page, more))
    }

    /// The `GM_HISTORY` sequence of the newest message from each of `uids` to `gm`;
    /// players who never wrote are left out.
    pub async fn last_player_messages(
        &self,
        gm: GmId,
        uids: &[Uid],
    ) -> Result<HashMap<Uid, u64>, RelayError> {
        let mut last = HashMap::new();
        for chunk in uids.chunks(MULTI_LAST_CHUNK) {
            let subjects: Vec<String> =
                chunk.iter().map(|u| names::history_subject(gm, *u, "player")).collect();
            let found = self
                .direct_batch(names::STREAM_HISTORY, json!({ "multi_last": subjects }), chunk.len())
                .await?;
            for m in found {
                // gm.hist.<gm>.<uid>.player
                if let Some(uid) = m.subject.split('.').nth(3).and_then(|u| Uid::parse(u.as_bytes())) {
                    last.insert(uid, m.seq);
                }
            }
        }
        Ok(last)
    }

    /// How many messages `uid` wrote to `gm` after history sequence `after`, counting to
    /// at most `cap`.
    pub async fn count_player_messages_after(
        &self,
        gm: GmId,
        uid: Uid,
        after: u64,
        cap: usize,
    ) -> Result<usize, RelayError> {
        let request = json!({
            "next_by_subj": names::history_subject(gm, uid, "player"),
            "seq": after + 1,
            "batch": cap,
        });
        Ok(self.direct_batch(names::STREAM_HISTORY, request, cap).await?.len())
    }

    /// A GM's live feed: the players' messages on `gs.to.gm.<gm>` after `after` (a
    /// `GS_TO_GM` sequence), or from now on when None, through an ordered consumer that
    /// the server deletes once the feed is dropped.
    pub async fn gm_feed(
        &self,
        gm: GmId,
        after: Option<u64>,
    ) -> Result<impl Stream<Item = Result<LiveMessage, RelayError>> + Send + 'static, RelayError> {
        self.ensure_connected()?;
        let deliver_policy = match after {
            // `after` comes from the browser: saturate rather than wrap to the stream's start.
            Some(seq) => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq.saturating_add(1) },
            None => consumer::DeliverPolicy::New,
        };
        let config = consumer::pull::OrderedConfig {
            filter_subject: names::subject(Route::ToGm(gm)),
            deliver_policy,
            ..Default::default()
        };
        let messages = tokio::time::timeout(DIRECT_GET_TIMEOUT, async {
            let stream = self.js.get_stream_no_info(names::STREAM_TO_GM).await.map_err(unavailable)?;
            let consumer = stream.create_consumer(config).await.map_err(unavailable)?;
            consumer.messages().await.map_err(unavailable)
        })
        .await
        .map_err(unavailable)??;
        Ok(messages.filter_map(|m| async move {
            match m {
                Err(e) => Some(Err(unavailable(e))),
                Ok(message) => {
                    let seq = match message.info() {
                        Ok(info) => info.stream_sequence,
                        Err(e) => return Some(Err(unavailable(e.to_string()))),
                    };
                    match envelope(&message.payload) {
                        Some(event) => Some(Ok(LiveMessage { seq, event })),
                        None => {
                            tracing::warn!(seq, "skipping a live message that is not a valid envelope");
                            None
                        }
                    }
                }
            }
        }))
    }

    /// Messages and last sequence of a stream.
    pub async fn stream_figures(&self, stream: &str) -> Result<StreamFigures, RelayError> {
        self.ensure_connected()?;
        let reply: jetstream::response::Response<jetstream::stream::Info> = tokio::time::timeout(
            FIGURES_TIMEOUT,
            self.js.request(format!("STREAM.INFO.{stream}"), &json!({})),
        )
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        match reply {
            jetstream::response::Response::Ok(info) => {
                Ok(StreamFigures { messages: info.state.messages, last_seq: info.state.last_sequence })
            }
            jetstream::response::Response::Err { error } => Err(unavailable(error.to_string())),
        }
    }

    /// One page of `stream`'s consumers with their state, from `offset` (one API call; the
    /// server pages by 256).
    pub async fn consumer_page(&self, stream: &str, offset: usize) -> Result<ConsumerPage, RelayError> {
        self.ensure_connected()?;
        let reply: jetstream::response::Response<ConsumerPage> = tokio::time::timeout(
            FIGURES_TIMEOUT,
            self.js.request(format!("CONSUMER.LIST.{stream}"), &json!({ "offset": offset })),
        )
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        match reply {
            jetstream::response::Response::Ok(page) => Ok(page),
            jetstream::response::Response::Err { error } => Err(unavailable(error.to_string())),
        }
    }
}
