//! Redis adapter: the [`FriendStore`] port. Owns every key name and every Lua script.
//!
//! Redis keeps only state. Each mutation is one Lua script, so a change, its revision bump
//! and its outbox entry commit together or not at all, and two GMs claiming one player
//! cannot both win. Key layout (prefix `gmr:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `gmr:gm:<gm>:name` | string | GM name; the GM exists when it is set |
//! | `gmr:gm_online` | set | online GMs |
//! | `gmr:gm:<gm>:friends` | set | the GM's players |
//! | `gmr:gm:<gm>:hosts` | hash | host → number of the GM's players there |
//! | `gmr:player:<uid>` | hash | `gm`, `host` while befriended; `rev` forever (revisions only grow) |
//! | `gmr:host:<host>:players` | set | befriended players on the host |
//! | `gmr:host:<host>:online_gms` | set | online GMs with a player on the host: `online` costs what it returns |
//! | `gmr:outbox` | list | `{"seq", "event"}` JSON, oldest first, until published |
//! | `gmr:outbox:seq` / `gmr:outbox:published` | string | last seq written / published |
//! | `gmr:lease:<name>` | string | lease holder's token, with a TTL |
//! | `gmr:gm:<gm>:password` | hash | console account: `phc` (argon2 hash), `role` (`gm`/`supervisor`), `ver` (bumped per new password) |
//! | `gmr:gm:<gm>:read` | hash | console read marks: uid → history sequence of the last player message read |
//! | `gmr:signin_fail:gm:<gm>` / `gmr:signin_fail:ip:<ip>` | string | console sign-in attempts not proved right (failed, or being checked), expiring one window after the first |
//! | `gmr:signed_out:<mac>` | string | a console session signed out (by its token's signature), expiring when the token would |
//!
//! The console's keys and scripts are in [`console`].

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use serde::Deserialize;

use crate::domain::ports::{FriendStore, LeaseToken, OutboxItem, PlayerLink, RosterEntry};
use crate::domain::{Backend, Envelope, Errno, GmId, GmName, HostId, RelayError, Uid};

pub mod console;
pub mod import;

/// Key prefix of everything gm-relay writes, apart from the original system's keys.
pub const PREFIX: &str = "gmr:";

/// A command that takes longer than this is treated as Redis being unavailable (errno 10).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A mutating script that starts later than this after it was sent changes nothing and
/// reports "too late": the caller has given up at [`RESPONSE_TIMEOUT`] and answered errno
/// 10, which promises that nothing changed. The margin covers clock skew between this
/// host and Redis's (same machine or NTP-synced).
const SCRIPT_DEADLINE: Duration = Duration::from_millis(1500);

/// Bound on one (re)connection attempt, so a request never waits on a dead server for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Reconnect attempts per failure before the manager reports an error; it tries again on
/// the next command.
const RECONNECT_RETRIES: usize = 3;

/// Longest pause between those attempts: a restarted Redis is back in use within half a
/// second of answering, and three attempts stay well under a request's bound.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

mod keys {
    use super::PREFIX;
    use crate::domain::HostId;

    pub const OUTBOX: &str = "gmr:outbox";
    pub const OUTBOX_PUBLISHED: &str = "gmr:outbox:published";

    pub fn online_gms(host: HostId) -> String {
        format!("{PREFIX}host:{host}:online_gms")
    }

    pub fn lease(name: &str) -> String {
        format!("{PREFIX}lease:{name}")
    }
}

