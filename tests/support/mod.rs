//! Real servers for integration tests: a `nats-server` with JetStream and a `redis-server`,
//! each on a free loopback port with its own temporary directory, killed when dropped and
//! when the test process dies ([`spawn_child`]).
//!
//! Why real servers: the relay's promises (nothing acknowledged before PubAck, outbox
//! drained after a crash, consumers surviving a restart) are about what the servers do, so
//! mocks would test nothing that matters. The pattern follows the nats.rs and redis-rs test
//! harnesses: nats-server picks its own port (`-p -1`) and we read it from its log; Redis
//! has no such option (`--port 0` disables TCP), so we bind port 0 ourselves, free it and
//! pass it, retrying when somebody else took it in between. A server that dies under a
//! test fails the test at once with its log (the check on `try_wait()`, as Iggy's harness
//! does), instead of a timeout somewhere else.
//!
//! Binaries: `$GM_RELAY_NATS_SERVER` / `$GM_RELAY_REDIS_SERVER` (set by `./deploy/test`),
//! else the project's pinned nats-server in `var/venv/bin` (installed by
//! `deploy/lib/install.sh`), else `nats-server` / `redis-server` on `PATH`.
//!
//! Waiting: tests wait for a condition with [`wait_until`] or [`wait_until_async`], never
//! with a bare sleep.
//!
//! Include with `mod support;` from a file in `tests/`.
#![allow(dead_code)] // each test file uses a different subset

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to start answering. Generous: CI machines have 2 cores that
/// the test binary shares with the servers.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// Polling period of every wait here: short enough to add little latency to a test, long
/// enough not to steal a core from the servers under test.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Times a Redis start is retried on a fresh port when the chosen one was taken between
/// our probe and the server's bind.
const REDIS_PORT_ATTEMPTS: usize = 5;

/// What nats-server logs once it accepts clients; the port follows the last `:`.
const NATS_LISTENING: &str = "Listening for client connections on ";

/// Server-level JetStream bounds for a test server whose config has none. Without a
/// `max_file_store` nats-server takes 75% of the disk's free space, and JetStream reserves
/// each stream's `max_bytes` (10 GiB by default, three streams) up front: a runner with
/// less than 40 GiB free would refuse the relay's streams. The shipped configs pin the
/// same figure; reservations are bookkeeping, the tests write megabytes.
const TEST_JETSTREAM_LIMITS: &str = "jetstream {\n    max_file_store: 40GB\n}\n";

// ---------------------------------------------------------------------------------------
// Children

/// Starts `cmd` so that the child is killed when this test process ends, however it ends
/// (an abort, a timeout's SIGKILL), not only when its handle is dropped: Linux's
/// parent-death signal. That signal fires when the *thread* that forked the child exits,
/// and a test's thread can end while its servers live on (a server shared with other
/// tests), so every child is forked by one thread that lives as long as the process.
pub fn spawn_child(cmd: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in queue {
                    let _ = reply.send(spawn_killed_with_parent(&mut cmd));
                }
            })
            .expect("the spawner thread starts");
        jobs
    });
    let (reply, answer) = mpsc::channel();
    spawner.send((cmd, reply)).expect("the spawner thread lives as long as the process");
    answer.recv().expect("the spawner answers every job")
}

