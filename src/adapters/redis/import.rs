//! Redis side of `gm-relay import-legacy` (see [`crate::migrate`]): writes imported GMs and
//! players with exactly the keys the relay's own scripts write, and remembers what was
//! imported so that a second run changes nothing.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `gmr:import` | hash | one field per imported item (`gm:<gm>`, `player:<uid>`, `chat:<event id>`) → ms when it was imported |
//!
//! Each GM and each player is one Lua script that checks its marker, writes the state as
//! `create`/`add` would (the player hash with a `rev` bump, the GM's friends and hosts,
//! the host's players and online-GM index) and its friend events into the outbox, and sets
//! the marker, all atomically: a run killed at any point leaves every item either wholly
//! imported (with its events on the way to the stream) or untouched.

use super::RedisStore;
use crate::domain::{GmId, GmName, HostId, RelayError, Uid};

/// The import marker hash (under the relay's `gmr:` prefix, as everything it writes).
pub const IMPORT_MARKERS: &str = "gmr:import";

/// Markers read per `HMGET`: small enough to keep a reply far below the response timeout.
const MARKER_BATCH: usize = 1000;

/// ARGV: prefix, marker field, gm, name, online ('1'/'0'), ts. Returns {0, 1} imported,
/// {0, 0} already imported, {1} the GM exists with another name.
const IMPORT_GM: &str = r#"
local field, gm, name, online, ts = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local K_IMPORT = P .. 'import'
if redis.call('HEXISTS', K_IMPORT, field) == 1 then return {0, 0} end
if too_late() then return {-3} end
local current = redis.call('GET', k_name(gm))
if current and current ~= name then return {1} end
redis.call('SET', k_name(gm), name)
-- Presence as SET_PRESENCE keeps it, without events: hosts learn online GMs by polling.
if online == '1' and redis.call('SADD', K_ONLINE, gm) == 1 then
  for _, host in ipairs(redis.call('HKEYS', k_hosts(gm))) do
    redis.call('SADD', k_online_gms(host), gm)
  end
end
redis.call('HSET', K_IMPORT, field, ts)
return {0, 1}
"#;

/// ARGV: prefix, marker field, uid, removed-from host or '', gm or '', host, pending add
/// ('1'/'0'), remove event id, add event id, ts. Returns {0, outbox seq or 0, imported 1/0};
/// {2} the GM does not exist, {3} the player already has a GM.
///
/// A pending removal comes first (the original dropped it on a re-add, so both exist only
/// after a race), then the friendship exactly as ADD_FRIEND writes it; events are stamped
/// with the player's revision after each change.
const IMPORT_PLAYER: &str = r#"
local field, uid, rhost, gm, host, apply = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local rid, aid, ts = ARGV[8], ARGV[9], tonumber(ARGV[10])
local K_IMPORT = P .. 'import'
if redis.call('HEXISTS', K_IMPORT, field) == 1 then return {0, 0, 0} end
if too_late() then return {-3} end
local pk = k_player(uid)
local name
if gm ~= '' then
  name = redis.call('GET', k_name(gm))
  if not name then return {2} end
  if redis.call('HEXISTS', pk, 'gm') == 1 then return {3} end
end
local seq = 0
if rhost ~= '' then
  local rev = redis.call('HINCRBY', pk, 'rev', 1)
  -- The original kept only the host of a removal, not its GM: gm '0', no name.
  seq = emit({v = 1, id = rid, type = 'friend_remove', host = rhost, uid = uid, gm = '0',
              gm_name = '', ts = ts, rev = rev})
end
if gm ~= '' then
  local rev = claim(gm, host, uid)
  -- A removal from this same host imported just above must not be the host's last word:
  -- the player is befriended there now.
  if apply == '1' or rhost == host then
    seq = emit({v = 1, id = aid, type = 'friend_add', host = host, uid = uid, gm = gm,
                gm_name = name, ts = ts, rev = rev})
  end