/// Lua helpers shared by the mutating scripts. `P` is the key prefix (ARGV[1]).
const LUA_PRELUDE: &str = r#"
local P = ARGV[1]
-- The caller gives up waiting at its deadline (ms since the epoch, the last argument) and
-- answers "unavailable, nothing changed"; a script that only starts after it must then
-- change nothing.
local DEADLINE = tonumber(ARGV[#ARGV])
local function too_late()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > DEADLINE
end
local function k_name(gm) return P .. 'gm:' .. gm .. ':name' end
local function k_friends(gm) return P .. 'gm:' .. gm .. ':friends' end
local function k_hosts(gm) return P .. 'gm:' .. gm .. ':hosts' end
local function k_player(uid) return P .. 'player:' .. uid end
local function k_players(host) return P .. 'host:' .. host .. ':players' end
local function k_online_gms(host) return P .. 'host:' .. host .. ':online_gms' end
local K_ONLINE = P .. 'gm_online'
local K_OUTBOX = P .. 'outbox'
local K_OUTBOX_SEQ = P .. 'outbox:seq'
-- Makes uid the player of gm on host: every key `add` writes but the outbox. Returns the
-- player's new revision, and whether this is the GM's first player on host. The caller
-- has checked the GM exists and the player is free.
local function claim(gm, host, uid)
  local pk = k_player(uid)
  local rev = redis.call('HINCRBY', pk, 'rev', 1)
  redis.call('HSET', pk, 'gm', gm, 'host', host)
  redis.call('SADD', k_friends(gm), uid)
  redis.call('SADD', k_players(host), uid)
  local first = redis.call('HINCRBY', k_hosts(gm), host, 1) == 1
  if first and redis.call('SISMEMBER', K_ONLINE, gm) == 1 then
    redis.call('SADD', k_online_gms(host), gm)
  end
  return rev, first
end
local function emit(event)
  local seq = redis.call('INCR', K_OUTBOX_SEQ)
  redis.call('RPUSH', K_OUTBOX, cjson.encode({seq = seq, event = event}))
  return seq
end
"#;

/// ARGV: prefix, gm, name. Returns {errno}.
const CREATE_GM: &str = r#"
if too_late() then return {-3} end
local gm, name = ARGV[2], ARGV[3]
if redis.call('EXISTS', k_name(gm)) == 1 then return {1} end
redis.call('SET', k_name(gm), name)
redis.call('SADD', K_ONLINE, gm)
return {0}
"#;

/// ARGV: prefix, gm, uid. Returns {errno}.
const CHECK_ADD: &str = r#"
local gm, uid = ARGV[2], ARGV[3]
if redis.call('EXISTS', k_name(gm)) == 0 then return {2} end
if redis.call('HEXISTS', k_player(uid), 'gm') == 1 then return {3} end
return {0}
"#;

/// ARGV: prefix, gm, host, uid, event id, ts. Returns {errno, outbox seq}.
const ADD_FRIEND: &str = r#"
if too_late() then return {-3} end
local gm, host, uid, id, ts = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local name = redis.call('GET', k_name(gm))
if not name then return {2} end
if redis.call('HEXISTS', k_player(uid), 'gm') == 1 then return {3} end
local rev, first = claim(gm, host, uid)
local seq = emit({v = 1, id = id, type = 'friend_add', host = host, uid = uid, gm = gm,
                  gm_name = name, ts = ts, rev = rev})
-- A host hears of a GM's presence changes only while the GM has players there, so what it
-- last heard may be stale: the GM's first player there brings the GM's presence now.
if first then
  local mode = redis.call('SISMEMBER', K_ONLINE, gm) == 1 and 'online' or 'offline'
  seq = emit({v = 1, id = id .. '.' .. host, type = 'gm_' .. mode, host = host, gm = gm,
              gm_name = name, ts = ts})
end
return {0, seq}
"#;

/// ARGV: prefix, gm, uid, event id, ts. Returns {errno, outbox seq}.
const REMOVE_FRIEND: &str = r#"
if too_late() then return {-3} end
local gm, uid, id, ts = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local name = redis.call('GET', k_name(gm))
if not name then return {2} end
local pk = k_player(uid)
if redis.call('HGET', pk, 'gm') ~= gm then return {5} end
if redis.call('SREM', k_friends(gm), uid) == 0 then return {4} end
local host = redis.call('HGET', pk, 'host')
redis.call('HDEL', pk, 'gm', 'host')
local rev = redis.call('HINCRBY', pk, 'rev', 1)
redis.call('SREM', k_players(host), uid)
if redis.call('HINCRBY', k_hosts(gm), host, -1) <= 0 then
  redis.call('HDEL', k_hosts(gm), host)
  redis.call('SREM', k_online_gms(host), gm)
end
return {0, emit({v = 1, id = id, type = 'friend_remove', host = host, uid = uid, gm = gm,
                 gm_name = name, ts = ts, rev = rev})}
"#;

/// ARGV: prefix, gm, event id base, ts, 'online'|'offline'. Returns {errno, last seq or 0}.
/// One presence event per host where the GM has players; ids are `<base>.<host>`.
const SET_PRESENCE: &str = r#"
if too_late() then return {-3} end
local gm, id, ts, mode = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local name = redis.call('GET', k_name(gm))
local changed
if mode == 'online' then
  if not name then return {2} end
  changed = redis.call('SADD', K_ONLINE, gm)
else
  changed = redis.call('SREM', K_ONLINE, gm)
  if changed == 0 then return {-2} end
end
if changed == 0 then return {0, 0} end
local seq = 0
for _, host in ipairs(redis.call('HKEYS', k_hosts(gm))) do
  if mode == 'online' then
    redis.call('SADD', k_online_gms(host), gm)
  else
    redis.call('SREM', k_online_gms(host), gm)
  end
  seq = emit({v = 1, id = id .. '.' .. host, type = 'gm_' .. mode, host = host, gm = gm,
              gm_name = name or '', ts = ts})
end
return {0, seq}
"#;

/// ARGV: prefix, host, cursor, page. Returns {next cursor, uid, gm, name, online, rev, ...}.
const HOST_ROSTER: &str = r#"
local host, cursor, page = ARGV[2], ARGV[3], ARGV[4]
local scan = redis.call('SSCAN', k_players(host), cursor, 'COUNT', page)
local out = {scan[1]}
for _, uid in ipairs(scan[2]) do
  local p = redis.call('HMGET', k_player(uid), 'gm', 'host', 'rev')
  if p[1] and p[2] == host then
    local name = redis.call('GET', k_name(p[1])) or ''
    table.insert(out, uid)
    table.insert(out, p[1])
    table.insert(out, name)
    table.insert(out, redis.call('SISMEMBER', K_ONLINE, p[1]))
    table.insert(out, p[3] or '0')
  end
end
return out
"#;

/// KEYS: lease. ARGV: token, ttl ms. Returns 1 if held and extended.
const RENEW_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// KEYS: lease. ARGV: token.
const RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// KEYS: lease, outbox, published. ARGV: token, count, last seq. Returns 1 if removed.
const OUTBOX_REMOVE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
redis.call('SET', KEYS[3], ARGV[3])
return 1
"#;

struct Scripts {
    create_gm: Script,
    check_add: Script,
    add_friend: Script,
    remove_friend: Script,
    set_presence: Script,
    host_roster: Script,
    renew_lease: Script,
    release_lease: Script,
    outbox_remove: Script,
}

impl Scripts {
    fn load() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{LUA_PRELUDE}{body}"));
        Self {
            create_gm: with_prelude(CREATE_GM),
            check_add: with_prelude(CHECK_ADD),
            add_friend: with_prelude(ADD_FRIEND),
            remove_friend: with_prelude(REMOVE_FRIEND),
            set_presence: with_prelude(SET_PRESENCE),
            host_roster: with_prelude(HOST_ROSTER),
            renew_lease: Script::new(RENEW_LEASE),
            release_lease: Script::new(RELEASE_LEASE),
            outbox_remove: Script::new(OUTBOX_REMOVE),
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    scripts: std::sync::Arc<Scripts>,
}

fn unavailable(e: redis::RedisError) -> RelayError {
    RelayError::unavailable(Backend::Redis, e)
}

/// Turns a script's `{errno, value...}` reply into the value or the refusal.
fn check(reply: Vec<redis::Value>) -> Result<Vec<redis::Value>, RelayError> {
    let errno = match reply.first() {
        Some(redis::Value::Int(n)) => *n,
        other => {
            return Err(RelayError::unavailable(Backend::Redis, format!("unexpected script reply {other:?}")))
        }
    };
    match errno {
        0 => Ok(reply),
        -2 => Err(RelayError::NotOnline),
        -3 => {
            Err(RelayError::unavailable(Backend::Redis, "script started after its deadline; nothing changed"))
        }
        1 => Err(Errno::GmExists.into()),
        2 => Err(Errno::NoSuchGm.into()),
        3 => Err(Errno::PlayerHasGm.into()),
        4 => Err(Errno::NotFriend.into()),
        5 => Err(Errno::WrongGm.into()),
        n => Err(RelayError::unavailable(Backend::Redis, format!("unknown script errno {n}"))),
    }
}

fn int_at(reply: &[redis::Value], i: usize) -> Result<i64, RelayError> {
    match reply.get(i) {
        Some(redis::Value::Int(n)) => Ok(*n),
        Some(v @ redis::Value::BulkString(_)) => redis::from_redis_value_ref::<i64>(v)
            .map_err(|e| RelayError::unavailable(Backend::Redis, e.to_string())),
        other => Err(RelayError::unavailable(Backend::Redis, format!("expected integer, got {other:?}"))),
    }
}

#[derive(Deserialize)]
struct StoredOutboxItem {
    seq: u64,
    event: Envelope,
}

impl RedisStore {
    pub async fn connect(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self { conn, scripts: std::sync::Arc::new(Scripts::load()) })
    }

    async fn run(&self, script: &Script, args: &[&str]) -> Result<Vec<redis::Value>, RelayError> {
        let mut inv = script.prepare_invoke();
        inv.arg(PREFIX);
        for a in args {
            inv.arg(*a);
        }
        inv.arg(crate::domain::event::now_ms() + SCRIPT_DEADLINE.as_millis() as i64);
        let reply: Vec<redis::Value> = inv.invoke_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        check(reply)
    }

    async fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RelayError> {
        cmd.query_async(&mut self.conn.clone()).await.map_err(unavailable)
    }

    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, RelayError> {
        pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)
    }
}

impl FriendStore for RedisStore {
    async fn create_gm(&self, gm: GmId, name: &GmName) -> Result<(), RelayError> {
        self.run(&self.scripts.create_gm, &[&gm.to_string(), name.as_str()]).await.map(drop)
    }

    async fn check_add(&self, gm: GmId, uid: Uid) -> Result<(), RelayError> {
        self.run(&self.scripts.check_add, &[&gm.to_string(), &uid.to_string()]).await.map(drop)
    }

    async fn add_friend(
        &self,
        gm: GmId,
        host: HostId,
        uid: Uid,
        event_id: &str,
        ts: i64,
    ) -> Result<u64, RelayError> {
        let args = [gm.to_string(), host.to_string(), uid.to_string(), event_id.to_owned(), ts.to_string()];
        let reply = self.run(&self.scripts.add_friend, &args.each_ref().map(String::as_str)).await?;
        Ok(int_at(&reply, 1)? as u64)
    }

    async fn remove_friend(&self, gm: GmId, uid: Uid, event_id: &str, ts: i64) -> Result<u64, RelayError> {
        let args = [gm.to_string(), uid.to_string(), event_id.to_owned(), ts.to_string()];
        let reply = self.run(&self.scripts.remove_friend, &args.each_ref().map(String::as_str)).await?;
        Ok(int_at(&reply, 1)? as u64)
    }

    async fn set_online(&self, gm: GmId, event_id: &str, ts: i64) -> Result<Option<u64>, RelayError> {
        self.presence(gm, event_id, ts, "online").await
    }

    async fn set_offline(&self, gm: GmId, event_id: &str, ts: i64) -> Result<Option<u64>, RelayError> {
        self.presence(gm, event_id, ts, "offline").await
    }

    async fn gm_chat_target(&self, gm: GmId, uid: Uid) -> Result<HostId, RelayError> {
        // Two reads in one MULTI, not a script: this runs for every GM message, and a
        // transaction of two plain reads costs Redis a fraction of an EVALSHA.
        let (friend, (owner, host)): (bool, (Option<i64>, Option<i64>)) = self
            .query(
                redis::pipe()
                    .atomic()
                    .cmd("SISMEMBER")
                    .arg(format!("{PREFIX}gm:{gm}:friends"))
                    .arg(uid.0)
                    .cmd("HMGET")
                    .arg(format!("{PREFIX}player:{uid}"))
                    .arg("gm")
                    .arg("host"),
            )
            .await?;
        // The order of the original's checks: not a friend is 4, before whose player it is.
        match (friend, owner, host) {
            (false, _, _) => Err(Errno::NotFriend.into()),
            (true, Some(owner), Some(host)) if owner == gm.0 => Ok(HostId(host)),
            _ => Err(Errno::WrongGm.into()),
        }
    }

    async fn player_link(&self, uid: Uid) -> Result<PlayerLink, RelayError> {
        let (gm, host): (Option<i64>, Option<i64>) =
            self.cmd(redis::cmd("HMGET").arg(format!("{PREFIX}player:{uid}")).arg("gm").arg("host")).await?;
        match (gm, host) {
            (Some(gm), Some(host)) => Ok(PlayerLink { gm: GmId(gm), host: HostId(host) }),
            _ => Err(Errno::WrongGm.into()),
        }
    }

    async fn online_gms_on_host(&self, host: HostId, limit: usize) -> Result<Vec<GmId>, RelayError> {
        // The set holds at most the GMs with players on this host; SRANDMEMBER with a
        // positive count returns distinct members, capped at `limit`.
        let gms: Vec<i64> =
            self.cmd(redis::cmd("SRANDMEMBER").arg(keys::online_gms(host)).arg(limit)).await?;
        let mut gms: Vec<GmId> = gms.into_iter().map(GmId).collect();
        gms.sort();
        Ok(gms)
    }

    async fn try_lease(&self, name: &str, ttl: Duration) -> Result<Option<LeaseToken>, RelayError> {
        let token = uuid::Uuid::now_v7().to_string();
        let set: Option<String> = self
            .cmd(
                redis::cmd("SET")
                    .arg(keys::lease(name))
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await?;
        Ok(set.map(|_| LeaseToken(token)))
    }

    async fn renew_lease(&self, name: &str, token: &LeaseToken, ttl: Duration) -> Result<bool, RelayError> {
        let renewed: i64 = self
            .scripts
            .renew_lease
            .key(keys::lease(name))
            .arg(&token.0)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(renewed == 1)
    }

    async fn lease_time_left(&self, name: &str) -> Result<Option<Duration>, RelayError> {
        // -2: no such key; -1: no expiry (never set by this code).
        let ms: i64 = self.cmd(redis::cmd("PTTL").arg(keys::lease(name))).await?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    async fn release_lease(&self, name: &str, token: &LeaseToken) -> Result<(), RelayError> {
        let _: i64 = self
            .scripts
            .release_lease
            .key(keys::lease(name))
            .arg(&token.0)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn outbox_peek(&self, max: usize) -> Result<Vec<OutboxItem>, RelayError> {
        let raw: Vec<String> =
            self.cmd(redis::cmd("LRANGE").arg(keys::OUTBOX).arg(0).arg(max as i64 - 1)).await?;
        raw.iter()
            .map(|entry| {
                serde_json::from_str::<StoredOutboxItem>(entry)
                    .map(|s| OutboxItem { seq: s.seq, event: s.event })
                    .map_err(|e| {
                        tracing::error!(%entry, error = %e, "unreadable outbox entry blocks the outbox");
                        RelayError::unavailable(Backend::Redis, e)
                    })
            })
            .collect()
    }

    async fn outbox_remove(
        &self,
        lease: &str,
        token: &LeaseToken,
        count: usize,
        last_seq: u64,
    ) -> Result<bool, RelayError> {
        let removed: i64 = self
            .scripts
            .outbox_remove
            .key(keys::lease(lease))
            .key(keys::OUTBOX)
            .key(keys::OUTBOX_PUBLISHED)
            .arg(&token.0)
            .arg(count)
            .arg(last_seq)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(removed == 1)
    }

    async fn outbox_published_seq(&self) -> Result<u64, RelayError> {
        let seq: Option<u64> = self.cmd(redis::cmd("GET").arg(keys::OUTBOX_PUBLISHED)).await?;
        Ok(seq.unwrap_or(0))
    }

    async fn outbox_len(&self) -> Result<u64, RelayError> {
        self.cmd(redis::cmd("LLEN").arg(keys::OUTBOX)).await
    }

    async fn host_roster(
        &self,
        host: HostId,
        cursor: u64,
        page: usize,
    ) -> Result<(Vec<RosterEntry>, u64), RelayError> {
        let mut inv = self.scripts.host_roster.prepare_invoke();
        inv.arg(PREFIX).arg(host.to_string()).arg(cursor).arg(page);
        let reply: Vec<redis::Value> = inv.invoke_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        let text = |v: &redis::Value| -> Result<String, RelayError> {
            redis::from_redis_value_ref::<String>(v)
                .map_err(|e| RelayError::unavailable(Backend::Redis, e.to_string()))
        };
        let next: u64 = reply.first().map(text).transpose()?.and_then(|c| c.parse().ok()).unwrap_or(0);
        let entries = reply[1.min(reply.len())..]
            .chunks_exact(5)
            .map(|f| {
                let id = |v: &redis::Value| text(v).map(|s| s.parse::<i64>().unwrap_or_default());
                Ok(RosterEntry {
                    uid: Uid(id(&f[0])?),
                    gm: GmId(id(&f[1])?),
                    gm_name: text(&f[2])?,
                    gm_online: int_at(f, 3)? == 1,
                    rev: text(&f[4])?.parse().unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, RelayError>>()?;
        Ok((entries, next))
    }

    async fn ping(&self) -> Result<(), RelayError> {
        self.cmd::<String>(&redis::cmd("PING")).await.map(drop)
    }
}

impl RedisStore {
    async fn presence(
        &self,
        gm: GmId,
        event_id: &str,
        ts: i64,
        mode: &str,
    ) -> Result<Option<u64>, RelayError> {
        let args = [gm.to_string(), event_id.to_owned(), ts.to_string(), mode.to_owned()];
        let reply = self.run(&self.scripts.set_presence, &args.each_ref().map(String::as_str)).await?;
        let seq = int_at(&reply, 1)? as u64;
        Ok((seq > 0).then_some(seq))
    }
}

/// Friendships committed per pipeline of [`RedisStore::seed_friendships`]: about two
/// commands each, so a pipeline stays far below the response timeout.
const SEED_CHUNK: usize = 20_000;

impl RedisStore {
    /// Bulk loading for benchmarks and migrations: creates `gms` (named and online, as
    /// `create` does) and writes `friendships` `(gm, host, uid)` with exactly the keys the
    /// `ADD_FRIEND` script writes — the player hash's `gm`, `host` and a `rev` bump, the GM's
    /// friends set and hosts hash, the host's players set and, for GMs that are online,
    /// the host's `online_gms` — but without outbox events (nothing is published), in
    /// pipelines of `SEED_CHUNK` (20,000) friendships. Meant for an empty store: unlike `add` it
    /// checks nothing, so every uid must appear once, have no GM yet, and every GM must
    /// exist (be in `gms` or created before).
    pub async fn seed_friendships(
        &self,
        gms: &[(GmId, String)],
        friendships: &[(GmId, HostId, Uid)],
    ) -> Result<(), RelayError> {
        let mut conn = self.conn.clone();
        let online_key = format!("{PREFIX}gm_online");
        if !gms.is_empty() {
            let mut pipe = redis::pipe();
            for (gm, name) in gms {
                pipe.cmd("SET").arg(format!("{PREFIX}gm:{gm}:name")).arg(name).ignore();
                pipe.cmd("SADD").arg(&online_key).arg(gm.0).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)?;
        }
        let online: std::collections::HashSet<i64> =
            self.cmd(redis::cmd("SMEMBERS").arg(&online_key)).await?;
        for chunk in friendships.chunks(SEED_CHUNK) {
            let mut friends: std::collections::HashMap<GmId, Vec<i64>> = Default::default();
            let mut players: std::collections::HashMap<HostId, Vec<i64>> = Default::default();
            let mut per_gm_host: std::collections::HashMap<(GmId, HostId), i64> = Default::default();
            let mut pipe = redis::pipe();
            for &(gm, host, uid) in chunk {
                let pk = format!("{PREFIX}player:{uid}");
                pipe.cmd("HINCRBY").arg(&pk).arg("rev").arg(1).ignore();
                pipe.cmd("HSET").arg(&pk).arg("gm").arg(gm.0).arg("host").arg(host.0).ignore();
                friends.entry(gm).or_default().push(uid.0);
                players.entry(host).or_default().push(uid.0);
                *per_gm_host.entry((gm, host)).or_default() += 1;
            }
            for (gm, uids) in &friends {
                pipe.cmd("SADD").arg(format!("{PREFIX}gm:{gm}:friends")).arg(uids).ignore();
            }
            for (host, uids) in &players {
                pipe.cmd("SADD").arg(format!("{PREFIX}host:{host}:players")).arg(uids).ignore();
            }
            for (&(gm, host), n) in &per_gm_host {
                pipe.cmd("HINCRBY").arg(format!("{PREFIX}gm:{gm}:hosts")).arg(host.0).arg(*n).ignore();
                if online.contains(&gm.0) {
                    pipe.cmd("SADD").arg(keys::online_gms(host)).arg(gm.0).ignore();
                }
            }
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)?;
        }
        Ok(())
    }
}
