//! Console accounts: setting a password (`gm-relay gm set-password`) and signing in.
//!
//! Passwords are stored as argon2id hashes in PHC form (parameters and salt inside), so
//! the parameters can be raised later without breaking stored hashes. Signing in is rate
//! limited per account and per client IP across all relays (the counters are in Redis),
//! checked before any hashing so a flood of guesses cannot buy CPU time, and hashing runs
//! on the blocking pool behind a small semaphore so sign-ins never stall the relay.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use password_hash::rand_core::OsRng;
use password_hash::SaltString;
use tokio::sync::Semaphore;

use crate::adapters::redis::RedisStore;
use crate::domain::event::now_ms;
use crate::domain::session::{Role, Session, SessionKey, SESSION_TTL_S};
use crate::domain::{GmId, RelayError};

/// Shortest password accepted: with the sign-in limits below, 8 characters are far out
/// of reach of online guessing.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Longest password accepted, in bytes: argon2 hashes any length, but an unbounded input
/// would let one request make the relay hash megabytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Failed sign-ins counted per account and per IP over this window.
pub const SIGNIN_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Failures per account per window before its sign-ins are refused: enough for a person
/// fumbling a password, far too few for guessing one.
pub const MAX_FAILURES_PER_ACCOUNT: u64 = 10;

/// Failures per IP per window: higher than per account (an office behind one NAT), low
/// enough that one address cannot try many accounts.
pub const MAX_FAILURES_PER_IP: u64 = 30;

/// Password hashes computed at once. Each argon2id hash takes ~19 MiB and tens of
/// milliseconds of a core; on 2 cores, 2 at a time keeps the relay's other work moving.
const MAX_CONCURRENT_HASHES: usize = 2;

/// Bound on waiting for a hashing slot; past it the sign-in answers "busy".
const HASH_SLOT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SetPasswordError {
    #[error("the password must have at least {MIN_PASSWORD_CHARS} characters")]
    TooShort,
    #[error("the password must have at most {MAX_PASSWORD_BYTES} bytes")]
    TooLong,
    #[error("GM account {0} does not exist (create it first, or pass --supervisor for an ops-only account)")]
    NoSuchGm(GmId),
    #[error("cannot read the password: {0}")]
    Input(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Store(#[from] RelayError),
}

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("wrong account or password")]
    Refused,
    #[error("too many failed sign-ins; try again later")]
    Limited,
    #[error("too many sign-ins at once; try again")]
    Busy,
    #[error(transparent)]
    Store(#[from] RelayError),
}

/// Checks a password against the policy above.
pub fn check_password_policy(password: &str) -> Result<(), SetPasswordError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(SetPasswordError::TooLong);
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(SetPasswordError::TooShort);
    }
    Ok(())
}

/// An argon2id hash (default parameters: 19 MiB, 2 passes) in PHC string form.
pub fn hash_password(password: &str) -> Result<String, SetPasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| SetPasswordError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `phc`; a malformed hash matches nothing.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok())
}

/// Verified against when the account has no password, so that "no such account" takes
/// as long as "wrong password" and the timing tells nobody which accounts exist.
static DECOY_HASH: LazyLock<String> =
    LazyLock::new(|| hash_password("decoy password, never valid").unwrap_or_default());

/// Sets `gm`'s password and role. A plain GM account must exist already; a supervisor may
/// be an ops-only account. Returns the new credential version (older sessions end).
pub async fn set_password(
    store: &RedisStore,
    gm: GmId,
    password: &str,
    role: Role,
) -> Result<u64, SetPasswordError> {
    check_password_policy(password)?;
    if role == Role::Gm && store.gm_profile(gm).await?.is_none() {
        return Err(SetPasswordError::NoSuchGm(gm));
    }
    let password = password.to_owned();
    let phc = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| SetPasswordError::Hash(e.to_string()))??;
    Ok(store.set_password(gm, &phc, role).await?)
}

/// Signs GMs in: checks the limits, then the password, and signs a session.
pub struct SignIn {
    key: SessionKey,
    hashing: Arc<Semaphore>,
}

impl SignIn {
    pub fn new(key: SessionKey) -> Self {
        Self { key, hashing: Arc::new(Semaphore::new(MAX_CONCURRENT_HASHES)) }
    }

    pub fn key(&self) -> &SessionKey {
        &self.key
    }

