//! Presence, join/leave and the fleet-wide demand of polling jobs, against real hubs (in-process and the
//! binary), a private redis-server per test, real WebSocket and HTTP clients: members of every replica in
//! one answer (WebSocket and REST), presence stats, join and leave across replicas, the members of a replica
//! killed with SIGKILL leaving within `presence_ttl` (while a live replica's stay past it), the member cap,
//! memory mode, and the polling status's `subscribers` counting clients on two replicas with `auto_stop`
//! waiting for all of them.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use common::process::{ConfigFile, Process, start_binary};
use common::upstream::{Mode, Upstream};
use common::{RedisServer, TestHub, Ws, eventually, get_json, wait_ready};

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

/// A token for `sub` with these extra claims, valid for an hour.
fn signed(sub: &str, mut claims: Value) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    claims["sub"] = json!(sub);
    claims["exp"] = json!(exp);
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign a test token")
}

fn token(sub: &str, info: Value) -> String {
    signed(sub, json!({ "info": info }))
}

fn presence_config(redis: Option<&RedisServer>, extra: &str) -> String {
    let redis = redis
        .map(|r| format!("[redis]\nurl = \"{}\"\nrequired = true\n", r.url()))
        .unwrap_or_default();
    format!(
        "{redis}{extra}\n[auth]\njwt_hs256_secret = \"{SECRET}\"\n\
         [namespaces.room]\npresence = true\njoin_leave = true\n\
         [namespaces.quiet]\npresence = true\n"
    )
}

/// Two ready replicas on a private Redis, configured by [`presence_config`] with `extra`: the binary, which a
/// test can kill or stop, and an in-process hub.
struct BinaryAndHub {
    hub: TestHub,
    /// The binary (killed with SIGKILL when dropped).
    binary: Process,
    /// The binary's address, `host:port`.
    base: String,
    /// The binary's config file, kept while it runs.
    _file: ConfigFile,
    /// Kept for as long as both replicas run.
    _redis: RedisServer,
}

impl BinaryAndHub {
    async fn start(extra: &str) -> BinaryAndHub {
        let redis = RedisServer::start();
        let config = presence_config(Some(&redis), extra);
        let file = ConfigFile::new(&config);
        let (binary, base) = start_binary(&file).await;
        let hub = TestHub::start(&config).await;
        wait_ready(&hub).await;
        BinaryAndHub {
            hub,
            binary,
            base,
            _file: file,
            _redis: redis,
        }
    }

    /// A WebSocket client of the binary.
    async fn connect_to_binary(&self) -> Ws {
        Ws::connect(&format!("ws://{}/ws", self.base)).await
    }
}

/// Asks for the presence of `channel` over the WebSocket and returns the answer.
async fn ask_presence(ws: &mut Ws, channel: &str) -> Value {
    ws.send(json!({"op": "presence", "channel": channel, "id": "p"}))
        .await;
    let answer = ws.recv().await;
    assert_eq!(answer["id"], "p", "{answer}");
    answer
}

fn clients(answer: &Value) -> Vec<String> {
    let mut clients: Vec<String> = answer["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members: {answer}"))
        .iter()
        .map(|m| m["client"].as_str().unwrap().to_string())
        .collect();
    clients.sort();
    clients
}

