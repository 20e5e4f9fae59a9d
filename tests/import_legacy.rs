//! `gm-relay import-legacy` on data written in the original system's Redis layout.
//!
//! The same scenario — GMs (one with a non-canonical id), friendships, a removal and adds
//! the hosts have not polled yet, queued messages both ways (more than one poll's worth,
//! one not base64, some of a player who lost its GM, some of a player `"0099"`) — is
//! written two ways: by the real original app (`conformance/original_app.py` under Python
//! 2, when it is installed: `PYENV_VERSION=2.7.18 python2` with redis-py in
//! `var/py2-redis`), and by [`Direct`], which writes exactly the keys the original's
//! handlers write (so the suite runs where Python 2 is not installed). Then the import
//! runs, and a relay on the imported data must answer every legacy poll as the original
//! would have, accept new requests consistently, and a second import must change nothing.
//! The source is compared key by key before and after: the import never writes to it.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gm_relay::config::Config;
use gm_relay::migrate;
use serde_json::json;
use support::app::{b64, enc, stored_events};
use support::relays::{base_settings, Legacy, RelayInstance};
use support::{wait_until_async, NatsServer, RedisServer};

/// Bound on the original app starting (Python 2 start-up and its first Redis call).
const ORIGINAL_START_DEADLINE: Duration = Duration::from_secs(15);

/// Messages queued for player 1001: more than one poll returns (10 per player).
const QUEUED_FOR_1001: usize = 12;

/// The original system, written to through its handlers' Redis calls.
#[allow(async_fn_in_trait)]
trait Original {
    async fn gm(&mut self, query: &str) -> serde_json::Value;
    async fn gs(&mut self, query: &str) -> serde_json::Value;
}

