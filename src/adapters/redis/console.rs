//! The console's state in Redis: GM passwords and roles, failed sign-in counters and read
//! marks, plus the reads the GM view and the ops dashboard make of friendship state. The
//! keys are listed with the others in the [parent module](super)'s table.
//!
//! Every read here is bounded: a GM's roster is capped by the caller's limit, the online
//! GM list likewise, so no console page can make Redis walk an unbounded set.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{int_at, unavailable, RedisStore, PREFIX};
use crate::domain::session::Role;
use crate::domain::{Backend, GmId, HostId, RelayError, Uid};

mod keys {
    use std::net::IpAddr;

    use super::PREFIX;
    use crate::domain::GmId;

    pub fn password(gm: GmId) -> String {
        format!("{PREFIX}gm:{gm}:password")
    }

    pub fn read_marks(gm: GmId) -> String {
        format!("{PREFIX}gm:{gm}:read")
    }

    pub fn name(gm: GmId) -> String {
        format!("{PREFIX}gm:{gm}:name")
    }

    pub fn failures_of_gm(gm: GmId) -> String {
        format!("{PREFIX}signin_fail:gm:{gm}")
    }

    pub fn failures_of_ip(ip: IpAddr) -> String {
        format!("{PREFIX}signin_fail:ip:{ip}")
    }

    pub const ONLINE: &str = "gmr:gm_online";

    /// A signed-out session, by its token's signature.
    pub fn signed_out(mac: &str) -> String {
        format!("{PREFIX}signed_out:{mac}")
    }
}

/// KEYS: password hash. ARGV: PHC string, role. Returns the new credential version.
static SET_PASSWORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('HSET', KEYS[1], 'phc', ARGV[1], 'role', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'ver', 1)
"#,
    )
});

/// KEYS: the account's and the IP's sign-in counters. ARGV: window (ms), the account's
/// limit, the IP's limit. Counts one attempt against both, unless either is at its limit
/// (returns 0). Counted before the password is checked, in one step, so that concurrent
/// guesses cannot all pass the check on the same count. A counter lives for one window from
/// its first attempt.
static TAKE_ATTEMPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[2])
  or tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[3]) then
  return 0
end
for i = 1, 2 do
  redis.call('INCR', KEYS[i])
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
return 1
"#,
    )
});

/// KEYS: the account's and the IP's sign-in counters. ARGV: "forgive" (the password was
/// right: the account's failures go, the IP gets this attempt back) or "return" (the
/// password was never checked: both get it back).
static SETTLE_ATTEMPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local first = 1
if ARGV[1] == 'forgive' then
  redis.call('DEL', KEYS[1])
  first = 2
end
for i = first, 2 do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return 0
"#,
    )
});

/// KEYS: read marks. ARGV: uid, seq. A mark only moves forward, so two tabs marking in
/// either order end at the later one.
static MARK_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"#,
    )
});

/// ARGV: prefix, gm, limit. Returns {total, uid, host, uid, host, ...}: every player when
/// there are at most `limit`, else `limit` of them.
static GM_PLAYERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local P, gm, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local k = P .. 'gm:' .. gm .. ':friends'
local total = redis.call('SCARD', k)
local uids
if total <= limit then uids = redis.call('SMEMBERS', k) else uids = redis.call('SRANDMEMBER', k, limit) end
local out = {total}
for _, uid in ipairs(uids) do
  local host = redis.call('HGET', P .. 'player:' .. uid, 'host')
  if host then
    table.insert(out, uid)
    table.insert(out, host)
  end
end
return out
"#,
    )
});

/// What is stored for a console account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The argon2 hash in PHC string form (algorithm, parameters and salt included).
    pub phc: String,
    pub role: Role,
    /// Bumped by every new password; sessions signed for an older version are over.
    pub ver: u64,
}

/// A GM as the console shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmProfile {
    pub name: String,
    pub online: bool,
}

fn text(v: &redis::Value) -> Result<String, RelayError> {
    redis::from_redis_value_ref::<String>(v)
        .map_err(|e| RelayError::unavailable(Backend::Redis, e.to_string()))
}

fn id(v: &redis::Value) -> Result<i64, RelayError> {
    text(v)?.parse().map_err(|_| RelayError::unavailable(Backend::Redis, "stored id is not an integer"))
}

