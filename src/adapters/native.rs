//! The native interface for new game servers: an async-nats service answering
//! `gm.relay.gs.<host>.send` and `gm.relay.gs.<host>.resync` (it shows in NATS service
//! discovery and stats as `gm-relay`). Game servers receive through their durable consumer
//! `host_<n>`; see `nats/CONTRACT.md`.
//!
//! Replies are `{"ok": true, ...}` or `{"ok": false, "errno": N, "error": "..."}` with the
//! legacy errno table.

use std::sync::Arc;

use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{watch, Semaphore};

use super::http::AppRelay;
use super::nats::names;
use crate::domain::{Errno, HostId, RelayError, Uid};
use crate::metrics::Metrics;

/// Requests handled at once; past it the service stops taking requests from its
/// subscriptions, whose client-side buffers ([`REQUEST_BUFFER`]) hold the next ones.
const MAX_IN_FLIGHT: usize = 1024;

/// Requests each endpoint's subscription holds unread in the client before the client
/// drops the next ones (their senders time out and retry, under the same idempotency key).
/// async-nats's default, 65,536 per subscription, would let a burst hold 131,072 requests
/// of up to NATS's `max_payload` (1 MB) in memory; with this, a relay holds at most 5,120
/// (these two buffers and those in flight): 40 MB of valid ones (`MAX_REQUEST_BYTES`),
/// 5 GB if every publisher sent `max_payload`-sized junk. (The service's `$SRV` discovery
/// subscriptions on the same connection have buffers as large; with `nats-auth`
/// credentials hosts may not publish there.) Twice `MAX_IN_FLIGHT`: the
/// client's reader can put a whole burst into the buffer before the service takes any
/// (one socket read carries hundreds of requests), so a burst of up to this many — hosts
/// retrying after an outage — is held, not dropped. The size is per connection in
/// async-nats, which is why the service has a connection of its own ([`connect`]): the
/// relay's other connection also carries the replies of every JetStream call, which must
/// not be dropped.
pub const REQUEST_BUFFER: usize = 2 * MAX_IN_FLIGHT;

/// Name of the service's connection in the server's connection list (`/connz`).
pub const CONNECTION_NAME: &str = "gm-relay-native";

/// Inbox prefixes a request's reply subject may have: a host's own (with per-host
/// credentials, `gm-relay nats-auth`, the only inbox it can read) or the client default.
const HOST_INBOX_PREFIX: &str = "_INBOX_host_";
const DEFAULT_INBOX_PREFIX: &str = "_INBOX.";

/// A request body larger than this is refused: a chat line is at most 500 characters.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

#[derive(Deserialize)]
struct SendRequest {
    uid: String,
    text: String,
}

#[derive(Deserialize, Default)]
struct ResyncRequest {
    #[serde(default)]
    cursor: u64,
}

fn error_reply(errno: Errno) -> serde_json::Value {
    let reason = match errno {
        // The legacy reason speaks of base64 `msg`; native text is plain JSON.
        Errno::BadMsg => "text must be 1 to 500 characters",
        errno => errno.reason(),
    };
    json!({"ok": false, "errno": errno.code(), "error": reason})
}

fn relay_error_reply(e: &RelayError, what: &str) -> serde_json::Value {
    if let RelayError::Unavailable { backend, source } = e {
        tracing::error!(%backend, error = %source, what, "native request failed: backend unavailable");
    }
    match e {
        RelayError::NotOnline => error_reply(Errno::BadParam),
        e => error_reply(e.errno().unwrap_or(Errno::Unavailable)),
    }
}

/// Opens the service's own connection to NATS (`urls` and credentials as the relay's).
pub async fn connect(
    urls: &str,
    nkey_seed: Option<&str>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let options = super::nats::options(nkey_seed, CONNECTION_NAME).subscription_capacity(REQUEST_BUFFER);
    super::nats::connect_with(options, urls).await
}

/// Serves native requests on `client` (from [`connect`]) until `stop` flips, then waits
/// for those in flight.
pub async fn serve(
    client: async_nats::Client,
    relay: Arc<AppRelay>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), async_nats::Error> {
    let service = client
        .service_builder()
        .description("gm-relay: native game-server interface")
        .start("gm-relay", env!("CARGO_PKG_VERSION"))
        .await?;
    let mut send = service.endpoint_builder().name("send").add(names::SERVICE_SEND).await?;
    let mut resync = service.endpoint_builder().name("resync").add(names::SERVICE_RESYNC).await?;
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut service = Some(service);
    loop {
        let (request, verb) = tokio::select! {
            Some(r) = send.next() => (r, "send"),
            Some(r) = resync.next() => (r, "resync"),
            _ = stop.changed(), if service.is_some() => {
                // Stopping the service makes each endpoint unsubscribe (at its next poll)
                // without dropping what it has already received, so NATS gives new
                // requests to the other relays of the queue group and those already
                // given to this one are still answered; the endpoints end once empty.
                // Requests still on the wire when the unsubscribe takes effect are lost
                // (the client library offers no drain for a service endpoint): their
                // senders time out and retry under the same key.
                if let Some(service) = service.take() {
                    service.stop().await?;
                }
                continue;
            }
            else => break,
        };
        // The reply goes where the requester says; the relay may publish anywhere, so a
        // reply subject outside an inbox would let a game server make the relay publish
        // into another host's feed, a GM's subjects or JetStream's API.
        let host = names::service_host(&request.message.subject);
        let reply_to = request.message.reply.as_ref().map(|r| r.as_str());
        if !reply_allowed(host, reply_to) {
            tracing::warn!(subject = %request.message.subject, reply = ?reply_to, verb, "native request refused: its reply subject is not an inbox");
            metrics.requests.with_label_values(&["native", verb, "refused"]).inc();
            continue;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { break };
        let relay = Arc::clone(&relay);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let reply = answer(&relay, verb, host, &request.message).await;
            let result = match reply.get("errno").and_then(|e| e.as_i64()) {
                Some(n) => format!("errno_{n}"),
                None => "ok".to_owned(),
            };
            metrics.requests.with_label_values(&["native", verb, &result]).inc();
            let body = Bytes::from(serde_json::to_vec(&reply).unwrap_or_default());
            if let Err(e) = request.respond(Ok(body)).await {
                tracing::warn!(error = %e, verb, "could not answer a native request");
            }
            drop(permit);
        });
    }
    if let Some(service) = service {
        service.stop().await?;
    }
    // Requests already taken finish — replied to, their history copies queued — before the
    // relay flushes its history writer and closes the connection. The caller bounds this
    // wait by the shutdown timeout.
    let all = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    Ok(())
}

