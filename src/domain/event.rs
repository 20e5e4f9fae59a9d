//! The event envelope: one JSON object per NATS message, the contract every subscriber of
//! `gm.to.host.<host>` and `gs.to.gm.<gm>` relies on (see `nats/CONTRACT.md`).

use serde::{Deserialize, Serialize};

use super::ids::{GmId, HostId, Uid};

/// The only schema version so far; readers must refuse other values rather than guess.
pub const ENVELOPE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Chat,
    FriendAdd,
    FriendRemove,
    GmOnline,
    GmOffline,
}

/// Which way a chat message travels; decides its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// GM to player: `gm.to.host.<host>`.
    ToHost,
    /// Player to GM: `gs.to.gm.<gm>`.
    ToGm,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    /// Unique per event; also the `Nats-Msg-Id`, so a republished event is de-duplicated.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub host: HostId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<Uid>,
    pub gm: GmId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gm_name: Option<String>,
    /// Chat text as UTF-8 (not base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    /// Per-uid revision of friend events, stamped by the state store: the higher wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<u64>,
}

impl Envelope {
    /// A chat message between `gm` and `uid` (a player on `host`).
    pub fn chat(id: String, host: HostId, uid: Uid, gm: GmId, text: &str, ts: i64) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            id,
            kind: EventKind::Chat,
            host,
            uid: Some(uid),
            gm,
            gm_name: None,
            text: Some(text.to_owned()),
            ts,
            rev: None,
        }
    }
}

/// A fresh, time-ordered event id (UUIDv7).
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch, for `ts`.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_envelope_shape() {
        let e = Envelope::chat("e1".into(), HostId(3), Uid(1001), GmId(7), "你好", 1_700_000_000_000);
        let json: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"v": 1, "id": "e1", "type": "chat", "host": "3", "uid": "1001",
                               "gm": "7", "text": "你好", "ts": 1_700_000_000_000_i64})
        );
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn friend_event_from_store_parses() {
        // The state store writes friend events with Lua's cjson: numbers may carry no
        // fraction but field order is arbitrary.
        let raw = r#"{"rev":2,"gm_name":"Alice","uid":"5","ts":1700000000000,"type":"friend_remove","host":"1","id":"x","v":1,"gm":"3"}"#;
        let e: Envelope = serde_json::from_str(raw).unwrap();
        assert_eq!(e.kind, EventKind::FriendRemove);
        assert_eq!(e.rev, Some(2));
        assert_eq!(e.uid, Some(Uid(5)));
    }
}
