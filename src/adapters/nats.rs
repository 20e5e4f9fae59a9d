//! NATS JetStream adapter: the [`EventBus`] port. Owns stream, subject and consumer names.
//!
//! Streams: `GM_TO_HOST` (`gm.to.host.*`) and `GS_TO_GM` (`gs.to.gm.*`), file storage,
//! limits retention (several consumers read each subject), de-duplication by `Nats-Msg-Id`.
//! The legacy adapter reads through its own durable consumers, never the native
//! `host_<n>` ones: `legacy_chat_<n>` and `legacy_rel_<n>` filtered on `gm.to.host.<n>`, and
//! `legacy_gm` over all of `GS_TO_GM` (no filter: a wildcard filter on a whole-stream
//! consumer is several times slower on current servers).
//!
//! A third stream, `GM_HISTORY` (`gm.hist.<gm>.<uid>.<from>`), keeps a copy of every chat
//! message per conversation for the console; see `nats/HISTORY.md` and [`console`].
//!
//! On a cluster, streams have `GM_RELAY_STREAM_REPLICAS` replicas and consumers
//! `GM_RELAY_CONSUMER_REPLICAS` (default: as many as their stream). An R1 consumer is ~18x
//! cheaper to create and has no Raft group of its own, but while the node that holds it is
//! down, its feed stalls (nothing is lost; it resumes when the node returns); an R3
//! consumer keeps serving through the loss of one node. Consumers keep their state on
//! disk: a memory-storage consumer would forget its acks on a restart and deliver the
//! whole retention window again.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{
    ConsumerCreateStrictErrorKind, ConsumerError, ConsumerErrorKind, LastRawMessageErrorKind,
};
use async_nats::jetstream::{self, consumer, stream, AckKind};
use bytes::Bytes;
use futures::StreamExt;

use crate::domain::event::ENVELOPE_VERSION;
use crate::domain::order;
use crate::domain::ports::{Delivery, EventBus, Feed, FetchFailed, Route, Settle, Stored};
use crate::domain::{Backend, Envelope, HostId, RelayError};
use crate::metrics::Metrics;

pub mod console;
mod history;
pub mod replay;

pub mod names {
    //! Every subject, stream and consumer name, in one place.
    use crate::domain::ports::{Feed, Route};

    use crate::domain::HostId;

    pub const STREAM_TO_HOST: &str = "GM_TO_HOST";
    pub const STREAM_TO_GM: &str = "GS_TO_GM";
    pub const SUBJECTS_TO_HOST: &str = "gm.to.host.*";
    pub const SUBJECTS_TO_GM: &str = "gs.to.gm.*";
    /// Conversation history for the console: `gm.hist.<gm>.<uid>.<from>`, `from` being `gm`
    /// or `player`. Its own subjects, so reading one conversation reads nothing else.
    pub const STREAM_HISTORY: &str = "GM_HISTORY";
    pub const SUBJECTS_HISTORY: &str = "gm.hist.*.*.*";

    /// Who wrote a chat message: the last token of its history subject.
    pub fn history_from(route: Route) -> &'static str {
        match route {
            Route::ToHost(_) => "gm",
            Route::ToGm(_) => "player",
        }
    }

    /// `gm.hist.<gm>.<uid>.<from>`; `from` may be `*` for both directions.
    pub fn history_subject(gm: crate::domain::GmId, uid: crate::domain::Uid, from: &str) -> String {
        format!("gm.hist.{gm}.{uid}.{from}")
    }

    pub fn subject(route: Route) -> String {
        match route {
            Route::ToHost(h) => format!("gm.to.host.{h}"),
            Route::ToGm(g) => format!("gs.to.gm.{g}"),
        }
    }

    /// The stream, durable name and filter of a legacy feed's consumer.
    pub fn feed_consumer(feed: Feed) -> (&'static str, String, String) {
        match feed {
            Feed::HostChat(h) => (STREAM_TO_HOST, format!("legacy_chat_{h}"), subject(Route::ToHost(h))),
            Feed::HostRelation(h) => (STREAM_TO_HOST, format!("legacy_rel_{h}"), subject(Route::ToHost(h))),
            Feed::GmChat => (STREAM_TO_GM, "legacy_gm".to_owned(), String::new()),
        }
    }

    /// The native consumer a game server binds: `host_<n>` on `gm.to.host.<n>`.
    pub fn host_consumer(host: HostId) -> String {
        format!("host_{host}")
    }

    /// Requests of native game servers: `gm.relay.gs.<host>.send` / `.resync`.
    pub const SERVICE_PREFIX: &str = "gm.relay.gs";
    pub const SERVICE_SEND: &str = "gm.relay.gs.*.send";
    pub const SERVICE_RESYNC: &str = "gm.relay.gs.*.resync";

    /// The host of a service request subject, if it is one of ours and canonical.
    pub fn service_host(subject: &str) -> Option<HostId> {
        let rest = subject.strip_prefix(SERVICE_PREFIX)?.strip_prefix('.')?;
        let (host, _verb) = rest.split_once('.')?;
        HostId::parse(host.as_bytes())
    }
}

