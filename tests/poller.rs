//! The poller against real upstream HTTP servers started in the test, and a real Redis for fleet behaviour.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::upstream::{Mode, Upstream};
use common::{RedisServer, TestHub, eventually, get_json, post_json, wait_ready};

fn source_config(upstream: &Upstream, extra: &str) -> String {
    format!(
        r#"
[poller]
lease = "2s"

[[sources]]
name = "ticker"
url = "{}"
channel = "ticker:{{symbol}}"
interval = "1s"
timeout = "500ms"
{extra}
"#,
        upstream.url("/ticker/{symbol}")
    )
}

fn redis_config(redis: &RedisServer) -> String {
    format!("[redis]\nurl = \"{}\"\nrequired = true\n", redis.url())
}

async fn start_job(hub: &TestHub, source: &str, params: Value) -> Value {
    let (status, body) = post_json(
        &hub.http("/api/polling/start"),
        &json!({"source": source, "params": params}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The id of the first job listed, once there is one.
async fn job_status_any(hub: &TestHub) -> String {
    loop {
        let (_, body) = get_json(&hub.http("/api/polling/status")).await;
        if let Some(id) = body["jobs"][0]["id"].as_str() {
            return id.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica other than the one running job `id`, once the job has an owner.
async fn replica_not_owning<'a>(hubs: &'a [TestHub], id: &str) -> &'a TestHub {
    let owner = loop {
        if let Some(owner) = job_status(&hubs[0], id).await["owner"].as_str() {
            break owner.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    hubs.iter()
        .find(|h| h.hub().instance_id() != owner)
        .expect("two replicas")
}

async fn job_status(hub: &TestHub, id: &str) -> Value {
    let (status, body) = get_json(&hub.http("/api/polling/status")).await;
    assert_eq!(status, 200, "{body}");
    body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

#[actix_web::test]
async fn three_replicas_fetch_each_interval_once_and_every_client_gets_every_update() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let config = format!("{}{}", redis_config(&redis), source_config(&upstream, ""));
    let hubs = [
        TestHub::start(&config).await,
        TestHub::start(&config).await,
        TestHub::start(&config).await,
    ];
    for hub in &hubs {
        eventually(Duration::from_secs(10), "replica ready", || async {
            get_json(&hub.http("/ready")).await.0 == 200
        })
        .await;
    }
    let mut clients = Vec::new();
    for hub in &hubs {
        for _ in 0..3 {
            let mut ws = hub.connect().await;
            ws.subscribe("ticker:ACME").await;
            clients.push(ws);
        }
    }
    // Any replica may start it; the same id comes back from every replica.
    let started = start_job(&hubs[1], "ticker", json!({"symbol": "ACME"})).await;
    assert_eq!(started["channel"], "ticker:ACME");
    let again = start_job(&hubs[2], "ticker", json!({"symbol": "ACME"})).await;
    assert_eq!(again["job"], started["job"]);
    let window_start = upstream.requests("/ticker/ACME");
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let fetched = upstream.requests("/ticker/ACME") - window_start;
    let seconds = began.elapsed().as_secs_f64();
    // One fetch per 1 s interval fleet-wide (three replicas polling would triple it).
    assert!(
        (seconds - 2.0..=seconds + 1.0).contains(&(fetched as f64)),
        "{fetched} upstream requests in {seconds:.1} s"
    );
    let id = started["job"].as_str().unwrap();
    let (status, _) = post_json(&hubs[0].http("/api/polling/stop"), &json!({"job": id}), &[]).await;
    assert_eq!(status, 200);
    let last = get_json(&hubs[0].http("/api/channels/ticker:ACME")).await.1["seq"]
        .as_u64()
        .unwrap();
    assert!(last >= 18, "last seq {last}");
    for ws in &mut clients {
        let mut seen = Vec::new();
        while seen.last() != Some(&last) {
            let frame = ws.recv().await;
            assert!(
                frame["type"] == "message" || frame["type"] == "snapshot",
                "{frame}"
            );
            seen.push(frame["seq"].as_u64().unwrap());
        }
        // Every update, once, in order: consecutive sequence numbers from the first one received.
        let expected: Vec<u64> = (seen[0]..=last).collect();
        assert_eq!(seen, expected);
    }
}

#[actix_web::test]
async fn a_dead_owner_is_replaced_within_the_lease_and_a_graceful_stop_hands_over_at_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let config = format!(
        "{}{}",
        redis_config(&redis),
        source_config(&upstream, "").replace("lease = \"2s\"", "lease = \"4s\"")
    );
    let mut hubs = vec![
        TestHub::start(&config).await,
        TestHub::start(&config).await,
        TestHub::start(&config).await,
    ];
    let started = start_job(&hubs[0], "ticker", json!({"symbol": "X"})).await;
    let id = started["job"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "job owned", || async {
        job_status(&hubs[0], &id).await["owner"].is_string()
    })
    .await;
    let owner_of = |status: &Value| status["owner"].as_str().map(str::to_string);
    let instance = |hub: &TestHub| hub.hub().instance_id().to_string();

    // Kill the owner: no release, its lease must expire (4 s) before another replica takes over.
    let owner = owner_of(&job_status(&hubs[0], &id).await).unwrap();
    let index = hubs.iter().position(|h| instance(h) == owner).unwrap();
    let mut dead = hubs.remove(index);
    dead.kill().await;
    let killed_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "takeover after a crash",
        || async { owner_of(&job_status(&hubs[0], &id).await).is_some_and(|o| o != owner) },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover <= Duration::from_millis(4000 + 1000 + 1500),
        "takeover took {takeover:?}"
    );
    let before = upstream.requests("/ticker/X");
    eventually(Duration::from_secs(5), "fetching resumes", || async {
        upstream.requests("/ticker/X") > before
    })
    .await;

    // Graceful stop of the new owner releases the lease: the last replica takes over well within the lease.
    let owner = owner_of(&job_status(&hubs[0], &id).await).unwrap();
    let index = hubs.iter().position(|h| instance(h) == owner).unwrap();
    let mut leaving = hubs.remove(index);
    leaving.shutdown().await;
    let stopped_at = Instant::now();
    let survivor = instance(&hubs[0]);
    eventually(
        Duration::from_secs(10),
        "takeover after a graceful stop",
        || async {
            owner_of(&job_status(&hubs[0], &id).await).as_deref() == Some(survivor.as_str())
        },
    )
    .await;
    let handover = stopped_at.elapsed();
    assert!(
        handover < Duration::from_millis(3500),
        "graceful handover took {handover:?}, the lease is 4 s"
    );
}

#[actix_web::test]
async fn upstream_failures_keep_the_last_good_value_and_back_off() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"price": 10})));
    let hub = TestHub::start(&source_config(&upstream, "")).await;
    let mut ws = hub.connect().await;
    ws.subscribe("ticker:F").await;
    let started = start_job(&hub, "ticker", json!({"symbol": "F"})).await;
    let id = started["job"].as_str().unwrap().to_string();
    let first = ws.recv_type("message").await;
    assert_eq!(first["data"]["price"], 10);

    for (mode, expected) in [
        (Mode::Status(500), "500"),
        (Mode::Hang, "timed out"),
        (Mode::BadJson, "invalid JSON"),
    ] {
        upstream.set_mode(mode);
        eventually(Duration::from_secs(15), expected, || async {
            let s = job_status(&hub, &id).await;
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(expected))
                && s["state"] == "backoff"
        })
        .await;
        let status = job_status(&hub, &id).await;
        assert!(
            status["consecutive_failures"].as_u64() >= Some(1),
            "{status}"
        );
        assert!(status["next_run"].is_string());
    }
    // Nothing was published while failing: the cached value is still the last good one.
    let (_, latest) = get_json(&hub.http("/api/channels/ticker:F")).await;
    let good_seq = latest["seq"].as_u64().unwrap();
    assert_eq!(latest["data"]["price"], 10);
    let failures = job_status(&hub, &id).await["consecutive_failures"]
        .as_u64()
        .unwrap();
    assert!(
        failures >= 3,
        "three kinds of failure in a row, got {failures}"
    );

    // Recovery: the next fetch publishes again and the failure count resets.
    upstream.set_mode(Mode::Ok(json!({"price": 11})));
    let mut recovered = ws.recv_type("message").await;
    while recovered["data"]["price"] != 11 {
        recovered = ws.recv_type("message").await;
    }
    assert_eq!(
        recovered["seq"],
        good_seq + 1,
        "no message was published during the failures"
    );
    eventually(Duration::from_secs(10), "failures reset", || async {
        let s = job_status(&hub, &id).await;
        s["consecutive_failures"] == 0 && s["state"] == "running"
    })
    .await;
}

