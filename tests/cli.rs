//! The `relayhub` binary as an operator runs it: exit codes and messages for bad configuration and an
//! unreachable Redis, memory mode, and a graceful stop on SIGTERM (clients get 1001, exit code 0).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use common::process::{
    ConfigFile, Process, relayhub, start_binary, start_binary_in, start_binary_with,
};
use common::{Ws, close_code, free_port, get_json};

/// Runs relayhub to completion: exit code and everything it printed.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut process = Process::spawn(relayhub(args, env));
    let code = process.exit_code();
    (code, process.output())
}

#[test]
fn bad_config_files_exit_2_and_name_the_key() {
    let cases = [
        ("[server]\nprot = 1\n", "server.prot"),
        ("[server]\nport = \"x\"\n", "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        (
            "[websocket]\nclient_timeout = \"10 parsecs\"\n",
            "websocket.client_timeout",
        ),
        (
            "[websocket]\nheartbeat_interval = \"soon\"\n",
            "websocket.heartbeat_interval",
        ),
        (
            "[websocket]\nheartbeat_interval = \"30s\"\nclient_timeout = \"30s\"\n",
            "websocket.client_timeout",
        ),
        (
            "[websocket]\nclient_timeout = \"10s\"\n",
            "websocket.client_timeout",
        ),
        ("[redis]\nurl = \"http://localhost\"\n", "redis.url"),
        (
            "[namespaces.chat]\nclient_publish = \"yes\"\n",
            "namespaces.chat.client_publish",
        ),
        ("[redis\nurl = 1\n", "TOML"),
        (
            "[[sources]]\nname = \"t\"\nurl = \"http://x/t\"\nchannel = \"p:{key}\"\nsplit = \"/data\"\n\
             split_key = \"s\"\nderive = [\"mid = (bid + ask) / 2\", \"spread = (ask -\"]\n",
            "sources[0].derive: `spread = (ask -`",
        ),
        (
            "[[sources]]\nname = \"t\"\nurl = \"http://x/t\"\nchannel = \"p:{key}\"\nsplit = \"/data\"\n",
            "sources[0].split_key",
        ),
        (
            "[auth]\njwt_public_key_file = \"/nonexistent/key.pem\"\n",
            "auth.jwt_public_key_file",
        ),
        (
            "[auth]\njwt_hs256_secret = \"short\"\n",
            "auth.jwt_hs256_secret",
        ),
        (
            "[namespaces.team]\nanonymous = false\n",
            "namespaces.team.anonymous",
        ),
    ];
    for (text, key) in cases {
        let file = ConfigFile::new(text);
        for check in [true, false] {
            let mut args = vec!["--config", file.path()];
            if check {
                args.push("--check-config");
            }
            let (code, output) = run(&args, &[]);
            assert_eq!(code, 2, "{text:?} (check {check}):\n{output}");
            assert!(
                output.contains(key),
                "{text:?} must name `{key}`:\n{output}"
            );
        }
    }
}

#[test]
fn a_missing_config_file_or_a_bad_argument_exits_2() {
    let (code, output) = run(&["--config", "/nonexistent/relayhub.toml"], &[]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("/nonexistent/relayhub.toml"), "{output}");
    let (code, output) = run(&["--frobnicate"], &[]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("--frobnicate"), "{output}");
}

#[test]
fn bad_environment_values_exit_2_and_name_the_variable() {
    for (env, name) in [
        (&[("PORT", "abc")][..], "PORT"),
        (&[("PORT", "70000")], "PORT"),
        (
            &[("REDIS_HOST", "localhost"), ("REDIS_PORT", "six")],
            "REDIS_PORT",
        ),
    ] {
        for args in [&["--check-config"][..], &[]] {
            let (code, output) = run(args, env);
            assert_eq!(code, 2, "{env:?}:\n{output}");
            assert!(output.contains(name), "{env:?} must name {name}:\n{output}");
        }
    }
}

#[test]
fn check_config_accepts_the_shipped_files() {
    // Both pass with no environment at all (the production file's example source is commented out).
    let env = [];
    for file in ["config/default.toml", "config/production.toml"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file);
        if !path.exists() {
            assert_ne!(
                file, "config/default.toml",
                "config/default.toml is missing"
            );
            continue;
        }
        let (code, output) = run(
            &["--check-config", "--config", path.to_str().unwrap()],
            &env,
        );
        assert_eq!(code, 0, "{file}:\n{output}");
        assert!(output.contains("valid"), "{output}");
    }
    let (code, output) = run(&["--check-config"], &[]);
    assert_eq!(code, 0, "the embedded defaults:\n{output}");
}