/// A publish not acknowledged within this is reported as NATS unavailable (errno 10).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one ordered batch of the outbox, its sends and PubAcks together: a healthy
/// broker acknowledges a full batch in milliseconds, and the drainer must be done well
/// inside its 5 s lease (`outbox.rs`), or another relay could publish beside it.
const ORDERED_BATCH_TIMEOUT: Duration = Duration::from_secs(3);

/// One attempt of a publish; a PubAck normally takes ~0.1 ms, so an attempt this slow was
/// lost and is retried (same message id) while [`PUBLISH_TIMEOUT`] allows.
const PUBLISH_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(600);

/// Bound on a health check's round trip to NATS (`/readyz`): a server that takes longer
/// to answer a PING is not one to send traffic to.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause before retrying a failed publish attempt (e.g. "no responders" during a stream
/// leader election).
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Bound on a fetch (request to last message); no-wait fetches return at once normally.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on applying a poll's acks and naks, up to the server's confirmation of the last:
/// thousands of acks share a few writes and take milliseconds on a healthy connection.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on consumer or stream management calls.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Redelivery of a poll's events if its acks never arrive (relay died mid-poll, or its
/// acks failed). A poll's fetching ends within 3 s of asking for its lease
/// (`relay::POLL_FETCH_BUDGET`), and 3 + 10 s is under the poll lease (15 s,
/// `relay::POLL_LEASE_TTL`): when the lease expires, what the poll was handed is already
/// due again, and the next poll gets it before anything newer, in stream order. Were it
/// longer, the next polls would serve newer events first and the old ones after (a friend
/// add after the remove that undid it). One window is left: a pull request queued by the
/// client while its connection drops is sent after the reconnect, possibly after the
/// lease; what the broker then hands to the gone inbox comes back 10 s later, behind
/// whatever the polls in between served.
pub const LEGACY_ACK_WAIT: Duration = Duration::from_secs(10);

/// Events fetched but not yet acked per legacy consumer: one poll's worth (1,000) plus
/// the nak'd remainders of busy conversations, with room to spare.
const LEGACY_MAX_ACK_PENDING: i64 = 20_000;

/// Native host consumers: a game server has this long to ack an event before it is
/// redelivered. Game servers process an event in milliseconds; 30 s rides out a pause.
pub const HOST_ACK_WAIT: Duration = Duration::from_secs(30);

/// Events a game server may hold unacked; it stops receiving more until it acks.
pub const HOST_MAX_ACK_PENDING: i64 = 10_000;

/// De-duplication window: an outbox republish or a client retry within this is dropped.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Cached consumer handles; past this the cache starts over (a lookup is one API call).
const MAX_CACHED_CONSUMERS: usize = 50_000;

/// Consumers allowed on each stream. nats-server 2.15 caps a stream that sets no limit at
/// 1,000 consumers (`default_max_consumers`), and `GM_TO_HOST` holds up to three per host
/// (`legacy_chat_<n>`, `legacy_rel_<n>`, `host_<n>`) plus ops tools': this leaves room for
/// 10,000 hosts while a runaway creator still hits a wall.
pub const MAX_CONSUMERS_PER_STREAM: i32 = 30_000;

/// After the server refused to create a consumer (the stream's consumer limit, say), polls
/// of its feed fail at once (errno 10) for this long instead of asking again: a host polls
/// every second or so, and each refused creation costs the server three API calls (look
/// up, create, look up again), so a thousand such hosts would otherwise keep JetStream's
/// API busy with nothing else.
const CREATE_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Failed creations remembered at once; past it the oldest are forgotten (a forgotten one
/// is merely asked for again).
const MAX_REMEMBERED_FAILURES: usize = 10_000;

/// Remembers `key` until `for_` from now in a map of at most `max` entries: past it the
/// expired go, and if none has, all (a forgotten entry is merely asked about again).
fn remember_until<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Instant>,
    key: K,
    for_: Duration,
    max: usize,
) {
    let now = Instant::now();
    if map.len() >= max {
        map.retain(|_, until| *until > now);
        if map.len() >= max {
            map.clear();
        }
    }
    map.insert(key, now + for_);
}

