//! A 3-node JetStream cluster for integration tests, run from the shipped configs
//! (`nats/cluster/node<n>.conf`) with every port moved to a free loopback one, each node's
//! store in its own temporary directory, all killed on drop.
//!
//! Why the shipped files: the failover test then checks the configuration operators run,
//! not a copy. Command-line flags override the files' ports (`-p`, `-m`, `--cluster`,
//! `--routes`); the store comes from `GM_RELAY_NATS_STORE`, as in production. Client and
//! monitoring ports are chosen by the server (`-1`) and read from its log; route ports must
//! be known to every node before any starts, so they are picked by binding port 0 (the
//! whole cluster is started again on fresh ports if one was taken in between).
//!
//! Ready means: every node answers `/healthz` and one node reports a metadata leader with
//! all three peers current — before that, creating an R3 stream fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    await_start, child_running, find_binary, free_port, kill_and_reap, lock, next_log, port_after, read_log,
    repo_root,
};

/// Nodes in the cluster: the smallest size that survives the loss of one (R3 quorum 2).
pub const CLUSTER_SIZE: usize = 3;

/// Bound on the cluster electing its metadata leader with all peers current. Three servers
/// on a 2-core CI machine usually take 2-4 s.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Times the cluster is started again on fresh route ports when one was taken between
/// picking it and the server binding it.
const PORT_ATTEMPTS: usize = 3;

/// Bound on one monitoring request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// Polling period of the waits here.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

const CLIENT_LISTENING: &str = "Listening for client connections on ";
const HTTP_LISTENING: &str = "Starting http monitor on ";

struct Node {
    /// `server_name` from the node's config: `n1`, `n2`, `n3`.
    name: String,
    config: PathBuf,
    child: Mutex<Option<Child>>,
    client_port: u16,
    http_port: u16,
    route_port: u16,
    store: PathBuf,
    log: PathBuf,
    runs: u32,
}

/// Three nats-servers with routes between them and JetStream clustered.
pub struct NatsCluster {
    binary: PathBuf,
    nodes: Vec<Node>,
    dir: TempDir,
}