/// The real original app over HTTP.
struct App {
    base: String,
    http: reqwest::Client,
    child: Child,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl App {
    /// Starts `original_app.py` on `redis_url`, or None when Python 2 with redis-py is not
    /// installed here.
    async fn start(redis_url: &str) -> Option<App> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let py2_redis = root.join("var/py2-redis");
        let probe = Command::new("python2")
            .args(["-c", "import redis"])
            .env("PYENV_VERSION", "2.7.18")
            .env("PYTHONPATH", &py2_redis)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new("python2");
        cmd.arg(root.join("conformance/original_app.py"))
            .arg(port.to_string())
            .env("PYENV_VERSION", "2.7.18")
            .env("PYTHONPATH", &py2_redis)
            .env("GM_ORIG_REDIS_URL", format!("{redis_url}/0"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = support::spawn_child(cmd).expect("python2 runs");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let app = App { base: format!("http://127.0.0.1:{port}"), http, child };
        wait_until_async(ORIGINAL_START_DEADLINE, "the original app answers", || {
            let (http, url) = (app.http.clone(), format!("{}/gs?action=online&host=1", app.base));
            async move { http.get(url).send().await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
        Some(app)
    }

    async fn get(&mut self, path: &str, query: &str) -> serde_json::Value {
        let r = self.http.get(format!("{}{path}?{query}", self.base)).send().await.expect("original answers");
        assert_eq!(r.status(), 200, "{path}?{query}");
        serde_json::from_slice(&r.bytes().await.expect("original replies")).expect("original replies JSON")
    }
}

impl Original for App {
    async fn gm(&mut self, query: &str) -> serde_json::Value {
        self.get("/gm", query).await
    }

    async fn gs(&mut self, query: &str) -> serde_json::Value {
        self.get("/gs", query).await
    }
}

/// The original's handlers, as the Redis calls they make (original_app.py), for valid
/// requests: the same keys, the same commands, in the same order.
struct Direct {
    conn: redis::aio::MultiplexedConnection,
}

fn params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8 parameters")
}

impl Direct {
    async fn run(&mut self, cmd: &mut redis::Cmd) -> redis::Value {
        cmd.query_async(&mut self.conn).await.expect("redis command")
    }

    async fn get(&mut self, key: String) -> Option<String> {
        redis::cmd("GET").arg(key).query_async(&mut self.conn).await.expect("GET")
    }

    async fn smembers(&mut self, key: &str) -> Vec<String> {
        redis::cmd("SMEMBERS").arg(key).query_async(&mut self.conn).await.expect("SMEMBERS")
    }
}

impl Original for Direct {
    async fn gm(&mut self, query: &str) -> serde_json::Value {
        let p = params(query);
        let gm = p.get("gm_account").cloned().unwrap_or_default();
        let uid = p.get("uid").cloned().unwrap_or_default();
        match p["action"].as_str() {
            "create" => {
                self.run(redis::cmd("SET").arg(format!("gm_account:{gm}:name")).arg(&p["gm_name"])).await;
                self.run(redis::cmd("SADD").arg("gm_online_list").arg(&gm)).await;
            }
            "add" => {
                let host = &p["host"];
                self.run(redis::cmd("SADD").arg(format!("gm_account:{gm}:friend")).arg(&uid)).await;
                self.run(redis::cmd("SADD").arg(format!("gs_hostnum:{host}")).arg(&uid)).await;
                self.run(redis::cmd("SET").arg(format!("gs_usernum:{uid}:hostnum")).arg(host)).await;
                self.run(redis::cmd("SET").arg(format!("gs_usernum:{uid}:friend")).arg(&gm)).await;
                self.run(redis::cmd("SADD").arg("apply_frd_list").arg(&uid)).await;
                self.run(redis::cmd("HDEL").arg("remove_frd_list").arg(&uid)).await;
            }
            "del" => {
                self.run(redis::cmd("SREM").arg(format!("gm_account:{gm}:friend")).arg(&uid)).await;
                let host = self.get(format!("gs_usernum:{uid}:hostnum")).await.expect("befriended");
                self.run(redis::cmd("DEL").arg(format!("gs_usernum:{uid}:hostnum"))).await;
                self.run(redis::cmd("SREM").arg(format!("gs_hostnum:{host}")).arg(&uid)).await;
                self.run(redis::cmd("DEL").arg(format!("gs_usernum:{uid}:friend"))).await;
                self.run(redis::cmd("HSET").arg("remove_frd_list").arg(&uid).arg(&host)).await;
                self.run(redis::cmd("SREM").arg("apply_frd_list").arg(&uid)).await;
            }
            "offline" => {
                self.run(redis::cmd("SREM").arg("gm_online_list").arg(&gm)).await;
            }
            "send" => {
                self.run(redis::cmd("LPUSH").arg(format!("gs_usernum:{uid}:msg_from_gm")).arg(&p["msg"]))
                    .await;
                self.run(redis::cmd("SADD").arg("gm_newmsg_list").arg(&uid)).await;
            }
            other => panic!("the scenario does not use GM {other}"),
        }
        json!({"res": 1})
    }

    async fn gs(&mut self, query: &str) -> serde_json::Value {
        let p = params(query);
        match p["action"].as_str() {
            "send" => {
                let uid = &p["uid"];
                self.run(redis::cmd("LPUSH").arg(format!("gs_usernum:{uid}:msg_from_gs")).arg(&p["msg"]))
                    .await;
                self.run(redis::cmd("SADD").arg("gs_newmsg_list").arg(uid)).await;
            }
            "relation" => {
                // Drains the host's pending adds and removes (the scenario checks no reply).
                let host = &p["host"];
                for uid in self.smembers("apply_frd_list").await {
                    if self.get(format!("gs_usernum:{uid}:hostnum")).await.as_deref() == Some(host.as_str())
                        && self.get(format!("gs_usernum:{uid}:friend")).await.is_some()
                    {
                        self.run(redis::cmd("SREM").arg("apply_frd_list").arg(&uid)).await;
                    }
                }
                let removes: BTreeMap<String, String> =
                    redis::cmd("HGETALL").arg("remove_frd_list").query_async(&mut self.conn).await.unwrap();
                for (uid, h) in removes {
                    if &h == host {
                        self.run(redis::cmd("HDEL").arg("remove_frd_list").arg(&uid)).await;
                    }
                }
            }
            other => panic!("the scenario does not use GS {other}"),
        }
        json!({"res": 1})
    }
}

fn gm_send(gm: &str, uid: &str, text: &str) -> String {
    format!("action=send&gm_account={gm}&uid={uid}&msg={}", enc(&b64(text)))
}

fn gs_send(uid: &str, text: &str) -> String {
    format!("action=send&uid={uid}&msg={}", enc(&b64(text)))
}

/// The history every test imports: what the legacy clients did, in order.
async fn scenario(original: &mut impl Original) {
    let ok = json!({"res": 1});
    for q in [
        "action=create&gm_account=7&gm_name=Alice".to_owned(),
        format!("action=create&gm_account=8&gm_name={}", enc("客服")),
        "action=create&gm_account=007&gm_name=Bond".into(),
        "action=create&gm_account=9&gm_name=Nine".into(),
        "action=add&gm_account=7&host=3&uid=1001".into(),
        "action=add&gm_account=7&host=3&uid=1002".into(),
        "action=add&gm_account=7&host=3&uid=1003".into(),
        "action=add&gm_account=8&host=5&uid=2001".into(),
    ] {
        assert_eq!(original.gm(&q).await, ok, "{q}");
    }
    // Host 3 polls its friend changes; host 5 does not.
    assert_eq!(original.gs("action=relation&host=3").await["res"], 1);
    for q in [
        "action=add&gm_account=7&host=3&uid=1004".to_owned(),
        "action=add&gm_account=7&host=3&uid=0099".into(),
        "action=add&gm_account=8&host=5&uid=2002".into(),
        gm_send("7", "1003", "to a player about to leave"),
        "action=del&gm_account=7&uid=1003".into(),
        gm_send("7", "1002", "x"),
        format!("action=send&gm_account=7&uid=1002&msg={}", enc("not base64!")),
        gm_send("7", "0099", "to 0099"),
        "action=offline&gm_account=8".into(),
    ] {
        assert_eq!(original.gm(&q).await, ok, "{q}");
    }
    for k in 0..QUEUED_FOR_1001 {
        assert_eq!(original.gm(&gm_send("7", "1001", &format!("hello {k}"))).await, ok);
    }
    for q in [gs_send("1001", "from 1001"), gs_send("2001", "你好 GM 8"), gs_send("0099", "from 0099")] {
        assert_eq!(original.gs(&q).await, ok, "{q}");
    }
}

/// Every key of a Redis and its serialised value (`DUMP`), to show it did not change.
async fn dump_all(url: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let v: Vec<u8> = redis::cmd("DUMP").arg(&k).query_async(&mut conn).await.unwrap();
        out.insert(k, v);
    }
    out
}

/// Every key with its type and contents (sets and hashes sorted: their order means nothing).
async fn contents(url: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(&mut conn).await.unwrap();
        let mut value: Vec<String> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(&k).query_async(&mut conn).await.unwrap()],
            "set" => redis::cmd("SMEMBERS").arg(&k).query_async(&mut conn).await.unwrap(),
            "list" => redis::cmd("LRANGE").arg(&k).arg(0).arg(-1).query_async(&mut conn).await.unwrap(),
            "hash" => redis::cmd("HGETALL").arg(&k).query_async(&mut conn).await.unwrap(),
            other => panic!("unexpected type {other} of {k}"),
        };
        if kind == "set" {
            value.sort();
        }
        if kind == "hash" {
            let mut pairs: Vec<String> = value.chunks(2).map(|p| p.join("=")).collect();
            pairs.sort();
            value = pairs;
        }
        out.insert(k, (kind, value));
    }
    out
}