/// A host's legacy feed found with no consumer and nothing stored for the host is not
/// looked at again for this long: its polls answer empty without asking JetStream. A relay
/// that publishes to the host forgets the mark at once; through another relay, a new
/// host's first message is served up to this late.
const NOTHING_STORED_RECHECK: Duration = Duration::from_secs(5);

/// Hosts remembered as having nothing stored; past it the marks start over (a forgotten
/// one is merely looked at again).
const MAX_NOTHING_STORED: usize = 100_000;

/// Whether [`JetStreamBus::get_or_create`] may create a missing consumer.
#[derive(Clone, Copy)]
enum Create {
    Always,
    /// Only when something is stored on the host's subject: a poll for a host id nothing
    /// was ever sent to (a misconfigured game server, a typo, a scan) must not leave a
    /// durable consumer behind, or enough of them would fill the stream's consumer limit
    /// and stop real hosts from getting theirs. Nothing is lost by waiting: the consumer
    /// delivers from the stream's start.
    IfStored(HostId),
}

/// Bound on connecting to NATS at start-up (per attempt over the configured servers).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to NATS: `urls` is one URL or several separated by commas (the nodes of a
/// cluster; the client also learns the others from the server and reconnects to any).
pub async fn connect(
    urls: &str,
    nkey_seed: Option<&str>,
    client_name: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    connect_with(options(nkey_seed, client_name), urls).await
}

/// How often the relay's connections ping the server. The client drops a connection once
/// more than two pings go unanswered, so a half-open connection (the server gone without
/// a reset) is left within about 30 s rather than the default 3 minutes: well inside the
/// streams' 2-minute de-duplication window, so publishes stuck in its socket cannot reach
/// the server after their retries were stored and de-duplicated no more.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// The relay's connection options: credentials, name, start-up bound, keep-alive and
/// event logging.
pub fn options(nkey_seed: Option<&str>, client_name: &str) -> async_nats::ConnectOptions {
    let options = match nkey_seed {
        Some(seed) => async_nats::ConnectOptions::with_nkey(seed.to_owned()),
        None => async_nats::ConnectOptions::new(),
    };
    let slow = Arc::new(SlowConsumerLog::default());
    let connection: Arc<str> = client_name.into();
    options.name(client_name).connection_timeout(CONNECT_TIMEOUT).ping_interval(PING_INTERVAL).event_callback(
        move |event| {
            let (slow, connection) = (Arc::clone(&slow), Arc::clone(&connection));
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => slow.record(&connection, sid),
                    event => tracing::info!(%event, %connection, "nats connection event"),
                }
            }
        },
    )
}

/// Connects with `options` to `urls` (see [`connect`]).
pub async fn connect_with(
    options: async_nats::ConnectOptions,
    urls: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let servers: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    options.connect(servers).await
}

/// Least time between two log lines about messages dropped for a full subscription buffer:
/// the client reports every dropped message, and a flood must not become a flood of logs.
const SLOW_CONSUMER_LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts the client's slow-consumer reports (a message dropped because its subscription's
/// buffer was full) and logs them at most once per [`SLOW_CONSUMER_LOG_EVERY`]. The count
/// is a floor: the client drops its own reports when they come faster than they are read,
/// and drops after the last line are told with the next one.
#[derive(Default)]
struct SlowConsumerLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl SlowConsumerLog {
    fn record(&self, connection: &str, sid: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, dropped) = &mut *state;
        *dropped += 1;
        if last.is_none_or(|at| at.elapsed() >= SLOW_CONSUMER_LOG_EVERY) {
            tracing::warn!(
                connection,
                subscription = sid,
                dropped_at_least = *dropped,
                "nats subscription buffer full: messages dropped"
            );
            *last = Some(Instant::now());
            *dropped = 0;
        }
    }
}

