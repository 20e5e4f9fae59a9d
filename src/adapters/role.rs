//! HTTP client of the game's role service: the [`RoleService`] port.
//!
//! `GM_RELAY_ROLE_INFO_URL` is a template with `{uid}` and `{host}`; the reply is JSON and
//! the player exists when it is an object with `"code": 1`. Timeouts, connection errors,
//! non-2xx and non-JSON replies are "unavailable" (errno 7), never "unknown" (errno 4).

use std::time::Duration;

use crate::domain::ports::{RoleService, RoleUnavailable, RoleVerdict};
use crate::domain::{HostId, Uid};

/// A role reply larger than this is not a role reply.
const MAX_ROLE_REPLY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct RoleClient {
    /// The template and its client; `None`: the check is off and every player is taken to
    /// exist.
    service: Option<(String, reqwest::Client)>,
}

impl RoleClient {
    /// Fails only when the TLS roots cannot be used (`SSL_CERT_FILE` names a file whose
    /// every certificate is invalid).
    pub fn new(template: String, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        Ok(Self { service: Some((template, http)) })
    }

    /// The check turned off: every player exists.
    pub fn off() -> Self {
        Self { service: None }
    }
}

impl RoleService for RoleClient {
    async fn check(&self, host: HostId, uid: Uid) -> Result<RoleVerdict, RoleUnavailable> {
        let Some((template, http)) = &self.service else {
            return Ok(RoleVerdict::Exists);
        };
        let url = template.replace("{uid}", &uid.to_string()).replace("{host}", &host.to_string());
        let unavailable = |e: &dyn std::fmt::Display| RoleUnavailable(e.to_string());
        let response = http.get(&url).send().await.map_err(|e| unavailable(&e))?;
        if !response.status().is_success() {
            return Err(RoleUnavailable(format!("status {}", response.status())));
        }
        let body = super::read_body(response, MAX_ROLE_REPLY_BYTES).await.map_err(|e| unavailable(&e))?;
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| unavailable(&e))?;
        // The original: not a dict, or `code` != 1 → the player does not exist. Python's
        // `!= 1` holds for 1.0 and True too.
        let exists = value
            .as_object()
            .and_then(|o| o.get("code"))
            .is_some_and(|c| c.as_f64() == Some(1.0) || c.as_bool() == Some(true));
        Ok(if exists { RoleVerdict::Exists } else { RoleVerdict::Unknown })
    }
}
