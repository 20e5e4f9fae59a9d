//! W1, the legacy poll storm: every host polls `relation`, `receive` and `online` once a
//! second over HTTP while GMs (HTTP GM `send`) and players (HTTP GS `send`) each send
//! 200 messages/s and a GM client polls GM `receive`; then the poll rate is stepped up to
//! find the highest rate whose p99 stays under 20 ms.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::load::{self, Op, Req, Spec, StreamResult};
use crate::procs::cpu_of;
use crate::report::{errors_cell, f, kind_json, ms, n, stream_json, Table};
use crate::stack::{DataSet, Stack};
use crate::Scale;

/// p99 bound of the step test, milliseconds.
pub const P99_BOUND_MS: f64 = 20.0;

pub struct W1 {
    pub tables: Vec<Table>,
    pub json: Value,
    pub polls_per_s: f64,
    pub poll_p99_ms: f64,
    pub best_step: Option<f64>,
    pub rss_mb: Option<f64>,
    pub hwm_mb: Option<f64>,
}

fn poll_spec(set: &DataSet, hosts: i64, rate: f64, secs: f64, workers: usize) -> Spec {
    let set = *set;
    Spec {
        name: format!("W1 polls {rate:.0}/s"),
        kinds: vec!["relation", "receive", "online"],
        rate: Some(rate),
        workers,
        duration: Duration::from_secs_f64(secs),
        max_ops: (rate * secs).ceil() as u64,
        gen: Arc::new(move |i| {
            let kind = (i % 3) as usize;
            let host = set.host_base + ((i / 3) as i64 % hosts);
            let action = ["relation", "receive", "online"][kind];
            Op { kind, req: Req::Get(format!("/gs?action={action}&host={host}")) }
        }),
    }
}

/// The chat and GM-poll load that runs beside the polls.
fn side_specs(set: &DataSet, players: i64, scale: &Scale, secs: f64) -> Vec<Spec> {
    let set = *set;
    let tag: Arc<str> = Arc::from("w1");
    let (tag2, rate) = (Arc::clone(&tag), scale.w1_send_rate);
    let pick = move |i: u64| set.player((i as i64).wrapping_mul(7919).rem_euclid(players));
    vec![
        Spec {
            name: format!("W1 GM send {rate:.0}/s"),
            kinds: vec!["gm_send"],
            rate: Some(rate),
            workers: 16,
            duration: Duration::from_secs_f64(secs),
            max_ops: (rate * secs).ceil() as u64,
            gen: Arc::new(move |i| {
                let p = pick(i);
                Op { kind: 0, req: Req::GmSend { gm: p.gm, uid: p.uid, tag: Arc::clone(&tag) } }
            }),
        },
        Spec {
            name: format!("W1 GS send {rate:.0}/s"),
            kinds: vec!["gs_send"],
            rate: Some(rate),
            workers: 16,
            duration: Duration::from_secs_f64(secs),
            max_ops: (rate * secs).ceil() as u64,
            gen: Arc::new(move |i| {
                let p = pick(i + 1);
                Op { kind: 0, req: Req::GsSend { uid: p.uid, tag: Arc::clone(&tag2) } }
            }),
        },
        Spec {
            name: "W1 GM receive".into(),
            kinds: vec!["gm_receive"],
            rate: Some(scale.w1_gm_poll_rate),
            workers: 2,
            duration: Duration::from_secs_f64(secs),
            max_ops: (scale.w1_gm_poll_rate * secs).ceil() as u64,
            gen: Arc::new(|_| Op { kind: 0, req: Req::Get("/gm?action=receive".into()) }),
        },
    ]
}

