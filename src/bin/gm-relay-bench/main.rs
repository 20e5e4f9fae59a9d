//! `gm-relay-bench`: measured speed, latency, memory and growth of gm-relay against the
//! raw JetStream limit of the same machine, measured in the same run (README,
//! "Performance"; every table in `bench/RESULTS.md`).
//!
//! ```text
//! gm-relay-bench [--quick] [--out results.json] [--workloads w0,w1,w2,w3,sync] [--stock-nats-limits]
//!                [--nats-url U --redis-url U --relay-url U [--nats-monitor-url U]]
//! ```
//! By default it starts its own nats-server, redis-server and `gm-relay` (the binary next
//! to this one) on free loopback ports with temporary directories, and kills them on exit
//! (also on Ctrl-C). Prints a markdown table per workload and writes the figures as JSON
//! (default `var/bench/results.json`). `--quick` is the smoke mode (seconds per workload).
//!
//! `gm-relay-bench soak ...` is the long-running accounting mode with fault injection; see
//! `soak.rs`.

mod http;
mod load;
mod procs;
mod receipts;
mod report;
mod soak;
mod stack;
mod w0;
mod w1;
mod w2;
mod w3;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use procs::SyncMode;
use report::{f, n, Table};
use stack::{DataSet, External, Layout, Stack};

/// The load generator shares the machine's 2 cores with what it measures, so it takes the
/// relay's allocator: glibc's malloc and free were 3.6% of its CPU at the GM HTTP maximum.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: gm-relay-bench [--quick] [--out results.json] [--workloads w0,w1,w2,w3,sync] [--stock-nats-limits]
                      [--nats-url U --redis-url U --relay-url U [--nats-monitor-url U]]
       gm-relay-bench soak --help";

const ALL_WORKLOADS: [&str; 5] = ["w0", "w1", "w2", "sync", "w3"];

/// Every size and duration of a run.
pub struct Scale {
    pub quick: bool,
    pub w0_count: u64,
    pub w0_secs: f64,
    pub w0_sync_count: u64,
    /// The short W0 run before and after each W2 maximum phase.
    pub w0_beside_count: u64,
    pub w0_beside_secs: f64,
    pub w1_hosts: i64,
    pub w1_gms: i64,
    pub w1_players: i64,
    pub w1_secs: f64,
    pub w1_send_rate: f64,
    pub w1_gm_poll_rate: f64,
    pub w1_steps: Vec<f64>,
    pub w1_step_secs: f64,
    pub poll_workers: usize,
    pub w2_hosts: i64,
    pub w2_players: i64,
    pub w2_rate: f64,
    pub w2_secs: f64,
    pub w2_max_secs: f64,
    pub w2_max_ops: u64,
    /// Times each path's maximum at its top level is run, each beside the W0 runs around it;
    /// the throughput verdicts take the median share (`w2::Rounds`). Five in the full run:
    /// with three, a path's median moved by up to 6 points between runs of one build, more
    /// than its distance from the line; each further round costs ~10 s.
    pub w2_share_rounds: usize,
    pub w3_points: Vec<w3::Point>,
    pub w3_measured: i64,
    pub w3_rate: f64,
    pub w3_secs: f64,
    /// Rounds of each W3 measurement (all kinds in turn, then again); each figure is the
    /// median of its rounds, so one slow moment of a shared VM does not decide a ratio.
    pub w3_rounds: usize,
    pub w3_idle_secs: f64,
    pub w3_presence_ops: u64,
}

