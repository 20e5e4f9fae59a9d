//! The `gm-relay` binary: `gm-relay serve [--config <file>]`, `gm-relay nats-auth ...`,
//! `gm-relay gm set-password ...`, `gm-relay import-legacy --from <redis url> [--dry-run]`,
//! `gm-relay replay --host <n> ...`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use gm_relay::config::Config;
use gm_relay::startup::Application;

/// mimalloc: the send path allocates a handful of small buffers per message (HTTP, JSON,
/// NATS frames); glibc malloc took ~10% of the relay's CPU at full load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: gm-relay serve [--config <file>]
       gm-relay nats-auth --hosts <ids and ranges, e.g. 1-100,205> --out <auth.conf> --keys-dir <dir>
       gm-relay gm set-password <gm_account> [--supervisor] [--config <file>]   (password on stdin)
       gm-relay import-legacy --from <redis://original> [--dry-run] [--config <file>]
       gm-relay replay --host <n> (--from-seq <stream seq> | --since <90s, 30m, 2h, 1d>) [--feed native|chat|relation] [--config <file>]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("nats-auth") {
        return nats_auth(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("replay") {
        return replay(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("import-legacy") {
        return import_legacy(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("gm") {
        return ExitCode::from(gm_relay::console::cli::run(&args[1..], &mut std::io::stdin()));
    }
    let config_path = match args.as_slice() {
        [cmd] if cmd == "serve" => None,
        [cmd, flag, path] if cmd == "serve" && flag == "--config" => Some(path.clone()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    run_with_config(config_path.as_deref(), "gm-relay", |config| async move {
        let app = Application::build(config).await.context("start-up failed")?;
        app.run_until_stopped(shutdown_signal()).await.context("server failed")
    })
}

/// `gm-relay nats-auth --hosts .. --out .. --keys-dir ..`
fn nats_auth(args: &[String]) -> ExitCode {
    let mut flags = std::collections::HashMap::new();
    for pair in args.chunks(2) {
        match pair {
            [k, v] if ["--hosts", "--out", "--keys-dir"].contains(&k.as_str()) => {
                flags.insert(k.as_str(), v.as_str());
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(hosts), Some(out), Some(keys)) =
        (flags.get("--hosts"), flags.get("--out"), flags.get("--keys-dir"))
    else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = gm_relay::nats_auth::parse_hosts(hosts)
        .and_then(|hosts| gm_relay::nats_auth::generate(&hosts, Path::new(out), Path::new(keys)));
    match result {
        Ok(users) => {
            println!("wrote {out} ({users} users); seeds in {keys}/ (relay.nk, console.nk, host_<n>.nk)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gm-relay nats-auth: {e}");
            ExitCode::from(2)
        }
    }
}

/// Loads the settings (a bad one exits 2, naming it), starts logging and the async runtime,
/// and runs `work`; an error exits 1 with its whole cause chain.
fn run_with_config<F, Fut>(config_path: Option<&str>, what: &str, work: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Declared before the runtime, so it outlives it and writes out the last lines.
    let _log = gm_relay::telemetry::init(config.log_format);
    let outcome = gm_relay::startup::runtime(config.worker_threads)
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(work(config)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{what} stopped with an error");
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `gm-relay import-legacy --from <url> [--dry-run] [--config <file>]`: the relay's own
/// settings (env / config file, as for `serve`) name the target Redis and NATS.
fn import_legacy(args: &[String]) -> ExitCode {
    let (mut from, mut dry_run, mut config_path) = (None, false, None);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match (arg.as_str(), rest.clone().next()) {
            ("--dry-run", _) => dry_run = true,
            ("--from", Some(url)) => from = rest.next().cloned().filter(|_| !url.is_empty()),
            ("--config", Some(_)) => config_path = rest.next().cloned(),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(from) = from else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    run_with_config(config_path.as_deref(), "gm-relay import-legacy", |config| async move {
        run_import(&from, dry_run, &config).await
    })
}

async fn run_import(from: &str, dry_run: bool, config: &Config) -> anyhow::Result<()> {
    use gm_relay::migrate;
    migrate::check_source(from, config)?;
    let data = migrate::read_source(from).await?;
    let plan = migrate::plan(&data, migrate::import_ts());
    println!("source {from}: {plan}");
    if dry_run {
        let target =
            async { migrate::already_imported(&plan, &migrate::connect_target(config).await?).await };
        match target.await {
            Ok(a) => println!(
                "dry run: would import {} GMs, {} players and {} queued messages into {}; \
                 already imported by an earlier run: {} GMs, {} players, {} messages. Nothing was written.",
                plan.gms.len(),
                plan.players.len(),
                plan.messages(),
                config.redis_url,
                a.gms,
                a.players,
                a.messages
            ),
            Err(e) => println!("dry run: nothing was written; cannot tell what is already imported: {e}"),
        }
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(plan.items());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items, {elapsed} ({eta} left)")
    {
        bar.set_style(style);
    }
    let report = migrate::execute(&plan, config, &|n| bar.inc(n)).await.context("import failed");
    bar.finish_and_clear();
    println!("{}", report?);
    Ok(())
}

/// `gm-relay replay --host <n> (--from-seq <seq> | --since <age>) [--feed ..] [--config ..]`:
/// moves one of the host's consumers back so its events are delivered again.
fn replay(args: &[String]) -> ExitCode {
    use gm_relay::adapters::nats::replay::{ReplayFeed, ReplayFrom};
    let (mut host, mut from, mut feed, mut config_path) = (None, None, Some(ReplayFeed::Native), None);
    for pair in args.chunks(2) {
        match pair {
            [k, v] if k == "--host" => host = gm_relay::domain::HostId::parse(v.as_bytes()),
            [k, v] if k == "--from-seq" => from = v.parse().ok().filter(|s| *s > 0).map(ReplayFrom::Sequence),
            [k, v] if k == "--since" => from = gm_relay::config::parse_duration(v).map(ReplayFrom::Since),
            [k, v] if k == "--feed" => feed = ReplayFeed::parse(v),
            [k, v] if k == "--config" => config_path = Some(v.clone()),
            _ => host = None,
        }
    }
    let (Some(host), Some(from), Some(feed)) = (host, from, feed) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    run_with_config(config_path.as_deref(), "gm-relay replay", |config| async move {
        let client = gm_relay::adapters::nats::connect(
            &config.nats_url,
            config.nats_nkey_seed.as_deref(),
            "gm-relay-replay",
        )
        .await
        .context("cannot connect to NATS")?;
        let r = gm_relay::adapters::nats::replay::replay(&client, host, feed, from).await?;
        match r.from_seq {
            Some(seq) => println!(
                "{}: delivering again from stream sequence {seq} ({} events pending)",
                r.consumer, r.pending
            ),
            None => println!("{}: host {host} has no event in that range; nothing changed", r.consumer),
        }
        Ok(())
    })
}
