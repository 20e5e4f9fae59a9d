//! NATS or Redis going away: requests answer errno 10 quickly instead of hanging, `/readyz`
//! says so, the relay recovers by itself, and nothing is left half-done.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gm_relay::relay::POLL_LEASE_TTL;

use serde_json::json;

use crate::common::*;
use crate::support::app::{b64, enc, stored_events, wait_stored_for_host, Reply, TestApp};
use crate::support::{send_signal, wait_until, wait_until_async};

const HOST: i64 = 3;

/// A request during an outage must answer within this (the backends' own bounds are 2 s).
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Bound on the relay noticing a backend is back (NATS reconnect backoff is at most 4 s).
const RECOVERY: Duration = Duration::from_secs(20);

/// GET that must answer within [`ANSWER_WITHIN`]; returns the reply and how long it took.
async fn timed(app: &TestApp, path_and_query: &str) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = app
        .try_get(path_and_query, ANSWER_WITHIN)
        .await
        .unwrap_or_else(|e| panic!("{path_and_query} hung (no answer in {ANSWER_WITHIN:?}): {e}"));
    (reply, started.elapsed())
}

async fn assert_unavailable(app: &TestApp, what: &str, path_and_query: &str) {
    let (r, took) = timed(app, path_and_query).await;
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert_eq!(r.errno(), Some(10), "{what}: {}", r.text());
    assert_eq!(r.res(), 0);
    eprintln!("{what}: errno 10 after {took:?}");
}

fn send_query(uid: i64, text: &str) -> String {
    format!("/gm?action=send&gm_account={GM}&uid={uid}&msg={}", enc(&b64(text)))
}

/// Friend 1001 on host 3, seen by the host.
async fn befriended(app: &TestApp) {
    app.create_gm(GM, GM_NAME).await;
    app.add(GM, HOST, 1001).await;
    assert_eq!(app.relation(HOST).await, (json!({"1001": ["7", "Alice"]}), json!([])));
    app.wait_readyz(200, DEADLINE).await;
}

#[tokio::test]
async fn nats_down_answers_errno_10_then_recovers_by_itself() {
    let mut app = TestApp::spawn().await;
    befriended(&app).await;
    // Every legacy feed of host 3 polled once, so their consumers exist and are cached.
    assert_eq!(app.gs_receive(HOST).await, vec![]);
    assert!(app.gm_receive().await.is_empty());
    // Sent before the outage, polled only after it.
    gm_send_ok(&app, 1001, "before").await;
    gs_send_ok(&app, 1001, "before, from the player").await;

    app.nats.stop();
    app.wait_readyz(503, DEADLINE).await;
    assert_unavailable(&app, "GM send", &send_query(1001, "lost to player")).await;
    assert_unavailable(&app, "GS send", &format!("/gs?action=send&uid=1001&msg={}", enc(&b64("lost to GM"))))
        .await;
    assert_unavailable(&app, "GS receive", &format!("/gs?action=receive&host={HOST}")).await;
    assert_unavailable(&app, "GM receive", "/gm?action=receive").await;
    assert_unavailable(&app, "relation", &format!("/gs?action=relation&host={HOST}")).await;
    // A friend change needs only Redis to commit: it answers res 1 (after the bounded flush
    // wait) and the outbox publishes it once NATS is back.
    let (r, took) = timed(&app, &format!("/gm?action=add&gm_account={GM}&host={HOST}&uid=1002")).await;
    assert_eq!(r.json(), json!({"res": 1}), "add while NATS is down (after {took:?})");
    assert_eq!(outbox_len(&app).await, 1, "one friend_add (not the GM's first player here)");

    app.nats.restart();
    app.wait_readyz(200, RECOVERY).await;
    gm_send_ok(&app, 1001, "after").await;
    gs_send_ok(&app, 1001, "after, from the player").await;

    assert_eq!(
        next_relation(&app, HOST).await,
        (json!({"1002": ["7", "Alice"]}), json!([])),
        "the add committed during the outage"
    );
    wait_until_async(DEADLINE, "the outbox is drained", || async { outbox_len(&app).await == 0 }).await;
    assert_eq!(app.relation(HOST).await, no_changes());
    // The polls that failed during the outage took nothing: what waited comes on the next
    // polls (not after the ack wait), in order. Whether the errno-10 sends show up
    // is the next test's business; here they are left out.
    let not_lost = |texts: &[String]| -> Vec<String> {
        texts.iter().filter(|t| !t.starts_with("lost")).cloned().collect()
    };
    let host = drain_host_chat_until(&app, HOST, "after").await;
    assert_eq!(not_lost(&host["1001"]), ["before", "after"]);
    let gms = drain_gm_chat_until(&app, "after, from the player").await;
    assert_eq!(
        not_lost(&gms[&("7".into(), "1001".into())]),
        ["before, from the player", "after, from the player"]
    );
}

