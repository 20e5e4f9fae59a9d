//! One benchmark stack: nats-server, redis-server and the relay (started here, or given by
//! URL), with the clients the workloads use, and the data sets loaded into it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream;
use gm_relay::adapters::redis::RedisStore;
use gm_relay::domain::{GmId, HostId, Uid};

use crate::load::Target;
use crate::procs::{self, Counters, CpuWatch, NatsServer, RedisServer, RelayProc, SyncMode};

/// Window in which the relay must stay quiet, in [`Stack::wait_quiet`].
const QUIET_SAMPLE: Duration = Duration::from_millis(250);

/// Relay NATS messages allowed in a quiet window (PINGs are not counted as messages): slack
/// for a stray one, far below the hundreds a busy relay sends.
const QUIET_NATS_MSGS: f64 = 2.0;

/// How long to wait for quiet: the slowest tail seen is a poll's deferred acks (~1,000
/// messages, well under a second); past this the run goes on and says so.
const QUIET_DEADLINE: Duration = Duration::from_secs(30);

/// Servers to use instead of starting them (`--nats-url`, `--redis-url`, `--relay-url`).
#[derive(Debug, Clone)]
pub struct External {
    pub nats_url: String,
    pub redis_url: String,
    pub relay: SocketAddr,
    pub monitor: Option<SocketAddr>,
}

pub struct Stack {
    // Drop order: the relay before the servers it talks to.
    pub relay: Option<RelayProc>,
    pub nats: Option<NatsServer>,
    pub redis: Option<RedisServer>,
    pub nats_url: String,
    pub relay_addr: SocketAddr,
    pub monitor: Option<SocketAddr>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub store: RedisStore,
    pub redis_conn: redis::aio::MultiplexedConnection,
}

impl Stack {
    pub async fn start(mode: SyncMode, external: Option<&External>) -> Result<Stack> {
        let (nats, redis, relay, nats_url, redis_url, relay_addr, monitor) = match external {
            Some(e) => (None, None, None, e.nats_url.clone(), e.redis_url.clone(), e.relay, e.monitor),
            None => {
                let nats = NatsServer::start(mode).await?;
                let redis = RedisServer::start().await?;
                let relay = RelayProc::start(&nats.url, &redis.url).await?;
                let (n, r, a, m) = (nats.url.clone(), redis.url.clone(), relay.addr, Some(nats.monitor));
                (Some(nats), Some(redis), Some(relay), n, r, a, m)
            }
        };
        if external.is_some() {
            procs::wait_ready(relay_addr, None).await?;
        }
        let client = async_nats::ConnectOptions::new()
            .name("gm-relay-bench")
            .connection_timeout(Duration::from_secs(5))
            .connect(&nats_url)
            .await
            .with_context(|| format!("connect to {nats_url}"))?;
        let js = jetstream::new(client.clone());
        let store =
            RedisStore::connect(&redis_url).await.with_context(|| format!("connect to {redis_url}"))?;
        let redis_conn = redis::Client::open(redis_url.as_str())?.get_multiplexed_async_connection().await?;
        Ok(Stack { relay, nats, redis, nats_url, relay_addr, monitor, client, js, store, redis_conn })
    }

    pub fn target(&self) -> Target {
        Target { http: self.relay_addr, nats: Some(self.client.clone()) }
    }

    pub fn relay_pid(&self) -> Option<u32> {
        self.relay.as_ref().and_then(|r| r.proc.pid())
    }

    pub fn pids(&self) -> Vec<(&'static str, Option<u32>)> {
        vec![
            ("relay", self.relay_pid()),
            ("nats-server", self.nats.as_ref().and_then(|n| n.proc.pid())),
            ("redis-server", self.redis.as_ref().and_then(|r| r.proc.pid())),
            ("bench", Some(std::process::id())),
        ]
    }

    pub fn cpu_watch(&self) -> CpuWatch {
        CpuWatch::start(&self.pids())
    }

    pub async fn counters(&mut self) -> Counters {
        procs::counters(&mut self.redis_conn, self.monitor).await
    }

    /// Waits (bounded) until the relay has finished the work of earlier requests: no JetStream
    /// API call and at most a couple of NATS messages of the relay's in a [`QUIET_SAMPLE`].
    /// A poll answers before it acks what it returned, so the last poll of a warm-up can
    /// leave a thousand acks still to send; an idle baseline measured over them would be
    /// taken off every later operation's counts. Returns whether it got quiet in time.
    pub async fn wait_quiet(&mut self) -> bool {
        let deadline = Instant::now() + QUIET_DEADLINE;
        let mut last = self.counters().await;
        while Instant::now() < deadline {
            tokio::time::sleep(QUIET_SAMPLE).await;
            let now = self.counters().await;
            let d = now - last;
            if d.js_api == 0.0 && d.relay_nats_msgs <= QUIET_NATS_MSGS {
                return true;
            }
            last = now;
        }
        false
    }

    /// Fails when a server this run started has died.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(r) = self.relay.as_mut() {
            r.proc.check_alive()?;
        }
        if let Some(n) = self.nats.as_mut() {
            n.proc.check_alive()?;
        }
        if let Some(r) = self.redis.as_mut() {
            r.proc.check_alive()?;
        }
        Ok(())
    }

    /// Loads `set` (players `from..to`) into Redis directly; returns the seconds it took.
    pub async fn seed(&self, set: &DataSet, from: i64, to: i64) -> Result<f64> {
        let started = Instant::now();
        let gms: Vec<(GmId, String)> = (1..=set.gms).map(|g| (GmId(g), format!("gm{g}"))).collect();
        let links: Vec<(GmId, HostId, Uid)> = (from..to)
            .map(|k| {
                let p = set.player(k);
                (GmId(p.gm), HostId(p.host), Uid(p.uid))
            })
            .collect();
        self.store.seed_friendships(&gms, &links).await.map_err(|e| anyhow::anyhow!("seeding: {e}"))?;
        Ok(started.elapsed().as_secs_f64())
    }
}

/// A player of a data set.
#[derive(Debug, Clone, Copy)]
pub struct Player {
    pub uid: i64,
    pub host: i64,
    pub gm: i64,
}

/// Players `k = 0..` spread over hosts and GMs.
#[derive(Debug, Clone, Copy)]
pub struct DataSet {
    pub host_base: i64,
    pub uid_base: i64,
    pub gms: i64,
    pub layout: Layout,
}

#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// Player k on host `k % hosts`, GM `(k / hosts) % gms`: consecutive players on
    /// different hosts, every host with players of many GMs.
    Striped { hosts: i64 },
    /// Player k on host `k / per_host`, GM `k % gms`: hosts keep their players as the data
    /// set grows (W3).
    Blocks { per_host: i64 },
}

impl DataSet {
    pub fn player(&self, k: i64) -> Player {
        let (host, gm) = match self.layout {
            Layout::Striped { hosts } => (k % hosts, (k / hosts) % self.gms),
            Layout::Blocks { per_host } => (k / per_host, k % self.gms),
        };
        Player { uid: self.uid_base + k, host: self.host_base + host, gm: gm + 1 }
    }

    /// A player on the data set's `h`-th host.
    pub fn player_on_host(&self, h: i64) -> Player {
        match self.layout {
            Layout::Striped { .. } => self.player(h),
            Layout::Blocks { per_host } => self.player(h * per_host),
        }
    }
}