impl NatsCluster {
    /// Starts the three nodes and waits until the cluster can create R3 streams.
    pub fn start() -> NatsCluster {
        let binary = find_binary(
            "GM_RELAY_NATS_SERVER",
            &[repo_root().join("var/venv/bin/nats-server")],
            "nats-server",
        );
        let mut last_logs = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("gm-relay-cluster-")
                .tempdir()
                .expect("temp dir for the cluster");
            let nodes = (1..=CLUSTER_SIZE)
                .map(|n| Node {
                    name: format!("n{n}"),
                    config: repo_root().join(format!("nats/cluster/node{n}.conf")),
                    child: Mutex::new(None),
                    client_port: 0,
                    http_port: 0,
                    route_port: free_port(),
                    store: dir.path().join(format!("n{n}")),
                    log: PathBuf::new(),
                    runs: 0,
                })
                .collect();
            let mut cluster = NatsCluster { binary: binary.clone(), nodes, dir };
            let started: Result<(), String> = (0..CLUSTER_SIZE).try_for_each(|i| cluster.spawn(i, None));
            match started {
                Ok(()) => {
                    cluster.wait_ready();
                    return cluster;
                }
                Err(log) if log.contains("address already in use") => last_logs = log,
                Err(log) => panic!("nats-server cluster node did not start:\n{log}"),
            }
        }
        panic!("the cluster found no free route ports in {PORT_ATTEMPTS} attempts:\n{last_logs}");
    }

    fn routes(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats-route://127.0.0.1:{}", n.route_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Spawns node `i` (client port `port`, or a free one) and waits for its client and
    /// monitoring listeners; `Err(log)` when it exited.
    fn spawn(&mut self, i: usize, port: Option<u16>) -> Result<(), String> {
        let routes = self.routes();
        let binary = self.binary.clone();
        let dir = self.dir.path().to_owned();
        let node = &mut self.nodes[i];
        fs::create_dir_all(&node.store).expect("create node store dir");
        let (log_path, log_file) = next_log(&dir, &node.name, &mut node.runs);
        node.log = log_path;
        let http = if node.http_port == 0 { "-1".to_owned() } else { node.http_port.to_string() };
        let mut cmd = Command::new(&binary);
        cmd.arg("-c")
            .arg(&node.config)
            .args(["-a", "127.0.0.1", "-p", &port.map_or("-1".to_owned(), |p| p.to_string())])
            .args(["-m", &http])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", node.route_port)])
            .args(["--routes", &routes])
            .env("GM_RELAY_NATS_STORE", &node.store)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log file handle"))
            .stderr(log_file);
        let child = super::spawn_child(cmd).unwrap_or_else(|e| {
            panic!("cannot run {}: {e}; run ./deploy/test, which installs it", binary.display())
        });
        *lock(&node.child) = Some(child);
        let what = format!("node {} did not listen", node.name);
        let (client, http) =
            await_start(&node.child, &node.log, READY_DEADLINE, POLL_INTERVAL, &what, || {
                let log = read_log(&node.log);
                Some((port_after(&log, CLIENT_LISTENING)?, port_after(&log, HTTP_LISTENING)?))
            })?;
        node.client_port = client;
        node.http_port = http;
        Ok(())
    }

    /// Waits until every running node is healthy and the metadata leader sees all peers
    /// current.
    pub fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            self.assert_no_crash();
            let running: Vec<&Node> =
                self.nodes.iter().filter(|n| child_running(&n.child) == Some(true)).collect();
            let healthy =
                running.iter().all(|n| http_get(n.http_port, "/healthz").is_some_and(|b| b.contains("ok")));
            let meta_ok = running.iter().any(|n| {
                http_get(n.http_port, "/jsz")
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .is_some_and(|jsz| {
                        let meta = &jsz["meta_cluster"];
                        let peers = meta["replicas"].as_array().map(|r| {
                            r.iter()
                                .filter(|p| {
                                    p["current"].as_bool() == Some(true)
                                        && p["offline"].as_bool() != Some(true)
                                })
                                .count()
                        });
                        meta["leader"].is_string()
                            && meta["leader"].as_str() == Some(n.name.as_str())
                            && peers == Some(running.len() - 1)
                    })
            });
            if healthy && meta_ok {
                return;
            }
            if start.elapsed() > READY_DEADLINE {
                panic!("the cluster was not ready within {READY_DEADLINE:?}:\n{}", self.logs());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Client URL of node `i` (0-based).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Every node's client URL, comma-separated (what `GM_RELAY_NATS_URL` takes).
    pub fn urls(&self) -> String {
        (0..CLUSTER_SIZE).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// The index of the node whose `server_name` is `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// The `server_name` of node `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Kills node `i` like `kill -9` (no clean shutdown). Its store stays.
    pub fn kill(&mut self, i: usize) {
        kill_and_reap(&self.nodes[i].child);
    }

    /// Starts node `i` again on its ports with its store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let port = self.nodes[i].client_port;
        let start = Instant::now();
        loop {
            match self.spawn(i, Some(port)) {
                Ok(()) => return,
                Err(log) if log.contains("address already in use") && start.elapsed() < READY_DEADLINE => {
                    thread::sleep(POLL_INTERVAL)
                }
                Err(log) => panic!("node {} did not restart:\n{log}", self.nodes[i].name),
            }
        }
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        child_running(&self.nodes[i].child) == Some(true)
    }

    /// Every node's current log, labelled.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("--- {} ---\n{}\n", n.name, read_log(&n.log))).collect()
    }

    /// Panics with the logs if a node exited without being killed by the test.
    pub fn assert_no_crash(&self) {
        if self.nodes.iter().any(|n| child_running(&n.child) == Some(false)) {
            panic!("a cluster node exited unexpectedly:\n{}", self.logs());
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            kill_and_reap(&node.child);
        }
    }
}

/// `GET path` on the monitoring port; the body, or None on any failure.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}
