//! The process's logger: env_logger with either its own text lines (for people) or one JSON object a line
//! (for a log shipper that should not have to parse free text). Set up once by the binary, from `[log]`.

use std::io::Write;
use std::sync::OnceLock;

use crate::core::config::{LogConfig, LogFormat};

/// This replica's name, added to every JSON line once the hub has chosen it (lines before that have none).
static INSTANCE_ID: OnceLock<String> = OnceLock::new();

/// Records the instance id for the JSON lines; the first call wins (one hub per process in production).
pub fn set_instance_id(id: &str) {
    let _ = INSTANCE_ID.set(id.to_string());
}

/// Installs the logger. `rust_log` (the `RUST_LOG` variable) wins over `log.level` when set. Does nothing
/// when a logger is installed already.
pub fn init(config: &LogConfig, rust_log: Option<&str>) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(rust_log.unwrap_or(&config.level));
    if config.format == LogFormat::Json {
        builder.format(|out, record| {
            let mut line = serde_json::json!({
                "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            if let Some(id) = INSTANCE_ID.get() {
                line["instance_id"] = id.as_str().into();
            }
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)
        });
    }
    let _ = builder.try_init();
}