end
redis.call('HSET', K_IMPORT, field, ARGV[10])
return {0, seq, 1}
"#;

/// What an import script did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// Written now (with the outbox seq of its last event, 0 if none).
    Now(u64),
    /// Its marker was there: an earlier run imported it.
    Already,
}

/// One player as the original system left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayerState {
    pub uid: Uid,
    /// The player's GM and host, when befriended.
    pub friendship: Option<(GmId, HostId)>,
    /// The host had not polled the friend-add yet.
    pub pending_add: bool,
    /// The host had not polled a friend-remove yet (the host it was removed from).
    pub pending_remove: Option<HostId>,
}

impl RedisStore {
    /// Imports a GM (name, and online when `online`); errno 1 when it exists here with
    /// another name.
    pub async fn import_gm(
        &self,
        marker: &str,
        gm: GmId,
        name: &GmName,
        online: bool,
        ts: i64,
    ) -> Result<Imported, RelayError> {
        let (gm, ts) = (gm.to_string(), ts.to_string());
        let args = [marker, &gm, name.as_str(), if online { "1" } else { "0" }, &ts];
        let reply = self.run(&self.import_scripts().gm, &args).await?;
        Ok(if super::int_at(&reply, 1)? == 1 { Imported::Now(0) } else { Imported::Already })
    }

    /// Imports a player's friendship and pending friend events (into the outbox, ids
    /// `remove_id` / `add_id`); errno 2 when its GM does not exist, 3 when the player
    /// already has a GM here.
    pub async fn import_player(
        &self,
        marker: &str,
        player: &PlayerState,
        remove_id: &str,
        add_id: &str,
        ts: i64,
    ) -> Result<Imported, RelayError> {
        let (gm, host) = match player.friendship {
            Some((gm, host)) => (gm.to_string(), host.to_string()),
            None => (String::new(), String::new()),
        };
        let removed_from = player.pending_remove.map(|h| h.to_string()).unwrap_or_default();
        let (uid, ts) = (player.uid.to_string(), ts.to_string());
        let pending_add = if player.pending_add { "1" } else { "0" };
        let args = [marker, &uid, &removed_from, &gm, &host, pending_add, remove_id, add_id, &ts];
        let reply = self.run(&self.import_scripts().player, &args).await?;
        Ok(if super::int_at(&reply, 2)? == 1 {
            Imported::Now(super::int_at(&reply, 1)? as u64)
        } else {
            Imported::Already
        })
    }

    /// Which of `markers` are set.
    pub async fn import_markers(&self, markers: &[String]) -> Result<Vec<bool>, RelayError> {
        let mut out = Vec::with_capacity(markers.len());
        for chunk in markers.chunks(MARKER_BATCH) {
            let got: Vec<Option<String>> =
                self.cmd(redis::cmd("HMGET").arg(IMPORT_MARKERS).arg(chunk)).await?;
            out.extend(got.into_iter().map(|v| v.is_some()));
        }
        Ok(out)
    }

    /// Sets one marker (an item imported outside a script, e.g. a published message).
    pub async fn set_import_marker(&self, marker: &str, ts: i64) -> Result<(), RelayError> {
        self.cmd::<i64>(redis::cmd("HSET").arg(IMPORT_MARKERS).arg(marker).arg(ts)).await.map(drop)
    }

    fn import_scripts(&self) -> &'static ImportScripts {
        static SCRIPTS: std::sync::OnceLock<ImportScripts> = std::sync::OnceLock::new();
        SCRIPTS.get_or_init(|| {
            let with_prelude = |body: &str| redis::Script::new(&format!("{}{body}", super::LUA_PRELUDE));
            ImportScripts { gm: with_prelude(IMPORT_GM), player: with_prelude(IMPORT_PLAYER) }
        })
    }
}

struct ImportScripts {
    gm: redis::Script,
    player: redis::Script,
}