struct Target {
    nats: NatsServer,
    redis: RedisServer,
}

impl Target {
    fn start() -> Target {
        Target { nats: NatsServer::start(), redis: RedisServer::start() }
    }

    fn settings(&self) -> std::collections::HashMap<String, String> {
        base_settings(&self.nats.url(), &self.redis.url())
    }

    fn config(&self) -> Config {
        Config::from_map(&self.settings()).expect("valid settings")
    }

    /// Stream message counts, to show a second import publishes nothing.
    async fn stream_counts(&self) -> Vec<u64> {
        let js = async_nats::jetstream::new(async_nats::connect(self.nats.url()).await.unwrap());
        let mut counts = Vec::new();
        for name in ["GM_TO_HOST", "GS_TO_GM"] {
            counts.push(js.get_stream(name).await.unwrap().get_info().await.unwrap().state.messages);
        }
        counts
    }
}

/// Imports the source at `source_url` into `target`; returns the plan and report.
async fn import(source_url: &str, target: &Target) -> (migrate::Plan, migrate::ImportReport) {
    let config = target.config();
    migrate::check_source(source_url, &config).expect("a different Redis");
    let data = migrate::read_source(source_url).await.expect("source readable");
    let plan = migrate::plan(&data, migrate::import_ts());
    let report = migrate::execute(&plan, &config, &|_| {}).await.expect("import succeeds");
    (plan, report)
}