/// "NATS unreachable past a bounded wait → errno 10, nothing half-done": a send that
/// answered errno 10 must not be stored (and delivered) once NATS is back, or a GM who
/// retries reaches the player twice.
#[tokio::test]
async fn nats_down_a_send_answered_errno_10_is_never_delivered() {
    let mut app = TestApp::spawn().await;
    befriended(&app).await;
    app.nats.stop();
    app.wait_readyz(503, DEADLINE).await;
    assert_unavailable(&app, "GM send", &send_query(1001, "lost to player")).await;
    assert_unavailable(&app, "GS send", &format!("/gs?action=send&uid=1001&msg={}", enc(&b64("lost to GM"))))
        .await;
    app.nats.restart();
    app.wait_readyz(200, RECOVERY).await;
    gm_send_ok(&app, 1001, "after").await;
    gs_send_ok(&app, 1001, "after, from the player").await;

    let js = app.jetstream().await;
    let stored_chat: Vec<String> = stored_events(&js, "GM_TO_HOST", "gm.to.host.>")
        .await
        .into_iter()
        .chain(stored_events(&js, "GS_TO_GM", "gs.to.gm.>").await)
        .filter(|e| e.body["type"] == "chat")
        .map(|e| e.body["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        stored_chat,
        ["after", "after, from the player"],
        "sends answered with errno 10 were stored after the reconnect"
    );
    let host = drain_host_chat(&app, HOST, 1).await;
    assert_eq!(host["1001"], ["after"]);
    let gms = drain_gm_chat(&app, 1).await;
    assert_eq!(gms[&("7".into(), "1001".into())], ["after, from the player"]);
}

/// A poll whose consumer is not cached yet looks it up first (bounded by the 5 s API
/// timeout): it must still answer errno 10, not hang until the 15 s request timeout.
#[tokio::test]
async fn nats_down_first_poll_of_a_host_answers_errno_10() {
    let mut app = TestApp::spawn().await;
    app.nats.stop();
    app.wait_readyz(503, DEADLINE).await;
    let started = Instant::now();
    let r = app
        .try_get("/gs?action=receive&host=4", Duration::from_secs(12))
        .await
        .expect("answers before the request timeout");
    eprintln!("first poll of host 4 with NATS down: {:?}", started.elapsed());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.errno(), Some(10), "{}", r.text());
}

#[tokio::test]
async fn redis_down_answers_errno_10_then_recovers() {
    let mut app = TestApp::spawn().await;
    befriended(&app).await;

    app.redis.stop();
    app.wait_readyz(503, DEADLINE).await;
    let add_1002 = format!("/gm?action=add&gm_account={GM}&host={HOST}&uid=1002");
    assert_unavailable(&app, "add", &add_1002).await;
    assert_unavailable(&app, "online", &format!("/gm?action=online&gm_account={GM}")).await;
    assert_unavailable(&app, "GM send", &send_query(1001, "lost")).await;
    assert_unavailable(&app, "relation", &format!("/gs?action=relation&host={HOST}")).await;
    assert_unavailable(&app, "GS online", &format!("/gs?action=online&host={HOST}")).await;

    // The harness's Redis keeps nothing across a restart: the relay must work on the new,
    // empty one without being restarted itself.
    app.redis.restart();
    app.wait_readyz(200, RECOVERY).await;
    let keys: Vec<String> = redis_query(&app, &["KEYS", "gmr:*"]).await;
    assert!(keys.iter().all(|k| k.starts_with("gmr:lease:")), "the failed requests wrote nothing: {keys:?}");
    app.create_gm(GM, GM_NAME).await;
    app.add(GM, HOST, 1002).await;
    assert_eq!(next_relation(&app, HOST).await, (json!({"1002": ["7", "Alice"]}), json!([])));
    assert_eq!(app.relation(HOST).await, no_changes());
    gm_send_ok(&app, 1002, "works again").await;
    let host = drain_host_chat(&app, HOST, 1).await;
    assert_eq!(host["1002"], ["works again"]);
    // The add that failed was never published either.
    let js = app.jetstream().await;
    let adds_1002 = stored_events(&js, "GM_TO_HOST", "gm.to.host.>")
        .await
        .into_iter()
        .filter(|e| e.body["type"] == "friend_add" && e.body["uid"] == "1002")
        .count();
    assert_eq!(adds_1002, 1);
}

