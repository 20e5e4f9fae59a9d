//! Markdown tables for the terminal and `bench/RESULTS.md`, and JSON figures.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::load::{KindResult, StreamResult};

pub struct Table {
    pub title: String,
    pub head: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, head: &[&str]) -> Table {
        Table { title: title.into(), head: head.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("#### {}\n\n| {} |\n|", self.title, self.head.join(" | "));
        for _ in &self.head {
            out.push_str("---|");
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        out
    }
}

/// Milliseconds at quantile `q`.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn f(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// Thousands separators for counts and rates.
pub fn n(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn hist_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_ms": ms(h, 0.5),
        "p99_ms": ms(h, 0.99),
        "p999_ms": ms(h, 0.999),
        "max_ms": h.max() as f64 / 1000.0,
    })
}

pub fn kind_json(k: &KindResult, elapsed_s: f64) -> Value {
    let mut v = hist_json(&k.hist);
    v["ok"] = json!(k.ok);
    v["errors"] = json!(k.err);
    v["error_kinds"] = json!(k.errors);
    v["rate_per_s"] = json!(k.ok as f64 / elapsed_s.max(1e-6));
    v
}

pub fn stream_json(s: &StreamResult) -> Value {
    let secs = s.elapsed.as_secs_f64();
    let kinds: serde_json::Map<String, Value> =
        s.kinds.iter().map(|k| (k.kind.to_owned(), kind_json(k, secs))).collect();
    json!({
        "elapsed_s": secs,
        "dispatched": s.dispatched,
        "unfinished": s.unfinished,
        "rate_per_s": s.rate(),
        "all": kind_json(&s.merged(), secs),
        "kinds": kinds,
    })
}

/// A short error summary for a table cell.
pub fn errors_cell(k: &KindResult) -> String {
    if k.err == 0 {
        return "0".into();
    }
    let top: Vec<String> = k.errors.iter().take(2).map(|(e, c)| format!("{c}× {e}")).collect();
    format!("{} ({})", k.err, top.join("; "))
}