/// What the relay must answer on the imported data, as the original would have.
async fn check_imported(target: &Target) {
    let relay = RelayInstance::in_process(&target.settings()).await;
    let c = relay.client();

    // Friend changes the hosts had not polled: host 3 learns of 1004's add and 1003's
    // removal, host 5 (which never polled) of both its players (with the GM's name).
    assert_eq!(c.relation(3).await, (json!({"1004": ["7", "Alice"]}), json!(["1003"])));
    assert_eq!(c.relation(5).await, (json!({"2001": ["8", "客服"], "2002": ["8", "客服"]}), json!([])));
    assert_eq!(c.relation(3).await, (json!({}), json!([])), "served once");

    // Queued messages, oldest first, 10 per player per poll; the bad one and those of
    // players without a GM (or with id "0099") are not there.
    let first = c.try_gs_receive(3).await.expect("poll");
    let texts = |k: std::ops::Range<usize>| k.map(|k| format!("hello {k}")).collect::<Vec<_>>();
    assert_eq!(first, vec![("1001".into(), texts(0..10)), ("1002".into(), vec!["x".into()])]);
    assert_eq!(c.try_gs_receive(3).await.expect("poll"), vec![("1001".into(), texts(10..QUEUED_FOR_1001))]);
    assert_eq!(c.try_gs_receive(3).await.expect("poll"), vec![]);
    let mut to_gms = c.try_gm_receive().await.expect("poll");
    to_gms.sort();
    assert_eq!(
        to_gms,
        vec![
            ("7".into(), "1001".into(), vec!["from 1001".into()]),
            ("8".into(), "2001".into(), vec!["你好 GM 8".into()])
        ]
    );

    // State: presence per host, ownership, names.
    let online = |host: i64| {
        let c = c.clone();
        async move { c.gs(&format!("action=online&host={host}")).await.b64_json("data") }
    };
    assert_eq!(online(3).await, json!(["7"]));
    assert_eq!(online(5).await, json!([]), "GM 8 went offline");
    assert_eq!(c.add(9, 3, 1001).await.errno(), Some(3), "1001 is GM 7's");
    assert_eq!(c.gm("action=create&gm_account=8&gm_name=X").await.errno(), Some(1));
    assert_eq!(c.add(9, 3, 1003).await.res(), 1, "1003 was removed: free again");
    assert_eq!(c.get(&Legacy::gm_send_query(7, 1004, "welcome")).await.res(), 1);
    assert_eq!(c.del(7, 1002).await.res(), 1);
    assert_eq!(c.relation(3).await, (json!({"1003": ["9", "Nine"]}), json!(["1002"])));
    assert_eq!(c.try_gs_receive(3).await.expect("poll"), vec![("1004".into(), vec!["welcome".into()])]);
    let roster = async_nats::connect(target.nats.url())
        .await
        .unwrap()
        .request("gm.relay.gs.5.resync", serde_json::to_vec(&json!({"cursor": 0})).unwrap().into())
        .await
        .expect("resync answers");
    let roster: serde_json::Value = serde_json::from_slice(&roster.payload).unwrap();
    let mut players: Vec<(String, String, bool)> = roster["players"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["uid"].as_str().unwrap().into(), p["gm_name"].as_str().unwrap().into(), p["gm_online"] == true)
        })
        .collect();
    players.sort();
    assert_eq!(players, vec![("2001".into(), "客服".into(), false), ("2002".into(), "客服".into(), false)]);

    // The friend events carry their revision and ids derived from the source.
    let js = async_nats::jetstream::new(async_nats::connect(target.nats.url()).await.unwrap());
    let events = stored_events(&js, "GM_TO_HOST", "gm.to.host.3").await;
    let removal = events.iter().find(|e| e.body["type"] == "friend_remove").expect("removal event");
    assert_eq!(removal.msg_id.as_deref(), Some("legacy-remove-1003-3"));
    assert_eq!((removal.body["uid"].clone(), removal.body["rev"].clone()), (json!("1003"), json!(1)));
    let add = events.iter().find(|e| e.body["type"] == "friend_add").expect("add event");
    assert_eq!(add.msg_id.as_deref(), Some("legacy-add-1004-7-3"));
    assert_eq!(add.body["rev"], 1);
}