impl Scale {
    fn full() -> Scale {
        Scale {
            quick: false,
            w0_count: 200_000,
            w0_secs: 30.0,
            w0_sync_count: 100_000,
            w0_beside_count: 100_000,
            w0_beside_secs: 10.0,
            w1_hosts: 1000,
            w1_gms: 50,
            w1_players: 100_000,
            w1_secs: 30.0,
            w1_send_rate: 200.0,
            w1_gm_poll_rate: 10.0,
            w1_steps: vec![1000.0, 2000.0, 3000.0, 4000.0, 5000.0],
            w1_step_secs: 10.0,
            poll_workers: 128,
            w2_hosts: 10,
            w2_players: 1000,
            w2_rate: 1000.0,
            w2_secs: 10.0,
            w2_max_secs: 8.0,
            w2_max_ops: 1_000_000,
            w2_share_rounds: 5,
            w3_points: vec![
                w3::Point { hosts: 100, history: 100_000 },
                w3::Point { hosts: 1_000, history: 300_000 },
                w3::Point { hosts: 10_000, history: 1_000_000 },
            ],
            w3_measured: 100,
            w3_rate: 500.0,
            w3_secs: 1.0,
            w3_rounds: 15,
            w3_idle_secs: 2.0,
            w3_presence_ops: 4,
        }
    }

    fn quick() -> Scale {
        Scale {
            quick: true,
            w0_count: 5_000,
            w0_secs: 5.0,
            w0_sync_count: 2_000,
            w0_beside_count: 2_000,
            w0_beside_secs: 5.0,
            w1_hosts: 50,
            w1_gms: 5,
            w1_players: 2_000,
            w1_secs: 1.5,
            w1_send_rate: 50.0,
            w1_gm_poll_rate: 5.0,
            w1_steps: vec![100.0, 200.0],
            w1_step_secs: 1.0,
            poll_workers: 16,
            w2_hosts: 3,
            w2_players: 60,
            w2_rate: 200.0,
            w2_secs: 1.0,
            w2_max_secs: 0.5,
            w2_max_ops: 100_000,
            w2_share_rounds: 2,
            w3_points: vec![
                w3::Point { hosts: 10, history: 1_000 },
                w3::Point { hosts: 40, history: 10_000 },
            ],
            w3_measured: 10,
            w3_rate: 100.0,
            w3_secs: 0.5,
            w3_rounds: 1,
            w3_idle_secs: 0.3,
            w3_presence_ops: 2,
        }
    }

    pub fn w1_set(&self) -> DataSet {
        DataSet {
            host_base: 1,
            uid_base: 1,
            gms: self.w1_gms,
            layout: Layout::Striped { hosts: self.w1_hosts },
        }
    }

    pub fn w2_set(&self) -> DataSet {
        w2::data_set(self.w2_hosts)
    }
}

struct Args {
    quick: bool,
    out: PathBuf,
    workloads: Vec<String>,
    external: Option<External>,
}

fn parse_addr(url: &str, what: &str) -> Result<SocketAddr> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr =
        host_port.parse().with_context(|| format!("{what}: expected http://<ip>:<port>"))?;
    if !addr.ip().is_loopback() {
        bail!("{what}: the benchmark runs on loopback only");
    }
    Ok(addr)
}

fn parse_args() -> Result<Args> {
    let mut quick = false;
    let mut out = None;
    let mut workloads: Vec<String> = ALL_WORKLOADS.iter().map(|s| s.to_string()).collect();
    let (mut nats, mut redis, mut relay, mut monitor) = (None, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--quick" => quick = true,
            "--stock-nats-limits" => procs::STOCK_LIMITS.store(true, std::sync::atomic::Ordering::Relaxed),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--workloads" => {
                workloads =
                    value()?.split(',').map(|s| s.trim().to_lowercase()).filter(|s| !s.is_empty()).collect();
                if let Some(bad) = workloads.iter().find(|w| !ALL_WORKLOADS.contains(&w.as_str())) {
                    bail!("unknown workload {bad}; known: {}", ALL_WORKLOADS.join(","));
                }
            }
            "--nats-url" => nats = Some(value()?),
            "--redis-url" => redis = Some(value()?),
            "--relay-url" => relay = Some(value()?),
            "--nats-monitor-url" => monitor = Some(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let external = match (nats, redis, relay) {
        (None, None, None) => None,
        (Some(nats_url), Some(redis_url), Some(relay)) => Some(External {
            nats_url,
            redis_url,
            relay: parse_addr(&relay, "--relay-url")?,
            monitor: monitor.map(|m| parse_addr(&m, "--nats-monitor-url")).transpose()?,
        }),
        _ => bail!("--nats-url, --redis-url and --relay-url go together\n{USAGE}"),
    };
    let out = out.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("var/bench/results.json"));
    Ok(Args { quick, out, workloads, external })
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("soak") {
        return soak_main();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gm-relay-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    // One thread, like the relay (`gm_relay::startup::runtime`): the load generator shares
    // the 2 cores with the servers it measures, and on a multi-thread runtime its NATS
    // connection would write every request with its own system call.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(&args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopped the servers it started")),
        }
    });
    // Dropping the runtime ends the load tasks; the servers were killed with their guards.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gm-relay-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `gm-relay-bench soak ...`: exit 0 when no acknowledged message was lost, 1 when one was
