//! Builds the relay from its [`Config`] and runs it until told to stop.
//!
//! `Application::build` connects to NATS and Redis, ensures the streams and binds the
//! listener (port 0 works, for tests); `run_until_stopped` serves until the shutdown future
//! resolves, then stops accepting, lets in-flight requests finish, drains the outbox and
//! closes connections, all within `GM_RELAY_SHUTDOWN_TIMEOUT_S`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::adapters::http::access::Access;
use crate::adapters::http::{router, AppRelay, AppState};
use crate::adapters::nats::{JetStreamBus, StreamLimits};
use crate::adapters::redis::RedisStore;
use crate::adapters::role::RoleClient;
use crate::config::Config;
use crate::domain::rate::RateLimiter;
use crate::metrics::Metrics;
use crate::relay::{ChatLimits, Relay};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Nats { url: String, source: async_nats::ConnectError },
    #[error("cannot set up JetStream streams: {0}")]
    Streams(crate::adapters::nats::StreamSetupError),
    #[error("cannot connect to Redis at {url}: {source}")]
    Redis { url: String, source: redis::RedisError },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot set up the HTTP client (its TLS roots): {0}")]
    HttpClient(reqwest::Error),
    #[error("no trusted certificate for https:// (SSL_CERT_FILE, SSL_CERT_DIR or the system store): {0}")]
    NoTlsRoots(String),
}