fn assert_plan_reports(plan: &migrate::Plan) {
    let text = plan.to_string();
    for expected in [
        "gm_account:007:name",
        "gs_usernum:0099:friend",
        "gs_usernum:1003:msg_from_gm: 1 queued message(s): player \"1003\" has no (importable) GM",
        "gs_usernum:0099:msg_from_gm",
        "gs_usernum:0099:msg_from_gs",
        "gs_usernum:1002:msg_from_gm[1]",
    ] {
        assert!(text.contains(expected), "the report names {expected:?}:\n{text}");
    }
    assert_eq!(plan.gms.len(), 3, "7, 8 and 9; not 007");
}

async fn import_twice_and_check(source: &RedisServer) {
    let target = Target::start();
    let before = dump_all(&source.url()).await;

    let (plan, first) = import(&source.url(), &target).await;
    assert_plan_reports(&plan);
    assert_eq!(first.gms, migrate::Tally { imported: 3, already: 0, conflicts: 0 });
    assert_eq!(first.players.imported, 6, "1001, 1002, 1004, 2001, 2002 and 1003's removal");
    assert_eq!(first.messages, migrate::Tally { imported: 15, already: 0, conflicts: 0 });
    assert_eq!(first.events_published, 4, "3 pending adds, 1 pending removal");
    let counts = target.stream_counts().await;

    let (_, second) = import(&source.url(), &target).await;
    assert_eq!(
        (second.gms.imported, second.players.imported, second.messages.imported, second.events_published),
        (0, 0, 0, 0),
        "a second run imports nothing: {second}"
    );
    assert_eq!(second.messages.already, 15);
    assert_eq!(target.stream_counts().await, counts, "and publishes nothing");
    assert_eq!(dump_all(&source.url()).await, before, "the source is never written");

    check_imported(&target).await;
}