/// Why the streams could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StreamSetupError {
    /// JetStream reserves every stream's `max_bytes` up front; the server's
    /// `max_file_store` (by default 75% of the store directory's free disk) has no room
    /// left for this one. Retrying does not help, so this is told apart from an outage.
    #[error(
        "JetStream has no storage left to reserve {max_bytes} bytes for stream {stream}: \
         lower GM_RELAY_RETENTION_MAX_BYTES (every stream reserves it) or raise the \
         server's jetstream max_file_store"
    )]
    NoStorage { stream: &'static str, max_bytes: i64 },
    #[error(transparent)]
    Unavailable(#[from] RelayError),
}

/// Stream limits from the settings.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    pub max_age: Duration,
    pub max_bytes: i64,
    pub replicas: usize,
}

pub struct JetStreamBus {
    client: async_nats::Client,
    js: jetstream::Context,
    consumers: Mutex<HashMap<Feed, PullConsumer>>,
    /// Hosts whose native consumer is known to exist.
    host_consumers: Mutex<HashSet<HostId>>,
    /// Consumers whose creation failed lately, by durable name: not asked for again
    /// before [`CREATE_RETRY_PAUSE`], so hosts polling a consumer that cannot be made (the
    /// stream's consumer limit, a cluster without quorum) do not turn every poll into
    /// failing API calls.
    failed_creations: Mutex<HashMap<String, Instant>>,
    /// Hosts without a legacy consumer and with nothing stored, until when to believe it.
    nothing_stored: Mutex<HashMap<HostId, Instant>>,
    /// Publishes to any host acknowledged so far: a "nothing stored" answer is only
    /// believed if none was acknowledged while it was being asked.
    host_publishes: AtomicU64,
    /// Replicas of the consumers this bus creates; 0 = as many as their stream.
    consumer_replicas: usize,
    /// Writes the console's history copies behind the sends.
    history: history::HistoryWriter,
    metrics: Arc<Metrics>,
}

fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> RelayError {
    RelayError::unavailable(Backend::Nats, e)
}

impl JetStreamBus {
    /// Must be called within a Tokio runtime: it starts the history writer's task.
    pub fn new(client: async_nats::Client, metrics: Arc<Metrics>) -> Self {
        let js = jetstream::new(client.clone());
        let history = history::HistoryWriter::start(client.clone(), js.clone(), Arc::clone(&metrics));
        Self {
            client,
            js,
            consumers: Mutex::new(HashMap::new()),
            host_consumers: Mutex::new(HashSet::new()),
            failed_creations: Mutex::new(HashMap::new()),
            nothing_stored: Mutex::new(HashMap::new()),
            host_publishes: AtomicU64::new(0),
            consumer_replicas: 0,
            history,
            metrics,
        }
    }

    /// Waits (at most `bound`) until the history copies of every chat message this relay
    /// has answered are written, so that a history read sees them. Returns whether it did.
    pub async fn flush_history(&self, bound: Duration) -> bool {
        self.history.flush(bound).await
    }

