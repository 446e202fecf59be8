//! The `relayhub` binary: reads arguments and configuration, starts the hub, waits for SIGTERM or Ctrl-C,
//! then shuts down gracefully. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use relayhub::config::Config;

const USAGE: &str = "usage: relayhub [--config PATH] [--check-config]

  --config PATH    TOML configuration (default: $RELAYHUB_CONFIG, else the embedded config/default.toml)
  --check-config   validate the configuration and exit (0 valid, 2 invalid)

Environment: PORT, HOST, REDIS_URL (or REDIS_HOST, REDIS_PORT, REDIS_PASSWORD), RELAYHUB_API_KEY,
RELAYHUB_ADMIN_TOKEN, RELAYHUB_INSTANCE_ID, RUST_LOG (default: info).";

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn parse_args() -> Result<(Option<PathBuf>, bool), String> {
    let mut config = std::env::var_os("RELAYHUB_CONFIG").map(PathBuf::from);
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = Some(args.next().ok_or("--config needs a path")?.into());
            }
            "--check-config" => check = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("relayhub {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok((config, check))
}

fn load_config() -> Result<(Config, bool), String> {
    let (path, check) = parse_args()?;
    let mut config = Config::load(path.as_deref()).map_err(|e| e.to_string())?;
    config
        .apply_env(|name| std::env::var(name).ok())
        .map_err(|e| e.to_string())?;
    relayhub::check_config(&config)?;
    Ok((config, check))
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let (config, check) = match load_config() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("relayhub: {e}\n\n{USAGE}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
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