/// Redis alive but not answering writes for longer than the relay's 2 s bound (here
/// `CLIENT PAUSE ... WRITE`; in production a slow fsync, a failover or a long script): the
/// add answers errno 10, "nothing was changed" — so the friendship must not appear once
/// Redis catches up.
#[tokio::test]
async fn redis_too_slow_add_answers_errno_10_and_changes_nothing() {
    let app = TestApp::spawn().await;
    befriended(&app).await;

    let mut conn = app.redis_conn().await;
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3500)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .expect("CLIENT PAUSE");
    let paused_at = Instant::now();
    assert_unavailable(
        &app,
        "add while Redis stalls",
        &format!("/gm?action=add&gm_account={GM}&host={HOST}&uid=1002"),
    )
    .await;
    // A write of ours is served once the pause is over.
    wait_until_async(DEADLINE, "Redis takes writes again", || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("SET")
                .arg("test:after-pause")
                .arg(1)
                .query_async::<()>(&mut conn)
                .await
                .is_ok()
        }
    })
    .await;
    assert!(paused_at.elapsed() >= Duration::from_secs(3));
    app.wait_readyz(200, RECOVERY).await;

    let gm: Option<String> = redis_query(&app, &["HGET", "gmr:player:1002", "gm"]).await;
    assert_eq!(
        gm, None,
        "add answered errno 10 (\"nothing was changed\") but the friendship was committed later"
    );
    let r = app.gm(&format!("action=add&gm_account={GM}&host={HOST}&uid=1002")).await;
    assert_eq!(r.json(), json!({"res": 1}), "retrying the add");
}

/// The stream refuses a host's consumer (its consumer limit is reached): the host's polls
/// answer errno 10, the relay does not ask JetStream again at every poll, and once the
/// limit is raised the host is served without a restart.
#[tokio::test]
async fn a_consumer_the_stream_refuses_is_not_asked_for_at_every_poll() {
    let app = TestApp::spawn().await;
    let js = app.jetstream().await;
    let mut stream = js.get_stream("GM_TO_HOST").await.unwrap();
    // Both hosts have a player, so their polls need their legacy consumers.
    app.create_gm(GM, "Alice").await;
    for (host, uid) in [(76, 7601), (77, 7701)] {
        app.add(GM, host, uid).await;
        wait_stored_for_host(&js, host).await;
    }
    // Host 76's consumers exist, so the limit can be set to what there is (0 means no
    // limit).
    assert_eq!(app.gs("action=receive&host=76").await.errno(), None);
    let info = stream.info().await.unwrap().clone();
    let mut full = info.config.clone();
    full.max_consumers = info.state.consumer_count as i32;
    assert!(full.max_consumers > 0);
    js.update_stream(full).await.expect("lower the consumer limit");

    assert_unavailable(&app, "first poll, consumer refused", "/gs?action=receive&host=77").await;
    let api_calls = || async { js.query_account().await.unwrap().requests.total };
    let (a, b) = (api_calls().await, api_calls().await);
    let per_query = b - a;
    for i in 0..5 {
        assert_unavailable(&app, &format!("poll {i} within the pause"), "/gs?action=receive&host=77").await;
    }
    let c = api_calls().await;
    assert_eq!(c - b, per_query, "the refused consumer was asked for again within the pause");

    let mut open = info.config.clone();
    open.max_consumers = 30_000;
    js.update_stream(open).await.expect("raise the consumer limit");
    wait_until_async(Duration::from_secs(15), "host 77 is served after the pause", || async {
        app.gs("action=receive&host=77").await.errno().is_none()
    })
    .await;
}

