//! W2, chat: GM → player over legacy HTTP (receipt by native game servers bound to
//! `host_<n>`), player → GM over legacy HTTP and over native NATS requests (receipt by a
//! JetStream consumer on `GS_TO_GM`), at a fixed rate and at the maximum (closed loop).
//! A path's maximum is the best of its closed-loop phases: more requests in flight let
//! the relay and nats-server write more messages per system call, at a higher latency
//! (each phase's latencies are reported beside its rate). Also run, shorter, under each
//! nats-server `sync_interval` mode.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::load::{self, Op, Req, Spec};
use crate::receipts::{self, Receipts};
use crate::report::{errors_cell, f, hist_json, kind_json, ms, n, Table};
use crate::stack::{DataSet, Stack};
use crate::Scale;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    GmHttp,
    GsHttp,
    Native,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::GmHttp => "GM HTTP send → native host_<n>",
            Path::GsHttp => "GS HTTP send → GS_TO_GM consumer",
            Path::Native => "native NATS send → GS_TO_GM consumer",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Path::GmHttp => "gm_http",
            Path::GsHttp => "gs_http",
            Path::Native => "native",
        }
    }
}

#[derive(Default)]
pub struct W2 {
    pub tables: Vec<Table>,
    pub json: Value,
    pub gm_http_max: f64,
    pub gs_http_max: f64,
    pub native_max: f64,
    /// GM HTTP send → native host receipt p99 at the fixed rate.
    pub gm_native_p99_ms: f64,
    pub gm_native_rate: f64,
}