    /// Consumers created from now on get `replicas` replicas (0 = as their stream).
    /// Existing consumers keep theirs.
    pub fn with_consumer_replicas(mut self, replicas: usize) -> Self {
        self.consumer_replicas = replicas;
        self
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Creates the streams, or updates their limits, idempotently.
    pub async fn ensure_streams(&self, limits: &StreamLimits) -> Result<(), StreamSetupError> {
        for (name, subjects) in [
            (names::STREAM_TO_HOST, names::SUBJECTS_TO_HOST),
            (names::STREAM_TO_GM, names::SUBJECTS_TO_GM),
            (names::STREAM_HISTORY, names::SUBJECTS_HISTORY),
        ] {
            let config = stream::Config {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                discard: stream::DiscardPolicy::Old,
                max_age: limits.max_age,
                max_bytes: limits.max_bytes,
                num_replicas: limits.replicas,
                duplicate_window: DUPLICATE_WINDOW,
                max_consumers: MAX_CONSUMERS_PER_STREAM,
                // The console pages history with direct gets, which any replica serves.
                allow_direct: name == names::STREAM_HISTORY,
                ..Default::default()
            };
            let created = tokio::time::timeout(API_TIMEOUT, self.js.create_or_update_stream(config))
                .await
                .map_err(unavailable)?;
            match created {
                Ok(_) => {}
                Err(e)
                    if matches!(e.kind(), CreateStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED) =>
                {
                    return Err(StreamSetupError::NoStorage { stream: name, max_bytes: limits.max_bytes });
                }
                Err(e) => return Err(unavailable(e).into()),
            }
        }
        Ok(())
    }

    /// The legacy consumer of `feed`; `None` for a host's feed whose consumer does not
    /// exist while nothing is stored for the host (see [`Create::IfStored`]).
    async fn consumer(&self, feed: Feed) -> Result<Option<PullConsumer>, RelayError> {
        self.ensure_connected()?;
        if let Some(c) = self.consumers.lock().unwrap_or_else(|p| p.into_inner()).get(&feed) {
            return Ok(Some(c.clone()));
        }
        let create = match feed {
            Feed::HostChat(host) | Feed::HostRelation(host) => Create::IfStored(host),
            Feed::GmChat => Create::Always,
        };
        if let Create::IfStored(host) = create {
            let marks = self.nothing_stored.lock().unwrap_or_else(|p| p.into_inner());
            if marks.get(&host).is_some_and(|until| Instant::now() < *until) {
                return Ok(None);
            }
        }
        let (stream_name, durable, filter) = names::feed_consumer(feed);
        let config = consumer::pull::Config {
            durable_name: Some(durable.clone()),
            filter_subject: filter,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: LEGACY_ACK_WAIT,
            max_deliver: -1,
            max_ack_pending: LEGACY_MAX_ACK_PENDING,
            deliver_policy: consumer::DeliverPolicy::All,
            num_replicas: self.consumer_replicas,
            ..Default::default()
        };
        let Some(created) = self.get_or_create(stream_name, &durable, config, create).await? else {
            return Ok(None);
        };
        let mut cache = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_CONSUMERS {
            cache.clear();
        }
        cache.insert(feed, created.clone());
        Ok(Some(created))
    }

    /// Whether anything is stored on the host's subject now. A "no" is remembered for
    /// [`NOTHING_STORED_RECHECK`].
    async fn anything_stored(&self, host: HostId) -> Result<bool, RelayError> {
        let publishes = self.host_publishes.load(Ordering::Acquire);
        let stream = self.js.get_stream_no_info(names::STREAM_TO_HOST).await.map_err(unavailable)?;
        match stream.get_last_raw_message_by_subject(&names::subject(Route::ToHost(host))).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                let mut marks = self.nothing_stored.lock().unwrap_or_else(|p| p.into_inner());
                // A publish acknowledged meanwhile may be this host's, stored after the
                // answer was made: then look again at the next poll.
                if self.host_publishes.load(Ordering::Acquire) != publishes {
                    return Ok(false);
                }
                remember_until(&mut marks, host, NOTHING_STORED_RECHECK, MAX_NOTHING_STORED);
                Ok(false)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    fn forget_consumer(&self, feed: Feed) {
        self.consumers.lock().unwrap_or_else(|p| p.into_inner()).remove(&feed);
    }

    /// Binds the durable consumer `name` of `stream`, creating it with `config` if it does
    /// not exist and `create` allows (else `None`): one API call when it exists (no stream
    /// lookup first), two when it is created, three with [`Create::IfStored`]. An existing
    /// consumer keeps its own configuration. A refusal by the server is remembered for
    /// [`CREATE_RETRY_PAUSE`], during which the same name fails at once.
    async fn get_or_create(
        &self,
        stream: &str,
        name: &str,
        config: consumer::pull::Config,
        create: Create,
    ) -> Result<Option<PullConsumer>, RelayError> {
        if let Some(until) = self.failed_creations.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            if Instant::now() < *until {
                return Err(unavailable(format!(
                    "consumer {name} could not be created just now; retrying soon"
                )));
            }
        }
        let not_found = |e: &ConsumerError| {
            matches!(e.kind(), ConsumerErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND)
        };
        // Only a definite refusal by the server (a limit, a bad configuration) is
        // remembered; a timeout, a missing responder or a 503 ("temporarily unavailable")
        // during a leader election is worth asking again at the next poll.
        let definite = |e: Option<&jetstream::Error>| e.is_some_and(|j| j.code() != 503);
        // Boxed: the API requests' futures are ~8 KB, and inline they made the future of
        // every caller that finds its consumer cached, a GM's chat message among them,
        // carry those 8 KB through each move (a send's future was 8.2 KB, now 1.7 KB).
        let result = tokio::time::timeout(API_TIMEOUT, Box::pin(async {
            match self.js.get_consumer_from_stream(name, stream).await {
                // A consumer an earlier relay version created keeps its configuration: bring
                // the ack wait (editable, and shortened since) up to date. If that fails the
                // old one serves on; the next start tries again.
                Ok(mut c) if c.cached_info().config.ack_wait != config.ack_wait => {
                    match self.js.update_consumer_on_stream(config.clone(), stream).await {
                        Ok(updated) => c = updated,
                        Err(e) => tracing::warn!(consumer = name, error = %e, "could not update the consumer's ack wait"),
                    }
                    Ok(Some(c))
                }
                Ok(c) => Ok(Some(c)),
                Err(e) if not_found(&e) => {
                    if let Create::IfStored(host) = create {
                        match self.anything_stored(host).await {
                            Ok(true) => {}
                            Ok(false) => return Ok(None),
                            Err(e) => return Err((false, e)),
                        }
                    }
                    match self.js.create_consumer_strict_on_stream(config, stream).await {
                        Ok(c) => Ok(Some(c)),
                        // Another relay may have created it meanwhile, perhaps with another
                        // configuration; if not, the creation's own error says why.
                        Err(refused) => self.js.get_consumer_from_stream(name, stream).await.map(Some).map_err(|_| {
                            let server = match refused.kind() {
                                ConsumerCreateStrictErrorKind::JetStream(j) => Some(j),
                                _ => None,
                            };
                            (definite(server.as_ref()), unavailable(refused))
                        }),
                    }
                }
                Err(e) => {
                    let server = match e.kind() {
                        ConsumerErrorKind::JetStream(j) => Some(j),
                        _ => None,
                    };
                    Err((definite(server.as_ref()), unavailable(e)))
                }
            }
        }))
        .await;
        let mut failed = self.failed_creations.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(Ok(c)) => {
                failed.remove(name);
                Ok(c)
            }
            Ok(Err((remember, e))) => {
                if remember {
                    remember_until(&mut failed, name.to_owned(), CREATE_RETRY_PAUSE, MAX_REMEMBERED_FAILURES);
                }
                Err(e)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Whether NATS answers now.
    pub async fn ping(&self) -> Result<(), RelayError> {
        use async_nats::connection::State;
        if self.client.connection_state() != State::Connected {
            return Err(unavailable("not connected"));
        }
        tokio::time::timeout(PING_TIMEOUT, self.client.flush())
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }

    /// After a PubAck: the host has something stored from now on, so its polls look again
    /// (and a "nothing stored" answer already on its way is not believed).
    fn stored(&self, route: Route) {
        if let Route::ToHost(host) = route {
            self.host_publishes.fetch_add(1, Ordering::AcqRel);
            self.nothing_stored.lock().unwrap_or_else(|p| p.into_inner()).remove(&host);
        }
    }

    fn route_label(route: Route) -> &'static str {
        match route {
            Route::ToHost(_) => "to_host",
            Route::ToGm(_) => "to_gm",
        }
    }

    /// Fails at once while disconnected. async-nats would otherwise buffer the publish and
    /// send it on reconnect, after the caller answered "unavailable, nothing changed". (A
    /// publish written just before a disconnect can still arrive late; see the README.)
    fn ensure_connected(&self) -> Result<(), RelayError> {
        use async_nats::connection::State;
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(unavailable(format!("NATS connection is {state:?}"))),
        }
    }

    async fn send(
        &self,
        route: Route,
        event: &Envelope,
    ) -> Result<jetstream::context::PublishAckFuture, RelayError> {
        self.send_payload(route, &event.id, encode(event)?).await
    }

    async fn send_payload(
        &self,
        route: Route,
        id: &str,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, RelayError> {
        self.ensure_connected()?;
        let message = PublishMessage::build().payload(payload).message_id(id);
        self.js.send_publish(names::subject(route), message).await.map_err(unavailable)
    }

    /// Publishes and awaits the PubAck. A lost publish or ack (a stream leader change, a
    /// dropped packet) is retried with the same Nats-Msg-Id, so the stream stores the
    /// message once however many attempts reach it.
    async fn publish_payload(&self, route: Route, id: &str, payload: Bytes) -> Result<Stored, RelayError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
        // Set once an attempt failed: it may have been stored all the same, and then the
        // next attempt's "duplicate" is this publish's own first copy.
        let mut retried = false;
        let acked = loop {
            // One timer per attempt (this runs for every message): the attempt's end, or the
            // overall deadline when that comes first.
            let attempt_end = (tokio::time::Instant::now() + PUBLISH_ATTEMPT_TIMEOUT).min(deadline);
            let attempt = tokio::time::timeout_at(attempt_end, async {
                let ack = self.send_payload(route, id, payload.clone()).await?;
                ack.await.map_err(unavailable)
            });
            let error = match attempt.await {
                Ok(Ok(ack)) => break ack,
                Ok(Err(e)) => e,
                Err(elapsed) if attempt_end == deadline => {
                    self.metrics.publish_failures.with_label_values(&[Self::route_label(route)]).inc();
                    return Err(unavailable(elapsed));
                }
                Err(elapsed) => unavailable(elapsed),
            };
            if self.ensure_connected().is_err()
                || tokio::time::Instant::now() + PUBLISH_RETRY_PAUSE >= deadline
            {
                self.metrics.publish_failures.with_label_values(&[Self::route_label(route)]).inc();
                return Err(error);
            }
            tracing::debug!(%id, error = %error, "publish not acknowledged; retrying with the same id");
            self.metrics.publish_retries.with_label_values(&[Self::route_label(route)]).inc();
            retried = true;
            tokio::time::sleep(PUBLISH_RETRY_PAUSE).await;
        };
        self.stored(route);
        // A duplicate after a retry cannot be told from our own earlier attempt: counted as
        // stored now, the truth either way (the message is stored), where "duplicate"
        // could make a game server send its text again under another key.
        let duplicate = acked.duplicate && !retried;
        if duplicate {
            tracing::debug!(%id, "publish was a duplicate; already stored");
            self.metrics.publish_duplicates.with_label_values(&[Self::route_label(route)]).inc();
        }
        self.metrics
            .publish_seconds
            .with_label_values(&[Self::route_label(route)])
            .observe(started.elapsed().as_secs_f64());
        Ok(Stored { seq: acked.sequence, duplicate })
    }
}

fn encode(event: &Envelope) -> Result<Bytes, RelayError> {
    serde_json::to_vec(event).map(Bytes::from).map_err(unavailable)
}

impl EventBus for JetStreamBus {
    type Handle = jetstream::Message;