/// NATS dies right after a burst of sends was answered, while their history copies are
/// still being written behind them: the writer keeps the copies and writes them once NATS
/// is back, each once.
#[tokio::test]
async fn history_copies_survive_a_nats_restart_behind_the_sends() {
    use gm_relay::domain::ports::{EventBus, Route};
    use gm_relay::domain::{Envelope, GmId, HostId, Uid};
    const SENDS: usize = 3000;
    let mut app = TestApp::spawn().await;
    let relay = app.relay();
    let bus = relay.bus();
    let sends = (0..SENDS).map(|i| async move {
        let event = Envelope::chat(format!("nats-restart-{i}"), HostId(3), Uid(1001), GmId(GM), "x", 0);
        bus.publish_chat(Route::ToGm(GmId(GM)), &event).await.expect("delivered");
    });
    futures::future::join_all(sends).await;
    app.nats.restart();
    assert!(bus.flush_history(Duration::from_secs(30)).await, "the writer did not finish");
    let js = app.jetstream().await;
    let mut history = js.get_stream("GM_HISTORY").await.unwrap();
    assert_eq!(history.info().await.unwrap().state.messages, SENDS as u64);
    let metrics = app.get("/metrics").await.text();
    assert!(metrics.contains("gm_relay_history_lost_total 0"), "{metrics}");
}

/// nats-server stopped with SIGSTOP until dropped: connections stay open, nothing answers.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        send_signal(pid, libc::SIGSTOP);
        // kill(2) returns before a thread running on another core has stopped: wait until
        // every thread of the server shows the stopped state.
        wait_until(DEADLINE, "nats-server is stopped", || all_threads_stopped(pid));
        Frozen(pid)
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            // The state follows the command name, which is in parentheses.
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')))
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        send_signal(self.0, libc::SIGCONT);
    }
}

/// An outbox batch whose PubAcks never come gives up within one bound for the whole batch,
/// not one per event: the drainer must finish inside its 5 s lease, or another relay could
/// take the lease and publish beside it.
#[tokio::test]
async fn an_outbox_batch_without_pubacks_gives_up_within_one_bound() {
    use gm_relay::domain::ports::{EventBus, Route};
    use gm_relay::domain::{Envelope, GmId, HostId, Uid};
    const EVENTS: usize = 20;
    let app = TestApp::spawn().await;
    let relay = app.relay();
    let events: Vec<(Route, Envelope)> = (0..EVENTS)
        .map(|i| {
            let event = Envelope::chat(format!("unanswered-{i}"), HostId(HOST), Uid(1001), GmId(GM), "x", 0);
            (Route::ToHost(HostId(HOST)), event)
        })
        .collect();
    let frozen = Frozen::new(app.nats.pid().expect("nats-server runs"));
    let started = Instant::now();
    let (acked, error) = relay.bus().publish_ordered(&events).await;
    let took = started.elapsed();
    drop(frozen);
    assert_eq!(acked, 0, "nothing was acknowledged");
    assert!(error.is_some(), "the batch reports why it stopped");
    assert!(took < ANSWER_WITHIN, "the batch took {took:?}");
}

