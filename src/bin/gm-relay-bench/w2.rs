//! W2, chat: GM → player over legacy HTTP (receipt by native game servers bound to
//! `host_<n>`), player → GM over legacy HTTP and over native NATS requests (receipt by a
//! JetStream consumer on `GS_TO_GM`), at a fixed rate and at the maximum (closed loop).
//! A path's maximum is the best of its closed-loop phases: more requests in flight let
//! the relay and nats-server write more messages per system call, at a higher latency
//! (each phase's latencies are reported beside its rate). Also run, shorter, under each
//! nats-server `sync_interval` mode.
//!
//! In the main run each maximum phase is bracketed by a short W0 on the same nats-server
//! (one before the first, one after each), and its rate is also given as a share of the
//! mean of the two W0 runs beside it. This VM's speed drifts by more than the targets'
//! margins within minutes — W0 alone measured 52,000 and 88,000 msg/s on the same build
//! within the hour — so a ratio to a W0 taken minutes earlier measures the drift as much
//! as the relay. Even beside it, one 8-second phase against two ~1-second W0 runs moved
//! by several points of share between runs of the same build, so each path's top level
//! is run in several rounds spread through the run, and the verdict takes their median.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::load::{self, Op, Req, Spec};
use crate::procs::cpu_of;
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

    /// The closed-loop level of the share rounds: the most requests in flight, which lets
    /// the relay and nats-server write the most messages per system call; it gave the
    /// highest rate in most full runs before the rounds (GM HTTP 7 of 9, native 5 of 9).
    fn top_in_flight(self) -> usize {
        match self {
            Path::GmHttp | Path::GsHttp => 128,
            Path::Native => 512,
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
    /// Each path's share rounds, with the W0 runs beside each (bracketed runs only).
    pub gm_http_rounds: Rounds,
    pub gs_http_rounds: Rounds,
    pub native_rounds: Rounds,
}

/// A path's share rounds: the same maximum phase repeated through the run, each beside the
/// W0 runs just before and after it (neighbouring phases share one). The verdict takes the median share, so that one round caught by the VM's
/// drift (a W0 beside it 20% faster or slower than the phase saw) does not decide it.
#[derive(Clone, Debug, Default)]
pub struct Rounds(pub Vec<Beside>);

impl Rounds {
    /// The round with the median share (the lower middle one of an even count).
    pub fn median(&self) -> Option<Beside> {
        let mut sorted = self.0.clone();
        sorted.sort_by(|a, b| a.pct().total_cmp(&b.pct()));
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }

    /// Every round's share, in run order: "24.0% · 27.2% · 26.1%".
    pub fn shares(&self) -> String {
        self.0.iter().map(|b| format!("{:.1}%", b.pct())).collect::<Vec<_>>().join(" · ")
    }

    fn json(&self) -> Value {
        json!({
            "rounds": self.0.iter().map(Beside::json).collect::<Vec<_>>(),
            "median": self.median().map(|b| b.json()),
        })
    }
}

/// A maximum phase against the mean of the W0 runs just before and just after it.
#[derive(Clone, Copy, Debug)]
pub struct Beside {
    pub rate: f64,
    pub w0_before: f64,
    pub w0_after: f64,
}

impl Beside {
    pub fn w0(&self) -> f64 {
        (self.w0_before + self.w0_after) / 2.0
    }

    pub fn pct(&self) -> f64 {
        if self.w0() > 0.0 {
            100.0 * self.rate / self.w0()
        } else {
            0.0
        }
    }

    fn json(&self) -> Value {
        json!({"rate_per_s": self.rate, "w0_before_per_s": self.w0_before, "w0_after_per_s": self.w0_after,
               "pct_of_w0_beside": self.pct()})
    }
}

/// A short W0 for bracketing a maximum phase: its end-to-end rate.
async fn w0_beside(stack: &Stack, scale: &Scale, show: bool) -> Result<f64> {
    let w = crate::w0::run(stack, scale.w0_beside_count, Duration::from_secs_f64(scale.w0_beside_secs), show)
        .await?;
    Ok(w.e2e_rate)
}

/// `full`: the main run — every phase, and a short W0 around each maximum phase (see the
/// module's doc); otherwise the shorter run of the `sync_interval` modes.
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
        // The share rounds, alternated by path so that each path meets the VM's drift at
        // several points of the run.
        for _ in 0..scale.w2_share_rounds {
            for path in [Path::Native, Path::GmHttp, Path::GsHttp] {
                phases.push((path, None, path.top_in_flight()));
            }
        }
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
            "benchmark CPU %",
            "W0 before / after: % of their mean",
        ],
    );
    let mut w2 = W2::default();
    let mut rows_json = Vec::new();
    let mut w0_last: Option<f64> = None;
    for (i, (path, rate, workers)) in phases.into_iter().enumerate() {
        if full && rate.is_none() && w0_last.is_none() {
            w0_last = Some(w0_beside(stack, scale, show).await?);
        }
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
        let pct = |who: &str| cpu_of(&usage, who).map(|(p, _, _)| p);
        let rate_ok = result.rate();
        let beside = match (rate, w0_last) {
            (None, Some(before)) => {
                let after = w0_beside(stack, scale, show).await?;
                w0_last = Some(after);
                Some(Beside { rate: rate_ok, w0_before: before, w0_after: after })
            }
            _ => None,
        };
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
            pct("bench").map(f).unwrap_or_else(|| "-".into()),
            beside
                .map(|b| format!("{} / {}: {:.0}%", n(b.w0_before), n(b.w0_after), b.pct()))
                .unwrap_or_else(|| "-".into()),
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
            "bench_cpu_pct": pct("bench"),
            "beside_w0": beside.map(|b| b.json()),
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
        if let Some(b) = beside.filter(|_| workers == path.top_in_flight()) {
            match path {
                Path::GmHttp => w2.gm_http_rounds.0.push(b),
                Path::GsHttp => w2.gs_http_rounds.0.push(b),
                Path::Native => w2.native_rounds.0.push(b),
            }
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
        "share_rounds_beside_w0": {
            "gm_http": w2.gm_http_rounds.json(),
            "gs_http": w2.gs_http_rounds.json(),
            "native": w2.native_rounds.json(),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn round(rate: f64) -> Beside {
        Beside { rate, w0_before: 90.0, w0_after: 110.0 }
    }

    #[test]
    fn the_verdict_takes_the_median_round_not_the_best_or_the_last() {
        let r = Rounds(vec![round(24.0), round(29.0), round(26.0)]);
        assert_eq!(r.median().map(|b| b.rate), Some(26.0));
        assert_eq!(r.shares(), "24.0% · 29.0% · 26.0%");
        // Of an even count, the lower middle one: the verdict never rounds up.
        assert_eq!(Rounds(vec![round(27.0), round(24.0)]).median().map(|b| b.rate), Some(24.0));
        assert!(Rounds::default().median().is_none());
    }
}
