//! Logging: JSON lines in production, human-readable in development. `RUST_LOG` filters
//! (default `info`). Lines are written to stderr by a thread of their own, so a stalled
//! stderr (a full pipe, a paused terminal) never holds up the relay's tasks, which share
//! one thread by default; past a bound, lines are dropped and counted instead.
//!
//! Warnings and errors are also kept, the last [`RECENT_ERRORS_KEPT`] of them, for the ops
//! dashboard's "recent errors". Like the subscriber that feeds it, that list belongs to
//! the process, not to one relay: a log is process-wide by nature.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
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

/// Log lines queued for the writer thread. Seconds of the busiest debug logging, a few MB
/// at most; when stderr stalls longer, new lines are dropped (and counted in
/// `gm_relay_log_lines_dropped_total`) rather than blocking the relay.
const LOG_QUEUE_LINES: usize = 10_000;

/// Lines dropped because the queue was full; set once the subscriber is installed.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because stderr could not keep up.
pub fn dropped_log_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the log writer thread; dropping it writes out what is queued (waiting about a
/// second at most) and stops the thread. Hold it until the process ends.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] Option<WorkerGuard>);

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

/// The log filter when `RUST_LOG` is unset. async-nats logs each connection event at info
/// itself, one line per message dropped for a full subscription buffer among them; the
/// relay logs the same events, with the connection's name and drops summarised.
const DEFAULT_FILTER: &str = "info,async_nats=warn";

/// Installs the process's subscriber; the returned guard must live as long as the process.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("gm-relay-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    // Warnings reach the dashboard's list whatever RUST_LOG says.
    let registry = tracing_subscriber::registry().with(RecentErrors.with_filter(LevelFilter::WARN));
    let installed = match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true).with_filter(filter)).try_init(),
        LogFormat::Pretty => registry.with(fmt.with_filter(filter)).try_init(),
    };
    // A second init (tests) keeps the first subscriber and its writer.
    match installed {
        Ok(()) => {
            let _ = DROPPED.set(dropped);
            LogGuard(Some(guard))
        }
        Err(_) => LogGuard(None),
    }
}