#[actix_web::test]
async fn fifty_subscribers_to_an_uncached_channel_share_one_fetch() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"v": "fresh"})));
    let config = format!(
        "{}{}",
        redis_config(&redis),
        source_config(&upstream, "auto_start = true")
            .replace("interval = \"1s\"", "interval = \"1h\"")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        eventually(Duration::from_secs(10), "replica ready", || async {
            get_json(&hub.http("/ready")).await.0 == 200
        })
        .await;
    }
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push(hubs[i % 2].connect().await);
    }
    // All subscribe at once.
    for ws in &mut clients {
        ws.send(json!({"op": "subscribe", "channel": "ticker:SOLO"}))
            .await;
    }
    for ws in &mut clients {
        ws.recv_type("subscribed").await;
        let snapshot = ws.recv_type("snapshot").await;
        assert_eq!(snapshot["data"]["v"], "fresh");
    }
    assert_eq!(upstream.requests("/ticker/SOLO"), 1);
}

#[actix_web::test]
async fn pointer_and_diff_transforms_run_on_fetched_data() {
    let upstream = Upstream::start();
    let chain = |ltp_a: f64, oi_a: i64, ltp_b: f64| json!({"data": [{"strike": 100, "ltp": ltp_a, "oi": oi_a}, {"strike": 110, "ltp": ltp_b, "oi": 5}], "meta": "x"});
    upstream.set_mode(Mode::Ok(chain(5.5, 1000, 2.0)));
    let extra = "transform = [\"/data\", \"diff:strike\"]";
    let hub = TestHub::start(
        &source_config(&upstream, extra).replace("interval = \"1s\"", "interval = \"300ms\""),
    )
    .await;
    let mut ws = hub.connect().await;
    ws.subscribe("ticker:CH").await;
    start_job(&hub, "ticker", json!({"symbol": "CH"})).await;
    let first = ws.recv_type("message").await;
    assert_eq!(
        first["data"],
        json!([{"strike": 100, "ltp": 5.5, "oi": 1000}, {"strike": 110, "ltp": 2.0, "oi": 5}])
    );
    upstream.set_mode(Mode::Ok(chain(7.0, 990, 1.25)));
    let mut next = ws.recv_type("message").await;
    while next["data"][0]["ltp"] != 7.0 {
        next = ws.recv_type("message").await;
    }
    assert_eq!(
        next["data"],
        json!([
            {"strike": 100, "ltp": 7.0, "ltp_change": 1.5, "oi": 990, "oi_change": -10},
            {"strike": 110, "ltp": 1.25, "ltp_change": -0.75, "oi": 5, "oi_change": 0}
        ])
    );
}

