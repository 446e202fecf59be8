//! The HTTP API of one hub in memory mode: publish validation, limits and the API key, the REST view of
//! channels, stats, health, CORS and the static files.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::{TestHub, eventually, get_json, post_raw, request};

/// Asserts the API's error shape with the given status and code, and returns the message.
fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "an error says what is wrong: {body}");
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error`: {body}"
    );
    message.to_string()
}

async fn publish_raw(hub: &TestHub, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    post_raw(&hub.http("/api/publish"), body.as_bytes().to_vec(), headers).await
}

#[actix_web::test]
async fn publish_refuses_bad_bodies_with_400() {
    let hub = TestHub::start("[channels]\nstrict_namespaces = true\n").await;
    let long = format!(r#"{{"channel":"prices:{}","data":1}}"#, "x".repeat(200));
    let cases: &[(&str, &str)] = &[
        ("", "bad_request"),
        ("not json", "bad_request"),
        (r#"{"channel":"prices:A","data":"#, "bad_request"),
        ("[1, 2]", "bad_request"),
        (r#""prices:A""#, "bad_request"),
        (r#"{"channel":"prices:A"}"#, "bad_request"),
        (r#"{"data":1}"#, "bad_request"),
        (r#"{"channel":5,"data":1}"#, "bad_request"),
        (
            r#"{"channel":"prices:A","data":1,"extra":true}"#,
            "bad_request",
        ),
        (r#"{"channel":"prices:A","data":1,"id":7}"#, "bad_request"),
        (r#"{"channel":"","data":1}"#, "invalid_channel"),
        (r#"{"channel":"has space","data":1}"#, "invalid_channel"),
        (r#"{"channel":"prices/A","data":1}"#, "invalid_channel"),
        (r#"{"channel":"prices:*","data":1}"#, "invalid_channel"),
        (long.as_str(), "invalid_channel"),
        (r#"{"channel":"nowhere:A","data":1}"#, "invalid_channel"),
    ];
    for (body, code) in cases {
        let (status, reply) = publish_raw(&hub, body, &[]).await;
        assert_error(status, &reply, 400, code);
    }
    // None of it was published.
    let (status, _) = get_json(&hub.http("/api/channels/prices:A")).await;
    assert_eq!(status, 404);
    assert_eq!(hub.stats().await["messages_published"], 0);

    let (status, reply) =
        publish_raw(&hub, r#"{"channel":"prices:A","data":{"p":[1,null]}}"#, &[]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"channel": "prices:A", "seq": 1, "delivered": 0, "relayed": true})
    );
}

#[actix_web::test]
async fn publish_body_over_max_message_bytes_is_413() {
    let hub = TestHub::start("[websocket]\nmax_message_bytes = 1024\n").await;
    let body_of = |len: usize| {
        let head = r#"{"channel":"prices:BIG","data":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "a".repeat(len - head.len() - tail.len()))
    };
    let (status, reply) = publish_raw(&hub, &body_of(1025), &[]).await;
    assert_error(status, &reply, 413, "too_large");
    let (status, reply) = publish_raw(&hub, &body_of(8 * 1024), &[]).await;
    assert_error(status, &reply, 413, "too_large");
    assert_eq!(get_json(&hub.http("/api/channels/prices:BIG")).await.0, 404);
    // Exactly at the limit is fine.
    let (status, reply) = publish_raw(&hub, &body_of(1024), &[]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["seq"], 1);
}

#[actix_web::test]
async fn publish_needs_the_api_key_when_one_is_set() {
    let hub = TestHub::start("[server]\napi_key = \"k\"\n").await;
    let body = r#"{"channel":"prices:KEY","data":1}"#;
    for headers in [
        &[][..],
        &[("Authorization", "Bearer wrong")],
        &[("Authorization", "Bearer kk")],
        &[("Authorization", "Bearer ")],
        &[("Authorization", "Basic k")],
        &[("Authorization", "k")],
    ] {
        let (status, reply) = publish_raw(&hub, body, headers).await;
        assert_error(status, &reply, 401, "unauthorized");
    }
    assert_eq!(get_json(&hub.http("/api/channels/prices:KEY")).await.0, 404);
    let (status, reply) = publish_raw(&hub, body, &[("Authorization", "Bearer k")]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["seq"], 1);
    // A wrong key is refused before the body is looked at.
    let (status, reply) = publish_raw(&hub, "not json", &[("Authorization", "Bearer wrong")]).await;
    assert_error(status, &reply, 401, "unauthorized");
}

#[actix_web::test]
async fn channels_latest_value_and_history() {
    let hub = TestHub::start("").await;
    let (status, body) = get_json(&hub.http("/api/channels/prices:REST")).await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = get_json(&hub.http("/api/channels/bad%20name")).await;
    assert_error(status, &body, 400, "invalid_channel");

    for n in 1..=5 {
        hub.publish("prices:REST", json!({"n": n})).await;
    }
    let reply = request("GET", &hub.http("/api/channels/prices:REST"), &[], None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 4, "{body}");
    assert_eq!(
        (&body["channel"], &body["data"], &body["seq"]),
        (&json!("prices:REST"), &json!({"n": 5}), &json!(5))
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(body["ts"].as_str().expect("ts")).is_ok(),
        "{body}"
    );

    // history_size is 3 by default: at most the last three, newest first.
    for (query, count) in [
        ("?limit=1", 1),
        ("?limit=2", 2),
        ("?limit=3", 3),
        ("?limit=10", 3),
        ("", 3),
    ] {
        let (status, body) =
            get_json(&hub.http(&format!("/api/channels/prices:REST/history{query}"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["channel"], "prices:REST");
        let items = body["items"].as_array().expect("items");
        assert_eq!(items.len(), count, "{query}: {body}");
        for (k, item) in items.iter().enumerate() {
            let n = 5 - k as u64;
            assert_eq!(item["data"], json!({"n": n}), "{body}");
            assert_eq!(item["seq"], n, "{body}");
            assert!(item["ts"].is_string(), "{body}");
        }
    }
    // The data comes back as published: key order and number digits untouched.
    let raw = r#"{"z":1,"a":[0.10000000000000000555,12345678901234567890123],"m":{"y":null,"b":"\u00e9"}}"#;
    let body = format!(r#"{{"channel":"prices:RAW","data":{raw}}}"#);
    assert_eq!(
        post_raw(&hub.http("/api/publish"), body.into_bytes(), &[])
            .await
            .0,
        200
    );
    for path in [
        "/api/channels/prices:RAW",
        "/api/channels/prices:RAW/history",
    ] {
        let text = request("GET", &hub.http(path), &[], None).await.text();
        assert!(text.contains(&format!(r#""data":{raw}"#)), "{path}: {text}");
    }
    let (status, body) = get_json(&hub.http("/api/channels/prices:NONE/history")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["channel"], &body["seq"], &body["items"]),
        (&json!("prices:NONE"), &json!(0), &json!([]))
    );
    assert!(body["epoch"].is_string(), "{body}");
    for query in ["?limit=abc", "?limit=-1"] {
        let (status, body) =
            get_json(&hub.http(&format!("/api/channels/prices:REST/history{query}"))).await;
        assert_error(status, &body, 400, "bad_request");
    }
    let (status, body) = get_json(&hub.http("/api/channels/bad%20name/history")).await;
    assert_error(status, &body, 400, "invalid_channel");
}

#[actix_web::test]
async fn stats_report_this_instance() {
    let hub = TestHub::start("[server]\ninstance_id = \"stats-1\"\n").await;
    let stats = hub.stats().await;
    assert_eq!(stats["instance_id"], "stats-1");
    assert_eq!(stats["mode"], "memory");
    assert_eq!(stats["connections"], 0);
    assert_eq!(stats["subscribers"], json!({}));
    assert!(stats["uptime_seconds"].is_u64(), "{stats}");

    let mut one = hub.connect().await;
    let mut two = hub.connect().await;
    one.subscribe("prices:S").await;
    one.subscribe("chat:S").await;
    two.subscribe("chat:S").await;
    eventually(
        Duration::from_secs(10),
        "stats count both connections",
        || async {
            let stats = hub.stats().await;
            stats["connections"] == 2 && stats["subscribers"] == json!({"prices:S": 1, "chat:S": 2})
        },
    )
    .await;
    hub.publish("chat:S", json!("hi")).await;
    one.recv_type("message").await;
    two.recv_type("message").await;
    eventually(
        Duration::from_secs(10),
        "published and delivered counted",
        || async {
            let stats = hub.stats().await;
            stats["messages_published"] == 1 && stats["messages_delivered"] == 2
        },
    )
    .await;
    let stats = hub.stats().await;
    assert_eq!(
        (&stats["channels"], &stats["subscriptions"]),
        (&json!(2), &json!(3)),
        "{stats}"
    );
    assert_eq!(
        (&stats["pubsub_active"], &stats["ready"]),
        (&json!(false), &json!(true)),
        "{stats}"
    );

    two.close().await;
    eventually(
        Duration::from_secs(10),
        "a closed connection leaves the stats",
        || async {
            let stats = hub.stats().await;
            stats["connections"] == 1 && stats["subscribers"] == json!({"prices:S": 1, "chat:S": 1})
        },
    )
    .await;
}

#[actix_web::test]
async fn health_and_ready() {
    let hub = TestHub::start("").await;
    let (status, body) = get_json(&hub.http("/health")).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"status": "ok", "mode": "memory", "degraded": null, "redis": null})
        )
    );
    let (status, body) = get_json(&hub.http("/ready")).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"status": "ready", "mode": "memory", "degraded": null})
        )
    );
}

#[actix_web::test]
async fn unknown_api_paths_answer_the_error_shape() {
    let hub = TestHub::start("").await;
    let (status, body) = get_json(&hub.http("/api/nope")).await;
    assert_error(status, &body, 404, "not_found");
    let reply = request("GET", &hub.http("/api/publish"), &[], None).await;
    assert!(
        reply.status == 404 || reply.status == 405,
        "{}",
        reply.status
    );
    assert!(
        reply.json()["error"]["code"].is_string(),
        "{}",
        reply.text()
    );
}

#[actix_web::test]
async fn cors_follows_allowed_origins() {
    let hub = TestHub::start(
        "[server]\nallowed_origins = [\"https://app.example.com\", \"http://localhost:*\"]\n",
    )
    .await;
    let preflight = |origin: &'static str| {
        let url = hub.http("/api/publish");
        async move {
            let headers = [
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type",
                ),
            ];
            request("OPTIONS", &url, &headers, None).await
        }
    };
    for origin in ["https://app.example.com", "http://localhost:5173"] {
        let reply = preflight(origin).await;
        assert!(reply.status < 300, "{}", reply.status);
        assert_eq!(reply.header("access-control-allow-origin"), Some(origin));
        assert!(
            reply
                .header("access-control-allow-methods")
                .is_some_and(|m| m.contains("POST"))
        );
        let allowed = reply
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            allowed.contains("authorization") && allowed.contains("content-type"),
            "{allowed}"
        );
    }
    for origin in [
        "https://evil.example.com",
        "http://localhost.evil.com:80",
        "null",
    ] {
        let reply = preflight(origin).await;
        assert_eq!(
            reply.header("access-control-allow-origin"),
            None,
            "{origin}"
        );
        assert_eq!(
            reply.header("access-control-allow-methods"),
            None,
            "{origin}"
        );
    }

    // Plain requests: tagged for an allowed origin only.
    let stats_url = hub.http("/api/stats");
    let reply = request(
        "GET",
        &stats_url,
        &[("Origin", "https://app.example.com")],
        None,
    )
    .await;
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(reply.header("vary").is_some_and(|v| v.contains("Origin")));
    let reply = request(
        "GET",
        &stats_url,
        &[("Origin", "https://evil.example.com")],
        None,
    )
    .await;
    assert_eq!(reply.header("access-control-allow-origin"), None);

    // A page of a disallowed origin cannot publish through its visitors' browsers (a form or `text/plain`
    // POST needs no preflight); servers, which send no Origin, and allowed pages can.
    let body = br#"{"channel":"prices:CORS","data":1}"#.to_vec();
    let url = hub.http("/api/publish");
    let evil = [
        ("Origin", "https://evil.example.com"),
        ("Content-Type", "text/plain"),
    ];
    let reply = request("POST", &url, &evil, Some(body.clone())).await;
    assert_error(reply.status, &reply.json(), 403, "forbidden");
    assert_eq!(
        get_json(&hub.http("/api/channels/prices:CORS")).await.0,
        404
    );
    let app = [
        ("Origin", "https://app.example.com"),
        ("Content-Type", "application/json"),
    ];
    let reply = request("POST", &url, &app, Some(body.clone())).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let reply = request(
        "POST",
        &url,
        &[("Content-Type", "application/json")],
        Some(body),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[actix_web::test]
async fn static_files_are_served_and_nothing_else() {
    let hub = TestHub::start("").await;
    let web = concat!(env!("CARGO_MANIFEST_DIR"), "/web");
    let reply = request("GET", &hub.http("/"), &[], None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{:?}",
        reply.headers
    );
    assert_eq!(
        reply.body,
        std::fs::read(format!("{web}/index.html")).unwrap()
    );
    for (name, kind) in [
        ("relayhub.js", "javascript"),
        ("index.html", "text/html"),
        ("style.css", "text/css"),
    ] {
        let reply = request("GET", &hub.http(&format!("/{name}")), &[], None).await;
        assert_eq!(reply.status, 200, "{name}");
        assert!(
            reply
                .header("content-type")
                .is_some_and(|c| c.contains(kind)),
            "{name}: {:?}",
            reply.headers
        );
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(
            reply.body,
            std::fs::read(format!("{web}/{name}")).unwrap(),
            "{name}"
        );
    }
    for path in [
        "/..%2Fsrc%2Flib.rs",
        "/..%2FCargo.toml",
        "/%2e%2e%2fCargo.toml",
        "/%2E%2E%2FCargo.toml",
        "/..%5CCargo.toml",
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/web%2Findex.html",
        "/%2Fetc%2Fpasswd",
        "/..",
        "/.",
        "/.git",
        "/index.html%00.js",
        "/nothing-here.js",
        "/src/lib.rs",
    ] {
        let reply = request("GET", &hub.http(path), &[], None).await;
        assert_eq!(reply.status, 404, "{path}");
        let text = reply.text();
        assert!(
            !text.contains("[package]") && !text.contains("pub mod") && !text.contains("root:"),
            "{path}: {text}"
        );
    }
}

#[actix_web::test]
async fn the_client_library_is_built_in_and_importable_from_allowed_origins() {
    // An empty web_root: the files built into the binary, whatever the working directory.
    let mut config = common::test_config(
        "[server]\nallowed_origins = [\"https://app.example.com\", \"http://localhost:*\"]\n",
    );
    config.server.web_root = String::new();
    let hub = TestHub::start_with(config).await;
    let web = concat!(env!("CARGO_MANIFEST_DIR"), "/web");
    for (name, kind) in [
        ("relayhub.js", "text/javascript; charset=utf-8"),
        ("relayhub.d.ts", "application/typescript; charset=utf-8"),
        ("index.html", "text/html; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
    ] {
        let reply = request("GET", &hub.http(&format!("/{name}")), &[], None).await;
        assert_eq!(reply.status, 200, "{name}");
        assert_eq!(reply.header("content-type"), Some(kind), "{name}");
        assert_eq!(
            reply.body,
            std::fs::read(format!("{web}/{name}")).unwrap(),
            "{name}"
        );
    }
    for name in ["relayhub.js", "relayhub.d.ts"] {
        let url = hub.http(&format!("/{name}"));
        for origin in ["https://app.example.com", "http://localhost:5173"] {
            let reply = request("GET", &url, &[("Origin", origin)], None).await;
            assert_eq!(reply.status, 200, "{name} from {origin}");
            assert_eq!(
                reply.header("access-control-allow-origin"),
                Some(origin),
                "{name} from {origin}: {:?}",
                reply.headers
            );
            assert_eq!(reply.header("vary"), Some("Origin"), "{name}");
        }
        // Another origin still gets the file (a plain <script> needs no CORS) but no CORS header, so a
        // module import from there fails in the browser.
        for headers in [&[("Origin", "https://evil.example")][..], &[]] {
            let reply = request("GET", &url, headers, None).await;
            assert_eq!(reply.status, 200, "{name}");
            assert_eq!(
                reply.header("access-control-allow-origin"),
                None,
                "{name} {headers:?}"
            );
            assert_eq!(reply.header("vary"), Some("Origin"), "{name}");
        }
    }
    // The dashboard's own scripts are not offered to other origins.
    let reply = request(
        "GET",
        &hub.http("/app.js"),
        &[("Origin", "https://app.example.com")],
        None,
    )
    .await;
    assert_eq!(reply.header("access-control-allow-origin"), None);
    let reply = request("GET", &hub.http("/nothing-here.js"), &[], None).await;
    assert_eq!(reply.status, 404);
}

#[actix_web::test]
async fn web_root_serves_a_directory_instead() {
    let dir = std::env::temp_dir().join(format!("relayhub-webroot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), "<p>edited</p>").unwrap();
    std::fs::write(dir.join("relayhub.js"), "export const edited = true;\n").unwrap();
    let mut config = common::test_config("");
    config.server.web_root = dir.to_str().unwrap().to_string();
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    let hub = TestHub::start_with(config).await;
    let reply = request("GET", &hub.http("/"), &[], None).await;
    assert_eq!((reply.status, reply.text()), (200, "<p>edited</p>".into()));
    let reply = request("GET", &hub.http("/relayhub.js"), &[], None).await;
    assert_eq!(reply.text(), "export const edited = true;\n");
    // What the directory lacks is missing, not taken from the binary.
    let reply = request("GET", &hub.http("/style.css"), &[], None).await;
    assert_eq!(reply.status, 404);
    let _ = std::fs::remove_dir_all(&dir);
    // A web_root without index.html is named at start and by check-config.
    let mut config = common::test_config("");
    config.server.web_root = "/nonexistent/web".into();
    let warnings = config.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("server.web_root") && w.contains("/nonexistent/web")),
        "{warnings:?}"
    );
}