/// The poll lease held on `host`'s chat feed: its remaining time, or None.
async fn host_chat_lease_ttl(app: &TestApp) -> Option<Duration> {
    let key = format!(
        "gmr:lease:poll:{}",
        gm_relay::domain::ports::Feed::HostChat(gm_relay::domain::HostId(HOST)).key()
    );
    let ms: i64 = redis_query(app, &["PTTL", &key]).await;
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// A poll whose fetch goes unanswered cannot tell what the broker handed out: a message
/// sent to an inbox nobody reads any more stays unacked until its ack wait (10 s), and a
/// poll before then would serve what came after it first. So the poll answers errno 10
/// and leaves the feed's lease to expire (15 s) instead of releasing it; the next poll
/// then serves the feed from where it was, in order.
#[tokio::test]
async fn a_poll_whose_fetch_goes_unanswered_leaves_its_lease_to_expire() {
    use gm_relay::domain::HostId;
    let app = TestApp::spawn().await;
    befriended(&app).await;
    gm_send_ok(&app, 1001, "first").await;
    // A poll before the freeze: the relay knows the feed's consumer, so the frozen poll's
    // fetch request goes out.
    app.gs_receive(HOST).await;
    gm_send_ok(&app, 1001, "second").await;
    app.wait_polls_settled(DEADLINE).await;
    let relay = app.relay();
    let frozen = Frozen::new(app.nats.pid().expect("nats-server runs"));
    let started = Instant::now();
    let poll = relay.gs_receive(HostId(HOST)).await;
    assert!(poll.is_err(), "a poll without an answer from the broker fails");
    assert!(started.elapsed() < ANSWER_WITHIN, "the poll took {:?}", started.elapsed());
    // The poll has ended its turn: the lease is still there, running out.
    let ttl = host_chat_lease_ttl(&app).await;
    assert!(ttl.is_some_and(|t| t > Duration::ZERO), "the lease was released: {ttl:?}");
    drop(frozen);
    gm_send_ok(&app, 1001, "third").await;
    // Meanwhile polls answer empty at once, without waiting out their turn (2 s) for a
    // lease that outlasts it.
    let started = Instant::now();
    assert_eq!(app.gs_receive(HOST).await, vec![]);
    assert!(started.elapsed() < Duration::from_millis(1500), "the poll took {:?}", started.elapsed());
    // Then the next poll gets both, oldest first.
    let got = std::sync::Mutex::new(BTreeMap::new());
    wait_until_async(POLL_LEASE_TTL + DEADLINE, "the host gets its messages", || {
        let got = &got;
        let app = &app;
        async move {
            let reply = app.gs_receive(HOST).await;
            let mut got = got.lock().unwrap();
            absorb_host(&mut got, reply);
            got.values().flatten().any(|t| t == "third")
        }
    })
    .await;
    let got = got.into_inner().unwrap();
    assert_eq!(got.get("1001"), Some(&vec!["second".to_owned(), "third".to_owned()]));
    assert_eq!(app.gs_receive(HOST).await, vec![], "nothing comes again");
}

/// A poll whose acks go unconfirmed cannot tell which the broker applied: the next poll
/// must not start before what was not acked is due again. The turn ends with the lease
/// left to expire.
#[tokio::test]
async fn a_poll_whose_acks_fail_leaves_its_lease_to_expire() {
    use gm_relay::domain::HostId;
    let app = TestApp::spawn().await;
    befriended(&app).await;
    gm_send_ok(&app, 1001, "hello").await;
    app.wait_polls_settled(DEADLINE).await;
    let relay = app.relay();
    let ticket = relay.gs_receive(HostId(HOST)).await.expect("the poll fetched");
    let (reply, settlement) = ticket.into_parts();
    assert_eq!(reply.len(), 1, "the message was fetched");
    let frozen = Frozen::new(app.nats.pid().expect("nats-server runs"));
    let started = Instant::now();
    settlement.expect("a settlement").finish(true).await.expect("the settle task ran");
    assert!(started.elapsed() < ANSWER_WITHIN, "the settle took {:?}", started.elapsed());
    let ttl = host_chat_lease_ttl(&app).await;
    assert!(ttl.is_some_and(|t| t > Duration::ZERO), "the lease was released: {ttl:?}");
    drop(frozen);
}

/// Players and messages each in the large GM poll reply of the two tests below.
const BIG_REPLY_PLAYERS: i64 = 200;
const BIG_REPLY_PER_PLAYER: usize = 10;

/// Receive buffer of a client that does not read its reply: small, so what the relay can
/// hand to the kernel is about its own send buffer.
const SLOW_CLIENT_RCVBUF: u32 = 16 << 10;

/// Stores chat for a GM poll reply of 2,000 texts of 2,000 bytes, base64 twice: about
/// 7 MB, more than the kernel takes from the relay for a client that does not read.
async fn store_big_gm_reply(app: &TestApp) {
    use gm_relay::domain::ports::{EventBus, Route};
    use gm_relay::domain::{Envelope, GmId, HostId, Uid};
    let relay = app.relay();
    let bus = relay.bus();
    // The longest text there is: 500 four-byte characters.
    let text = "😀".repeat(500);
    let sends =
        (0..BIG_REPLY_PLAYERS).flat_map(|p| (0..BIG_REPLY_PER_PLAYER).map(move |i| (p, i))).map(|(p, i)| {
            let text = text.as_str();
            async move {
                let event =
                    Envelope::chat(format!("cut-{p}-{i}"), HostId(HOST), Uid(1000 + p), GmId(GM), text, 0);
                bus.publish_chat(Route::ToGm(GmId(GM)), &event).await.expect("stored");
            }
        });
    futures::future::join_all(sends).await;
    // The relay's send buffer grows to at most the kernel's `tcp_wmem` maximum.
    let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").expect("tcp_wmem");
    let wmem_max: usize = wmem.split_whitespace().last().and_then(|m| m.parse().ok()).expect("tcp_wmem max");
    assert!(
        wmem_max + (SLOW_CLIENT_RCVBUF as usize) * 2 < 7_000_000,
        "this machine's sockets could take the whole reply (tcp_wmem max {wmem_max}): the test would prove nothing"
    );
}

/// Asks for the GM poll with a small receive buffer and reads only the reply's first
/// bytes: returns the connection and the reply's announced length.
async fn ask_gm_poll_and_stop_reading(app: &TestApp) -> (tokio::net::TcpStream, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(SLOW_CLIENT_RCVBUF).expect("SO_RCVBUF");
    let mut client = socket.connect(app.addr()).await.expect("connect");
    client.write_all(b"GET /gm?action=receive HTTP/1.1\r\nHost: relay\r\n\r\n").await.expect("request");
    let mut first = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, client.read(&mut first)).await.expect("a reply").expect("read");
    let head = String::from_utf8_lossy(&first[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: ").or_else(|| l.strip_prefix("Content-Length: ")))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no length in {head}"));
    (client, length)
}