#[actix_web::test]
async fn presence_lists_the_members_of_every_replica_and_join_leave_crosses_replicas() {
    let redis = RedisServer::start();
    let config = presence_config(Some(&redis), "");
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    let url = format!(
        "{}?token={}",
        hubs[0].ws_url(),
        token("alice", json!({"name": "Alice"}))
    );
    let mut alice = Ws::connect(&url).await;
    alice.subscribe("room:1").await;
    let mut anon = hubs[1].connect().await;
    anon.subscribe("room:1").await;

    // Alice, on the other replica, hears the anonymous client join; it does not hear its own join.
    let join = alice.recv_type("join").await;
    assert_eq!(join["channel"], "room:1", "{join}");
    assert_eq!(join["member"]["user"], Value::Null, "{join}");
    assert_eq!(join["member"]["info"], Value::Null, "{join}");
    let anon_id = join["member"]["client"].as_str().unwrap().to_string();
    assert!(
        anon_id.starts_with(hubs[1].hub().instance_id()),
        "{anon_id}"
    );
    anon.ping().await;

    // Both members, from either replica, over the WebSocket and REST.
    let answer = ask_presence(&mut anon, "room:1").await;
    assert_eq!(answer["type"], "presence", "{answer}");
    assert_eq!(answer["channel"], "room:1");
    assert!(answer.get("truncated").is_none(), "{answer}");
    let members = answer["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{answer}");
    let alice_entry = members
        .iter()
        .find(|m| m["user"] == "alice")
        .unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(alice_entry["info"], json!({"name": "Alice"}));
    let alice_id = alice_entry["client"].as_str().unwrap().to_string();
    assert!(
        alice_id.starts_with(hubs[0].hub().instance_id()),
        "{alice_id}"
    );
    let mut both = vec![alice_id.clone(), anon_id.clone()];
    both.sort();
    assert_eq!(clients(&answer), both);
    for hub in &hubs {
        let (status, body) = get_json(&hub.http("/api/channels/room:1/presence")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(clients(&body), both, "{body}");
        let (status, body) = get_json(&hub.http("/api/channels/room:1/presence/stats")).await;
        assert_eq!(status, 200, "{body}");
        // Two connections, one user (the anonymous one has none).
        assert_eq!(body, json!({"clients": 2, "users": 1}));
    }

    // Unsubscribing is a leave, heard on the other replica, and the member is gone.
    anon.send(json!({"op": "unsubscribe", "channel": "room:1"}))
        .await;
    anon.recv_type("unsubscribed").await;
    let leave = alice.recv_type("leave").await;
    assert_eq!(leave["member"]["client"], anon_id.as_str(), "{leave}");
    assert_eq!(
        clients(&ask_presence(&mut alice, "room:1").await),
        vec![alice_id.clone()]
    );

    // Disconnecting is a leave too.
    let mut second = hubs[1].connect().await;
    second.subscribe("room:1").await;
    let joined = alice.recv_type("join").await["member"]["client"].clone();
    second.close().await;
    let left = alice.recv_type("leave").await;
    assert_eq!(left["member"]["client"], joined, "{left}");
    eventually(Duration::from_secs(10), "one member left", || async {
        get_json(&hubs[1].http("/api/channels/room:1/presence/stats"))
            .await
            .1
            == json!({"clients": 1, "users": 1})
    })
    .await;

    // A namespace with presence but no join_leave lists members and announces nothing.
    alice.subscribe("quiet:1").await;
    let mut other = hubs[1].connect().await;
    other.subscribe("quiet:1").await;
    eventually(Duration::from_secs(10), "two quiet members", || async {
        get_json(&hubs[0].http("/api/channels/quiet:1/presence/stats"))
            .await
            .1["clients"]
            == 2
    })
    .await;
    alice.ping().await;

    // Refusals: a namespace without presence, a pattern, a private channel the client may not read.
    let refused = ask_presence(&mut alice, "chat:1").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let refused = ask_presence(&mut alice, "room:*").await;
    assert_eq!(refused["code"], "invalid_channel", "{refused}");
    let (status, body) = get_json(&hubs[0].http("/api/channels/chat:1/presence")).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("forbidden"))
    );
    let (status, _) = get_json(&hubs[0].http("/api/channels/bad%20name/presence/stats")).await;
    assert_eq!(status, 400);

    let stats = hubs[1].stats().await;
    assert!(stats["presence_queries"].as_u64().unwrap() >= 3, "{stats}");
    assert_eq!(stats["presence_joins"], 3, "{stats}");
    assert_eq!(stats["presence_leaves"], 2, "{stats}");
    assert_eq!(stats["presence_dropped"], 0, "{stats}");
}