pub async fn run(stack: &mut Stack, scale: &Scale, show: bool, full: bool, title: &str) -> Result<W2> {
    let set = scale.w2_set();
    let players = scale.w2_players;
    stack.seed(&set, 0, players).await?;
    let warm = crate::w1::warm_up(stack, &set, scale.w2_hosts, show).await?;
    if warm.merged().err > 0 {
        eprintln!("W2 warm-up had errors: {}", errors_cell(&warm.merged()));
    }
    let hosts: Vec<i64> = (0..scale.w2_hosts).map(|h| set.host_base + h).collect();
    let host_rx = receipts::host_readers(&stack.js, &hosts).await?;
    let gm_rx = receipts::gm_reader(&stack.js).await?;

    let mut phases: Vec<(Path, Option<f64>, usize)> = vec![(Path::GmHttp, Some(scale.w2_rate), 32)];
    if full {
        phases.push((Path::GsHttp, Some(scale.w2_rate), 32));
        phases.push((Path::Native, Some(scale.w2_rate), 32));
    }
    phases.push((Path::GmHttp, None, 64));
    phases.push((Path::GsHttp, None, 64));
    phases.push((Path::Native, None, 64));
    if full {
        phases.push((Path::Native, None, 256));
        phases.push((Path::Native, None, 512));
        phases.push((Path::GmHttp, None, 128));
        phases.push((Path::GsHttp, None, 128));
    }

    let mut t = Table::new(
        title,
        &[
            "path",
            "load",
            "sent ok/s",
            "errors",
            "request p50 / p99 / p99.9 ms",
            "received",
            "send→receipt p50 / p99 / p99.9 ms",
            "relay CPU %",
            "nats CPU %",
        ],
    );
    let mut w2 = W2::default();
    let mut rows_json = Vec::new();
    for (i, (path, rate, workers)) in phases.into_iter().enumerate() {
        let tag: Arc<str> = Arc::from(format!("w2p{i}").as_str());
        let rx: &Arc<Receipts> = if path == Path::GmHttp { &host_rx } else { &gm_rx };
        rx.reset(&tag);
        let secs = if rate.is_some() { scale.w2_secs } else { scale.w2_max_secs };
        let max_ops = match rate {
            Some(r) => (r * secs).ceil() as u64,
            None => scale.w2_max_ops,
        };
        let gen_tag = Arc::clone(&tag);
        let spec = Spec {
            name: format!("W2 {} {}", path.key(), rate.map(|r| format!("{r:.0}/s")).unwrap_or("max".into())),
            kinds: vec![path.key()],
            rate,
            workers,
            duration: Duration::from_secs_f64(secs),
            max_ops,
            gen: Arc::new(move |i| {
                let p = set.player((i as i64).wrapping_mul(7919).rem_euclid(players));
                let tag = Arc::clone(&gen_tag);
                let req = match path {
                    Path::GmHttp => Req::GmSend { gm: p.gm, uid: p.uid, tag },
                    Path::GsHttp => Req::GsSend { uid: p.uid, tag },
                    Path::Native => Req::NativeSend { host: p.host, uid: p.uid, tag },
                };
                Op { kind: 0, req }
            }),
        };
        let cpu = stack.cpu_watch();
        let bar = show.then(|| load::progress(max_ops, &spec.name));
        let result = load::run(spec, stack.target(), bar).await;
        let usage = cpu.stop();
        let k = &result.kinds[0];
        rx.wait_for(k.ok, Duration::from_secs(5)).await;
        stack.check_alive()?;
        let received = rx.count();
        let e2e = rx.hist();
        let pct = |who: &str| usage.iter().find(|(n, _)| *n == who).and_then(|(_, c)| c.map(|(p, _, _)| p));
        let rate_ok = result.rate();
        let load_cell = match rate {
            Some(r) => format!("{} msg/s", n(r)),
            None => format!("max, {workers} in flight"),
        };
        t.row(vec![
            path.label().to_string(),
            load_cell.clone(),
            n(rate_ok),
            errors_cell(k),
            format!("{} / {} / {}", f(ms(&k.hist, 0.5)), f(ms(&k.hist, 0.99)), f(ms(&k.hist, 0.999))),
            format!("{} of {}", n(received as f64), n(k.ok as f64)),
            format!("{} / {} / {}", f(ms(&e2e, 0.5)), f(ms(&e2e, 0.99)), f(ms(&e2e, 0.999))),
            pct("relay").map(f).unwrap_or_else(|| "-".into()),
            pct("nats-server").map(f).unwrap_or_else(|| "-".into()),
        ]);
        rows_json.push(json!({
            "path": path.key(),
            "rate_target_per_s": rate,
            "in_flight": if rate.is_none() { Some(workers) } else { None },
            "sent_ok_per_s": rate_ok,
            "request": kind_json(k, result.elapsed.as_secs_f64()),
            "received": received,
            "send_to_receipt": hist_json(&e2e),
            "relay_cpu_pct": pct("relay"),
            "nats_cpu_pct": pct("nats-server"),
        }));
        match (path, rate) {
            (Path::GmHttp, Some(_)) => {
                w2.gm_native_p99_ms = ms(&e2e, 0.99);
                w2.gm_native_rate = rate_ok;
            }
            (Path::GmHttp, None) => w2.gm_http_max = w2.gm_http_max.max(rate_ok),
            (Path::GsHttp, None) => w2.gs_http_max = w2.gs_http_max.max(rate_ok),
            (Path::Native, None) => w2.native_max = w2.native_max.max(rate_ok),
            _ => {}
        }
    }
    host_rx.stop();
    gm_rx.stop();
    w2.tables.push(t);
    w2.json = json!({
        "hosts": scale.w2_hosts,
        "players": players,
        "phases": rows_json,
        "gm_http_max_per_s": w2.gm_http_max,
        "gs_http_max_per_s": w2.gs_http_max,
        "native_max_per_s": w2.native_max,
        "gm_http_to_native_p99_ms": w2.gm_native_p99_ms,
        "gm_http_to_native_rate_per_s": w2.gm_native_rate,
    });
    Ok(w2)
}

/// The W2 data set: its own hosts and players, apart from W1's.
pub fn data_set(hosts: i64) -> DataSet {
    DataSet {
        host_base: 1_000_001,
        uid_base: 10_000_001,
        gms: 50,
        layout: crate::stack::Layout::Striped { hosts },
    }
}