#[actix_web::test]
async fn polling_api_validates_parameters_and_requires_the_admin_token() {
    let upstream = Upstream::start();
    let hub = TestHub::start(&format!(
        "[server]\nadmin_token = \"s3cret\"\n{}",
        source_config(&upstream, "")
    ))
    .await;
    let url = hub.http("/api/polling/start");
    let body = json!({"source": "ticker", "params": {"symbol": "A"}});
    assert_eq!(post_json(&url, &body, &[]).await.0, 401);
    assert_eq!(
        post_json(&url, &body, &[("Authorization", "Bearer nope")])
            .await
            .0,
        401
    );
    assert_eq!(get_json(&hub.http("/api/polling/status")).await.0, 401);
    assert_eq!(
        post_json(&hub.http("/api/polling/stop"), &json!({"job": "x"}), &[])
            .await
            .0,
        401
    );
    let auth = [("Authorization", "Bearer s3cret")];
    let cases = [
        (json!({"source": "ticker", "params": {}}), 400, "symbol"),
        (
            json!({"source": "ticker", "params": {"symbol": "A", "extra": "1"}}),
            400,
            "extra",
        ),
        (json!({"source": "nope", "params": {}}), 400, "nope"),
        (
            json!({"source": "ticker", "params": {"symbol": "A B"}}),
            400,
            "invalid",
        ),
        (json!({"params": {}}), 400, "source"),
    ];
    for (body, status, mentions) in cases {
        let (got, reply) = post_json(&url, &body, &auth).await;
        assert_eq!(got, status, "{body} -> {reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains(mentions),
            "{reply}"
        );
    }
    let (status, started) = post_json(&url, &body, &auth).await;
    assert_eq!(status, 200);
    let (status, stopped) = post_json(
        &hub.http("/api/polling/stop"),
        &json!({"job": started["job"]}),
        &auth,
    )
    .await;
    assert_eq!((status, stopped["stopped"].clone()), (200, json!(true)));
    let (status, _) = post_json(
        &hub.http("/api/polling/stop"),
        &json!({"job": started["job"]}),
        &auth,
    )
    .await;
    assert_eq!(status, 404);
}

