//! The shipped operations files are valid, checked by the tools that will read them:
//! systemd units by `systemd-analyze verify`, nginx configs by `nginx -t`, the Redis,
//! replica and Sentinel configs by starting them (a replica that syncs, a Sentinel that
//! finds both), and the example relay settings by the relay's own loader. A check whose
//! tool is not installed says so and passes (`./deploy/test` and `./deploy/cluster` install
//! nginx; `systemd-analyze` comes with Debian's `systemd` package, which a container may
//! lack).

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on a Redis or Sentinel process answering, and on a replica syncing.
const REDIS_DEADLINE: Duration = Duration::from_secs(15);

/// Polling period of the waits here.
const POLL: Duration = Duration::from_millis(20);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn which(name: &str, also: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(also.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze", &[]) else {
        eprintln!("skipped: systemd-analyze is not installed (Debian package systemd)");
        return;
    };
    // `verify` also checks that each ExecStart binary exists: point the install paths at
    // binaries that exist here, and leave every other line as shipped.
    let nats = std::env::var_os("GM_RELAY_NATS_SERVER")
        .map(PathBuf::from)
        .or_else(|| Some(root().join("var/venv/bin/nats-server")).filter(|p| p.is_file()))
        .or_else(|| which("nats-server", &[]))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gm-relay")));
    let redis = which("redis-server", &[]).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gm-relay")));
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in fs::read_dir(root().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "service") {
            let text = read(&path)
                .replace("/usr/local/bin/gm-relay", env!("CARGO_BIN_EXE_gm-relay"))
                .replace("/usr/local/bin/nats-server", nats.to_str().unwrap())
                .replace("/usr/bin/redis-server", redis.to_str().unwrap());
            let copy = dir.path().join(path.file_name().unwrap());
            fs::write(&copy, text).unwrap();
            units.push(copy);
        }
    }
    assert_eq!(units.len(), 4, "gm-relay, gm-relay-nats, gm-relay-redis, gm-relay-sentinel");
    let (ok, output) = run(Command::new(analyze).arg("verify").args(&units));
    assert!(ok && output.trim().is_empty(), "systemd-analyze verify:\n{output}");
}

#[test]
fn nginx_configs_pass_nginx_t() {
    let Some(nginx) = which("nginx", &["/usr/sbin/nginx"]) else {
        eprintln!("skipped: nginx is not installed (./deploy/test installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let var = dir.path();
    fs::create_dir_all(var.join("nginx")).unwrap();
    let test = |conf: &Path| {
        let (ok, output) = run(Command::new(&nginx)
            .args(["-t", "-p"])
            .arg(var.join("nginx"))
            .arg("-e")
            .arg(var.join("error.log"))
            .arg("-c")
            .arg(conf));
        assert!(ok, "nginx -t {}:\n{output}", conf.display());
    };

    // What deploy/cluster generates.
    let cluster = read(&root().join("deploy/nginx/cluster.conf.template"))
        .replace("@VAR@", var.to_str().unwrap())
        .replace("@ROOT@", root().to_str().unwrap())
        .replace("@PORT@", "18090")
        .replace("@RELAY1_PORT@", "18081")
        .replace("@RELAY2_PORT@", "18082");
    let unfilled = cluster
        .match_indices('@')
        .any(|(i, _)| cluster[i + 1..].starts_with(|c: char| c.is_ascii_uppercase()));
    assert!(!unfilled, "every placeholder filled in");
    fs::write(var.join("cluster.conf"), cluster).unwrap();
    test(&var.join("cluster.conf"));

    // The production example, inside a minimal main config.
    let site = read(&root().join("deploy/nginx/gm-relay.conf")).replace(
        "/etc/gm-relay/gm-relay-proxy.conf",
        root().join("deploy/nginx/gm-relay-proxy.conf").to_str().unwrap(),
    );
    fs::write(var.join("site.conf"), site).unwrap();
    let main = format!(
        "pid {0}/nginx.pid;\nerror_log {0}/error.log;\nevents {{}}\nhttp {{\n    access_log off;\n    include {0}/site.conf;\n}}\n",
        var.display()
    );
    fs::write(var.join("main.conf"), main).unwrap();
    test(&var.join("main.conf"));
}

/// A server process of this test, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `redis-cli -p port args...`'s output, or None when it fails.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(proc: &mut Proc, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(proc.0.try_wait().unwrap().is_none(), "{what}: the process exited");
        assert!(start.elapsed() < REDIS_DEADLINE, "{what}: not within {REDIS_DEADLINE:?}");
        std::thread::sleep(POLL);
    }
}