#[test]
fn an_unreachable_required_redis_exits_3() {
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let file = ConfigFile::new(&format!(
        "[demo]\nenabled = false\n[redis]\nurl = \"{closed}\"\nrequired = true\n"
    ));
    let port = free_port().to_string();
    let env = [("PORT", port.as_str()), ("HOST", "127.0.0.1")];
    let (code, output) = run(&["--config", file.path()], &env);
    assert_eq!(code, 3, "{output}");
    assert!(
        output.contains("redis.required") && output.contains("unreachable"),
        "{output}"
    );
    // The same through REDIS_URL.
    let file = ConfigFile::new("[demo]\nenabled = false\n[redis]\nrequired = true\n");
    let env = [
        ("PORT", port.as_str()),
        ("HOST", "127.0.0.1"),
        ("REDIS_URL", closed.as_str()),
    ];
    let (code, output) = run(&["--config", file.path()], &env);
    assert_eq!(code, 3, "{output}");
}

#[test]
fn a_port_in_use_exits_4_before_anything_starts() {
    // Redis mode, so that a half-started hub (pub/sub bridge running) would show here.
    let redis = common::RedisServer::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let file = ConfigFile::new("[demo]\nenabled = false\n");
    let url = redis.url();
    let env = [
        ("PORT", port.as_str()),
        ("HOST", "127.0.0.1"),
        ("REDIS_URL", url.as_str()),
    ];
    let (code, output) = run(&["--config", file.path()], &env);
    assert_eq!(code, 4, "{output}");
    assert!(output.contains("cannot listen"), "{output}");
    assert!(!output.contains("panicked"), "{output}");
}

#[actix_web::test]
async fn without_required_redis_it_runs_in_memory_mode_and_sigterm_exits_0() {
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let config = ConfigFile::new(&format!(
        "[server]\nshutdown_timeout = \"8s\"\ndrain_period = \"1s\"\n[redis]\nurl = \"{closed}\"\nrequired = false\n"
    ));
    let (mut process, base) = start_binary(&config).await;
    assert!(
        process.output().contains("MEMORY MODE"),
        "{}",
        process.output()
    );
    // No admin token in this config: the start says who the admin API answers.
    assert!(
        process.output().contains("server.admin_token is not set"),
        "{}",
        process.output()
    );
    let (status, stats) = get_json(&format!("http://{base}/api/stats")).await;
    assert_eq!((status, &stats["mode"]), (200, &json!("memory")), "{stats}");

    process.terminate();
    let status = process.wait(Duration::from_secs(8));
    let status =
        status.unwrap_or_else(|| panic!("no exit within shutdown_timeout:\n{}", process.output()));
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

#[actix_web::test]
async fn sigterm_closes_websockets_with_1001() {
    let config = ConfigFile::new("[server]\nshutdown_timeout = \"8s\"\ndrain_period = \"1s\"\n");
    let (mut process, base) = start_binary(&config).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = Ws::connect(&format!("ws://{base}/ws")).await;
        ws.subscribe("prices:BYE").await;
        clients.push(ws);
    }
    for ws in &mut clients {
        ws.ping().await;
    }
    process.terminate();
    for ws in &mut clients {
        assert_eq!(close_code(ws).await, 1001, "{}", process.output());
    }
    let status = process.wait(Duration::from_secs(8));
    let status =
        status.unwrap_or_else(|| panic!("no exit within shutdown_timeout:\n{}", process.output()));
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

#[test]
fn help_and_version_name_the_commands() {
    let (code, output) = run(&["--help"], &[]);
    assert_eq!(code, 0, "{output}");
    for word in [
        "serve",
        "check-config",
        "publish",
        "--config",
        "RELAYHUB_LOG_FORMAT",
    ] {
        assert!(
            output.contains(word),
            "--help must mention {word}:\n{output}"
        );
    }
    let (code, output) = run(&["--version"], &[]);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains(env!("CARGO_PKG_VERSION")), "{output}");
    let (code, output) = run(&["publish", "--help"], &[]);
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("--api-key") && output.contains("--url"),
        "{output}"
    );
    // A subcommand that does not exist is an argument error, named.
    let (code, output) = run(&["frobnicate"], &[]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("frobnicate"), "{output}");
}