    async fn publish(&self, route: Route, event: &Envelope) -> Result<u64, RelayError> {
        Ok(self.publish_payload(route, &event.id, encode(event)?).await?.seq)
    }

    async fn publish_chat(&self, route: Route, event: &Envelope) -> Result<Stored, RelayError> {
        let payload = encode(event)?;
        let stored = self.publish_payload(route, &event.id, payload.clone()).await?;
        let seq = stored.seq;
        // Delivered: from here on the send has happened, whatever becomes of its copy.
        if let Some(uid) = event.uid {
            self.history
                .record(history::Copy {
                    subject: names::history_subject(event.gm, uid, names::history_from(route)),
                    id: event.id.clone(),
                    payload,
                    delivery_seq: matches!(route, Route::ToHost(_)).then_some(seq),
                })
                .await;
        }
        Ok(stored)
    }

    async fn publish_ordered(&self, events: &[(Route, Envelope)]) -> (usize, Option<RelayError>) {
        let started = Instant::now();
        // One bound for the whole batch: a batch in flight when the connection drops or a
        // leader is lost must not wait out one timeout per event, past the outbox lease.
        let deadline = tokio::time::Instant::now() + ORDERED_BATCH_TIMEOUT;
        let rounds = order::publish_rounds(events.iter().map(|(_, event)| event));
        let mut acked = vec![false; events.len()];
        let mut error = None;
        // Within a round, send all, then await the acknowledgements: one connection keeps
        // the publish order, and many acks in flight cost one round trip, not N.
        for round in 0..=rounds.iter().copied().max().unwrap_or(0) {
            let mut pending = Vec::new();
            for (i, (route, event)) in events.iter().enumerate().filter(|(i, _)| rounds[*i] == round) {
                let sent = tokio::time::timeout_at(deadline, self.send(*route, event)).await;
                match sent.map_err(unavailable).and_then(|r| r) {
                    Ok(ack) => pending.push((i, ack)),
                    Err(e) => {
                        self.metrics.publish_failures.with_label_values(&["outbox"]).inc();
                        error = Some(e);
                        break;
                    }
                }
            }
            for (i, ack) in pending {
                let stored = tokio::time::timeout_at(deadline, ack.into_future()).await;
                match stored.map_err(unavailable).and_then(|r| r.map_err(unavailable)) {
                    Ok(ack) => {
                        acked[i] = true;
                        self.stored(events[i].0);
                        if ack.duplicate {
                            self.metrics.publish_duplicates.with_label_values(&["outbox"]).inc();
                        }
                    }
                    Err(e) => {
                        self.metrics.publish_failures.with_label_values(&["outbox"]).inc();
                        error.get_or_insert(e);
                    }
                }
            }
            if error.is_some() {
                break;
            }
        }
        // What counts as published is the run of acknowledged events from the start of the
        // batch; from the first gap on, the next drain publishes again, in order (what was
        // stored already is de-duplicated by its id).
        let prefix = acked.iter().take_while(|&&a| a).count();
        if prefix > 0 {
            self.metrics
                .publish_seconds
                .with_label_values(&["outbox"])
                .observe(started.elapsed().as_secs_f64());
        }
        (prefix, error)
    }

