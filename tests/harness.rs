//! Checks the test harness itself: the servers start, answer, restart in place and die with
//! their owner.

mod support;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use support::{wait_until, wait_until_async, NatsServer, RedisServer};

const DEADLINE: Duration = Duration::from_secs(10);

async fn redis_ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok_and(|pong| pong == "PONG")
}

#[tokio::test]
async fn both_servers_answer() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    assert!(nats.is_running() && redis.is_running());

    let client = async_nats::connect(nats.url()).await.expect("connect to NATS");
    let js = jetstream::new(client);
    js.query_account().await.expect("JetStream is enabled");

    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect to Redis");
    let () = redis::cmd("SET").arg("harness").arg("ok").query_async(&mut conn).await.expect("SET");
    let got: String = redis::cmd("GET").arg("harness").query_async(&mut conn).await.expect("GET");
    assert_eq!(got, "ok");
}

#[tokio::test]
async fn restart_keeps_port_and_jetstream_data() {
    let mut nats = NatsServer::start();
    let port = nats.port();
    {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: "HARNESS".into(),
            subjects: vec!["harness.>".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
        js.publish("harness.one", "kept".into()).await.expect("publish").await.expect("PubAck");
    }

    nats.stop();
    assert!(!nats.is_running());
    nats.restart();
    assert!(nats.is_running());
    assert_eq!(nats.port(), port, "same port after restart");

    let client = async_nats::connect(nats.url()).await.expect("reconnect");
    let js = jetstream::new(client);
    let stream = js.get_stream("HARNESS").await.expect("stream survived");
    let info = stream.get_info().await.expect("stream info");
    assert_eq!(info.state.messages, 1, "message survived kill -9 + restart");

    let mut redis = RedisServer::start();
    let port = redis.port();
    redis.stop();
    assert!(!redis.is_running());
    assert!(!redis_ping(&redis.url()).await, "stopped Redis answers");
    redis.restart();
    assert_eq!(redis.port(), port, "same port after restart");
    let url = redis.url();
    wait_until_async(DEADLINE, "restarted Redis answers PING", || redis_ping(&url)).await;
}

#[test]
fn drop_kills_the_servers() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let pids = [nats.pid().expect("nats pid"), redis.pid().expect("redis pid")];
    for pid in pids {
        assert!(Path::new(&format!("/proc/{pid}")).exists());
    }
    drop(nats);
    drop(redis);
    // Drop kills and reaps the child, so not even a zombie is left.
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} outlived its server handle");
    }
}

/// Set for a copy of this test binary that starts servers and exits without dropping them.
const EXIT_WITH_SERVERS: &str = "GM_RELAY_TEST_EXIT_WITH_SERVERS";

/// Whether `pid` runs (a zombie waiting for its reaper has ended).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// Kills what is left should the test fail, so a failure leaves no servers behind.
struct KillIfRunning(Vec<u32>);

impl Drop for KillIfRunning {
    fn drop(&mut self) {
        for &pid in self.0.iter().filter(|&&pid| running(pid)) {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) takes plain integers and touches no memory of ours. Its
                // result is not checked: the process may have ended since `running`.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn the_servers_die_with_the_test_process() {
    if std::env::var_os(EXIT_WITH_SERVERS).is_some() {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        println!("pids {} {}", nats.pid().expect("nats pid"), redis.pid().expect("redis pid"));
        // Exits without running the handles' drops, as a killed test process would.
        std::process::exit(0);
    }
    // The exiting copy leaves its servers' directories behind; they go with this one.
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", "the_servers_die_with_the_test_process", "--nocapture"])
        .env(EXIT_WITH_SERVERS, "1")
        .env("TMPDIR", tmp.path())
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u32> = stdout
        .lines()
        .find_map(|line| line.strip_prefix("pids "))
        .unwrap_or_else(|| {
            panic!("no pids printed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
        })
        .split(' ')
        .map(|pid| pid.parse().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), 2);
    let _cleanup = KillIfRunning(pids.clone());
    wait_until(DEADLINE, "the servers of an exited test process end", || {
        !pids.iter().any(|&pid| running(pid))
    });
}

#[test]
fn wait_until_returns_once_the_condition_holds() {
    let mut polls = 0;
    wait_until(DEADLINE, "the third poll", || {
        polls += 1;
        polls == 3
    });
    assert_eq!(polls, 3);
}

#[tokio::test]
async fn config_is_applied_and_port_still_free() {
    let nats = NatsServer::start_with_config("max_payload: 4KB\n");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    assert_eq!(client.server_info().max_payload, 4096);
    assert_ne!(nats.port(), 4222, "the harness must not take the default port");
}