#[test]
fn the_check_config_command_validates_and_warns() {
    let bad = ConfigFile::new("[websocket]\nclient_timeout = \"10s\"\n");
    for args in [
        &["check-config", "--config", bad.path()][..],
        &["--config", bad.path(), "check-config"],
    ] {
        let (code, output) = run(args, &[]);
        assert_eq!(code, 2, "{args:?}:\n{output}");
        assert!(output.contains("websocket.client_timeout"), "{output}");
    }
    let (code, output) = run(&["check-config"], &[]);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("configuration is valid"), "{output}");
    assert!(!output.contains("warning"), "{output}");
    let unmatched = ConfigFile::new(&format!(
        "[namespaces.{}]\npatterns = true\n",
        "n".repeat(201)
    ));
    let (code, output) = run(&["check-config", "-c", unmatched.path()], &[]);
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("warning") && output.contains("matches no channel"),
        "{output}"
    );
}

#[actix_web::test]
async fn the_publish_command_goes_through_the_http_api() {
    let config = ConfigFile::new("[server]\napi_key = \"k3y\"\n");
    let (mut process, base) = start_binary(&config).await;
    let mut ws = Ws::connect(&format!("ws://{base}/ws")).await;
    ws.subscribe("chat:cli").await;
    let url = format!("http://{base}");
    let (code, output) = run(
        &[
            "publish",
            "chat:cli",
            r#"{"text":"hi"}"#,
            "--url",
            &url,
            "--api-key",
            "k3y",
        ],
        &[],
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("\"seq\""),
        "the hub's answer is printed: {output}"
    );
    let message = ws.recv_type("message").await;
    assert_eq!(message["data"], json!({"text": "hi"}), "{message}");
    // The key may come from the environment.
    let (code, output) = run(
        &["publish", "chat:cli", "2"],
        &[("RELAYHUB_URL", &url), ("RELAYHUB_API_KEY", "k3y")],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(ws.recv_type("message").await["data"], json!(2));
    // Refused by the hub: exit 1 with its answer; not JSON: exit 2 before anything is sent.
    let (code, output) = run(&["publish", "chat:cli", "3", "--url", &url], &[]);
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("401"), "{output}");
    let (code, output) = run(
        &[
            "publish",
            "chat:cli",
            "{oops",
            "--url",
            &url,
            "--api-key",
            "k3y",
        ],
        &[],
    );
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("not JSON"), "{output}");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (code, output) = run(&["publish", "chat:cli", "4", "--url", &closed], &[]);
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("cannot reach"), "{output}");
    // Nothing else arrived: the refused publishes published nothing.
    ws.ping().await;
    process.stop_gracefully();
}

#[actix_web::test]
async fn json_logs_are_one_object_a_line() {
    let config = ConfigFile::new("[server]\nshutdown_timeout = \"5s\"\ndrain_period = \"1s\"\n");
    let (mut process, base) = start_binary_with(&config, &[("RELAYHUB_LOG_FORMAT", "json")]).await;
    // A little traffic, so the log has more than the start.
    let ws = Ws::connect(&format!("ws://{base}/ws")).await;
    ws.close().await;
    process.stop_gracefully();
    let output = process.output();
    let lines: Vec<&str> = output.lines().collect();
    assert!(lines.len() >= 3, "{output}");
    let mut with_instance = 0;
    for line in &lines {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{output}"));
        for field in ["time", "level", "target", "message"] {
            assert!(entry[field].is_string(), "{field} missing: {line}");
        }
        assert!(
            chrono::DateTime::parse_from_rfc3339(entry["time"].as_str().unwrap()).is_ok(),
            "{line}"
        );
        with_instance += entry["instance_id"].is_string() as usize;
    }
    assert!(
        lines.iter().any(|l| l.contains("listening on")) && with_instance > 0,
        "{output}"
    );
    // The text format stays the default, and a bad value is a configuration error naming the variable.
    let (code, output) = run(&["--check-config"], &[("RELAYHUB_LOG_FORMAT", "xml")]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("RELAYHUB_LOG_FORMAT"), "{output}");
    let bad = ConfigFile::new("[log]\nformat = \"yaml\"\n");
    let (code, output) = run(&["check-config", "--config", bad.path()], &[]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("log.format"), "{output}");
}