/// One value of `INFO <section>` of the private Redis (`cmdstat_evalsha` -> its `calls`, or a plain field).
fn redis_info(redis: &RedisServer, section: &str, field: &str) -> u64 {
    let info = redis.cmd(&["INFO", section]).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .map(|rest| {
            let value = rest.strip_prefix("calls=").unwrap_or(rest);
            value
                .split([',', '\r'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .unwrap_or(0)
}

/// The next live message, skipping the snapshots a pattern subscription starts with.
async fn next_message(ws: &mut common::Ws) -> Value {
    loop {
        let frame = ws.recv().await;
        if frame["type"] == "message" {
            return frame;
        }
        assert_eq!(frame["type"], "snapshot", "{frame}");
    }
}

#[actix_web::test]
async fn the_job_limit_is_fleet_wide_and_answers_429_too_many_jobs() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let config = format!(
        "{}{}\n[poller]\nmax_jobs = 3\n",
        redis_config(&redis),
        source_config(&upstream, "").replace("[poller]\nlease = \"2s\"\n", "")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    start_job(&hubs[0], "ticker", json!({"symbol": "A"})).await;
    start_job(&hubs[0], "ticker", json!({"symbol": "B"})).await;
    let c = start_job(&hubs[1], "ticker", json!({"symbol": "C"})).await;
    // The fourth job is refused by either replica: the count is the fleet's, kept in Redis.
    for hub in &hubs {
        let (status, body) = post_json(
            &hub.http("/api/polling/start"),
            &json!({"source": "ticker", "params": {"symbol": "D"}}),
            &[],
        )
        .await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "too_many_jobs", "{body}");
        assert_eq!(hub.stats().await["jobs_refused"], 1);
    }
    assert_eq!(redis.cmd(&["HLEN", "relayhub:jobs"]).unwrap(), ":3\r\n");
    // Starting a job that exists is not a new job: still answered at the limit.
    start_job(&hubs[1], "ticker", json!({"symbol": "A"})).await;
    // A stopped job frees its place.
    let (status, _) = post_json(
        &hubs[0].http("/api/polling/stop"),
        &json!({"job": c["job"]}),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    start_job(&hubs[1], "ticker", json!({"symbol": "D"})).await;
}

#[actix_web::test]
async fn past_the_job_limit_an_auto_start_subscription_works_but_starts_no_job() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"v": 1})));
    let config = format!(
        "{}\n[poller]\nmax_jobs = 2\n",
        source_config(&upstream, "auto_start = true")
            .replace("[poller]\nlease = \"2s\"\n", "")
            .replace("interval = \"1s\"", "interval = \"1h\"")
    );
    let hub = TestHub::start(&config).await;
    for symbol in ["A", "B"] {
        let mut ws = hub.connect().await;
        ws.subscribe(&format!("ticker:{symbol}")).await;
        assert_eq!(ws.recv().await["data"]["v"], 1);
    }
    let mut ws = hub.connect().await;
    // Many more channels: each subscription is acknowledged, none creates a job.
    for i in 0..20 {
        ws.subscribe(&format!("ticker:X{i}")).await;
    }
    ws.ping().await;
    eventually(Duration::from_secs(10), "20 refusals counted", || async {
        hub.stats().await["jobs_refused"] == 20
    })
    .await;
    let (_, jobs) = get_json(&hub.http("/api/polling/status")).await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2, "{jobs}");
    assert_eq!(upstream.requests("/ticker/X0"), 0);
    // The connection still works for the channels that have jobs.
    ws.ping().await;
}

#[actix_web::test]
async fn a_job_scan_costs_a_constant_number_of_redis_round_trips_whatever_the_job_count() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"v": 1})));
    let config = format!(
        "{}{}",
        redis_config(&redis),
        // Fetch once at start, then not for an hour: what Redis sees afterwards is the scans.
        source_config(&upstream, "").replace("interval = \"1s\"", "interval = \"1h\"")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    const JOBS: usize = 60;
    for i in 0..JOBS {
        start_job(&hubs[i % 2], "ticker", json!({"symbol": format!("S{i}")})).await;
    }
    eventually(
        Duration::from_secs(20),
        "every job owned and fetched",
        || async {
            let (_, body) = get_json(&hubs[0].http("/api/polling/status")).await;
            let jobs = body["jobs"].as_array().unwrap().clone();
            jobs.len() == JOBS
                && jobs
                    .iter()
                    .all(|j| j["owner"].is_string() && j["fetches"] == 1)
        },
    )
    .await;
    // Each scan lists the jobs once (HGETALL), so its calls count the scans; reads count the round trips (a
    // pipeline or one script arrives in one read, a command per job in one read each).
    let scans_before = redis_info(&redis, "commandstats", "cmdstat_hgetall");
    let reads_before = redis_info(&redis, "stats", "total_reads_processed");
    let scripts_before = redis_info(&redis, "commandstats", "cmdstat_evalsha");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scans = redis_info(&redis, "commandstats", "cmdstat_hgetall") - scans_before;
    let reads = redis_info(&redis, "stats", "total_reads_processed") - reads_before;
    let scripts = redis_info(&redis, "commandstats", "cmdstat_evalsha") - scripts_before;
    assert!(scans >= 2, "{scans} scans in 3 s with a 2 s lease");
    // Both replicas scan: each scan renews its own ~30 jobs and tries to take the other ~30.
    assert!(
        reads <= scans * 12 + 20,
        "{reads} reads for {scans} scans of {JOBS} jobs: a round trip per job"
    );
    assert!(
        scripts <= scans * 2 + 4,
        "{scripts} script calls for {scans} scans of {JOBS} jobs"
    );
}

#[actix_web::test]
async fn a_pattern_subscriber_on_another_replica_keeps_an_auto_stop_job_running() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"v": 1})));
    let config = format!(
        "{}{}\n[namespaces.ticker]\npatterns = true\n",
        redis_config(&redis),
        source_config(
            &upstream,
            "auto_start = true\nauto_stop = true\nidle_grace = \"1s\"\nonly_on_change = false"
        )
        .replace("interval = \"1s\"", "interval = \"300ms\"")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    let mut exact = hubs[0].connect().await;
    exact.subscribe("ticker:P").await;
    exact.recv_type("snapshot").await;
    let id = job_status_any(&hubs[0]).await;
    // The pattern subscriber sits on the replica that does not run the job.
    let other = replica_not_owning(&hubs, &id).await;
    let mut pattern = other.connect().await;
    pattern.subscribe("ticker:*").await;
    next_message(&mut pattern).await;
    exact.close().await;
    // Well past the idle grace and several scans.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, body) = get_json(&hubs[0].http("/api/polling/status")).await;
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1, "{body}");
    let before = next_message(&mut pattern).await["seq"].as_u64().unwrap();
    let mut later = before;
    while later < before + 3 {
        later = next_message(&mut pattern).await["seq"].as_u64().unwrap();
    }
    // With no subscriber at all the job does stop.
    pattern.close().await;
    eventually(Duration::from_secs(15), "the idle job stops", || async {
        let (_, body) = get_json(&hubs[0].http("/api/polling/status")).await;
        body["jobs"].as_array().unwrap().is_empty()
    })
    .await;
}