/// The async runtime the relay runs on: `threads` = 1 (the default) is a current-thread
/// runtime, more a multi-thread one with that many workers.
///
/// Why one thread by default: every message the relay publishes (but the native replies) goes
/// through its main NATS connection, whose writer is a task. On a multi-thread runtime the
/// writer, woken by the task that queued a message, runs next in that worker's LIFO slot and
/// writes that one message: one `writev` per message (measured at the native send maximum:
/// ~42,000 `writev`/s for ~29,000 messages/s, also with a single worker). On one thread it runs
/// after every ready task and writes them together (~1,800 `writev`/s), which costs the relay
/// ~30% less CPU per message and the broker fewer reads. A relay therefore uses one core; more
/// relays (they share NATS and Redis) use more.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    config: Config,
    /// The server list's URL and its client, when there is a list to fetch.
    gs_list: Option<(String, reqwest::Client)>,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let client =
            crate::adapters::nats::connect(&config.nats_url, config.nats_nkey_seed.as_deref(), "gm-relay")
                .await
                .map_err(|source| StartError::Nats { url: config.nats_url.clone(), source })?;
        let native = crate::adapters::native::connect(&config.nats_url, config.nats_nkey_seed.as_deref())
            .await
            .map_err(|source| StartError::Nats { url: config.nats_url.clone(), source })?;
        let bus =
            JetStreamBus::new(client, Arc::clone(&metrics)).with_consumer_replicas(config.consumer_replicas);
        let limits = StreamLimits {
            max_age: config.retention_max_age,
            max_bytes: config.retention_max_bytes,
            replicas: config.stream_replicas,
        };
        bus.ensure_streams(&limits).await.map_err(StartError::Streams)?;
        let store = RedisStore::connect(&config.redis_url)
            .await
            .map_err(|source| StartError::Redis { url: config.redis_url.clone(), source })?;
        check_tls_roots(&config)?;
        let roles = match config.role_info_url.clone() {
            Some(template) => {
                RoleClient::new(template, config.role_timeout).map_err(StartError::HttpClient)?
            }
            None => RoleClient::off(),
        };
        let gs_list = match &config.gs_list_url {
            Some(url) => {
                Some((url.clone(), reqwest::Client::builder().build().map_err(StartError::HttpClient)?))
            }
            None => None,
        };
        let relay: Arc<AppRelay> = Arc::new(Relay::new(
            store,
            bus,
            roles,
            ChatLimits { gm_per_s: config.rate_gm_per_s, player_per_s: config.rate_player_per_s },
        ));
        #[cfg(feature = "fault-injection")]
        relay.faults.arm_from_env();
        let access = Arc::new(Access::new(
            config.gm_allow.clone(),
            config.gs_allow.clone(),
            config.trusted_proxies.clone(),
        ));
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let ip_rate = Arc::new(RateLimiter::new(config.rate_ip_per_s));
        let console = config
            .session_key
            .clone()
            .map(|key| crate::console::Console::start(Arc::clone(&relay), Arc::clone(&access), key));
        Ok(Self {
            listener,
            state: AppState { relay, access, metrics, ip_rate, console, native },
            config,
            gs_list,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn relay(&self) -> Arc<AppRelay> {
        Arc::clone(&self.state.relay)
    }

    pub fn access(&self) -> Arc<Access> {
        Arc::clone(&self.state.access)
    }

    /// Serves until `shutdown` resolves, then stops gracefully within the configured bound.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Application { listener, state, config, gs_list } = self;
        // The native interface's own connection (see `adapters::native::REQUEST_BUFFER`).
        let native_client = state.native.clone();
        let (stop_tx, stop_rx) = watch::channel(false);
        let relay = Arc::clone(&state.relay);
        let outbox = tokio::spawn(Arc::clone(&relay).run_outbox(stop_rx.clone()));
        // Its own stop, sent as soon as shutdown begins: the service leaves the queue group
        // at once, so other relays take new native requests while this one finishes.
        let (native_stop_tx, native_stop_rx) = watch::channel(false);
        let native = tokio::spawn({
            let (client, relay, metrics, stop) =
                (native_client.clone(), Arc::clone(&relay), Arc::clone(&state.metrics), native_stop_rx);
            async move {
                if let Err(e) = crate::adapters::native::serve(client, relay, metrics, stop).await {
                    tracing::error!(error = %e, "native NATS interface stopped");
                }
            }
        });
        let gs_list = gs_list.map(|(url, http)| {
            tokio::spawn(refresh_gs_list(
                Arc::clone(&state.access),
                http,
                url,
                config.gs_list_refresh,
                stop_rx.clone(),
            ))
        });

        tracing::info!(addr = %listener.local_addr()?, gm_path = %config.gm_path, gs_path = %config.gs_path, console = state.console.is_some(), "gm-relay serving");
        let console = state.console.clone();
        let app = router(state, &config.gm_path, &config.gs_path);
        let (serve_stop_tx, serve_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::adapters::http::server::serve(
            listener,
            app,
            crate::adapters::http::server::ServerLimits::default(),
            async move {
                let _ = serve_stop_rx.await;
            },
        ));
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing requests, draining the outbox");
        let _ = native_stop_tx.send(true);
        if let Some(console) = &console {
            // Live feeds never finish by themselves; ending them lets the server drain.
            console.close();
        }
        let _ = serve_stop_tx.send(());
        let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
        // Requests get three quarters of the time: a client that never finishes its
        // headers or never reads its reply must not leave the outbox and the history
        // copies (queued in memory only) without time to be written.
        let requests_deadline = deadline - config.shutdown_timeout / 4;
        let server_result = match tokio::time::timeout_at(requests_deadline, server).await {
            Ok(joined) => joined.map_err(std::io::Error::other),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish in time; dropping them");
                Ok(())
            }
        };
        let _ = stop_tx.send(true);
        // Side by side: the outbox keeps what it could not publish in Redis, but history
        // copies are queued in memory only, so a slow outbox drain must not use up their
        // time. The copies of native sends come once the native requests are answered.
        let outbox = async {
            if tokio::time::timeout_at(deadline, outbox).await.is_err() {
                tracing::warn!(
                    "outbox drain did not finish in time; the next relay to start publishes the rest"
                );
            }
        };
        let history = async {
            let _ = tokio::time::timeout_at(deadline, native).await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !relay.bus().flush_history(left).await {
                tracing::warn!("history copies not all written in time; the console history misses them");
            }
        };
        tokio::join!(outbox, history);
        if let Some(task) = gs_list {
            task.abort();
        }
        let _ = tokio::time::timeout_at(deadline, async {
            // The last native replies and the last publishes are written before the exit.
            let _ = tokio::join!(native_client.flush(), relay.bus().client().flush());
        })
        .await;
        tracing::info!("stopped");
        server_result
    }
}

/// The HTTP client starts with an empty trust store when `SSL_CERT_FILE` names a missing
/// or empty file, and every `https://` request would then fail (each `add` for a host
/// from 1000 on answering errno 7): refused at start instead. (Redis and NATS refuse such
/// a store themselves when they connect.)
fn check_tls_roots(config: &Config) -> Result<(), StartError> {
    let https = [&config.role_info_url, &config.gs_list_url]
        .into_iter()
        .flatten()
        .any(|url| url.starts_with("https://"));
    if !https {
        return Ok(());
    }
    let loaded = rustls_native_certs::load_native_certs();
    if loaded.certs.is_empty() {
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        let why = if errors.is_empty() { "none found".to_owned() } else { errors.join("; ") };
        return Err(StartError::NoTlsRoots(why));
    }
    Ok(())
}

async fn refresh_gs_list(
    access: Arc<Access>,
    http: reqwest::Client,
    url: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match access.refresh_gs_list(&http, &url).await {
            Ok(n) => tracing::info!(servers = n, "server list refreshed"),
            Err(e) => {
                tracing::warn!(error = %e, "server list refresh failed; keeping the last good list")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
