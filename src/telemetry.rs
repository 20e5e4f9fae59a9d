//! Logging: JSON lines in production, human-readable in development. `RUST_LOG` filters
//! (default `info`).
//!
//! Warnings and errors are also kept, the last [`RECENT_ERRORS_KEPT`] of them, for the ops
//! dashboard's "recent errors". Like the subscriber that feeds it, that list belongs to
//! the process, not to one relay: a log is process-wide by nature.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Warnings and errors kept for the dashboard: a screenful, and a bound on memory however
/// noisy an outage gets.
pub const RECENT_ERRORS_KEPT: usize = 50;

/// Longest message kept per line; the full line is in the log.
const MAX_LINE_CHARS: usize = 500;

/// A warning or error as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub level: &'static str,
    pub target: String,
    /// The message and its fields, `key=value`.
    pub message: String,
}

static RECENT: Mutex<VecDeque<LogLine>> = Mutex::new(VecDeque::new());

/// The latest warnings and errors, oldest first.
pub fn recent_errors() -> Vec<LogLine> {
    RECENT.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
}

/// Feeds [`recent_errors`] from the log.
struct RecentErrors;

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl<S: Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        let label = match level {
            Level::ERROR => "error",
            Level::WARN => "warn",
            _ => return,
        };
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let message: String = fields.0.chars().take(MAX_LINE_CHARS).collect();
        let line = LogLine {
            at_ms: crate::domain::event::now_ms(),
            level: label,
            target: event.metadata().target().to_owned(),
            message,
        };
        let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT_ERRORS_KEPT {
            recent.pop_front();
        }
        recent.push_back(line);
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // Warnings reach the dashboard's list whatever RUST_LOG says.
    let registry = tracing_subscriber::registry().with(RecentErrors.with_filter(LevelFilter::WARN));
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true).with_filter(filter)).try_init(),
        LogFormat::Pretty => registry.with(fmt.with_filter(filter)).try_init(),
    };
}