/// A fast source (200 ms) on the memory engine, with `extra` source keys.
async fn fast_hub(upstream: &Upstream, extra: &str) -> TestHub {
    TestHub::start(
        &source_config(upstream, extra).replace("interval = \"1s\"", "interval = \"200ms\""),
    )
    .await
}

async fn channel_seq(hub: &TestHub, channel: &str) -> Option<u64> {
    get_json(&hub.http(&format!("/api/channels/{channel}")))
        .await
        .1["seq"]
        .as_u64()
}

#[actix_web::test]
async fn conditional_requests_send_the_validators_back_and_a_304_publishes_nothing() {
    let upstream = Upstream::start();
    let etag = "\"v1\"";
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    upstream.set_mode(Mode::Conditional {
        value: json!({"price": 10}),
        etag: etag.into(),
        last_modified: date.into(),
    });
    let hub = fast_hub(&upstream, "").await;
    let mut ws = hub.connect().await;
    ws.subscribe("ticker:CND").await;
    let id = start_job(&hub, "ticker", json!({"symbol": "CND"})).await["job"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(ws.recv_type("message").await["data"], json!({"price": 10}));
    eventually(Duration::from_secs(10), "three 304 answers", || async {
        upstream.not_modified() >= 3
    })
    .await;
    // The first request is unconditional; the later ones carry both validators.
    let conditions = upstream.conditions();
    assert_eq!(conditions[0], (String::new(), String::new()));
    assert_eq!(conditions[1], (etag.to_string(), date.to_string()));
    // Nothing published after the first value.
    assert_eq!(channel_seq(&hub, "ticker:CND").await, Some(1));
    let status = job_status(&hub, &id).await;
    assert!(status["not_modified"].as_u64().unwrap() >= 3, "{status}");
    assert_eq!(status["consecutive_failures"], 0, "{status}");
    assert!(hub.stats().await["poll_not_modified"].as_u64().unwrap() >= 3);
    // A new document is published (and its new ETag used from then on).
    upstream.set_mode(Mode::Conditional {
        value: json!({"price": 11}),
        etag: "\"v2\"".into(),
        last_modified: date.into(),
    });
    assert_eq!(ws.recv_type("message").await["data"], json!({"price": 11}));
    let before = upstream.not_modified();
    eventually(
        Duration::from_secs(10),
        "a 304 for the new ETag",
        || async { upstream.not_modified() > before },
    )
    .await;
    assert_eq!(channel_seq(&hub, "ticker:CND").await, Some(2));
}

#[actix_web::test]
async fn retry_after_in_seconds_or_as_a_date_puts_the_next_fetch_off() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::RetryAfter(429, "4".into()));
    let hub = fast_hub(&upstream, "").await;
    let id = start_job(&hub, "ticker", json!({"symbol": "RA"})).await["job"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(10), "retry_at shown", || async {
        job_status(&hub, &id).await["retry_at"].is_string()
    })
    .await;
    // Backoff from a 200 ms interval would have asked several times by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(upstream.requests("/ticker/RA"), 1);
    assert_eq!(hub.stats().await["poll_retry_after"], 1);

    // An HTTP date, 4 s ahead, on a 503.
    let upstream = Upstream::start();
    let at = std::time::SystemTime::now() + Duration::from_secs(4);
    upstream.set_mode(Mode::RetryAfter(503, httpdate::fmt_http_date(at)));
    let hub = fast_hub(&upstream, "").await;
    start_job(&hub, "ticker", json!({"symbol": "RB"})).await;
    eventually(Duration::from_secs(10), "first request", || async {
        upstream.requests("/ticker/RB") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(upstream.requests("/ticker/RB"), 1);
}

#[actix_web::test]
async fn a_retry_after_longer_than_max_retry_after_is_cut_short() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::RetryAfter(429, "86400".into()));
    let hub = fast_hub(&upstream, "max_retry_after = \"300ms\"").await;
    start_job(&hub, "ticker", json!({"symbol": "RC"})).await;
    eventually(Duration::from_secs(10), "asked again soon", || async {
        upstream.requests("/ticker/RC") >= 3
    })
    .await;
}