/// A source Redis holding the scenario, written key by key as the original's handlers do.
async fn source_with_scenario() -> RedisServer {
    let source = RedisServer::start();
    let conn = redis::Client::open(source.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    scenario(&mut Direct { conn }).await;
    source
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_keys_written_as_the_original_writes_them() {
    let source = source_with_scenario().await;
    import_twice_and_check(&source).await;
}

/// The original's `add` and `del` are not atomic: a `del` racing an `add` of the same
/// player can leave the player befriended (its add already polled) with the `del`'s
/// removal still pending for the same host. The import must not make that removal the
/// host's last word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_left_pending_beside_a_friendship_is_followed_by_the_add() {
    let source = RedisServer::start();
    let conn = redis::Client::open(source.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut original = Direct { conn };
    let ok = json!({"res": 1});
    assert_eq!(original.gm("action=create&gm_account=7&gm_name=Alice").await, ok);
    assert_eq!(original.gm("action=add&gm_account=7&host=3&uid=1005").await, ok);
    assert_eq!(original.gs("action=relation&host=3").await["res"], 1);
    // The racing `del`'s last write, after the add's.
    original.run(redis::cmd("HSET").arg("remove_frd_list").arg("1005").arg("3")).await;

    let target = Target::start();
    import(&source.url(), &target).await;
    let relay = RelayInstance::in_process(&target.settings()).await;
    let c = relay.client();
    assert_eq!(c.relation(3).await, (json!({"1005": ["7", "Alice"]}), json!([])), "befriended, as in Redis");
    assert_eq!(c.del(7, 1005).await.res(), 1, "GM 7's player");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_what_the_original_app_wrote() {
    let source = RedisServer::start();
    let Some(mut app) = App::start(&source.url()).await else {
        eprintln!(
            "skipped: Python 2 with redis-py (PYENV_VERSION=2.7.18 python2, var/py2-redis) is not installed; \
             imports_keys_written_as_the_original_writes_them covers the same data"
        );
        return;
    };
    scenario(&mut app).await;
    drop(app);
    import_twice_and_check(&source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_redis_that_does_not_answer_fails_the_run_instead_of_refusing_its_gms() {
    let source = source_with_scenario().await;
    let target = Target::start();
    let config = target.config();
    let data = migrate::read_source(&source.url()).await.expect("source readable");
    let plan = migrate::plan(&data, migrate::import_ts());

    // Writes (the import's scripts) wait past the relay's Redis reply timeout.
    let mut admin =
        redis::Client::open(target.redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let () =
        redis::cmd("CLIENT").arg("PAUSE").arg(30_000).arg("WRITE").query_async(&mut admin).await.unwrap();
    let done = AtomicU64::new(0);
    let outcome = migrate::execute(&plan, &config, &|n| {
        done.fetch_add(n, Ordering::Relaxed);
    })
    .await;
    let () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(&mut admin).await.unwrap();
    match outcome {
        Err(e @ migrate::MigrateError::Write(_)) => {
            assert!(e.to_string().contains("run the import again"), "{e}");
        }
        Err(e) => panic!("expected a write failure, got: {e}"),
        Ok(report) => panic!("an outage was reported as a finished run: {report}"),
    }
    // The run stopped at the first GM: none was counted as done (a refused GM counts as
    // done, and so do its players, refused in turn).
    assert_eq!(done.load(Ordering::Relaxed), 0);

    // Once Redis answers, the run completes with nothing refused.
    let (_, report) = import(&source.url(), &target).await;
    assert_eq!(report.gms.conflicts, 0, "{report}");
    assert_eq!(report.players.conflicts, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_dry_run_writes_nothing_and_the_real_run_imports() {
    let source = source_with_scenario().await;
    let target = Target::start();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gm-relay"));
        cmd.arg("import-legacy")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in target.settings() {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "warn").output().expect("gm-relay runs")
    };

    let dry = run(&["--from", &source.url(), "--dry-run"]);
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{out}{}", String::from_utf8_lossy(&dry.stderr));
    assert!(out.contains("3 GMs (2 online)"), "{out}");
    assert!(out.contains("dry run: would import 3 GMs, 6 players and 15 queued messages"), "{out}");
    assert!(out.contains("gs_usernum:0099:friend"), "{out}");
    let mut conn =
        redis::Client::open(target.redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("gmr:*").query_async(&mut conn).await.unwrap();
    assert!(keys.is_empty(), "a dry run writes nothing: {keys:?}");

    let real = run(&["--from", &source.url()]);
    let out = String::from_utf8_lossy(&real.stdout);
    assert!(real.status.success(), "{out}{}", String::from_utf8_lossy(&real.stderr));
    assert!(out.contains("queued messages: 15 imported, 0 already imported"), "{out}");

    let again = run(&["--from", &source.url(), "--dry-run"]);
    let out = String::from_utf8_lossy(&again.stdout);
    assert!(out.contains("already imported by an earlier run: 3 GMs, 6 players, 15 messages"), "{out}");

    let same = run(&["--from", &target.redis.url()]);
    assert_eq!(same.status.code(), Some(1), "importing from the relay's own Redis is refused");
    assert!(String::from_utf8_lossy(&same.stderr).contains("relay's own Redis"));
    let usage = run(&["--dry-run"]);
    assert_eq!(usage.status.code(), Some(2), "--from is required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_writer_writes_what_the_original_app_writes() {
    let (by_app, by_hand) = (RedisServer::start(), RedisServer::start());
    let Some(mut app) = App::start(&by_app.url()).await else {
        eprintln!(
            "skipped: Python 2 with redis-py is not installed (see imports_what_the_original_app_wrote)"
        );
        return;
    };
    scenario(&mut app).await;
    drop(app);
    let conn = redis::Client::open(by_hand.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    scenario(&mut Direct { conn }).await;
    assert_eq!(contents(&by_app.url()).await, contents(&by_hand.url()).await);
}