    async fn fetch(
        &self,
        feed: Feed,
        max: usize,
        into: &mut Vec<Delivery<Self::Handle>>,
        until: tokio::time::Instant,
    ) -> Result<(), FetchFailed> {
        // Until the pull request is sent, the broker has handed out nothing: a slow
        // consumer lookup cut at `until` leaves nothing in doubt.
        let not_requested = |error| FetchFailed { error, requested: false };
        let looked_up = tokio::time::timeout_at(until, self.consumer(feed)).await.map_err(|elapsed| {
            not_requested(unavailable(format!("consumer lookup cut at the poll's budget: {elapsed}")))
        })?;
        let Some(consumer) = looked_up.map_err(not_requested)? else {
            // Nothing was ever sent to this host: nothing to serve.
            return Ok(());
        };
        let fetch_end = until.min(tokio::time::Instant::now() + FETCH_TIMEOUT);
        let fetched = tokio::time::timeout_at(fetch_end, async {
            let mut batch = consumer.fetch().max_messages(max).messages().await.map_err(unavailable)?;
            while let Some(message) = batch.next().await {
                // A status other than "no more messages" (a consumer leader change) ends
                // the round after what it already delivered; those stay in `into`.
                let message = message.map_err(unavailable)?;
                let stream_seq = message.info().map(|i| i.stream_sequence).map_err(unavailable)?;
                let event = serde_json::from_slice::<Envelope>(&message.payload)
                    .ok()
                    .filter(|e| e.v == ENVELOPE_VERSION);
                if event.is_none() {
                    tracing::warn!(subject = %message.subject, stream_seq, "skipping a message that is not a valid envelope");
                }
                into.push(Delivery { stream_seq, event, handle: message });
            }
            Ok::<_, RelayError>(())
        })
        .await;
        let error = match fetched {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                // The consumer may have been deleted behind our back: look it up again.
                self.forget_consumer(feed);
                e
            }
            Err(e) => unavailable(e),
        };
        Err(FetchFailed { error, requested: true })
    }