#[actix_web::test]
async fn on_change_publishes_an_unchanged_value_once_and_keeps_it_cached() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Fixed(json!({"v": 1})));
    let hub = fast_hub(&upstream, "ttl = \"2s\"").await;
    let id = start_job(&hub, "ticker", json!({"symbol": "OC"})).await["job"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(10), "ten fetches", || async {
        upstream.requests("/ticker/OC") >= 10
    })
    .await;
    // Past the 2 s TTL of the one value published: still cached, never published again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(channel_seq(&hub, "ticker:OC").await, Some(1));
    let status = job_status(&hub, &id).await;
    assert!(status["unchanged"].as_u64().unwrap() >= 9, "{status}");
    assert!(status["last_change"].is_string(), "{status}");
    assert_eq!(status["stale"], false, "{status}");
    assert!(hub.stats().await["poll_unchanged"].as_u64().unwrap() >= 9);
    // A change is published.
    upstream.set_mode(Mode::Fixed(json!({"v": 2})));
    eventually(Duration::from_secs(10), "the change published", || async {
        channel_seq(&hub, "ticker:OC").await == Some(2)
    })
    .await;

    // `publish = "always"` publishes every fetch.
    let hub = fast_hub(&upstream, "publish = \"always\"").await;
    start_job(&hub, "ticker", json!({"symbol": "AL"})).await;
    eventually(Duration::from_secs(10), "every fetch published", || async {
        channel_seq(&hub, "ticker:AL").await >= Some(4)
    })
    .await;
}

#[actix_web::test]
async fn a_job_without_success_for_stale_after_is_stale() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Status(500));
    let hub = fast_hub(&upstream, "stale_after = \"500ms\"").await;
    let id = start_job(&hub, "ticker", json!({"symbol": "ST"})).await["job"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(10), "stale", || async {
        job_status(&hub, &id).await["stale"] == true
    })
    .await;
    upstream.set_mode(Mode::Ok(json!({})));
    eventually(Duration::from_secs(20), "fresh again", || async {
        job_status(&hub, &id).await["stale"] == false
    })
    .await;
}

#[actix_web::test]
async fn three_replicas_share_one_max_requests_per_minute_budget() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let config = format!(
        "{}{}",
        redis_config(&redis),
        source_config(&upstream, "max_requests_per_minute = 60")
            .replace("interval = \"1s\"", "interval = \"200ms\"")
    );
    let hubs = [
        TestHub::start(&config).await,
        TestHub::start(&config).await,
        TestHub::start(&config).await,
    ];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    // Two jobs started on each replica: each replica owns the ones it started.
    for (i, symbol) in ["A", "B", "C", "D", "E", "F"].iter().enumerate() {
        start_job(&hubs[i % 3], "ticker", json!({"symbol": symbol})).await;
    }
    let start = upstream.requests("");
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let made = upstream.requests("") - start;
    let seconds = began.elapsed().as_secs_f64();
    // One request a second fleet-wide (30 a second without the budget).
    assert!(
        (made as f64) <= seconds + 2.0,
        "{made} requests in {seconds:.1} s"
    );
    assert!(made >= 3, "{made} requests in {seconds:.1} s");
    let mut delayed = 0;
    let mut owners = std::collections::HashSet::new();
    for hub in &hubs {
        delayed += hub.stats().await["poll_delayed"].as_u64().unwrap();
    }
    assert!(delayed > 0);
    // Delayed, not dropped: every job gets its turns.
    eventually(Duration::from_secs(30), "every job fetched", || async {
        let (_, body) = get_json(&hubs[0].http("/api/polling/status")).await;
        body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["fetches"].as_u64().unwrap_or(0) >= 1)
    })
    .await;
    let (_, body) = get_json(&hubs[0].http("/api/polling/status")).await;
    for job in body["jobs"].as_array().unwrap() {
        owners.insert(job["owner"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(owners.len(), 3, "{body}");
}

#[actix_web::test]
async fn refresh_fetches_now_from_any_replica_and_concurrent_refreshes_share_one_request() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"v": 1})));
    let config = format!(
        "{}{}",
        redis_config(&redis),
        source_config(&upstream, "").replace("interval = \"1s\"", "interval = \"1h\"")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    // Started on the first replica, which owns it from then on.
    let id = start_job(&hubs[0], "ticker", json!({"symbol": "RF"})).await["job"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(
        Duration::from_secs(10),
        "the first fetch published",
        || async { channel_seq(&hubs[0], "ticker:RF").await == Some(1) },
    )
    .await;
    assert_eq!(upstream.requests("/ticker/RF"), 1);
    // Ten refreshes at once, while the upstream takes its time: one request.
    upstream.set_mode(Mode::Hang);
    let url = hubs[0].http("/api/polling/refresh");
    let body = json!({"job": id});
    let answers =
        futures_util::future::join_all((0..10).map(|_| post_json(&url, &body, &[]))).await;
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["owner_here"], true, "{answer}");
    }
    // The hanging request times out after 500 ms.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(upstream.requests("/ticker/RF"), 2);
    // From the replica that does not own it: the owner fetches at its next scan.
    upstream.set_mode(Mode::Ok(json!({"v": 2})));
    let (status, answer) = post_json(&hubs[1].http("/api/polling/refresh"), &body, &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["owner_here"], false, "{answer}");
    eventually(Duration::from_secs(10), "the refreshed value", || async {
        get_json(&hubs[1].http("/api/channels/ticker:RF")).await.1["data"]["v"] == 2
    })
    .await;
    assert_eq!(upstream.requests("/ticker/RF"), 3);
    let (status, _) = post_json(
        &hubs[1].http("/api/polling/refresh"),
        &json!({"job": "ticker@nope"}),
        &[],
    )
    .await;
    assert_eq!(status, 404);
}