#[actix_web::test]
async fn a_binary_started_elsewhere_serves_the_dashboard_and_the_client() {
    // A directory with no web/ in it: the files must come from the binary itself.
    let elsewhere = std::env::temp_dir().join(format!("relayhub-elsewhere-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = ConfigFile::new("[server]\nshutdown_timeout = \"5s\"\ndrain_period = \"1s\"\n");
    let (mut process, base) = start_binary_in(&config, &[], Some(&elsewhere)).await;
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    for (path, file, kind) in [
        ("/", "index.html", "text/html; charset=utf-8"),
        (
            "/relayhub.js",
            "relayhub.js",
            "text/javascript; charset=utf-8",
        ),
        ("/app.js", "app.js", "text/javascript; charset=utf-8"),
    ] {
        let reply = common::request("GET", &format!("http://{base}{path}"), &[], None).await;
        assert_eq!(reply.status, 200, "{path}: {}", process.output());
        assert_eq!(reply.header("content-type"), Some(kind), "{path}");
        assert_eq!(reply.body, std::fs::read(web.join(file)).unwrap(), "{path}");
    }
    assert!(
        !process.output().contains("web_root"),
        "{}",
        process.output()
    );
    process.stop_gracefully();
    let _ = std::fs::remove_dir_all(&elsewhere);
}

/// The leading comment block of a config file.
fn header_comment(text: &str) -> String {
    text.lines()
        .take_while(|line| line.starts_with('#') || line.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[actix_web::test]
async fn the_production_config_starts_as_is_and_lists_its_environment() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/production.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Every variable `--help` names is listed at the top of the file.
    let (code, help) = run(&["--help"], &[]);
    assert_eq!(code, 0, "{help}");
    let environment = help
        .split("Environment:")
        .nth(1)
        .and_then(|rest| rest.split("Exit codes").next())
        .unwrap_or_else(|| panic!("--help has an Environment paragraph:\n{help}"));
    let names: Vec<&str> = environment
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .filter(|word| (word.len() > 2 && word.contains('_')) || matches!(*word, "PORT" | "HOST"))
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    let header = header_comment(&text);
    for name in &names {
        assert!(
            header.contains(name),
            "config/production.toml's header must list {name}"
        );
    }
    // It starts with nothing set (in memory mode, said loudly) and is ready.
    let config = ConfigFile::new(&text);
    let (mut process, base) = start_binary(&config).await;
    assert!(
        process.output().contains("MEMORY MODE"),
        "{}",
        process.output()
    );
    let (status, body) = get_json(&format!("http://{base}/ready")).await;
    assert_eq!(status, 200, "{body}");
    process.stop_gracefully();
    // In a fleet, RELAYHUB_REDIS_REQUIRED=true makes a missing Redis fatal instead.
    let port = free_port().to_string();
    let env = [
        ("PORT", port.as_str()),
        ("HOST", "127.0.0.1"),
        ("RELAYHUB_REDIS_REQUIRED", "true"),
    ];
    let (code, output) = run(&["--config", config.path()], &env);
    assert_eq!(code, 3, "{output}");
}

#[actix_web::test]
async fn the_token_command_mints_what_the_hub_accepts() {
    let secret = "cli-test-secret-that-is-long-enough-0123";
    let config = ConfigFile::new(
        "[namespaces.budget]\nprivate = true\n[namespaces.team]\nanonymous = false\n",
    );
    let env = [("RELAYHUB_JWT_SECRET", secret)];
    let (code, output) = run(
        &[
            "token",
            "--config",
            config.path(),
            "--sub",
            "42",
            "--channels",
            "budget:*",
            "--ttl",
            "1h",
        ],
        &env,
    );
    assert_eq!(code, 0, "{output}");
    let token = output.trim().to_string();
    assert_eq!(token.split('.').count(), 3, "{output}");
    // Its claims, read with the same secret.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .expect("the token verifies")
    .claims;
    assert_eq!(claims["sub"], "42");
    assert_eq!(claims["channels"], json!(["budget:*"]));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        (now + 3590..=now + 3610).contains(&exp),
        "exp {exp}, now {now}"
    );

    // The running hub takes it.
    let (mut process, base) = start_binary_with(&config, &env).await;
    let mut ws = Ws::connect(&format!("ws://{base}/ws?token={token}")).await;
    ws.send(json!({"op": "subscribe", "channel": "budget:family", "id": 1}))
        .await;
    assert_eq!(ws.recv().await["type"], "subscribed");
    ws.send(json!({"op": "subscribe", "channel": "team:x", "id": 2}))
        .await;
    assert_eq!(ws.recv().await["type"], "subscribed");
    process.terminate();
    process.wait(Duration::from_secs(10));

    // No secret: exit 2, saying what is missing; a bad ttl too.
    let (code, output) = run(&["token", "--sub", "42"], &[]);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("auth.jwt_hs256_secret"), "{output}");
    let (code, output) = run(&["token", "--sub", "42", "--ttl", "soon"], &env);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("--ttl"), "{output}");
}