/// Creates every consumer through the relay's normal operation: a GM send to one player
/// of each host (its native `host_<n>`), then two rounds of polls (the legacy consumers;
/// the second drains what the first round's sends queued), and a GM receive.
pub async fn warm_up(stack: &Stack, set: &DataSet, hosts: i64, show: bool) -> Result<StreamResult> {
    let set = *set;
    let tag: Arc<str> = Arc::from("warm");
    let ops = (hosts * 6 + 1) as u64;
    let spec = Spec {
        name: "warm-up (consumers)".into(),
        kinds: vec!["gm_send", "relation", "receive", "online", "gm_receive"],
        rate: None,
        workers: 32,
        duration: Duration::from_secs(120),
        max_ops: ops,
        gen: Arc::new(move |i| {
            let i = i as i64;
            let round = i / hosts;
            let host_k = i % hosts;
            match round {
                0 => {
                    let p = set.player_on_host(host_k);
                    Op { kind: 0, req: Req::GmSend { gm: p.gm, uid: p.uid, tag: Arc::clone(&tag) } }
                }
                1..=5 => {
                    let kind = [1, 2, 3, 1, 2][(round - 1) as usize];
                    let action = ["", "relation", "receive", "online"][kind];
                    let host = set.host_base + host_k;
                    Op { kind, req: Req::Get(format!("/gs?action={action}&host={host}")) }
                }
                _ => Op { kind: 4, req: Req::Get("/gm?action=receive".into()) },
            }
        }),
    };
    // Round by round would be exact; a closed loop of 32 over the whole list is close
    // enough: a host's first-round send is far ahead of its fourth-round poll.
    let bar = show.then(|| load::progress(ops, "warm-up (consumers)"));
    Ok(load::run(spec, stack.target(), bar).await)
}