#[test]
fn redis_replica_and_sentinel_configs_run() {
    let (Some(redis), Some(_)) = (which("redis-server", &[]), which("redis-cli", &[])) else {
        eprintln!("skipped: redis-server / redis-cli not installed (./deploy/test installs them)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| {
        let p = dir.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    };
    // The machine-specific lines are replaced: `dir` (Redis changes into it while reading
    // the file, so it must exist) in the copies, addresses on the command line (applied
    // after the file).
    let with_dir = |text: String, data: &Path| {
        text.replace("dir /var/lib/gm-relay-redis", &format!("dir {}", data.display()))
    };
    let start = |conf: &Path, data: &Path, port: u16, extra: &[&str]| {
        let child = Command::new(&redis)
            .arg(conf)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--supervised", "no"])
            .arg("--dir")
            .arg(data)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        Proc(child)
    };

    let primary_conf = dir.path().join("redis-primary.conf");
    fs::write(&primary_conf, with_dir(read(&root().join("deploy/redis/redis.conf")), &d("primary"))).unwrap();
    let primary_port = free_port();
    let mut primary = start(&primary_conf, &d("primary"), primary_port, &[]);
    wait_for(&mut primary, "the primary answers", || {
        cli(primary_port, &["ping"]).is_some_and(|r| r.trim() == "PONG")
    });
    assert_eq!(
        cli(primary_port, &["config", "get", "appendonly"]).unwrap().split_whitespace().nth(1),
        Some("yes")
    );
    assert_eq!(
        cli(primary_port, &["config", "get", "appendfsync"]).unwrap().split_whitespace().nth(1),
        Some("everysec")
    );
    assert_eq!(
        cli(primary_port, &["config", "get", "maxmemory-policy"]).unwrap().split_whitespace().nth(1),
        Some("noeviction")
    );

    let replica_conf = dir.path().join("redis-replica.conf");
    fs::write(
        &replica_conf,
        read(&root().join("deploy/redis/redis-replica.conf"))
            .replace("/etc/gm-relay/redis-primary.conf", primary_conf.to_str().unwrap()),
    )
    .unwrap();
    let replica_port = free_port();
    let primary_addr = ["127.0.0.1".to_owned(), primary_port.to_string()];
    let replicaof = ["--replicaof", &primary_addr[0], &primary_addr[1]];
    let mut replica = start(&replica_conf, &d("replica"), replica_port, &replicaof);
    let _ = cli(primary_port, &["set", "gmr:ops-check", "1"]);
    wait_for(&mut replica, "the replica syncs", || {
        cli(replica_port, &["info", "replication"]).is_some_and(|i| i.contains("master_link_status:up"))
            && cli(replica_port, &["get", "gmr:ops-check"]).is_some_and(|v| v.trim() == "1")
    });

    // Sentinel rewrites its file: a writable copy, watching this primary.
    let sentinel_conf = dir.path().join("sentinel.conf");
    fs::write(
        &sentinel_conf,
        with_dir(read(&root().join("deploy/redis/sentinel.conf")), &d("sentinel")).replace(
            "sentinel monitor gm-relay 10.0.0.21 6379 2",
            &format!("sentinel monitor gm-relay 127.0.0.1 {primary_port} 1"),
        ),
    )
    .unwrap();
    let sentinel_port = free_port();
    let mut sentinel = start(&sentinel_conf, &d("sentinel"), sentinel_port, &["--sentinel"]);
    wait_for(&mut sentinel, "the Sentinel sees the primary and its replica", || {
        cli(sentinel_port, &["sentinel", "get-master-addr-by-name", "gm-relay"]).is_some_and(|a| {
            a.split_whitespace().collect::<Vec<_>>() == ["127.0.0.1", &primary_port.to_string()]
        }) && cli(sentinel_port, &["sentinel", "replicas", "gm-relay"])
            .is_some_and(|r| r.contains(&replica_port.to_string()))
    });
}

#[test]
fn the_example_relay_settings_load() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("relay.nk");
    fs::write(&seed, "SUAEXAMPLEEXAMPLEEXAMPLE\n").unwrap();
    let text = read(&root().join("deploy/systemd/gm-relay.conf")).replace(
        "GM_RELAY_NATS_NKEY_FILE=/etc/gm-relay/relay.nk",
        &format!("GM_RELAY_NATS_NKEY_FILE={}", seed.display()),
    );
    let path = dir.path().join("gm-relay.conf");
    fs::write(&path, text).unwrap();
    let config = gm_relay::config::Config::load(Some(path.to_str().unwrap())).expect("the example is valid");
    assert_eq!((config.stream_replicas, config.consumer_replicas), (3, 3));
    assert_eq!(config.nats_url.split(',').count(), 3, "every node of the cluster");
}
