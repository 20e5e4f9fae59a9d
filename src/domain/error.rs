//! Why a request did not take effect, in the protocol's terms.

use std::error::Error as StdError;

/// The legacy protocol's error numbers (README, "The legacy protocol"), one variant per meaning.
/// Two meanings share errno 4, as in the original system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// Missing parameter, non-canonical id or bad `gm_name`.
    BadParam,
    GmExists,
    NoSuchGm,
    PlayerHasGm,
    RoleRefused,
    NotFriend,
    /// `del`/GM `send`: the player's GM is another GM or none; GS `send`: no GM at all.
    WrongGm,
    BadMsg,
    RoleUnavailable,
    RateLimited,
    /// Native send: the player is not on the sending host.
    WrongHost,
    /// NATS or Redis did not answer in time; nothing was changed.
    Unavailable,
}

impl Errno {
    pub fn code(self) -> i32 {
        match self {
            Errno::BadParam => -1,
            Errno::GmExists => 1,
            Errno::NoSuchGm => 2,
            Errno::PlayerHasGm => 3,
            Errno::RoleRefused | Errno::NotFriend => 4,
            Errno::WrongGm => 5,
            Errno::BadMsg => 6,
            Errno::RoleUnavailable => 7,
            Errno::RateLimited => 8,
            Errno::WrongHost => 9,
            Errno::Unavailable => 10,
        }
    }

    /// Short reason for the optional `error` field; clients ignore it.
    pub fn reason(self) -> &'static str {
        match self {
            Errno::BadParam => "missing or invalid parameter",
            Errno::GmExists => "GM account already exists",
            Errno::NoSuchGm => "GM account does not exist",
            Errno::PlayerHasGm => "player already has a GM",
            Errno::RoleRefused => "role service does not know this player",
            Errno::NotFriend => "player is not this GM's friend",
            Errno::WrongGm => "player belongs to another GM or none",
            Errno::BadMsg => "msg must be base64 of 1 to 500 UTF-8 characters",
            Errno::RoleUnavailable => "role service unavailable",
            Errno::RateLimited => "rate limited",
            Errno::WrongHost => "player is not on this host",
            Errno::Unavailable => "temporarily unavailable",
        }
    }
}

/// Which backing service failed; for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nats,
    Redis,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Nats => "nats",
            Backend::Redis => "redis",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A protocol-level refusal; the state is unchanged.
    #[error("rejected with errno {}: {}", .0.code(), .0.reason())]
    Rejected(Errno),
    /// `offline` of a GM that was not online: the protocol answers `{"res": 0}`.
    #[error("GM was not online")]
    NotOnline,
    /// A backing service failed or timed out. The cause is for the log only.
    #[error("{backend} unavailable: {source}")]
    Unavailable {
        backend: Backend,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl RelayError {
    pub fn unavailable(backend: Backend, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        RelayError::Unavailable { backend, source: source.into() }
    }

    /// The errno a client sees, if any.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RelayError::Rejected(e) => Some(*e),
            RelayError::NotOnline => None,
            RelayError::Unavailable { .. } => Some(Errno::Unavailable),
        }
    }
}

impl From<Errno> for RelayError {
    fn from(e: Errno) -> Self {
        RelayError::Rejected(e)
    }
}