#[actix_web::test]
async fn private_channels_need_the_read_rules_for_presence() {
    let redis = RedisServer::start();
    let config = presence_config(
        Some(&redis),
        "[namespaces.team]\npresence = true\nprivate = true\n",
    );
    let hub = TestHub::start(&config).await;
    wait_ready(&hub).await;
    let granted = format!(
        "{}?token={}",
        hub.ws_url(),
        common_token_with_channels("bob", &["team:a"])
    );
    let mut bob = Ws::connect(&granted).await;
    bob.subscribe("team:a").await;
    // Another user without the claim is refused, over the WebSocket and REST.
    let url = format!("{}?token={}", hub.ws_url(), token("eve", Value::Null));
    let mut eve = Ws::connect(&url).await;
    let refused = ask_presence(&mut eve, "team:a").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let (status, _) = get_json(&hub.http("/api/channels/team:a/presence")).await;
    assert_eq!(status, 403);
    let answer = ask_presence(&mut bob, "team:a").await;
    assert_eq!(answer["members"][0]["user"], "bob", "{answer}");
}

fn common_token_with_channels(sub: &str, channels: &[&str]) -> String {
    signed(sub, json!({ "channels": channels }))
}

#[actix_web::test]
async fn the_members_of_a_killed_replica_leave_presence_within_presence_ttl() {
    let replicas = BinaryAndHub::start("[channels]\npresence_ttl = \"2s\"\n").await;
    let mut here = replicas.hub.connect().await;
    here.subscribe("room:k").await;
    let mut there = replicas.connect_to_binary().await;
    there.subscribe("room:k").await;
    let there_id = here.recv_type("join").await["member"]["client"].clone();
    let stats_url = replicas.hub.http("/api/channels/room:k/presence/stats");
    assert_eq!(get_json(&stats_url).await.1["clients"], 2);
    // Both replicas refresh their members: well past presence_ttl, both are still there.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(get_json(&stats_url).await.1["clients"], 2);
    // SIGKILL: the replica writes no leave, so the expiry removes its member, and whichever script prunes it
    // (the live replica's refresh, or a read) announces its leave.
    drop(replicas.binary);
    eventually(
        Duration::from_secs(6),
        "the killed replica's member is gone",
        || async { get_json(&stats_url).await.1["clients"] == 1 },
    )
    .await;
    let leave = here.recv_type("leave").await;
    assert_eq!(leave["member"]["client"], there_id, "{leave}");
    let (_, body) = get_json(&replicas.hub.http("/api/channels/room:k/presence")).await;
    let members = body["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{body}");
    assert!(
        members[0]["client"]
            .as_str()
            .unwrap()
            .starts_with(replicas.hub.hub().instance_id()),
        "{body}"
    );
}

#[actix_web::test]
async fn memory_mode_caps_presence_answers_and_announces_joins() {
    let config = presence_config(None, "[channels]\nmax_presence_members = 3\n");
    let hub = TestHub::start(&config).await;
    let mut first = hub.connect().await;
    first.subscribe("room:m").await;
    let mut others = Vec::new();
    for _ in 0..4 {
        let mut ws = hub.connect().await;
        ws.subscribe("room:m").await;
        first.recv_type("join").await;
        others.push(ws);
    }
    let answer = ask_presence(&mut first, "room:m").await;
    assert_eq!(answer["members"].as_array().unwrap().len(), 3, "{answer}");
    assert_eq!(answer["truncated"], true, "{answer}");
    let (_, body) = get_json(&hub.http("/api/channels/room:m/presence")).await;
    assert_eq!(body["members"].as_array().unwrap().len(), 3, "{body}");
    assert_eq!(body["truncated"], true, "{body}");
    let (_, counts) = get_json(&hub.http("/api/channels/room:m/presence/stats")).await;
    assert_eq!(counts, json!({"clients": 5, "users": 0}));
    others.pop().unwrap().close().await;
    first.recv_type("leave").await;
    let (_, counts) = get_json(&hub.http("/api/channels/room:m/presence/stats")).await;
    assert_eq!(counts["clients"], 4);
    let stats = hub.stats().await;
    assert_eq!(stats["presence_truncated"], 2, "{stats}");
    assert_eq!(stats["presence_joins"], 5, "{stats}");
    assert_eq!(stats["presence_leaves"], 1, "{stats}");
    // Who is here changes by the second: no cache may keep either answer.
    for path in ["presence", "presence/stats"] {
        let url = hub.http(&format!("/api/channels/room:m/{path}"));
        let reply = common::request("GET", &url, &[], None).await;
        let cache = reply.headers.iter().find(|(k, _)| k == "cache-control");
        assert_eq!(
            (reply.status, cache.map(|(_, v)| v.as_str())),
            (200, Some("no-store")),
            "{path}"
        );
    }
}