impl RedisStore {
    /// Stores a new password hash and role for `gm`; returns the new credential version.
    pub async fn set_password(&self, gm: GmId, phc: &str, role: Role) -> Result<u64, RelayError> {
        SET_PASSWORD
            .key(keys::password(gm))
            .arg(phc)
            .arg(role.as_str())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// The account's credentials, if it has a password.
    pub async fn credentials(&self, gm: GmId) -> Result<Option<Credentials>, RelayError> {
        let (phc, role, ver): (Option<String>, Option<String>, Option<u64>) =
            self.cmd(redis::cmd("HMGET").arg(keys::password(gm)).arg("phc").arg("role").arg("ver")).await?;
        Ok(match (phc, role.as_deref().and_then(Role::parse), ver) {
            (Some(phc), Some(role), Some(ver)) => Some(Credentials { phc, role, ver }),
            _ => None,
        })
    }

    /// The account's role and credential version, and whether the session whose token has
    /// the signature `mac` was signed out: what every console request checks, in one round
    /// trip.
    pub async fn session_state(
        &self,
        gm: GmId,
        mac: &str,
    ) -> Result<(Option<(Role, u64)>, bool), RelayError> {
        let ((role, ver), signed_out): ((Option<String>, Option<u64>), bool) = self
            .query(
                redis::pipe()
                    .cmd("HMGET")
                    .arg(keys::password(gm))
                    .arg("role")
                    .arg("ver")
                    .cmd("EXISTS")
                    .arg(keys::signed_out(mac)),
            )
            .await?;
        Ok((role.as_deref().and_then(Role::parse).zip(ver), signed_out))
    }

    /// Ends the session whose token has the signature `mac`, on every relay; the mark
    /// lasts as long as the token would (`ttl`), then the token is expired anyway.
    pub async fn sign_out(&self, mac: &str, ttl: Duration) -> Result<(), RelayError> {
        self.cmd(redis::cmd("SET").arg(keys::signed_out(mac)).arg(1).arg("EX").arg(ttl.as_secs().max(1)))
            .await
    }

    /// Counts a sign-in attempt against the account and the IP for `window`, unless either
    /// has reached its limit (then returns false and counts nothing). An attempt counts as
    /// a failure until [`RedisStore::settle_signin_attempt`] says otherwise.
    pub async fn take_signin_attempt(
        &self,
        gm: GmId,
        ip: IpAddr,
        window: Duration,
        (max_by_gm, max_by_ip): (u64, u64),
    ) -> Result<bool, RelayError> {
        let taken: i64 = TAKE_ATTEMPT
            .key(keys::failures_of_gm(gm))
            .key(keys::failures_of_ip(ip))
            .arg(window.as_millis() as u64)
            .arg(max_by_gm)
            .arg(max_by_ip)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(taken == 1)
    }

    /// An attempt that was not a failure: the right password forgives the account's
    /// failures and gives the IP its attempt back (one address guessing many accounts
    /// stays limited, an office signing in does not use up its allowance); an attempt
    /// whose password was never checked (no hashing slot) is given back to both.
    pub async fn settle_signin_attempt(
        &self,
        gm: GmId,
        ip: IpAddr,
        signed_in: bool,
    ) -> Result<(), RelayError> {
        let _: i64 = SETTLE_ATTEMPT
            .key(keys::failures_of_gm(gm))
            .key(keys::failures_of_ip(ip))
            .arg(if signed_in { "forgive" } else { "return" })
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The GM's name and presence, or None when the account does not exist.
    pub async fn gm_profile(&self, gm: GmId) -> Result<Option<GmProfile>, RelayError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(keys::name(gm)).cmd("SISMEMBER").arg(keys::ONLINE).arg(gm.0);
        let (name, online): (Option<String>, bool) =
            pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(name.map(|name| GmProfile { name, online }))
    }

    /// The GM's players with their hosts, at most `limit`, and how many there are in all.
    pub async fn gm_players(&self, gm: GmId, limit: usize) -> Result<(u64, Vec<(Uid, HostId)>), RelayError> {
        let reply: Vec<redis::Value> = GM_PLAYERS
            .prepare_invoke()
            .arg(PREFIX)
            .arg(gm.0)
            .arg(limit)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let total = int_at(&reply, 0)? as u64;
        let players = reply[1.min(reply.len())..]
            .chunks_exact(2)
            .map(|pair| Ok((Uid(id(&pair[0])?), HostId(id(&pair[1])?))))
            .collect::<Result<Vec<_>, RelayError>>()?;
        Ok((total, players))
    }

    /// Per player, the history sequence of the last player message the GM has read.
    pub async fn read_marks(&self, gm: GmId) -> Result<HashMap<Uid, u64>, RelayError> {
        let marks: HashMap<String, u64> = self.cmd(redis::cmd("HGETALL").arg(keys::read_marks(gm))).await?;
        Ok(marks.into_iter().filter_map(|(uid, seq)| Some((uid.parse().ok()?, seq))).collect())
    }

    /// Moves the read mark of a conversation forward to `seq`.
    pub async fn mark_read(&self, gm: GmId, uid: Uid, seq: u64) -> Result<(), RelayError> {
        let _: i64 = MARK_READ
            .key(keys::read_marks(gm))
            .arg(uid.0)
            .arg(seq)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Online GMs with their names, at most `limit`, and how many are online in all.
    pub async fn online_gms(&self, limit: usize) -> Result<(u64, Vec<(GmId, String)>), RelayError> {
        let total: u64 = self.cmd(redis::cmd("SCARD").arg(keys::ONLINE)).await?;
        let gms: Vec<i64> = self.cmd(redis::cmd("SRANDMEMBER").arg(keys::ONLINE).arg(limit)).await?;
        if gms.is_empty() {
            return Ok((total, Vec::new()));
        }
        let names: Vec<Option<String>> = self
            .cmd(redis::cmd("MGET").arg(gms.iter().map(|g| keys::name(GmId(*g))).collect::<Vec<_>>()))
            .await?;
        let mut out: Vec<(GmId, String)> =
            gms.into_iter().zip(names).map(|(g, n)| (GmId(g), n.unwrap_or_default())).collect();
        out.sort();
        Ok((total, out))
    }

    /// Round-trip time of a PING, for the dashboard.
    pub async fn ping_latency(&self) -> Result<Duration, RelayError> {
        let started = std::time::Instant::now();
        self.cmd::<String>(&redis::cmd("PING")).await?;
        Ok(started.elapsed())
    }
}
