//! The `gm-relay` binary: `gm-relay serve [--config <file>]`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use gm_relay::config::Config;
use gm_relay::startup::Application;

const USAGE: &str = "usage: gm-relay serve [--config <file>]
       gm-relay nats-auth --hosts <ids and ranges, e.g. 1-100,205> --out <auth.conf> --keys-dir <dir>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("nats-auth") {
        return nats_auth(&args[1..]);
    }
    let config_path = match args.as_slice() {
        [cmd] if cmd == "serve" => None,
        [cmd, flag, path] if cmd == "serve" && flag == "--config" => Some(path.clone()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    gm_relay::telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gm-relay stopped with an error");
            eprintln!("gm-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = Application::build(config).await.context("start-up failed")?;
    app.run_until_stopped(shutdown_signal()).await.context("server failed")
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