/// A tickers document: one row per symbol, `bid` and `ask` from `price(symbol index)`.
fn tickers(count: usize, price: impl Fn(usize) -> f64) -> Value {
    let rows: Vec<Value> = (0..count)
        .map(|i| json!({"s": format!("S{i}"), "bid": price(i), "ask": price(i) + 2.0}))
        .collect();
    json!({"data": rows})
}

fn split_config(upstream: &Upstream, extra: &str) -> String {
    format!(
        r#"
[poller]
lease = "2s"

[[sources]]
name = "tickers"
url = "{}"
channel = "prices:{{key}}"
interval = "200ms"
timeout = "500ms"
split = "/data"
split_key = "s"
max_split_elements = 50
transform = ["diff"]
{extra}
"#,
        upstream.url("/tickers")
    )
}

#[actix_web::test]
async fn one_fetch_publishes_each_element_to_its_own_channel_and_only_the_changed_ones() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Fixed(tickers(50, |i| i as f64)));
    let config = format!("{}{}", redis_config(&redis), split_config(&upstream, ""));
    let hub = TestHub::start(&config).await;
    wait_ready(&hub).await;
    let mut a = hub.connect().await;
    a.subscribe("prices:S1").await;
    let mut b = hub.connect().await;
    b.subscribe("prices:S2").await;
    let started = start_job(&hub, "tickers", json!({})).await;
    let id = started["job"].as_str().unwrap().to_string();
    assert_eq!(id, "tickers@prices:*");
    assert_eq!(a.recv_type("message").await["data"]["bid"], 1.0);
    assert_eq!(b.recv_type("message").await["data"]["bid"], 2.0);
    eventually(Duration::from_secs(10), "every channel cached", || async {
        channel_seq(&hub, "prices:S49").await == Some(1)
    })
    .await;
    let status = job_status(&hub, &id).await;
    assert_eq!(status["split_channels"], 50, "{status}");
    assert_eq!(status["split_dropped"], 0, "{status}");
    // One request per interval for 50 channels.
    let fetches = upstream.requests("/tickers");
    eventually(
        Duration::from_secs(10),
        "a few unchanged fetches",
        || async { upstream.requests("/tickers") >= fetches + 3 },
    )
    .await;
    assert_eq!(channel_seq(&hub, "prices:S1").await, Some(1));

    // Only S2 changes: only its channel is published, with its own diff.
    upstream.set_mode(Mode::Fixed(tickers(50, |i| {
        if i == 2 { 5.0 } else { i as f64 }
    })));
    let changed = b.recv_type("message").await;
    assert_eq!(changed["seq"], 2, "{changed}");
    assert_eq!(changed["data"]["bid"], 5.0, "{changed}");
    assert_eq!(changed["data"]["bid_change"], 3.0, "{changed}");
    let after = upstream.requests("/tickers");
    eventually(Duration::from_secs(10), "more fetches", || async {
        upstream.requests("/tickers") >= after + 3
    })
    .await;
    for (channel, seq) in [("prices:S1", 1), ("prices:S2", 2), ("prices:S30", 1)] {
        assert_eq!(channel_seq(&hub, channel).await, Some(seq), "{channel}");
    }
    // Its own history too.
    let (_, history) = get_json(&hub.http("/api/channels/prices:S2/history")).await;
    assert_eq!(
        history["items"].as_array().map(Vec::len),
        Some(2),
        "{history}"
    );

    // An upstream sending more elements than max_split_elements: the first 50 are published, the rest
    // dropped, counted and reported; no channel is made for them.
    upstream.set_mode(Mode::Fixed(tickers(80, |i| i as f64 + 100.0)));
    eventually(
        Duration::from_secs(10),
        "over the bound reported",
        || async { job_status(&hub, &id).await["split_dropped"] == 30 },
    )
    .await;
    let status = job_status(&hub, &id).await;
    assert_eq!(status["split_channels"], 50, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("max_split_elements = 50")),
        "{status}"
    );
    assert!(hub.stats().await["poll_split_over_limit"].as_u64().unwrap() >= 1);
    assert_eq!(channel_seq(&hub, "prices:S49").await, Some(2));
    assert_eq!(channel_seq(&hub, "prices:S50").await, None);
    let exists = redis.cmd(&["EXISTS", "relayhub:cache:prices:S50"]).unwrap();
    assert_eq!(common::int_reply(&exists), 0);
    // A key is a parameter of no job: giving it is a 400.
    let (status, body) = post_json(
        &hub.http("/api/polling/start"),
        &json!({"source": "tickers", "params": {"key": "S1"}}),
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[actix_web::test]
async fn meta_frames_carry_the_fetch_time_on_every_replica_and_in_snapshots() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Fixed(json!({"v": 1})));
    let config = format!(
        "{}{}",
        redis_config(&redis),
        source_config(&upstream, "meta = true").replace("interval = \"1s\"", "interval = \"1h\"")
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    let mut far = hubs[1].connect().await;
    far.subscribe("ticker:M").await;
    let before = chrono::Utc::now();
    start_job(&hubs[0], "ticker", json!({"symbol": "M"})).await;
    // Relayed through Redis to the replica that does not own the job.
    let frame = far.recv_type("message").await;
    assert_eq!(frame["data"], json!({"v": 1}), "{frame}");
    let fetched_at = frame["fetched_at"]
        .as_str()
        .expect("fetched_at")
        .to_string();
    let at = chrono::DateTime::parse_from_rfc3339(&fetched_at).unwrap();
    assert!(at >= before - chrono::Duration::seconds(1), "{frame}");
    assert!(
        frame["ts"].as_str().unwrap() >= fetched_at.as_str(),
        "{frame}"
    );
    // A later subscriber's snapshot (read from the cache) and the REST view carry it too.
    for hub in &hubs {
        let mut ws = hub.connect().await;
        ws.subscribe("ticker:M").await;
        let snapshot = ws.recv_type("snapshot").await;
        assert_eq!(snapshot["fetched_at"], fetched_at.as_str(), "{snapshot}");
        let (_, latest) = get_json(&hub.http("/api/channels/ticker:M")).await;
        assert_eq!(latest["fetched_at"], fetched_at.as_str(), "{latest}");
    }
    // Without `meta`, no fetched_at.
    let hub = fast_hub(&upstream, "").await;
    let mut ws = hub.connect().await;
    ws.subscribe("ticker:N").await;
    start_job(&hub, "ticker", json!({"symbol": "N"})).await;
    let frame = ws.recv_type("message").await;
    assert!(frame.get("fetched_at").is_none(), "{frame}");
}