    /// Returns the session and its signed token.
    pub async fn sign_in(
        &self,
        store: &RedisStore,
        gm: GmId,
        password: &str,
        ip: IpAddr,
    ) -> Result<(Session, String), SignInError> {
        let limits = (MAX_FAILURES_PER_ACCOUNT, MAX_FAILURES_PER_IP);
        if !store.take_signin_attempt(gm, ip, SIGNIN_WINDOW, limits).await? {
            tracing::warn!(%gm, %ip, "console sign-in refused: too many failures");
            return Err(SignInError::Limited);
        }
        let attempt = Attempt { store: store.clone(), gm, ip, judged: false };
        if password.len() > MAX_PASSWORD_BYTES {
            attempt.failed();
            return Err(SignInError::Refused);
        }
        let credentials = store.credentials(gm).await?;
        let phc = credentials.as_ref().map_or_else(|| DECOY_HASH.clone(), |c| c.phc.clone());
        let Ok(Ok(permit)) =
            tokio::time::timeout(HASH_SLOT_WAIT, Arc::clone(&self.hashing).acquire_owned()).await
        else {
            return Err(SignInError::Busy);
        };
        let mut attempt = attempt;
        attempt.checking();
        let candidate = password.to_owned();
        let checked = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_password(&candidate, &phc)
        })
        .await;
        let matches = match checked {
            Ok(matches) => matches,
            Err(e) => {
                // A panic in the check is our fault, not a wrong password: not counted
                // against the account, answered as "try again".
                tracing::error!(%gm, error = %e, "console password check failed");
                attempt.give_back();
                return Err(SignInError::Busy);
            }
        };
        let Some(credentials) = credentials.filter(|_| matches) else {
            attempt.failed();
            tracing::info!(%gm, %ip, "console sign-in failed");
            return Err(SignInError::Refused);
        };
        attempt.succeeded().await;
        let session = Session {
            gm,
            role: credentials.role,
            ver: credentials.ver,
            expires: now_ms() / 1000 + SESSION_TTL_S,
            // The low 64 bits of a UUIDv7 (random, counter-ordered): unique per sign-in.
            id: uuid::Uuid::now_v7().as_u128() as u64,
        };
        tracing::info!(%gm, role = credentials.role.as_str(), "console sign-in");
        Ok((session, self.key.sign(&session)))
    }
}

/// A sign-in attempt counted against the account and the IP, not yet judged. Dropped
/// unjudged (the password was never checked: no hashing slot, a backend error, the request
/// went away), it is given back in the background.
struct Attempt {
    store: RedisStore,
    gm: GmId,
    ip: IpAddr,
    judged: bool,
}

impl Attempt {
    /// The password check starts: from here it runs to its end even if the request goes
    /// away, so the attempt stays counted, or a client that hangs up at once could have
    /// passwords checked without limit.
    fn checking(&mut self) {
        self.judged = true;
    }

    /// The check could not judge the password (it panicked): the attempt is given back.
    fn give_back(mut self) {
        self.judged = false;
    }

    /// A wrong password, or one too long to check: the attempt stays counted.
    fn failed(mut self) {
        self.judged = true;
    }

    /// The right password: the account's failures go and the IP gets the attempt back. A
    /// failure here is logged: the sign-in itself stands.
    async fn succeeded(mut self) {
        self.judged = true;
        if let Err(e) = self.store.settle_signin_attempt(self.gm, self.ip, true).await {
            tracing::warn!(gm = %self.gm, error = %e, "could not clear the sign-in failure counts");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.judged {
            return;
        }
        let (store, gm, ip) = (self.store.clone(), self.gm, self.ip);
        runtime.spawn(async move {
            if let Err(e) = store.settle_signin_attempt(gm, ip, false).await {
                tracing::warn!(%gm, error = %e, "could not give back an unjudged sign-in attempt");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_carry_their_parameters() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong horse", &phc));
        assert!(!verify_password("correct horse", "not a hash"));
        assert_ne!(phc, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn policy() {
        assert!(matches!(check_password_policy("short"), Err(SetPasswordError::TooShort)));
        assert!(matches!(check_password_policy(&"x".repeat(1025)), Err(SetPasswordError::TooLong)));
        assert!(check_password_policy("八个字符的密码啊").is_ok());
    }
}