/// (or the run failed), 2 on bad arguments.
fn soak_main() -> ExitCode {
    let args = match soak::parse_args(std::env::args().skip(2)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gm-relay-bench soak: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    load::now_ns();
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = soak::run(&args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopped the servers it started")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("gm-relay-bench soak: acknowledged messages were lost");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("gm-relay-bench soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn emit(markdown: &mut String, t: &Table) {
    let text = t.markdown();
    println!("{text}");
    markdown.push_str(&text);
    markdown.push('\n');
}

/// `/proc/loadavg`'s first three fields: how busy the machine was besides this run.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn pct_of(x: f64, of: f64) -> f64 {
    if of > 0.0 {
        100.0 * x / of
    } else {
        0.0
    }
}

async fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    load::now_ns();
    let scale = if args.quick { Scale::quick() } else { Scale::full() };
    let show = !args.quick;
    let want = |w: &str| args.workloads.iter().any(|x| x == w);
    let ext = args.external.as_ref();
    let mut md = String::new();
    let mut workloads = serde_json::Map::new();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load_at_start = loadavg();
    eprintln!("{cores} cores, load average {load_at_start} (other work on the machine skews latencies)");

    let mut w0_rate = None;
    let mut w1_figs = None;
    let mut w2_figs = None;
    let mut sync_rows: Vec<(SyncMode, Option<w0::W0>, Option<w2::W2>)> = Vec::new();

    if want("w0") || want("w1") || want("w2") {
        eprintln!("starting nats-server, redis-server and gm-relay ...");
        let mut stack = Stack::start(SyncMode::Default, ext).await?;
        let mut w0_default = None;
        if want("w0") {
            let w = w0::run(&stack, scale.w0_count, Duration::from_secs_f64(scale.w0_secs), show).await?;
            emit(
                &mut md,
                &w.table("W0 raw JetStream limit (256 PubAcks in flight, one consumer fetching 500)"),
            );
            workloads.insert("w0".into(), w.json());
            w0_rate = Some(w.e2e_rate);
            w0_default = Some(w);
        }
        if want("w1") {
            let w = w1::run(&mut stack, &scale, show).await?;
            for t in &w.tables {
                emit(&mut md, t);
            }
            workloads.insert("w1".into(), w.json.clone());
            w1_figs = Some(w);
        }
        if want("w2") {
            let w =
                w2::run(&mut stack, &scale, show, true, "W2 chat, default sync (fsync every 2 min)").await?;
            for t in &w.tables {
                emit(&mut md, t);
            }
            workloads.insert("w2".into(), w.json.clone());
            w2_figs = Some(w);
        }
        sync_rows.push((SyncMode::Default, w0_default, None));
    }

    if want("sync") {
        if ext.is_some() {
            eprintln!("sync: skipped (needs its own nats-server; not with --nats-url)");
            workloads.insert("sync".into(), json!({"skipped": "external servers"}));
        } else {
            let mut sync_json = serde_json::Map::new();
            for mode in [SyncMode::OneSecond, SyncMode::Always] {
                eprintln!("sync_interval {}: starting a fresh stack ...", mode.label());
                let mut stack = Stack::start(mode, None).await?;
                let w0 = w0::run(
                    &stack,
                    scale.w0_sync_count,
                    Duration::from_secs_f64(scale.w0_secs.min(15.0)),
                    show,
                )
                .await?;
                let title = format!("W2 chat, sync_interval {}", mode.label());
                let w2 = w2::run(&mut stack, &scale, show, false, &title).await?;
                emit(&mut md, &w0.table(&format!("W0 raw JetStream, sync_interval {}", mode.label())));
                for t in &w2.tables {
                    emit(&mut md, t);
                }
                sync_json.insert(mode.key().into(), json!({"w0": w0.json(), "w2": w2.json}));
                sync_rows.push((mode, Some(w0), Some(w2)));
            }
            workloads.insert("sync".into(), Value::Object(sync_json));
        }
        // Summary across modes: what durability costs.
        let mut t = Table::new(
            "Durability modes (nats-server sync_interval): what each costs",
            &[
                "mode",
                "W0 msg/s",
                "GM HTTP send max /s",
                "GS HTTP send max /s",
                "native send max /s",
                "GM HTTP → native p99 ms",
            ],
        );
        for (mode, w0, w2) in &sync_rows {
            let w2 = if *mode == SyncMode::Default { w2_figs.as_ref() } else { w2.as_ref() };
            t.row(vec![
                mode.label().into(),
                w0.as_ref().map(|w| n(w.e2e_rate)).unwrap_or_else(|| "-".into()),
                w2.map(|w| n(w.gm_http_max)).unwrap_or_else(|| "-".into()),
                w2.map(|w| n(w.gs_http_max)).unwrap_or_else(|| "-".into()),
                w2.map(|w| n(w.native_max)).unwrap_or_else(|| "-".into()),
                w2.map(|w| f(w.gm_native_p99_ms)).unwrap_or_else(|| "-".into()),
            ]);
        }
        emit(&mut md, &t);
    }

    let mut w3_figs = None;
    if want("w3") {
        eprintln!("W3: starting a fresh stack ...");
        let mut stack = Stack::start(SyncMode::Default, ext).await?;
        let w = w3::run(&mut stack, &scale, show).await?;
        for t in &w.tables {
            emit(&mut md, t);
        }
        workloads.insert("w3".into(), w.json.clone());
        w3_figs = Some(w);
    }

    // Targets, all measured in this run beside W0.
    let mut targets = Table::new("Targets", &["target", "measured", "met"]);
    let mut targets_json = Vec::new();
    let mut check = |name: &str, measured: String, met: Option<bool>| {
        let cell = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        targets.row(vec![name.into(), measured.clone(), cell.into()]);
        targets_json.push(json!({"target": name, "measured": measured, "met": met}));
    };
    // Throughput against W0: the verdict takes the median of each path's share rounds, each
    // round's rate against the W0 runs just before and after it (see w2.rs); every round's
    // share and the share of the run's first W0 are shown beside it.
    let vs_first = |rate: f64| {
        w0_rate
            .map(|w0| format!("; {:.0}% of the run's first W0 {}", pct_of(rate, w0), n(w0)))
            .unwrap_or_default()
    };
    let rounds_cell = |who: &str, r: &w2::Rounds, b: &w2::Beside| {
        format!(
            "{who}{} msg/s = {:.1}% of W0 beside it ({} before / {} after), the median of {} rounds ({})",
            n(b.rate),
            b.pct(),
            n(b.w0_before),
            n(b.w0_after),
            r.0.len(),
            r.shares()
        )
    };
    let medians = w2_figs
        .as_ref()
        .map(|w| (w, w.native_rounds.median(), w.gm_http_rounds.median(), w.gs_http_rounds.median()));
    match medians {
        Some((w2, Some(native), Some(gm), Some(gs))) => {
            check(
                "native relay chat throughput ≥ 40% of W0",
                format!("{}{}", rounds_cell("", &w2.native_rounds, &native), vs_first(w2.native_max)),
                Some(native.pct() >= 40.0),
            );
            let legacy = gm.pct().min(gs.pct());
            check(
                "legacy HTTP send ≥ 25% of W0",
                format!(
                    "{}, {}{}",
                    rounds_cell("GM ", &w2.gm_http_rounds, &gm),
                    rounds_cell("GS ", &w2.gs_http_rounds, &gs),
                    vs_first(w2.gm_http_max.min(w2.gs_http_max))
                ),
                Some(legacy >= 25.0),
            );
        }
        _ => {
            check("native relay chat throughput ≥ 40% of W0", "-".into(), None);
            check("legacy HTTP send ≥ 25% of W0", "-".into(), None);
        }
    }
    match &w1_figs {
        Some(w1) => {
            let rate = 3.0 * scale.w1_hosts as f64;
            check(
                &format!("W1 holds {} polls/s with p99 < 20 ms", n(rate)),
                format!(
                    "{} polls/s, p99 {} ms; step test: {}",
                    n(w1.polls_per_s),
                    f(w1.poll_p99_ms),
                    w1.best_step
                        .map(|b| format!("p99 < 20 ms up to {} polls/s", n(b)))
                        .unwrap_or("no step under 20 ms".into())
                ),
                Some(w1.polls_per_s >= 0.95 * rate && w1.poll_p99_ms < w1::P99_BOUND_MS),
            );
            check(
                "relay RSS < 150 MB at W1's scale",
                format!(
                    "{} MB (peak {} MB)",
                    w1.rss_mb.map(f).unwrap_or("-".into()),
                    w1.hwm_mb.map(f).unwrap_or("-".into())
                ),
                w1.hwm_mb.map(|m| m < 150.0),
            );
        }
        None => {
            check("W1 holds 3,000 polls/s with p99 < 20 ms", "-".into(), None);
            check("relay RSS < 150 MB at W1's scale", "-".into(), None);
        }
    }
    match &w2_figs {
        Some(w2) => check(
            "GM HTTP send → native host receipt p99 < 10 ms at 1,000 msg/s",
            format!("p99 {} ms at {} msg/s", f(w2.gm_native_p99_ms), n(w2.gm_native_rate)),
            Some(w2.gm_native_p99_ms < 10.0 && w2.gm_native_p99_ms > 0.0),
        ),
        None => check("GM HTTP send → native host receipt p99 < 10 ms at 1,000 msg/s", "-".into(), None),
    }
    match &w3_figs {
        Some(w3) => {
            check(
                "W3: Redis cmds, JS API calls per op flat",
                "see W3 growth table".into(),
                Some(w3.counts_flat),
            );
            let w = w3.worst;
            check(
                "W3: time per op grows < 1.5× (CPU per op: relay, nats + redis)",
                format!(
                    "largest growth: relay CPU {}×, nats + redis CPU {}× (p50 {}×, not judged: see W3)",
                    f(w.relay_cpu),
                    f(w.servers_cpu),
                    f(w.p50)
                ),
                Some(w3.time_ok),
            );
        }
        None => {
            check("W3: Redis cmds, JS API calls per op flat", "-".into(), None);
            check("W3: time per op grows < 1.5× (CPU per op: relay, nats + redis)", "-".into(), None);
        }
    }
    emit(&mut md, &targets);
    let note = format!(
        "Machine: {cores} cores; load average (1, 5, 15 min) at start {load_at_start}, at end {}; \
         run took {:.0} s.\n",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!("{note}");
    md.push_str(&note);

    let result = json!({
        "version": 1,
        "load_average_at_start": load_at_start,
        "load_average_at_end": loadavg(),
        "quick": scale.quick,
        "cores": cores,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "workloads": Value::Object(workloads),
        "targets": targets_json,
    });
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let md_path = args.out.with_extension("md");
    std::fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
    eprintln!(
        "wrote {} and {} in {:.0} s",
        args.out.display(),
        md_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
