//! The `relayhub` binary: parses the command line, then serves (reads the configuration, starts the hub,
//! waits for SIGTERM or Ctrl-C, shuts down gracefully), checks a configuration, or publishes one message
//! through a running hub's HTTP API, or mints a token. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use relayhub::config::Config;

const ENVIRONMENT: &str = "Environment: PORT, HOST, REDIS_URL (or REDIS_HOST, REDIS_PORT, REDIS_PASSWORD), \
RELAYHUB_REDIS_REQUIRED (true or false), RELAYHUB_API_KEY, RELAYHUB_ADMIN_TOKEN, RELAYHUB_JWT_SECRET, \
RELAYHUB_INSTANCE_ID, RELAYHUB_LOG_FORMAT (text or json), RUST_LOG (default: log.level, info).

Exit codes: 0 stopped normally, 1 publish failed, 2 bad arguments or configuration, 3 Redis required but \
unreachable, 4 cannot listen.";

/// A realtime hub: browsers subscribe over WebSocket, Redis stays the shared source of truth.
#[derive(Parser)]
#[command(name = "relayhub", version, after_help = ENVIRONMENT)]
struct Cli {
    /// TOML configuration laid over the embedded config/default.toml.
    #[arg(short, long, env = "RELAYHUB_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit (0 valid, 2 invalid); the same as `relayhub check-config`.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (what `relayhub` alone does).
    Serve {
        /// TOML configuration laid over the embedded config/default.toml.
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and exit (0 valid, 2 invalid); prints warnings about likely mistakes.
    CheckConfig {
        /// TOML configuration laid over the embedded config/default.toml.
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Publish one message through a running hub's HTTP API (POST /api/publish).
    Publish {
        /// The channel, e.g. prices:BTC.
        channel: String,
        /// The message: any JSON value, e.g. '{"price":64000.5}'.
        json: String,
        /// The hub's base URL.
        #[arg(long, env = "RELAYHUB_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The hub's server.api_key, sent as a bearer token.
        #[arg(long, env = "RELAYHUB_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Print a token signed with the configured auth.jwt_hs256_secret (or RELAYHUB_JWT_SECRET), for
    /// operators and tests; an application's backend mints its own.
    Token {
        /// TOML configuration laid over the embedded config/default.toml.
        #[arg(short, long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// The user id (`sub`); omit it for a subscription token of an anonymous connection.
        #[arg(long)]
        sub: Option<String>,
        /// Channels and `prefix:*` patterns the connection may subscribe to in private namespaces
        /// (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Channels and `prefix:*` patterns it may publish to (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        publish: Vec<String>,
        /// Make a subscription token for this one channel instead of a connection token.
        #[arg(long)]
        channel: Option<String>,
        /// Lifetime: "30s", "15m", "1h", "2d".
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// Exit code for bad arguments and configuration errors (clap uses it for its own errors too).
const EXIT_CONFIG: u8 = 2;
/// Exit code of a publish the hub did not accept.
const EXIT_PUBLISH: u8 = 1;

fn load_config(path: Option<&std::path::Path>) -> Result<Config, String> {
    let mut config = Config::load(path).map_err(|e| e.to_string())?;
    config
        .apply_env(|name| std::env::var(name).ok())
        .map_err(|e| e.to_string())?;
    relayhub::check_config(&config)?;
    Ok(config)
}

fn init_logging(config: &Config) {
    relayhub::logging::init(&config.log, std::env::var("RUST_LOG").ok().as_deref());
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = ctrl_c => log::info!("Ctrl-C received"),
        _ = term.recv() => log::info!("SIGTERM received"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        None if cli.check_config => Command::CheckConfig { config: None },
        None => Command::Serve { config: None },
        Some(command) => command,
    };
    // A path after the subcommand wins over one before it (or in RELAYHUB_CONFIG).
    match command {
        Command::Serve { config } => serve(config.or(cli.config)),
        Command::CheckConfig { config } => check_config(config.or(cli.config)),
        Command::Publish {
            channel,
            json,
            url,
            api_key,
        } => publish(&channel, &json, &url, api_key.as_deref()),
        Command::Token {
            config,
            sub,
            channels,
            publish,
            channel,
            ttl,
        } => {
            let ttl = match relayhub::config::parse_duration(&ttl) {
                Ok(ttl) if ttl.as_secs() >= 1 => ttl,
                Ok(_) => return config_error("--ttl must be at least 1s"),
                Err(e) => return config_error(&format!("--ttl: {e}")),
            };
            if sub.is_none() && channel.is_none() {
                return config_error(
                    "a connection token needs --sub (or give --channel for a subscription token)",
                );
            }
            let mint = relayhub::token::Mint {
                sub,
                channels,
                publish,
                channel,
                ttl,
            };
            token(config.or(cli.config), &mint)
        }
    }
}

fn token(path: Option<PathBuf>, mint: &relayhub::token::Mint) -> ExitCode {
    let config = match load_config(path.as_deref()) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    match relayhub::token::mint(&config.auth, mint) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

fn config_error(e: &str) -> ExitCode {
    eprintln!("relayhub: {e}\n\nRun `relayhub --help` for the options.");
    ExitCode::from(EXIT_CONFIG)
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(path.as_deref()) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    for warning in config.warnings() {
        println!("warning: {warning}");
    }
    println!("configuration is valid");
    ExitCode::SUCCESS
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(path.as_deref()) {
        Ok(config) => config,
        Err(e) => return config_error(&e),
    };
    init_logging(&config);
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
    actix_web::rt::System::new().block_on(async move {
        let running = match relayhub::start(config).await {
            Ok(running) => running,
            Err(e) => {
                log::error!("{e}");
                eprintln!("relayhub: {e}");
                return ExitCode::from(e.exit_code() as u8);
            }
        };
        shutdown_signal().await;
        running.shutdown().await;
        log::info!("stopped");
        ExitCode::SUCCESS
    })
}

fn publish(channel: &str, json: &str, url: &str, api_key: Option<&str>) -> ExitCode {
    // Checked here so a typo is named before anything is sent.
    let data: serde_json::Value = match serde_json::from_str(json) {
        Ok(data) => data,
        Err(e) => return config_error(&format!("the message is not JSON: {e}")),
    };
    let endpoint = format!("{}/api/publish", url.trim_end_matches('/'));
    let body = serde_json::json!({ "channel": channel, "data": data });
    actix_web::rt::System::new().block_on(async move {
        let mut request = awc::Client::new()
            .post(&endpoint)
            .timeout(std::time::Duration::from_secs(10));
        if let Some(key) = api_key.filter(|k| !k.is_empty()) {
            request = request.bearer_auth(key);
        }
        let mut response = match request.send_json(&body).await {
            Ok(response) => response,
            Err(e) => {
                eprintln!("relayhub: cannot reach {endpoint}: {e}");
                return ExitCode::from(EXIT_PUBLISH);
            }
        };
        let status = response.status();
        let text = match response.body().await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("(unreadable answer: {e})"),
        };
        if status.is_success() {
            println!("{text}");
            ExitCode::SUCCESS
        } else {
            eprintln!("relayhub: {endpoint} answered {status}: {text}");
            ExitCode::from(EXIT_PUBLISH)
        }
    })
}