    async fn ensure_host_consumer(&self, host: HostId) -> Result<(), RelayError> {
        self.ensure_connected()?;
        if self.host_consumers.lock().unwrap_or_else(|p| p.into_inner()).contains(&host) {
            return Ok(());
        }
        let name = names::host_consumer(host);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: names::subject(Route::ToHost(host)),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: HOST_ACK_WAIT,
            max_deliver: -1,
            max_ack_pending: HOST_MAX_ACK_PENDING,
            deliver_policy: consumer::DeliverPolicy::All,
            description: Some(format!("native game server {host}")),
            num_replicas: self.consumer_replicas,
            ..Default::default()
        };
        self.get_or_create(names::STREAM_TO_HOST, &name, config, Create::Always).await?;
        let mut known = self.host_consumers.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_CACHED_CONSUMERS {
            known.clear();
        }
        known.insert(host);
        Ok(())
    }

    async fn settle(&self, mut settles: Vec<(Self::Handle, Settle)>) -> Result<(), RelayError> {
        // Naks first, then acks; only the last is confirmed by the server. The server
        // applies one consumer's acks in arrival order, so the confirmation means all of
        // them were applied and the next fetch sees the nak'd messages first, in order.
        settles.sort_by_key(|(_, s)| matches!(s, Settle::Ack));
        let Some((last, last_kind)) = settles.pop() else {
            return Ok(());
        };
        let kind = |s: Settle| match s {
            Settle::Ack => AckKind::Ack,
            Settle::Nak => AckKind::Nak(None),
        };
        // One bound for all of them: while disconnected, sends wait for room in the
        // client's queue, and a poll's turn must not wait with them.
        tokio::time::timeout(SETTLE_TIMEOUT, async {
            for (message, s) in &settles {
                message.ack_with(kind(*s)).await.map_err(unavailable)?;
            }
            last.double_ack_with(kind(last_kind)).await.map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }
}
