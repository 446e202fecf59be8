//! docs/openapi.json kept true: every documented operation is called on a real hub, each answer's status
//! must be documented for it and its body must match the documented schema (checked by a JSON Schema
//! validator); the hub serves the same document at /api/openapi.json.

mod common;

use std::collections::BTreeSet;

use serde_json::{Value, json};

use common::{TestHub, Ws, request};

fn document() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
        .expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// The checker: answers are compared with the document and each operation's exercise is recorded.
struct Contract {
    doc: Value,
    exercised: BTreeSet<(String, String)>,
}

impl Contract {
    /// Calls `method path` (the concrete URL path `url_path`, documented as `path`) and checks the answer.
    // Each call reads as one line of the contract: a builder would hide that.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &mut self,
        hub: &TestHub,
        method: &str,
        path: &str,
        url_path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
        expect: u16,
    ) -> Value {
        let operation = &self.doc["paths"][path][method.to_ascii_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {path} is not in docs/openapi.json"
        );
        let mut headers = headers.to_vec();
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let reply = request(
            method,
            &hub.http(url_path),
            &headers,
            body.map(|b| b.to_string().into_bytes()),
        )
        .await;
        assert_eq!(
            reply.status,
            expect,
            "{method} {url_path}: {}",
            reply.text()
        );
        let status = reply.status.to_string();
        let documented = &operation["responses"][&status];
        assert!(
            documented.is_object(),
            "{method} {path} answered {status}, which the document does not list"
        );
        let (media, schema) = documented["content"]
            .as_object()
            .and_then(|c| c.iter().next())
            .map(|(media, v)| (media.clone(), v["schema"].clone()))
            .unwrap_or_else(|| panic!("{method} {path} {status}: no content documented"));
        let content_type = reply.header("content-type").unwrap_or("").to_string();
        assert!(
            content_type.starts_with(&media),
            "{method} {url_path}: content type {content_type}, documented {media}"
        );
        let instance = if media == "application/json" {
            serde_json::from_slice(&reply.body)
                .unwrap_or_else(|e| panic!("{method} {url_path}: not JSON ({e})"))
        } else {
            Value::String(reply.text())
        };
        // The response schema with the document's components beside it, so its `$ref`s resolve.
        let mut root = schema;
        if let Value::Object(map) = &mut root {
            map.insert("components".into(), self.doc["components"].clone());
        }
        if let Err(e) = jsonschema::validate(&root, &instance) {
            panic!(
                "{method} {url_path} {status}: the body does not match the document: {e}\n{instance}"
            );
        }
        self.exercised
            .insert((method.to_ascii_lowercase(), path.to_string()));
        instance
    }
}

