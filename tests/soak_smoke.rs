//! The soak mode of the benchmark in the test suite: 8 s of mixed traffic at 100 msg/s with
//! the relay killed (`kill -9`) and restarted every 4 s; every acknowledged message must be
//! delivered. The soak pauses its legacy pollers around a kill, so no poll's acks die with
//! the relay and the drain does not wait out a poll lease and ack wait: the run takes ~15 s.

use std::process::Command;
use std::time::{Duration, Instant};

/// The run's 8 s, startup and a drain that usually takes 2 s (at most 45 s).
const DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn soak_with_relay_kills_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("soak.json");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gm-relay-bench"))
        .args(["soak", "--duration", "8s", "--rate", "100", "--fault", "relay-kill", "--fault-every", "4s"])
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run gm-relay-bench soak");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the soak") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gm-relay-bench soak took more than {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("soak output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "gm-relay-bench soak failed ({status}):\n{stderr}\n{stdout}");
    assert!(stdout.contains("| path | sent | acknowledged |"), "no table:\n{stdout}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("soak JSON written")).expect("valid JSON");
    let total = &json["total"];
    let count = |k: &str| total[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {json:#}"));
    assert_eq!(count("lost"), 0, "acknowledged messages lost:\n{stdout}");
    assert!(count("acknowledged") > 0, "nothing acknowledged:\n{stdout}");
    assert!(count("delivered") >= count("acknowledged"), "delivered < acknowledged:\n{stdout}");
    assert!(!json["faults"].as_array().expect("faults").is_empty(), "no relay kill happened:\n{stderr}");
}
