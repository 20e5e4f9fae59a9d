//! Console sessions: who is signed in, in which role, until when. A session travels in a
//! cookie as a signed token, so any relay that shares `GM_RELAY_SESSION_KEY` accepts it
//! without asking another relay or keeping session state anywhere.
//!
//! Token: `v2.<gm>.<role>.<ver>.<expires>.<id>.<mac>`, where `mac` is the unpadded URL-safe
//! base64 of HMAC-SHA256(key, everything before the last dot). Every field is ASCII and
//! none may contain a dot (ids are canonical decimals), so the split is unambiguous.
//! `ver` is the account's credential version: setting a new password bumps it, which ends
//! every session signed before (the relay compares it with the store on each request).
//! `id` is random per sign-in, so two sign-ins of one account within a second are two
//! sessions, and signing out of one (remembered by its `mac`) leaves the other.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ids::GmId;

/// Shortest signing key accepted: 32 bytes is HMAC-SHA256's own output size, below which
/// the key, not the hash, would be the weak part.
pub const MIN_SESSION_KEY_BYTES: usize = 32;

/// How long a session lasts: a working shift. Past it the GM signs in again.
pub const SESSION_TTL_S: i64 = 12 * 3600;

/// Longest token accepted before any parsing: a maximal one is about 100 bytes.
const MAX_TOKEN_LEN: usize = 256;

const TOKEN_VERSION: &str = "v2";

type HmacSha256 = Hmac<Sha256>;

/// What a signed-in person may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Chats with their own players.
    Gm,
    /// Also sees the ops dashboard.
    Supervisor,
}

impl Role {
    /// The spelling in tokens and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gm => "gm",
            Role::Supervisor => "supervisor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "gm" => Some(Role::Gm),
            "supervisor" => Some(Role::Supervisor),
            _ => None,
        }
    }
}

/// A verified session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub gm: GmId,
    pub role: Role,
    /// The credential version the session was signed for.
    pub ver: u64,
    /// Seconds since the Unix epoch.
    pub expires: i64,
    /// Unique per sign-in.
    pub id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("malformed session token")]
    Malformed,
    #[error("session signature does not match")]
    BadSignature,
    #[error("session expired")]
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session key must be at least {MIN_SESSION_KEY_BYTES} bytes")]
pub struct ShortKey;

/// The shared signing key (`GM_RELAY_SESSION_KEY`).
#[derive(Clone)]
pub struct SessionKey(Vec<u8>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

impl SessionKey {
    pub fn new(key: &[u8]) -> Result<Self, ShortKey> {
        if key.len() < MIN_SESSION_KEY_BYTES {
            return Err(ShortKey);
        }
        Ok(Self(key.to_vec()))
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// A token for `session`.
    pub fn sign(&self, session: &Session) -> String {
        let body = format!(
            "{TOKEN_VERSION}.{}.{}.{}.{}.{}",
            session.gm,
            session.role.as_str(),
            session.ver,
            session.expires,
            session.id
        );
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    /// Checks the signature (in constant time), then the expiry against `now` (seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Session, SessionError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(SessionError::Malformed);
        }
        let (body, sig) = token.rsplit_once('.').ok_or(SessionError::Malformed)?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| SessionError::Malformed)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&sig).map_err(|_| SessionError::BadSignature)?;
        let fields: Vec<&str> = body.split('.').collect();
        let [version, gm, role, ver, expires, id] = fields.as_slice() else {
            return Err(SessionError::Malformed);
        };
        if *version != TOKEN_VERSION {
            return Err(SessionError::Malformed);
        }
        let session = Session {
            gm: GmId::parse(gm.as_bytes()).ok_or(SessionError::Malformed)?,
            role: Role::parse(role).ok_or(SessionError::Malformed)?,
            ver: ver.parse().map_err(|_| SessionError::Malformed)?,
            expires: expires.parse().map_err(|_| SessionError::Malformed)?,
            id: id.parse().map_err(|_| SessionError::Malformed)?,
        };
        if session.expires <= now {
            return Err(SessionError::Expired);
        }
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SessionKey {
        SessionKey::new(&[byte; MIN_SESSION_KEY_BYTES]).unwrap()
    }

    fn session() -> Session {
        Session { gm: GmId(7), role: Role::Supervisor, ver: 3, expires: 2_000, id: 42 }
    }

    #[test]
    fn round_trip_and_expiry() {
        let token = key(1).sign(&session());
        assert!(token.starts_with("v2.7.supervisor.3.2000.42."), "{token}");
        assert_eq!(key(1).verify(&token, 1_999), Ok(session()));
        assert_eq!(key(1).verify(&token, 2_000), Err(SessionError::Expired));
    }

    #[test]
    fn another_key_or_a_changed_field_is_refused() {
        let token = key(1).sign(&session());
        assert_eq!(key(2).verify(&token, 0), Err(SessionError::BadSignature));
        let forged = token.replacen("v2.7.", "v2.8.", 1);
        assert_eq!(key(1).verify(&forged, 0), Err(SessionError::BadSignature));
        let promoted =
            key(1).sign(&Session { role: Role::Gm, ..session() }).replacen(".gm.", ".supervisor.", 1);
        assert_eq!(key(1).verify(&promoted, 0), Err(SessionError::BadSignature));
        let other_sign_in = key(1).sign(&Session { id: 43, ..session() });
        assert_ne!(other_sign_in, token, "two sign-ins are two sessions");
        for junk in ["", "v2", "a.b", &"x".repeat(300), "v2.7.gm.1.5.1.!!!"] {
            assert!(key(1).verify(junk, 0).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert_eq!(SessionKey::new(&[0; MIN_SESSION_KEY_BYTES - 1]).unwrap_err(), ShortKey);
    }
}
