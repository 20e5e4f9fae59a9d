//! Named fault points for tests (feature `fault-injection` only): an armed point parks
//! the task that reaches it forever, as if the process had died right there. The test
//! then stops the relay and starts a new one over the same NATS and Redis.
//!
//! In-process tests arm points with [`Faults::arm`]; a relay process arms the
//! comma-separated names in `GM_RELAY_FAULTS` at start-up (feature builds only).

use std::collections::HashSet;
use std::sync::Mutex;

#[derive(Default)]
pub struct Faults {
    armed: Mutex<HashSet<String>>,
    hits: Mutex<Vec<&'static str>>,
}

impl Faults {
    pub fn arm(&self, name: &str) {
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned());
    }

    /// Arms the points named in `GM_RELAY_FAULTS`.
    pub fn arm_from_env(&self) {
        let names = std::env::var("GM_RELAY_FAULTS").unwrap_or_default();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            self.arm(name);
        }
    }

    /// Names of the armed points reached so far.
    pub fn hits(&self) -> Vec<&'static str> {
        self.hits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub async fn park_if_armed(&self, name: &'static str) {
        if self.armed.lock().unwrap_or_else(|p| p.into_inner()).contains(name) {
            tracing::warn!(fault = name, "fault point reached: parking this task");
            self.hits.lock().unwrap_or_else(|p| p.into_inner()).push(name);
            std::future::pending::<()>().await;
        }
    }
}
