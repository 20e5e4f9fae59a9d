//! The servers a benchmark run starts (nats-server, redis-server, the relay), each a child
//! process on 127.0.0.1 killed when its guard drops (also on Ctrl-C, and through
//! `PR_SET_PDEATHSIG` when the benchmark itself dies), and what is read from them:
//! CPU and RSS from `/proc`, nats-server monitoring (`/varz`, `/jsz`, `/connz`), Redis
//! `INFO commandstats`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::http::HttpConn;

/// Bound on a server starting to answer.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A temporary directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child when
        // the thread that spawned it (a runtime worker, alive as long as the benchmark) exits.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("cannot run {name} ({:?})", cmd.get_program()))?;
        Ok(Proc { name: name.to_owned(), child: Some(child), log })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9` and reap (the soak's fault injection).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Fails with the log when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!("{} exited ({status}):\n{tail}", self.name);
            }
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?.local_addr()?.port())
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn find_binary(env_var: &str, preferred: &[PathBuf], name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    preferred.iter().find(|p| p.is_file()).cloned().or_else(|| on_path(name)).with_context(|| {
        format!("{name} not found (${env_var}, {preferred:?}, PATH); ./deploy/test installs it")
    })
}

/// The repository root: from the build, or the current directory.
fn repo_root() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.is_dir() {
        built
    } else {
        std::env::current_dir().unwrap_or_default()
    }
}

/// Per-stream consumer cap given to the benchmark's nats-server (see [`NatsServer::start`]).
pub const LIFTED_MAX_CONSUMERS: u32 = 100_000;

/// `--stock-nats-limits`: leave nats-server's default consumer cap in place.
pub static STOCK_LIMITS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// nats-server `sync_interval` modes measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The server's default: fsync every 2 minutes.
    Default,
    OneSecond,
    Always,
}

impl SyncMode {
    pub fn label(self) -> &'static str {
        match self {
            SyncMode::Default => "default (2 min)",
            SyncMode::OneSecond => "1s",
            SyncMode::Always => "always",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            SyncMode::Default => "default",
            SyncMode::OneSecond => "sync_1s",
            SyncMode::Always => "sync_always",
        }
    }
}

pub struct NatsServer {
    pub proc: Proc,
    pub url: String,
    pub monitor: SocketAddr,
    binary: PathBuf,
    args: Vec<std::ffi::OsString>,
    restarts: u32,
    _dir: TempDir,
}

impl NatsServer {
    pub async fn start(mode: SyncMode) -> Result<NatsServer> {
        let binary = find_binary(
            "GM_RELAY_NATS_SERVER",
            &[repo_root().join("var/venv/bin/nats-server")],
            "nats-server",
        )?;
        let dir = TempDir::new("gm-relay-bench-nats")?;
        let (port, mport) = (free_port()?, free_port()?);
        let store = dir.path().join("store");
        let mut cmd = Command::new(&binary);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-m", &mport.to_string(), "-js"]);
        let interval = match mode {
            SyncMode::Default => String::new(),
            SyncMode::OneSecond => "  sync_interval: \"1s\"\n".to_owned(),
            SyncMode::Always => "  sync_interval: always\n".to_owned(),
        };
        // nats-server 2.15 caps every stream that leaves `max_consumers` unset at
        // `default_max_consumers` (1,000) consumers; the relay needs three per host on
        // GM_TO_HOST. Lifted here unless `--stock-nats-limits`, so the workloads measure
        // speed rather than that cap (which the report names as a finding).
        let limits = if STOCK_LIMITS.load(std::sync::atomic::Ordering::Relaxed) {
            String::new()
        } else {
            format!("  limits {{ default_max_consumers: {LIFTED_MAX_CONSUMERS} }}\n")
        };
        let conf = dir.path().join("nats.conf");
        // The store directory comes from `-sd` (the config may not name it a second time).
        // `max_file_store` as in the shipped configs: unset, nats-server takes 75% of the
        // free disk, and the relay's three streams reserve 10 GiB each up front.
        let text = format!("jetstream {{\n  max_file_store: 40GB\n{interval}{limits}}}\n");
        std::fs::write(&conf, text)?;
        cmd.arg("-c").arg(&conf).arg("-sd").arg(&store);
        let args = cmd.get_args().map(|a| a.to_owned()).collect();
        let proc = Proc::spawn("nats-server", cmd, dir.path().join("nats.log"))?;
        let mut server = NatsServer {
            proc,
            url: format!("nats://127.0.0.1:{port}"),
            monitor: SocketAddr::from((Ipv4Addr::LOCALHOST, mport)),
            binary,
            args,
            restarts: 0,
            _dir: dir,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    /// `kill -9`, then the same server again: same ports, config and store directory.
    pub async fn kill_and_restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.restarts += 1;
        let log = self._dir.path().join(format!("nats-{}.log", self.restarts));
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args);
        self.proc = Proc::spawn("nats-server", cmd, log)?;
        self.wait_healthy().await
    }

    async fn wait_healthy(&mut self) -> Result<()> {
        let server = self;
        let started = Instant::now();
        loop {
            server.proc.check_alive()?;
            if let Ok(v) = monitor_get(server.monitor, "/healthz?js-enabled-only=true").await {
                if v.get("status").and_then(Value::as_str) == Some("ok") {
                    return Ok(());
                }
            }
            if started.elapsed() > START_DEADLINE {
                bail!("nats-server did not become healthy within {START_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub struct RedisServer {
    pub proc: Proc,
    pub url: String,
    _dir: TempDir,
}

impl RedisServer {
    pub async fn start() -> Result<RedisServer> {
        let binary = find_binary("GM_RELAY_REDIS_SERVER", &[], "redis-server")?;
        let dir = TempDir::new("gm-relay-bench-redis")?;
        let port = free_port()?;
        let mut cmd = Command::new(&binary);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path());
        let proc = Proc::spawn("redis-server", cmd, dir.path().join("redis.log"))?;
        let mut server = RedisServer { proc, url: format!("redis://127.0.0.1:{port}"), _dir: dir };
        let started = Instant::now();
        loop {
            server.proc.check_alive()?;
            if let Ok(client) = redis::Client::open(server.url.as_str()) {
                if let Ok(Ok(mut conn)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    client.get_multiplexed_async_connection(),
                )
                .await
                {
                    if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                        return Ok(server);
                    }
                }
            }
            if started.elapsed() > START_DEADLINE {
                bail!("redis-server did not answer within {START_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub struct RelayProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    nats_url: String,
    redis_url: String,
    restarts: u32,
    _dir: TempDir,
}

impl RelayProc {
    /// Starts the `gm-relay` binary next to this executable with rate limits off.
    pub async fn start(nats_url: &str, redis_url: &str) -> Result<RelayProc> {
        let dir = TempDir::new("gm-relay-bench-relay")?;
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let proc = Self::spawn(addr, nats_url, redis_url, dir.path().join("relay.log"))?;
        let mut relay = RelayProc {
            proc,
            addr,
            nats_url: nats_url.to_owned(),
            redis_url: redis_url.to_owned(),
            restarts: 0,
            _dir: dir,
        };
        wait_ready(addr, Some(&mut relay.proc)).await?;
        Ok(relay)
    }

    /// `kill -9`, then a new relay on the same address (clients keep their URL).
    pub async fn kill_and_restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.restarts += 1;
        let log = self._dir.path().join(format!("relay-{}.log", self.restarts));
        self.proc = Self::spawn(self.addr, &self.nats_url, &self.redis_url, log)?;
        wait_ready(self.addr, Some(&mut self.proc)).await
    }

    fn spawn(addr: SocketAddr, nats_url: &str, redis_url: &str, log: PathBuf) -> Result<Proc> {
        let binary = std::env::current_exe()?.with_file_name("gm-relay");
        if !binary.is_file() {
            bail!(
                "{} not found: build it beside the benchmark (cargo build --release --bin gm-relay)",
                binary.display()
            );
        }
        let mut cmd = Command::new(&binary);
        cmd.arg("serve")
            .env("GM_RELAY_LISTEN", addr.to_string())
            .env("GM_RELAY_NATS_URL", nats_url)
            .env("GM_RELAY_REDIS_URL", redis_url)
            .env("GM_RELAY_RATE_GM_PER_S", "0")
            .env("GM_RELAY_RATE_PLAYER_PER_S", "0")
            .env("GM_RELAY_RATE_IP_PER_S", "0")
            .env("GM_RELAY_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .env_remove("GM_RELAY_CONFIG");
        Proc::spawn("gm-relay", cmd, log)
    }
}

/// Waits until `GET /readyz` answers 200.
pub async fn wait_ready(addr: SocketAddr, mut proc: Option<&mut Proc>) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(p) = proc.as_deref_mut() {
            p.check_alive()?;
        }
        if let Ok(mut conn) = HttpConn::connect(addr).await {
            if let Ok((200, _)) = conn.get("/readyz").await {
                return Ok(());
            }
        }
        if started.elapsed() > START_DEADLINE {
            bail!("the relay at {addr} was not ready within {START_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A GET on the nats-server monitoring port, parsed as JSON.
pub async fn monitor_get(addr: SocketAddr, path: &str) -> Result<Value> {
    let mut conn = HttpConn::connect(addr).await?;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), conn.get(path)).await??;
    if status != 200 {
        bail!("GET {path}: status {status}");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// CPU seconds (user + system) and RSS of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStat {
    pub cpu_s: f64,
    pub rss_mb: f64,
    pub hwm_mb: f64,
}

/// The process's CPU time in nanoseconds (all its threads, living and ended): `/proc`'s
/// utime and stime count 10 ms ticks, which over W3's 1-second rounds is ±12% of the
/// relay's CPU per operation.
fn process_cpu_clock(pid: u32) -> Option<f64> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: both calls only write through the valid pointers given; a pid that has gone
    // away makes them return an error, which is handled.
    unsafe {
        if libc::clock_getcpuclockid(pid, &mut clock) != 0 || libc::clock_gettime(clock, &mut ts) != 0 {
            return None;
        }
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_s = process_cpu_clock(pid).unwrap_or(ticks / hz);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(ProcStat { cpu_s, rss_mb: kb("VmRSS:") / 1024.0, hwm_mb: kb("VmHWM:") / 1024.0 })
}

/// CPU % of one core over an interval, CPU seconds in it, and the process's stat at its end.
pub type CpuFigure = (f64, f64, ProcStat);

/// CPU use of the processes of a run over an interval.
#[derive(Debug, Clone)]
pub struct CpuWatch {
    pids: Vec<(&'static str, Option<u32>)>,
    start: Vec<Option<ProcStat>>,
    at: Instant,
}

impl CpuWatch {
    pub fn start(pids: &[(&'static str, Option<u32>)]) -> CpuWatch {
        let start = pids.iter().map(|(_, p)| p.and_then(proc_stat)).collect();
        CpuWatch { pids: pids.to_vec(), start, at: Instant::now() }
    }

    /// (name, CPU % of one core over the interval, CPU seconds, stat now) per process.
    pub fn stop(&self) -> Vec<(&'static str, Option<CpuFigure>)> {
        let secs = self.at.elapsed().as_secs_f64().max(1e-6);
        self.pids
            .iter()
            .zip(&self.start)
            .map(|((name, pid), start)| {
                let now = pid.and_then(proc_stat);
                let figure = match (start, now) {
                    (Some(a), Some(b)) => Some((100.0 * (b.cpu_s - a.cpu_s) / secs, b.cpu_s - a.cpu_s, b)),
                    _ => None,
                };
                (*name, figure)
            })
            .collect()
    }
}

/// The figure of the process named `name` in what [`CpuWatch::stop`] returned.
pub fn cpu_of(usage: &[(&'static str, Option<CpuFigure>)], name: &str) -> Option<CpuFigure> {
    usage.iter().find(|(n, _)| *n == name).and_then(|(_, c)| *c)
}

/// Counters that do not suffer from noise: Redis commands (all, including those run inside
/// scripts, less `INFO` itself), JetStream API calls, and the relay connections' NATS
/// messages in and out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub redis_cmds: f64,
    pub js_api: f64,
    pub relay_nats_msgs: f64,
}

pub async fn counters(
    redis: &mut redis::aio::MultiplexedConnection,
    monitor: Option<SocketAddr>,
) -> Counters {
    let mut c = Counters::default();
    if let Ok(info) = redis::cmd("INFO").arg("commandstats").query_async::<String>(redis).await {
        for line in info.lines() {
            let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else {
                continue;
            };
            if name == "info" {
                continue;
            }
            if let Some(calls) = rest.split(',').find_map(|kv| kv.strip_prefix("calls=")) {
                c.redis_cmds += calls.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    if let Some(addr) = monitor {
        if let Ok(jsz) = monitor_get(addr, "/jsz").await {
            c.js_api = jsz["api"]["total"].as_f64().unwrap_or(0.0);
        }
        if let Ok(connz) = monitor_get(addr, "/connz?limit=4096").await {
            for conn in connz["connections"].as_array().into_iter().flatten() {
                // The relay's two connections: the main one and the native service's.
                if matches!(
                    conn["name"].as_str(),
                    Some("gm-relay" | gm_relay::adapters::native::CONNECTION_NAME)
                ) {
                    c.relay_nats_msgs +=
                        conn["in_msgs"].as_f64().unwrap_or(0.0) + conn["out_msgs"].as_f64().unwrap_or(0.0);
                }
            }
        }
    }
    c
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            redis_cmds: self.redis_cmds - o.redis_cmds,
            js_api: self.js_api - o.js_api,
            relay_nats_msgs: self.relay_nats_msgs - o.relay_nats_msgs,
        }
    }
}