/// A poll's events are acked only once its reply is on the wire: a client that resets the
/// connection while a large reply is still being written gets every event again on its
/// next poll. (hyper takes a reply's body into its buffer and lets the body go before it
/// writes it to the socket; acking then would lose what the client never read.)
#[tokio::test]
async fn a_reply_the_client_cut_off_is_served_again() {
    let app = TestApp::spawn().await;
    store_big_gm_reply(&app).await;
    let (client, _) = ask_gm_poll_and_stop_reading(&app).await;
    // Reset, not close: the relay's next write fails at once.
    #[allow(deprecated)] // deprecated for blocking on close; a zero linger resets at once
    client.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    drop(client);

    let got = drain_gm_chat(&app, BIG_REPLY_PLAYERS as usize * BIG_REPLY_PER_PLAYER).await;
    assert_eq!(got.len(), BIG_REPLY_PLAYERS as usize, "every conversation comes again");
}

/// A reply not written within the poll's budget is nak'd, and the relay gives up the
/// connection at once (well before the write-stall bound), so the client reads a cut
/// reply rather than events it also gets again on its next poll.
#[tokio::test]
async fn a_reply_not_written_in_time_is_cut_and_served_again() {
    use gm_relay::adapters::http::server::WRITE_STALL_TIMEOUT;
    use gm_relay::relay::POLL_REPLY_BUDGET;
    use tokio::io::AsyncReadExt;
    let app = TestApp::spawn().await;
    store_big_gm_reply(&app).await;
    let (mut client, length) = ask_gm_poll_and_stop_reading(&app).await;
    // The client reads nothing more until its events come again on other polls.
    let want = BIG_REPLY_PLAYERS as usize * BIG_REPLY_PER_PLAYER;
    let got = drain_gm_chat_within(&app, want, POLL_REPLY_BUDGET + DEADLINE).await;
    // Reads what the relay still sends: the connection must close before the reply's end,
    // and soon (the write-stall bound, WRITE_STALL_TIMEOUT, would close it only later).
    let mut read = 0;
    let mut chunk = vec![0u8; 64 << 10];
    let ended = tokio::time::timeout(ANSWER_WITHIN, async {
        while read + 1024 < length {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => read += n,
            }
        }
        false
    })
    .await;
    match ended {
        Ok(true) => {}
        Ok(false) => panic!("the client read the whole reply ({length} bytes) after its events were nak'd"),
        Err(_) => panic!(
            "the connection was neither closed nor written, {WRITE_STALL_TIMEOUT:?} being the stall bound"
        ),
    }
    assert_eq!(got.len(), BIG_REPLY_PLAYERS as usize, "every conversation comes again");
}