#[actix_web::test]
async fn every_documented_operation_answers_as_documented() {
    let mut hub = TestHub::start(
        "[server]\napi_key = \"k\"\n[[sources]]\nname = \"feed\"\nurl = \"http://127.0.0.1:9/{id}\"\n\
         channel = \"feed:{id}\"\ninterval = \"10s\"\n[namespaces.room]\npresence = true\n",
    )
    .await;
    let mut c = Contract {
        doc: document(),
        exercised: BTreeSet::new(),
    };
    let key = [("Authorization", "Bearer k")];

    c.call(&hub, "GET", "/health", "/health", &[], None, 200)
        .await;
    c.call(&hub, "GET", "/ready", "/ready", &[], None, 200)
        .await;
    c.call(&hub, "GET", "/metrics", "/metrics", &[], None, 200)
        .await;
    c.call(&hub, "GET", "/ws", "/ws", &[], None, 400).await;
    // The stream itself is read by tests/sse.rs; a request naming no channel is refused as documented.
    c.call(&hub, "GET", "/sse", "/sse", &[], None, 400).await;
    // A documented path with a method it does not take: 405 in the error shape, not 404.
    for (method, path) in [
        ("TRACE", "/ws"),
        ("GET", "/api/publish"),
        ("DELETE", "/api/stats"),
    ] {
        let reply = request(method, &hub.http(path), &[], None).await;
        assert_eq!(reply.status, 405, "{method} {path}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "method_not_allowed");
        assert!(
            reply.header("allow").is_some(),
            "{method} {path}: no Allow header"
        );
    }
    // The upgrade itself, with an Origin that is not allowed.
    let refused = Ws::connect_with_origin(&hub.ws_url(), "https://evil.example").await;
    assert!(refused.is_err());

    let publish = "/api/publish";
    let answer = c
        .call(
            &hub,
            "POST",
            publish,
            publish,
            &key,
            Some(json!({"channel": "chat:a", "data": {"x": 1}})),
            200,
        )
        .await;
    assert_eq!(answer["seq"], 1);
    c.call(
        &hub,
        "POST",
        publish,
        publish,
        &[],
        Some(json!({"channel": "chat:a", "data": 1})),
        401,
    )
    .await;
    c.call(
        &hub,
        "POST",
        publish,
        publish,
        &key,
        Some(json!({"channel": "chat:a"})),
        400,
    )
    .await;
    c.call(
        &hub,
        "POST",
        publish,
        publish,
        &key,
        Some(json!({"channel": "bad channel", "data": 1})),
        400,
    )
    .await;
    c.call(
        &hub,
        "POST",
        publish,
        publish,
        &key,
        Some(json!({"channel": "chat:a", "data": "x".repeat(70_000)})),
        413,
    )
    .await;
    c.call(
        &hub,
        "POST",
        publish,
        publish,
        &[
            ("Authorization", "Bearer k"),
            ("Origin", "https://evil.example"),
        ],
        Some(json!({"channel": "chat:a", "data": 1})),
        403,
    )
    .await;

    c.call(&hub, "GET", "/api/stats", "/api/stats", &[], None, 200)
        .await;
    let latest = "/api/channels/{channel}";
    c.call(&hub, "GET", latest, "/api/channels/chat:a", &[], None, 200)
        .await;
    c.call(
        &hub,
        "GET",
        latest,
        "/api/channels/chat:none",
        &[],
        None,
        404,
    )
    .await;
    c.call(
        &hub,
        "GET",
        latest,
        "/api/channels/bad%20name",
        &[],
        None,
        400,
    )
    .await;
    let history = "/api/channels/{channel}/history";
    let items = c
        .call(
            &hub,
            "GET",
            history,
            "/api/channels/chat:a/history?limit=2",
            &[],
            None,
            200,
        )
        .await;
    assert_eq!(items["items"].as_array().map(Vec::len), Some(1));
    let epoch = items["epoch"].as_str().expect("an epoch").to_string();
    let after = c
        .call(
            &hub,
            "GET",
            history,
            &format!("/api/channels/chat:a/history?since_seq=0&epoch={epoch}"),
            &[],
            None,
            200,
        )
        .await;
    assert_eq!(after["recovered"], true, "{after}");
    c.call(
        &hub,
        "GET",
        history,
        "/api/channels/chat:a/history?epoch=E",
        &[],
        None,
        400,
    )
    .await;
    c.call(
        &hub,
        "GET",
        history,
        "/api/channels/chat:a/history?limit=many",
        &[],
        None,
        400,
    )
    .await;

    let presence = "/api/channels/{channel}/presence";
    let members = c
        .call(
            &hub,
            "GET",
            presence,
            "/api/channels/room:a/presence",
            &[],
            None,
            200,
        )
        .await;
    assert_eq!(members["members"], json!([]));
    for (url, status) in [
        ("/api/channels/chat:a/presence", 403),
        ("/api/channels/bad%20name/presence", 400),
    ] {
        c.call(&hub, "GET", presence, url, &[], None, status).await;
    }
    let presence_stats = "/api/channels/{channel}/presence/stats";
    for (url, status) in [
        ("/api/channels/room:a/presence/stats", 200),
        ("/api/channels/chat:a/presence/stats", 403),
    ] {
        c.call(&hub, "GET", presence_stats, url, &[], None, status)
            .await;
    }

    let start = "/api/polling/start";
    let job = c
        .call(
            &hub,
            "POST",
            start,
            start,
            &[],
            Some(json!({"source": "feed", "params": {"id": "1"}})),
            200,
        )
        .await;
    c.call(
        &hub,
        "POST",
        start,
        start,
        &[],
        Some(json!({"source": "nope", "params": {}})),
        400,
    )
    .await;
    c.call(
        &hub,
        "GET",
        "/api/polling/status",
        "/api/polling/status",
        &[],
        None,
        200,
    )
    .await;
    c.call(
        &hub,
        "GET",
        "/api/polling/sources",
        "/api/polling/sources",
        &[],
        None,
        200,
    )
    .await;
    let refresh = "/api/polling/refresh";
    c.call(
        &hub,
        "POST",
        refresh,
        refresh,
        &[],
        Some(json!({"job": job["job"]})),
        200,
    )
    .await;
    c.call(
        &hub,
        "POST",
        refresh,
        refresh,
        &[],
        Some(json!({"job": "gone"})),
        404,
    )
    .await;
    let stop = "/api/polling/stop";
    c.call(
        &hub,
        "POST",
        stop,
        stop,
        &[],
        Some(json!({"job": job["job"]})),
        200,
    )
    .await;
    c.call(
        &hub,
        "POST",
        stop,
        stop,
        &[],
        Some(json!({"job": "gone"})),
        404,
    )
    .await;

    let served = c
        .call(
            &hub,
            "GET",
            "/api/openapi.json",
            "/api/openapi.json",
            &[],
            None,
            200,
        )
        .await;
    assert_eq!(served, c.doc, "the hub serves docs/openapi.json as built");

    // Nothing documented was left out.
    let documented: BTreeSet<(String, String)> = c.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let missing: Vec<_> = documented.difference(&c.exercised).collect();
    assert!(
        missing.is_empty(),
        "documented but not exercised: {missing:?}"
    );
    hub.shutdown().await;
}

/// Every route the server registers is in the document (a new route without its contract fails here).
#[test]
fn every_api_route_is_documented() {
    let doc = document();
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/mod.rs"))
        .expect("src/http/mod.rs");
    // `one("/path", ...)` calls, however rustfmt breaks their lines.
    let routes = source
        .split("one(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"'))
        .filter_map(|rest| rest.split('"').next())
        .collect::<Vec<_>>();
    assert!(routes.len() > 10, "{routes:?}");
    let in_api = source
        .split("web::scope(\"/api\")")
        .nth(1)
        .expect("the /api scope");
    for route in routes {
        let full = if in_api.contains(&format!("\"{route}\"")) {
            format!("/api{route}")
        } else {
            route.to_string()
        };
        assert!(
            doc["paths"][&full].is_object(),
            "{full} is served but not in docs/openapi.json"
        );
    }
}
