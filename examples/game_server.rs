//! A native game server talking to gm-relay over NATS: the smallest complete client.
//!
//! ```sh
//! cargo run --example game_server -- nats://127.0.0.1:14222 3 1001 "hello GM"
//! ```
//! (with `GM_GAME_SERVER_SEED_FILE=host_3.nk` when NATS requires authentication)
//! connects as game server 3, resyncs its friend list, sends one message from player 1001
//! to the player's GM, then prints every event for host 3 (chat from GMs, friend changes,
//! GM presence) and acks it. See `nats/CONTRACT.md` for subjects and envelopes.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures::StreamExt;
use serde_json::{json, Value};

/// Bound on each request to the relay.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait before asking again for a resync page the relay refused as over the host's rate
/// (20 pages a second).
const RESYNC_PAUSE: Duration = Duration::from_millis(100);

/// One game server's connection to gm-relay.
pub struct GameServer {
    host: i64,
    client: async_nats::Client,
    events: PullConsumer,
}

impl GameServer {
    /// Connects and binds the durable consumer `host_<host>` (the relay created it when
    /// the host got its first player). `seed`: the host's NKey seed (`host_<n>.nk` from
    /// `gm-relay nats-auth`) when the server requires authentication.
    pub async fn connect(url: &str, host: i64, seed: Option<&str>) -> Result<GameServer, async_nats::Error> {
        let options = match seed {
            Some(seed) => async_nats::ConnectOptions::with_nkey(seed.trim().to_owned()),
            None => async_nats::ConnectOptions::new(),
        };
        let client = options
            .name(format!("game-server-{host}"))
            // Replies come to an inbox only this host may read (see `gm-relay nats-auth`).
            .custom_inbox_prefix(format!("_INBOX_host_{host}"))
            .connect(url)
            .await?;
        let js = jetstream::new(client.clone());
        let events = js.get_consumer_from_stream(format!("host_{host}"), "GM_TO_HOST").await?;
        Ok(GameServer { host, client, events })
    }

    async fn request(
        &self,
        verb: &str,
        headers: async_nats::HeaderMap,
        body: Value,
    ) -> Result<Value, async_nats::Error> {
        let subject = format!("gm.relay.gs.{}.{verb}", self.host);
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(serde_json::to_vec(&body)?.into())
            .timeout(Some(REQUEST_TIMEOUT));
        let reply = self.client.send_request(subject, request).await?;
        Ok(serde_json::from_slice(&reply.payload)?)
    }

    /// Every player of this host with their GM, page by page.
    pub async fn resync(&self) -> Result<Vec<Value>, async_nats::Error> {
        let mut players = Vec::new();
        let mut cursor = 0;
        // Bounded: a host has far fewer than 1,000 pages of 1,000 players (plus the pauses
        // the relay's rate of 20 pages a second asks for).
        for _ in 0..2000 {
            let reply =
                self.request("resync", async_nats::HeaderMap::new(), json!({"cursor": cursor})).await?;
            if reply["errno"] == 8 {
                // Over the host's resync rate: ask for the same page a little later.
                tokio::time::sleep(RESYNC_PAUSE).await;
                continue;
            }
            if reply["ok"] != true {
                return Err(format!("resync refused: {reply}").into());
            }
            players.extend(reply["players"].as_array().cloned().unwrap_or_default());
            cursor = reply["next_cursor"].as_u64().unwrap_or(0);
            if cursor == 0 {
                break;
            }
        }
        Ok(players)
    }

    /// Sends a player's message to their GM. `key` makes a retry safe: the relay turns the
    /// same key into the same event, which JetStream stores once.
    pub async fn send(&self, uid: i64, text: &str, key: &str) -> Result<Value, async_nats::Error> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, key);
        self.request("send", headers, json!({"uid": uid.to_string(), "text": text})).await
    }

    /// Waits up to `wait` for the next event, acks it and returns its envelope.
    pub async fn next_event(&self, wait: Duration) -> Result<Option<Value>, async_nats::Error> {
        let mut batch = self.events.fetch().max_messages(1).expires(wait).messages().await?;
        let Some(message) = batch.next().await.transpose()? else { return Ok(None) };
        let event: Value = match serde_json::from_slice(&message.payload) {
            Ok(e) => e,
            Err(_) => {
                // Not an envelope: take it off the queue so it cannot block the rest.
                message.ack_with(AckKind::Term).await?;
                return Ok(Some(Value::Null));
            }
        };
        // Apply the event to game state here, then ack; until the ack it is redelivered.
        message.double_ack().await?;
        Ok(Some(event))
    }
}

#[allow(dead_code)] // the integration test includes this file as a module
#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, host, uid, text] = args.as_slice() else {
        eprintln!("usage: game_server <nats-url> <host> <uid> <text>   (env GM_GAME_SERVER_SEED_FILE: NKey seed file)");
        std::process::exit(2);
    };
    let seed = match std::env::var("GM_GAME_SERVER_SEED_FILE") {
        Ok(path) => Some(std::fs::read_to_string(path)?),
        Err(_) => None,
    };
    let server = GameServer::connect(url, host.parse()?, seed.as_deref()).await?;
    for player in server.resync().await? {
        println!("player {player}");
    }
    let key = format!("{}-{}", uid, std::process::id());
    println!("send: {}", server.send(uid.parse()?, text, &key).await?);
    // Bounded, like every loop here: an hour of events, then exit.
    for _ in 0..3600 {
        if let Some(event) = server.next_event(Duration::from_secs(1)).await? {
            println!("event {event}");
        }
    }
    Ok(())
}