/// Whether a request's reply subject is an inbox that `host` (the one its subject names)
/// may read: the client default or the host's own prefix (a request on
/// `gm.relay.gs.3.send` may not be answered into host 5's inbox). A request without one is not acted on either: nobody
/// waits for it, and its sender could not learn what became of it.
fn reply_allowed(host: Option<HostId>, reply: Option<&str>) -> bool {
    let Some(reply) = reply else { return false };
    if reply.contains(['*', '>', ' ', '\t']) {
        return false;
    }
    let own_inbox = |host: HostId| {
        reply
            .strip_prefix(HOST_INBOX_PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(id, rest)| id == host.to_string() && !rest.is_empty())
    };
    reply.strip_prefix(DEFAULT_INBOX_PREFIX).is_some_and(|rest| !rest.is_empty())
        || host.is_some_and(own_inbox)
}

/// `host` is the request subject's (`None` when it names none).
async fn answer(
    relay: &AppRelay,
    verb: &str,
    host: Option<HostId>,
    message: &async_nats::Message,
) -> serde_json::Value {
    let Some(host) = host else {
        return error_reply(Errno::BadParam);
    };
    let oversize = message.payload.len() > MAX_REQUEST_BYTES;
    match verb {
        // A send's text is the only part that can grow: its limit is what was passed.
        "send" if oversize => error_reply(Errno::BadMsg),
        _ if oversize => error_reply(Errno::BadParam),
        "send" => {
            let Ok(req) = serde_json::from_slice::<SendRequest>(&message.payload) else {
                return error_reply(Errno::BadParam);
            };
            let Some(uid) = Uid::parse(req.uid.as_bytes()) else { return error_reply(Errno::BadParam) };
            let key = message.headers.as_ref().and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID));
            // A key that cannot be used is refused, not dropped: without it a retry would
            // be stored a second time, which the key was sent to prevent.
            if key.is_some_and(|k| !valid_key(k.as_str())) {
                return error_reply(Errno::BadParam);
            }
            match relay.native_send(host, uid, req.text, key.map(|k| k.as_str())).await {
                // A duplicate was stored before (a retry, or the key used again within
                // the de-duplication window): said so, as this text was not stored now.
                Ok((id, true)) => json!({"ok": true, "id": id, "duplicate": true}),
                Ok((id, false)) => json!({"ok": true, "id": id}),
                Err(e) => relay_error_reply(&e, "send"),
            }
        }
        _ => {
            let req = if message.payload.is_empty() {
                ResyncRequest::default()
            } else {
                match serde_json::from_slice::<ResyncRequest>(&message.payload) {
                    Ok(r) => r,
                    Err(_) => return error_reply(Errno::BadParam),
                }
            };
            match relay.resync(host, req.cursor).await {
                Ok((players, next)) => json!({
                    "ok": true,
                    "host": HostId::to_string(&host),
                    "players": players,
                    "next_cursor": next,
                }),
                Err(e) => relay_error_reply(&e, "resync"),
            }
        }
    }
}

/// Idempotency keys become part of an event id: printable ASCII without spaces, at most
/// 64 bytes.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_go_only_to_the_requesting_hosts_inboxes() {
        let send = names::service_host("gm.relay.gs.3.send");
        assert!(reply_allowed(send, Some("_INBOX.abc.1")));
        assert!(reply_allowed(send, Some("_INBOX_host_3.abc.1")));
        assert!(reply_allowed(names::service_host("gm.relay.gs.-3.resync"), Some("_INBOX_host_-3.x")));
        for refused in [
            None,
            Some("gm.to.host.5"),
            Some("gs.to.gm.7"),
            Some("gm.hist.7.1001.player"),
            Some("$JS.API.STREAM.PURGE.GM_TO_HOST"),
            Some("_INBOX_host_5.abc"),
            Some("_INBOX_host_33.abc"),
            Some("_INBOX_host_3"),
            Some("_INBOX_host_3."),
            Some("_INBOX."),
            Some("_INBOX.>"),
            Some("_INBOX.a.*"),
            Some("_INBOXX.a"),
        ] {
            assert!(!reply_allowed(send, refused), "{refused:?}");
        }
    }
}