pub async fn run(stack: &mut Stack, scale: &Scale, show: bool) -> Result<W1> {
    let set = scale.w1_set();
    let (hosts, players) = (scale.w1_hosts, scale.w1_players);
    let mut tables = Vec::new();

    eprintln!("W1: {hosts} hosts, {} GMs, {players} friendships", set.gms);
    let seed_s = stack.seed(&set, 0, players).await?;
    let warm = warm_up(stack, &set, hosts, show).await?;
    stack.check_alive()?;
    let warm_s = warm.elapsed.as_secs_f64();
    let warm_errors = warm.merged().err;
    if warm_errors > 0 {
        eprintln!("W1 warm-up had errors: {}", errors_cell(&warm.merged()));
    }
    let consumers = match stack.monitor {
        Some(m) => crate::procs::monitor_get(m, "/jsz").await.ok().and_then(|j| j["consumers"].as_u64()),
        None => None,
    };

    // The storm at the nominal rate: every host polls each action once a second.
    let rate = 3.0 * hosts as f64;
    let secs = scale.w1_secs;
    let cpu = stack.cpu_watch();
    let mut specs = vec![poll_spec(&set, hosts, rate, secs, scale.poll_workers)];
    specs.extend(side_specs(&set, players, scale, secs));
    let results = load::run_all(specs, &stack.target(), show).await;
    let usage = cpu.stop();
    stack.check_alive()?;
    let polls = &results[0];
    let mut t = Table::new(
        format!(
            "W1 legacy poll storm: {hosts} hosts × 3 polls/s, {players} friendships, {secs:.0} s \
             (set-up: seeded in {seed_s:.1} s, {} JetStream consumers, warm-up errors {warm_errors})",
            consumers.map(|c| c.to_string()).unwrap_or("?".into())
        ),
        &[
            "request",
            "target /s",
            "achieved /s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors",
            "unfinished",
        ],
    );
    let mut side_json = serde_json::Map::new();
    for s in &results {
        let secs_s = s.elapsed.as_secs_f64();
        for k in &s.kinds {
            let target = if s.kinds.len() == 3 { rate / 3.0 } else { s.dispatched as f64 / secs };
            t.row(vec![
                k.kind.to_string(),
                n(target),
                n(k.ok as f64 / secs_s),
                f(ms(&k.hist, 0.5)),
                f(ms(&k.hist, 0.99)),
                f(ms(&k.hist, 0.999)),
                f(k.hist.max() as f64 / 1000.0),
                errors_cell(k),
                if s.kinds.len() == 3 { n(s.unfinished as f64) } else { "-".into() },
            ]);
        }
        side_json.insert(s.name.clone(), stream_json(s));
    }
    let all = polls.merged();
    t.row(vec![
        "**all polls**".into(),
        n(rate),
        n(polls.rate()),
        f(ms(&all.hist, 0.5)),
        f(ms(&all.hist, 0.99)),
        f(ms(&all.hist, 0.999)),
        f(all.hist.max() as f64 / 1000.0),
        errors_cell(&all),
        n(polls.unfinished as f64),
    ]);
    tables.push(t);

    let mut res = Table::new(
        "W1 resources during the storm",
        &["process", "CPU % of one core", "RSS MB", "peak RSS MB"],
    );
    let mut res_json = serde_json::Map::new();
    let (mut rss_mb, mut hwm_mb) = (None, None);
    for (name, figure) in &usage {
        if let Some((pct, _, st)) = figure {
            res.row(vec![name.to_string(), f(*pct), f(st.rss_mb), f(st.hwm_mb)]);
            res_json.insert(
                name.to_string(),
                json!({"cpu_pct": pct, "rss_mb": st.rss_mb, "peak_rss_mb": st.hwm_mb}),
            );
            if *name == "relay" {
                rss_mb = Some(st.rss_mb);
                hwm_mb = Some(st.hwm_mb);
            }
        }
    }
    tables.push(res);

    // Step the poll rate.
    let mut steps = Table::new(
        format!("W1 poll-rate steps ({:.0} s each, sends as above)", scale.w1_step_secs),
        &[
            "target polls/s",
            "achieved",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "errors",
            "unfinished",
            "relay CPU %",
            "nats CPU %",
            "redis CPU %",
        ],
    );
    let mut steps_json = Vec::new();
    let mut best = None;
    let mut failed = false;
    for &step in &scale.w1_steps {
        let cpu = stack.cpu_watch();
        let mut specs = vec![poll_spec(&set, hosts, step, scale.w1_step_secs, scale.poll_workers)];
        specs.extend(side_specs(&set, players, scale, scale.w1_step_secs));
        let results = load::run_all(specs, &stack.target(), show).await;
        let usage = cpu.stop();
        stack.check_alive()?;
        let polls = &results[0];
        let all = polls.merged();
        let pct = |who: &str| cpu_of(&usage, who).map(|(p, _, _)| p);
        let held = polls.rate() >= 0.95 * step && all.err == 0 && polls.unfinished == 0;
        let p99 = ms(&all.hist, 0.99);
        // The highest rate below which every step held (a later lucky step does not count).
        if held && p99 < P99_BOUND_MS && !failed {
            best = Some(step);
        } else {
            failed = true;
        }
        steps.row(vec![
            n(step),
            n(polls.rate()),
            f(ms(&all.hist, 0.5)),
            f(p99),
            f(ms(&all.hist, 0.999)),
            errors_cell(&all),
            n(polls.unfinished as f64),
            pct("relay").map(f).unwrap_or_else(|| "-".into()),
            pct("nats-server").map(f).unwrap_or_else(|| "-".into()),
            pct("redis-server").map(f).unwrap_or_else(|| "-".into()),
        ]);
        steps_json.push(json!({
            "target_per_s": step,
            "achieved_per_s": polls.rate(),
            "polls": kind_json(&all, polls.elapsed.as_secs_f64()),
            "unfinished": polls.unfinished,
            "relay_cpu_pct": pct("relay"),
            "nats_cpu_pct": pct("nats-server"),
            "redis_cpu_pct": pct("redis-server"),
        }));
    }
    steps.row(vec![
        format!("**highest rate with p99 < {P99_BOUND_MS:.0} ms**"),
        best.map(n).unwrap_or_else(|| "none".into()),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    tables.push(steps);

    let json = json!({
        "hosts": hosts,
        "gms": set.gms,
        "friendships": players,
        "seed_s": seed_s,
        "warm_up_s": warm_s,
        "warm_up_errors": warm_errors,
        "nats_consumers": consumers,
        "polls_target_per_s": rate,
        "polls_per_s": polls.rate(),
        "polls": stream_json(polls),
        "side": side_json,
        "resources": res_json,
        "relay_rss_mb": rss_mb,
        "relay_peak_rss_mb": hwm_mb,
        "steps": steps_json,
        "best_step_per_s": best,
    });
    Ok(W1 {
        tables,
        json,
        polls_per_s: polls.rate(),
        poll_p99_ms: ms(&all.hist, 0.99),
        best_step: best,
        rss_mb,
        hwm_mb,
    })
}