fn spawn_killed_with_parent(cmd: &mut Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
    // calls (prctl, getppid, _exit), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            // prctl(2) takes the signal as an unsigned long.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The test process may have died between the fork and the prctl.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

// ---------------------------------------------------------------------------------------
// Waiting

/// Polls `condition` until it returns true; panics naming `what` after `deadline`.
/// The only way tests wait for something to happen.
#[track_caller]
pub fn wait_until<F: FnMut() -> bool>(deadline: Duration, what: &str, mut condition: F) {
    let start = Instant::now();
    loop {
        if condition() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Async [`wait_until`]: awaits `condition()` until it yields true; panics naming `what`
/// after `deadline`. A single poll that hangs is cut off at the deadline too.
pub async fn wait_until_async<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(give_up, condition()).await {
            Ok(true) => return,
            Ok(false) if tokio::time::Instant::now() < give_up => {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            _ => panic!("timed out after {deadline:?} waiting until {what}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared process plumbing

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// Finds a server binary: `$env_var`, then `preferred` paths, then `name` on `PATH`.
fn find_binary(env_var: &str, preferred: &[PathBuf], name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env_var}={} does not exist; run ./deploy/test, which installs the servers",
            path.display()
        );
        return path;
    }
    preferred.iter().find(|p| p.is_file()).cloned().or_else(|| on_path(name)).unwrap_or_else(|| {
        panic!(
            "{name} not found (looked at ${env_var}, {preferred:?} and PATH); \
                 run ./deploy/test, which installs it, or set {env_var}"
        )
    })
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

fn lock(child: &Mutex<Option<Child>>) -> MutexGuard<'_, Option<Child>> {
    // A panic while holding the lock leaves the Child intact; keep using it.
    child.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Kills (SIGKILL, like `kill -9`) and reaps the child, if any.
fn kill_and_reap(child: &Mutex<Option<Child>>) {
    if let Some(mut child) = lock(child).take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The child's state: `Some(true)` running, `Some(false)` exited (crashed), `None` stopped
/// on purpose.
fn child_running(child: &Mutex<Option<Child>>) -> Option<bool> {
    lock(child).as_mut().map(|c| matches!(c.try_wait(), Ok(None)))
}

/// Waits until `ready` finds the server serving, polling every `poll`. `Err(log)` if the
/// server exited first, so the caller can retry on another port; a panic with the log if it
/// is still silent after `deadline`.
fn await_start<T>(
    child: &Mutex<Option<Child>>,
    log: &Path,
    deadline: Duration,
    poll: Duration,
    what: &str,
    mut ready: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(found) = ready() {
            return Ok(found);
        }
        if child_running(child) == Some(false) {
            kill_and_reap(child);
            return Err(read_log(log));
        }
        if start.elapsed() > deadline {
            kill_and_reap(child);
            panic!("{what} within {deadline:?}:\n{}", read_log(log));
        }
        thread::sleep(poll);
    }
}

/// The port in the first log line that contains `marker`: the digits after the line's last `:`.
fn port_after(log: &str, marker: &str) -> Option<u16> {
    log.lines()
        .filter_map(|line| line.split(marker).nth(1))
        .filter_map(|addr| addr.trim().rsplit(':').next()?.parse::<u16>().ok())
        .next()
}

/// A fresh log file `<dir>/<stem>-<n>.log` for the n-th run, so a restart's log does not
/// mix with the previous run's.
fn next_log(dir: &Path, stem: &str, runs: &mut u32) -> (PathBuf, File) {
    *runs += 1;
    let path = dir.join(format!("{stem}-{runs}.log"));
    let file =
        File::create(&path).unwrap_or_else(|e| panic!("cannot create log file {}: {e}", path.display()));
    (path, file)
}

// ---------------------------------------------------------------------------------------
// NATS

/// Which `-p` a nats-server gets.
enum NatsPort {
    /// `-p -1`: the server picks a free port.
    Free,
    /// `-p <port>`.
    Fixed(u16),
    /// No `-p`: the config's `port`, else 4222.
    FromConfig,
}

/// A nats-server with JetStream on 127.0.0.1, store in its own temporary directory.
/// Killed when dropped.
pub struct NatsServer {
    child: Mutex<Option<Child>>,
    port: u16,
    binary: PathBuf,
    /// `-c` file: the caller's config, plus [`TEST_JETSTREAM_LIMITS`] unless it has a
    /// `jetstream` block of its own.
    config: PathBuf,
    /// Holds the JetStream store (`store/`), the config and the logs.
    dir: TempDir,
    log: PathBuf,
    runs: u32,
}

impl NatsServer {
    /// Starts `nats-server -c <tmp>/nats-server.conf -a 127.0.0.1 -p -1 -js -sd <tmp>/store`
    /// (the config holds [`TEST_JETSTREAM_LIMITS`]) and waits until it accepts clients.
    pub fn start() -> NatsServer {
        Self::launch(None, NatsPort::Free)
    }

    /// Like [`NatsServer::start`], with `conf_text` (e.g. accounts and permissions) passed
    /// as `-c`. The command line still sets the address, a free port and the store dir; they
    /// override the config's.
    pub fn start_with_config(conf_text: &str) -> NatsServer {
        Self::launch(Some(conf_text), NatsPort::Free)
    }

    /// Like [`NatsServer::start_with_config`], choosing the port: `Some(p)` passes `-p p`,
    /// `None` passes no `-p`, so the config's `port` (or 4222) applies.
    pub fn start_with_config_on_port(conf_text: &str, port: Option<u16>) -> NatsServer {
        let port = port.map_or(NatsPort::FromConfig, NatsPort::Fixed);
        Self::launch(Some(conf_text), port)
    }

    fn launch(conf_text: Option<&str>, port: NatsPort) -> NatsServer {
        let binary = find_binary(
            "GM_RELAY_NATS_SERVER",
            &[repo_root().join("var/venv/bin/nats-server")],
            "nats-server",
        );
        let dir = tempfile::Builder::new()
            .prefix("gm-relay-nats-")
            .tempdir()
            .expect("create temp dir for nats-server");
        let mut text = conf_text.unwrap_or_default().to_owned();
        if !text.contains("jetstream") {
            text.push_str(TEST_JETSTREAM_LIMITS);
        }
        let config = dir.path().join("nats-server.conf");
        fs::write(&config, text).expect("write nats-server config");
        let mut server = NatsServer {
            child: Mutex::new(None),
            port: 0,
            binary,
            config,
            log: PathBuf::new(),
            dir,
            runs: 0,
        };
        let port_arg = match port {
            NatsPort::Free => Some("-1".to_string()),
            NatsPort::FromConfig => None,
            NatsPort::Fixed(p) => Some(p.to_string()),
        };
        match server.spawn(port_arg.as_deref()) {
            Ok(port) => server.port = port,
            Err(log) => panic!("nats-server did not start:\n{log}"),
        }
        server
    }

    /// Spawns the server and waits for its "Listening" line; `Err(log)` when it exited.
    fn spawn(&mut self, port: Option<&str>) -> Result<u16, String> {
        let (log_path, log_file) = next_log(self.dir.path(), "nats-server", &mut self.runs);
        self.log = log_path;
        let store = self.dir.path().join("store");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c").arg(&self.config);
        cmd.args(["-a", "127.0.0.1"]);
        if let Some(port) = port {
            cmd.args(["-p", port]);
        }
        cmd.arg("-js")
            .arg("-sd")
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log file handle"))
            .stderr(log_file);
        let child = spawn_child(cmd).unwrap_or_else(|e| {
            panic!("cannot run {}: {e}; run ./deploy/test, which installs it", self.binary.display())
        });
        *lock(&self.child) = Some(child);

        await_start(
            &self.child,
            &self.log,
            START_DEADLINE,
            POLL_INTERVAL,
            "nats-server did not accept clients",
            || port_after(&read_log(&self.log), NATS_LISTENING),
        )
    }

    /// `nats://127.0.0.1:<port>`. Panics with the server's log if it crashed.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// The client port. Panics with the server's log if it crashed.
    pub fn port(&self) -> u16 {
        self.assert_not_crashed();
        self.port
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// The JetStream store directory (kept across [`stop`](Self::stop) and
    /// [`restart`](Self::restart)).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// True while the process runs (false after [`stop`](Self::stop) or a crash).
    pub fn is_running(&self) -> bool {
        child_running(&self.child) == Some(true)
    }

    /// Kills the server like `kill -9` (no clean shutdown) and reaps it. The store stays.
    pub fn stop(&mut self) {
        kill_and_reap(&self.child);
    }

    /// Starts the server again on the same port with the same store, so JetStream streams
    /// and consumers survive. Stops it first if it still runs. Retries while the port is
    /// not free yet.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let start = Instant::now();
        loop {
            match self.spawn(Some(&port)) {
                Ok(got) => {
                    assert_eq!(got, self.port, "nats-server restarted on another port");
                    return;
                }
                Err(log) if log.contains("address already in use") => {
                    assert!(
                        start.elapsed() < START_DEADLINE,
                        "port {port} still taken after {START_DEADLINE:?}:\n{log}"
                    );
                    thread::sleep(POLL_INTERVAL);
                }
                Err(log) => panic!("nats-server did not restart:\n{log}"),
            }
        }
    }

    fn assert_not_crashed(&self) {
        if child_running(&self.child) == Some(false) {
            panic!("nats-server exited unexpectedly:\n{}", self.log());
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill_and_reap(&self.child);
    }
}

// ---------------------------------------------------------------------------------------
// Redis

/// A redis-server on 127.0.0.1 without persistence, in its own temporary directory.
/// Killed when dropped.
pub struct RedisServer {
    child: Mutex<Option<Child>>,
    port: u16,
    binary: PathBuf,
    dir: TempDir,
    log: PathBuf,
    runs: u32,
    /// Set for a server that also takes TLS connections: its files and TLS port.
    tls: Option<(tls::ServerFiles, u16)>,
}

impl RedisServer {
    /// Starts `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no` on a free
    /// port and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// [`RedisServer::start`], plus a TLS port serving `files`' certificate (clients need
    /// none of their own); the plain port stays for the harness's own checks.
    pub fn start_tls(files: tls::ServerFiles) -> RedisServer {
        Self::start_with(Some(files))
    }

    fn start_with(tls: Option<tls::ServerFiles>) -> RedisServer {
        let binary = find_binary("GM_RELAY_REDIS_SERVER", &[], "redis-server");
        let dir = tempfile::Builder::new()
            .prefix("gm-relay-redis-")
            .tempdir()
            .expect("create temp dir for redis-server");
        let tls = tls.map(|files| (files, 0));
        let mut server =
            RedisServer { child: Mutex::new(None), port: 0, binary, dir, log: PathBuf::new(), runs: 0, tls };
        let mut last_log = String::new();
        for _ in 0..REDIS_PORT_ATTEMPTS {
            let port = free_port();
            if let Some((_, tls_port)) = &mut server.tls {
                *tls_port = free_port();
            }
            match server.spawn(port) {
                Ok(()) => {
                    server.port = port;
                    return server;
                }
                Err(log) if port_taken(&log) => last_log = log,
                Err(log) => panic!("redis-server did not start:\n{log}"),
            }
        }
        panic!("redis-server found no free port in {REDIS_PORT_ATTEMPTS} attempts:\n{last_log}");
    }

    /// Spawns the server on `port` and waits until *this* process answers there;
    /// `Err(log)` when it exited.
    fn spawn(&mut self, port: u16) -> Result<(), String> {
        let (log_path, log_file) = next_log(self.dir.path(), "redis-server", &mut self.runs);
        self.log = log_path;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some((files, tls_port)) = &self.tls {
            cmd.args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .args(["--tls-auth-clients", "no"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log file handle"))
            .stderr(log_file);
        let child = spawn_child(cmd).unwrap_or_else(|e| {
            panic!("cannot run {}: {e}; run ./deploy/test, which installs it", self.binary.display())
        });
        let pid = child.id();
        *lock(&self.child) = Some(child);

        let what = format!("redis-server did not answer PING on port {port}");
        await_start(&self.child, &self.log, START_DEADLINE, POLL_INTERVAL, &what, || {
            // PING, then check the answering server is ours: if another process held the
            // port, ours exits and that one would answer.
            let ours = redis_command(port, "PING").is_ok_and(|reply| reply == "+PONG")
                && redis_command(port, "INFO server")
                    .is_ok_and(|info| info.lines().any(|l| l.trim() == format!("process_id:{pid}")));
            ours.then_some(())
        })
    }

    /// `redis://127.0.0.1:<port>`. Panics with the server's log if it crashed.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    /// `rediss://127.0.0.1:<tls port>` of a server started with [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> String {
        let (_, tls_port) = self.tls.as_ref().expect("a server started with TLS");
        self.port();
        format!("rediss://127.0.0.1:{tls_port}")
    }

    /// Panics with the server's log if it crashed.
    pub fn port(&self) -> u16 {
        if child_running(&self.child) == Some(false) {
            panic!("redis-server exited unexpectedly:\n{}", read_log(&self.log));
        }
        self.port
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// The log of the current (or last) run.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// True while the process runs (false after [`stop`](Self::stop) or a crash).
    pub fn is_running(&self) -> bool {
        child_running(&self.child) == Some(true)
    }

    /// Kills the server like `kill -9` and reaps it. Its data is gone (no persistence).
    pub fn stop(&mut self) {
        kill_and_reap(&self.child);
    }

    /// Starts the server again on the same port (empty: it keeps nothing). Retries while
    /// the port is not free yet.
    pub fn restart(&mut self) {
        self.stop();
        let start = Instant::now();
        loop {
            match self.spawn(self.port) {
                Ok(()) => return,
                Err(log) if port_taken(&log) => {
                    assert!(
                        start.elapsed() < START_DEADLINE,
                        "port {} still taken after {START_DEADLINE:?}:\n{log}",
                        self.port
                    );
                    thread::sleep(POLL_INTERVAL);
                }
                Err(log) => panic!("redis-server did not restart:\n{log}"),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill_and_reap(&self.child);
    }
}

/// A port that was free a moment ago: bind port 0, note the port, release it.
fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn port_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("address already in use")
}

/// Sends one inline command and returns the reply: a status/error line as is (`+PONG`), a
/// bulk string's contents.
fn redis_command(port: u16, command: &str) -> io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        reply.extend_from_slice(&buf[..n]);
        let Some(eol) = reply.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&reply[..eol]).into_owned();
        match head.strip_prefix('$') {
            // Bulk string: `$<len>\r\n<bytes>\r\n`.
            Some(len) => {
                let len: usize =
                    len.parse().map_err(|_| io::Error::other(format!("bad bulk reply {head:?}")))?;
                let body = eol + 2;
                if reply.len() >= body + len {
                    return Ok(String::from_utf8_lossy(&reply[body..body + len]).into_owned());
                }
            }
            None => return Ok(head),
        }
    }
}

/// Sends signal `sig` (`libc::SIGTERM`, `SIGSTOP`, `SIGCONT`) to process `pid`.
pub fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a process id");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let sent = unsafe { libc::kill(pid, sig) };
    assert_eq!(sent, 0, "signal {sig} to {pid}: {}", std::io::Error::last_os_error());
}

pub mod app;
pub mod cluster;
pub mod console;
pub mod relays;
pub mod tls;