async fn job_subscribers(hub: &TestHub) -> Option<(String, u64, Option<String>)> {
    let (_, body) = get_json(&hub.http("/api/polling/status")).await;
    let job = body["jobs"].get(0)?;
    Some((
        job["id"].as_str()?.to_string(),
        job["subscribers"].as_u64()?,
        job["owner"].as_str().map(str::to_string),
    ))
}

#[actix_web::test]
async fn the_polling_status_counts_subscribers_on_every_replica_and_auto_stop_waits_for_all() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"v": 1})));
    let config = format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n[poller]\nlease = \"2s\"\n\
         [namespaces.ticker]\npatterns = true\n\
         [[sources]]\nname = \"ticker\"\nurl = \"{}\"\nchannel = \"ticker:{{symbol}}\"\n\
         interval = \"300ms\"\ntimeout = \"500ms\"\nauto_start = true\nauto_stop = true\n\
         idle_grace = \"1s\"\nonly_on_change = false\n",
        redis.url(),
        upstream.url("/ticker/{symbol}")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    // Two exact subscribers on the first replica start the job.
    let mut exact = Vec::new();
    for _ in 0..2 {
        let mut ws = hubs[0].connect().await;
        ws.subscribe("ticker:P").await;
        exact.push(ws);
    }
    let owner = loop {
        if let Some((_, _, Some(owner))) = job_subscribers(&hubs[0]).await {
            break owner;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A pattern subscriber on the replica that does not own the job.
    let other = hubs
        .iter()
        .find(|h| h.hub().instance_id() != owner)
        .unwrap();
    let mut pattern = other.connect().await;
    pattern.subscribe("ticker:*").await;
    for hub in &hubs {
        eventually(
            Duration::from_secs(10),
            "the status counts three subscribers on two replicas",
            || async { job_subscribers(hub).await.is_some_and(|(_, n, _)| n == 3) },
        )
        .await;
    }
    // The exact subscribers leave: the pattern subscriber on the other replica still counts and the job
    // keeps running well past its idle grace.
    for ws in exact.drain(..) {
        ws.close().await;
    }
    eventually(Duration::from_secs(10), "one subscriber left", || async {
        job_subscribers(&hubs[0])
            .await
            .is_some_and(|(_, n, _)| n == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        job_subscribers(&hubs[0])
            .await
            .is_some_and(|(_, n, _)| n == 1),
        "the job is still listed with one subscriber"
    );
    let before = upstream.requests("/ticker/P");
    eventually(Duration::from_secs(10), "the job still fetches", || async {
        upstream.requests("/ticker/P") > before
    })
    .await;
    // With nobody left anywhere, it stops.
    pattern.close().await;
    eventually(Duration::from_secs(15), "the idle job stops", || async {
        job_subscribers(&hubs[0]).await.is_none()
    })
    .await;
    // The fleet-wide counts live in Redis, one entry per replica with subscribers, gone with them.
    eventually(
        Duration::from_secs(10),
        "no demand entry is left",
        || async {
            redis
                .cmd(&["KEYS", "relayhub:demand:*"])
                .unwrap_or_default()
                == "*0\r\n"
        },
    )
    .await;
}

#[actix_web::test]
async fn the_cap_holds_in_redis_and_a_graceful_stop_announces_its_members_leaving() {
    let mut replicas = BinaryAndHub::start(
        "[server]\ndrain_period = \"0s\"\n[channels]\nmax_presence_members = 3\n",
    )
    .await;
    let mut watcher = replicas.hub.connect().await;
    watcher.subscribe("room:g").await;
    let mut leaving = Vec::new();
    for _ in 0..4 {
        let mut ws = replicas.connect_to_binary().await;
        ws.subscribe("room:g").await;
        watcher.recv_type("join").await;
        leaving.push(ws);
    }
    // Five members in Redis, three listed.
    let answer = ask_presence(&mut watcher, "room:g").await;
    assert_eq!(answer["members"].as_array().unwrap().len(), 3, "{answer}");
    assert_eq!(answer["truncated"], true, "{answer}");
    let (_, body) = get_json(&replicas.hub.http("/api/channels/room:g/presence")).await;
    assert_eq!(body["members"].as_array().unwrap().len(), 3, "{body}");
    let stats_url = replicas.hub.http("/api/channels/room:g/presence/stats");
    assert_eq!(get_json(&stats_url).await.1["clients"], 5);
    // A graceful stop (SIGTERM) closes its clients with 1001 and writes their leaves before it exits.
    replicas.binary.stop_gracefully();
    for _ in 0..4 {
        watcher.recv_type("leave").await;
    }
    assert_eq!(
        get_json(&stats_url).await.1,
        json!({"clients": 1, "users": 0})
    );
    drop(leaving);
}

#[actix_web::test]
async fn the_polling_status_sums_cache_reads_over_the_fleet() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Fixed(json!({"price": 1})));
    let config = format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n[poller]\nlease = \"2s\"\n\
         [[sources]]\nname = \"ticker\"\nurl = \"{}\"\nchannel = \"ticker:{{symbol}}\"\n\
         interval = \"1h\"\ntimeout = \"500ms\"\nauto_start = true\n",
        redis.url(),
        upstream.url("/ticker/{symbol}")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    // The first subscriber finds nothing cached (a miss); the others, on both replicas, find the value.
    let mut clients = Vec::new();
    for hub in [&hubs[0], &hubs[1], &hubs[1]] {
        let mut ws = hub.connect().await;
        ws.subscribe("ticker:C").await;
        ws.recv_type("snapshot").await;
        clients.push(ws);
    }
    for hub in &hubs {
        eventually(
            Duration::from_secs(10),
            "both replicas' cache reads in the status of each",
            || async {
                let (_, body) = get_json(&hub.http("/api/polling/status")).await;
                let job = &body["jobs"][0];
                job["cache_hits"] == 2 && job["cache_misses"] == 1
            },
        )
        .await;
    }
}

#[actix_web::test]
async fn presence_requests_spend_the_connection_s_request_budget() {
    let config = presence_config(
        None,
        "[websocket]\nrequests_per_second = 1\nrequest_burst = 3\n",
    );
    let hub = TestHub::start(&config).await;
    let mut ws = hub.connect().await;
    // Pipelined: each is read only after the one before was answered, and past the burst they are refused.
    for i in 0..6 {
        ws.send(json!({"op": "presence", "channel": "room:r", "id": i}))
            .await;
    }
    let mut answered = 0;
    let mut refused = 0;
    for _ in 0..6 {
        let frame = ws.recv().await;
        match frame["type"].as_str() {
            Some("presence") => answered += 1,
            Some("error") if frame["code"] == "rate_limited" => refused += 1,
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert!(answered <= 4, "{answered} answered, {refused} refused");
    assert!(refused >= 2, "{answered} answered, {refused} refused");
    assert_eq!(hub.stats().await["presence_queries"], answered);
}

#[actix_web::test]
async fn a_live_replica_s_refresh_announces_the_leaving_of_a_dead_one_s_members() {
    let replicas = BinaryAndHub::start("[channels]\npresence_ttl = \"2s\"\n").await;
    let mut here = replicas.hub.connect().await;
    here.subscribe("room:d").await;
    let mut there = replicas.connect_to_binary().await;
    there.subscribe("room:d").await;
    let there_id = here.recv_type("join").await["member"]["client"].clone();
    drop(replicas.binary);
    // Nobody reads the channel's presence: the live replica's refresh (every third of presence_ttl) prunes
    // the dead member and announces it.
    let leave = here.recv_type("leave").await;
    assert_eq!(leave["member"]["client"], there_id, "{leave}");
    assert_eq!(
        get_json(&replicas.hub.http("/api/channels/room:d/presence/stats"))
            .await
            .1,
        json!({"clients": 1, "users": 0})
    );
}