#[actix_web::test]
async fn derive_computes_fields_per_element_before_diff() {
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Fixed(tickers(3, |i| 100.0 + i as f64)));
    let hub = TestHub::start(&split_config(
        &upstream,
        r#"derive = ["mid = (bid + ask) / 2", "spread_pct = (ask - bid) / mid * 100"]"#,
    ))
    .await;
    let mut ws = hub.connect().await;
    ws.subscribe("prices:S0").await;
    start_job(&hub, "tickers", json!({})).await;
    let first = ws.recv_type("message").await;
    assert_eq!(first["data"]["mid"], 101, "{first}");
    assert_eq!(first["data"]["spread_pct"], 1.98019802, "{first}");
    // The derived fields are diffed like the others.
    upstream.set_mode(Mode::Fixed(tickers(3, |i| 104.0 + i as f64)));
    let next = ws.recv_type("message").await;
    assert_eq!(next["data"]["mid"], 105, "{next}");
    assert_eq!(next["data"]["mid_change"], 4, "{next}");
    let (_, s2) = get_json(&hub.http("/api/channels/prices:S2")).await;
    assert_eq!(s2["data"]["mid"], 107, "{s2}");
}

#[actix_web::test]
async fn a_split_job_starts_and_stops_with_subscribers_of_its_element_channels_on_any_replica() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Fixed(tickers(5, |i| i as f64)));
    let config = format!(
        "{}{}",
        redis_config(&redis),
        split_config(
            &upstream,
            "auto_start = true\nauto_stop = true\nidle_grace = \"1s\""
        )
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    // A subscriber to one element channel starts the job; its value comes as the snapshot.
    let mut first = hubs[0].connect().await;
    first.subscribe("prices:S3").await;
    assert_eq!(first.recv_type("snapshot").await["data"]["bid"], 3.0);
    let id = "tickers@prices:*";
    // The status counts the subscribers of its element channels.
    eventually(Duration::from_secs(10), "the job listed", || async {
        !job_status(&hubs[0], id).await.is_null()
    })
    .await;
    // The count is the fleet's, as each replica's scan records it: it appears within a quarter lease.
    eventually(
        Duration::from_secs(10),
        "one subscriber counted",
        || async { job_status(&hubs[0], id).await["subscribers"] == 1 },
    )
    .await;
    // Another element's subscriber on the replica that does not run the job keeps it running.
    let other = replica_not_owning(&hubs, id).await;
    let mut far = other.connect().await;
    far.subscribe("prices:S1").await;
    far.recv_type("snapshot").await;
    first.close().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(job_status(&hubs[0], id).await["id"], id);
    // Nobody listening anywhere: it stops.
    far.close().await;
    eventually(
        Duration::from_secs(15),
        "the idle split job stops",
        || async { job_status(&hubs[0], id).await.is_null() },
    )
    .await;
}
