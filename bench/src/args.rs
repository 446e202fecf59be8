//! Command-line flags of the load generator, parsed by clap into [`Args`] and checked by [`parse`].
//! `main` calls [`parse`] once; every other module reads the typed result.

use std::fmt;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};

use crate::reference;

/// How published messages reach the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PublishMode {
    /// `PUBLISH <prefix>ch:<channel> <json>` on Redis; the hub relays it.
    Redis,
    /// `POST /api/publish` on the hub's HTTP API.
    Http,
    /// No publishing: connect, subscribe, hold (idle capacity).
    None,
}

impl fmt::Display for PublishMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PublishMode::Redis => "redis",
            PublishMode::Http => "http",
            PublishMode::None => "none",
        })
    }
}

/// Everything the run needs; [`parse`] validates it and fills the derived values.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "relayhub-bench",
    about = "relayhub-bench: opens WebSocket subscribers on a relayhub, publishes at a fixed rate, measures delivery.",
    after_help = "Output: a table, then one JSON line (the last line of stdout).\n\
                  Exit status: 0 all delivered; 1 setup failed (connect, subscribe, publisher) or bad flags; \
                  2 run finished with losses or errors."
)]
pub struct Args {
    /// Hub WebSocket endpoint every subscriber connects to.
    #[arg(
        long,
        value_name = "URL",
        default_value = "ws://127.0.0.1:8080/ws",
        help_heading = "Connections"
    )]
    pub url: String,
    /// Subscriber connections.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        help_heading = "Connections"
    )]
    pub connections: usize,
    /// Channels bench:0..bench:C-1; connection `i` subscribes to `bench:<i % C>` (round robin).
    #[arg(
        long,
        value_name = "C",
        default_value_t = 1,
        help_heading = "Connections"
    )]
    pub channels: usize,
    /// Source addresses 127.0.0.1..127.0.0.K to spread connections over, so one address's ephemeral ports
    /// never run out; 0 = no bind, the kernel picks the address and port.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 4,
        help_heading = "Connections"
    )]
    pub sources: u8,
    /// Receiver threads, each with its own current-thread runtime.
    #[arg(
        long,
        value_name = "T",
        default_value_t = 1,
        help_heading = "Connections"
    )]
    pub threads: usize,
    /// WebSocket handshakes in flight at once during the connect phase.
    #[arg(
        long,
        value_name = "M",
        default_value_t = 256,
        help_heading = "Connections"
    )]
    pub connect_concurrency: usize,
    /// Give up connecting/subscribing after S seconds.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 120.0,
        help_heading = "Connections"
    )]
    pub setup_timeout: f64,
    /// Misbehaving clients beside the measured ones, from 127.0.0.200: stuck readers, 4 GiB frame headers,
    /// ping floods, subscribe churn, malformed frames.
    #[arg(
        long,
        value_name = "H",
        default_value_t = 0,
        help_heading = "Connections"
    )]
    pub hostile: usize,

    /// How messages are published (none = idle capacity: connect, subscribe, hold).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = PublishMode::Http, help_heading = "Publishing")]
    pub publish: PublishMode,
    /// Publishes per second, all channels together.
    #[arg(
        long,
        value_name = "R",
        default_value_t = 100.0,
        help_heading = "Publishing"
    )]
    pub rate: f64,
    /// Seconds measured (publishing, or holding with --publish none).
    #[arg(
        long,
        value_name = "D",
        default_value_t = 10.0,
        help_heading = "Publishing"
    )]
    pub duration: f64,
    /// Seconds published before measuring (not counted; lets every path warm up).
    #[arg(
        long,
        value_name = "S",
        default_value_t = 1.0,
        help_heading = "Publishing"
    )]
    pub warmup: f64,
    /// Seconds to wait for late deliveries after publishing.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 2.0,
        help_heading = "Publishing"
    )]
    pub drain: f64,
    /// Pad each published JSON to about BYTES bytes (0 = no padding).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 0,
        help_heading = "Publishing"
    )]
    pub payload: usize,
    /// Redis for --publish redis.
    #[arg(
        long,
        value_name = "URL",
        default_value = "redis://127.0.0.1:6379",
        help_heading = "Publishing"
    )]
    pub redis_url: String,
    /// Key prefix of the hub; publishes go to <P>ch:<channel>.
    #[arg(
        long,
        value_name = "P",
        default_value = "relayhub:",
        help_heading = "Publishing"
    )]
    pub prefix: String,
    /// Hub HTTP base for --publish http [default: derived from --url].
    #[arg(
        long,
        value_name = "URL",
        default_value = "",
        hide_default_value = true,
        help_heading = "Publishing"
    )]
    pub http: String,
    /// Extra header on every HTTP publish (repeatable).
    #[arg(long = "header", value_name = "'Name: value'", value_parser = header, help_heading = "Publishing")]
    pub headers: Vec<String>,

    /// Measure this machine's cost of one loopback TCP write and read, then exit.
    #[arg(long, help_heading = "Other")]
    pub calibrate: bool,
    /// With --calibrate: messages per write (a hub with a write delay sends several frames in one `writev`).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64),
          requires = "calibrate", help_heading = "Other")]
    pub calibrate_batch: u16,
    /// Run a plain single-threaded tokio relay on ADDR:PORT until SIGTERM/SIGINT instead of a benchmark:
    /// WebSocket subscribe on /ws, POST /api/publish; a baseline to run the same scenarios against
    /// (scripts/bench.sh ref-*), not relayhub.
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Other")]
    pub serve_reference: Option<String>,
    /// With --serve-reference: the relay also delivers what is published on <prefix>ch:* of this Redis (one
    /// PSUBSCRIBE on the relay's own thread), as relayhub does with raw PUBLISH.
    #[arg(
        long,
        value_name = "URL",
        requires = "serve_reference",
        help_heading = "Other"
    )]
    pub reference_redis: Option<String>,

    /// Hub process to sample (RSS, CPU seconds) over the measured window.
    #[arg(long, value_name = "PID", help_heading = "Reporting")]
    pub server_pid: Option<u32>,
    /// Label copied into the report.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "",
        hide_default_value = true,
        help_heading = "Reporting"
    )]
    pub scenario: String,
}

/// What the command line asks for.
pub enum Mode {
    /// A benchmark run with these (validated) arguments; boxed, it is much larger than the other cases.
    Bench(Box<Args>),
    /// `--calibrate`, with this many messages per write.
    Calibrate(usize),
    /// `--serve-reference ADDR:PORT`: serve the reference relay there.
    ServeReference(reference::Options),
}

/// Parses the whole command line (program name first). `--help` and bad flags come back as clap errors:
/// the caller prints them (`Error::print`) and picks the exit status by `Error::kind`.
pub fn parse<I, T>(command_line: I) -> Result<Mode, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut args = Args::try_parse_from(command_line)?;
    if args.calibrate {
        return Ok(Mode::Calibrate(usize::from(args.calibrate_batch)));
    }
    if let Some(addr) = args.serve_reference.take() {
        return Ok(Mode::ServeReference(reference::Options {
            addr,
            redis: args
                .reference_redis
                .take()
                .map(|url| reference::RedisInput {
                    url,
                    pattern: format!("{}ch:*", args.prefix),
                }),
        }));
    }
    args.validate()
        .map_err(|message| Args::command().error(ErrorKind::ValueValidation, message))?;
    Ok(Mode::Bench(Box::new(args)))
}

/// `--header` values must look like `Name: value`.
fn header(value: &str) -> Result<String, String> {
    if value.contains(':') {
        Ok(value.to_string())
    } else {
        Err("expected 'Name: value'".into())
    }
}

impl Args {
    /// Checks ranges across flags and fills the values derived from others.
    fn validate(&mut self) -> Result<(), String> {
        let positive = |name: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("{name} must be positive"))
            }
        };
        positive("--connections", self.connections > 0)?;
        positive("--channels", self.channels > 0)?;
        positive("--threads", self.threads > 0)?;
        positive("--connect-concurrency", self.connect_concurrency > 0)?;
        positive("--setup-timeout", self.setup_timeout > 0.0)?;
        positive("--duration", self.duration > 0.0)?;
        if self.publish != PublishMode::None {
            positive("--rate", self.rate > 0.0)?;
        }
        if self.warmup < 0.0 || self.drain < 0.0 {
            return Err("--warmup and --drain must not be negative".into());
        }
        if !self.url.starts_with("ws://") {
            return Err(format!(
                "--url {} must start with ws:// (the bench speaks plain WebSocket)",
                self.url
            ));
        }
        if self.http.is_empty() {
            let host_port = self.url["ws://".len()..]
                .split('/')
                .next()
                .unwrap_or_default();
            self.http = format!("http://{host_port}");
        }
        if !self.http.starts_with("http://") {
            return Err(format!("--http {} must start with http://", self.http));
        }
        Ok(())
    }

    /// Publishes made before the measured window.
    pub fn warmup_count(&self) -> u64 {
        (self.rate * self.warmup).round() as u64
    }

    /// Publishes inside the measured window.
    pub fn measured_count(&self) -> u64 {
        ((self.rate * self.duration).round() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<Mode, clap::Error> {
        parse(std::iter::once("relayhub-bench").chain(line.split_whitespace()))
    }

    fn rejected(line: &str) -> bool {
        matches!(parse_line(line), Err(error) if error.kind() != ErrorKind::DisplayHelp)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn smoke_flags_parse_and_derive_the_http_base() {
        let Ok(Mode::Bench(args)) = parse_line(
            "--url ws://127.0.0.1:18080/ws --connections 20 --channels 2 --rate 50 --duration 2",
        ) else {
            panic!("smoke flags must parse");
        };
        assert_eq!(args.connections, 20);
        assert_eq!(args.http, "http://127.0.0.1:18080");
        assert_eq!(args.measured_count(), 100);
        assert_eq!(args.warmup_count(), 50);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let Ok(Mode::Bench(args)) = parse_line("") else {
            panic!("no flags must parse");
        };
        assert_eq!(args.url, "ws://127.0.0.1:8080/ws");
        assert_eq!(
            (args.connections, args.channels, args.sources, args.threads),
            (100, 1, 4, 1)
        );
        assert_eq!(args.connect_concurrency, 256);
        assert_eq!(args.setup_timeout, 120.0);
        assert_eq!(args.hostile, 0);
        assert_eq!(args.publish, PublishMode::Http);
        assert_eq!(
            (args.rate, args.duration, args.warmup, args.drain),
            (100.0, 10.0, 1.0, 2.0)
        );
        assert_eq!(args.payload, 0);
        assert_eq!(args.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(args.prefix, "relayhub:");
        assert_eq!(args.http, "http://127.0.0.1:8080");
        assert!(args.headers.is_empty());
        assert_eq!(args.server_pid, None);
        assert_eq!(args.scenario, "");
    }

    #[test]
    fn unknown_flags_and_bad_values_are_rejected() {
        assert!(rejected("--nope 1"));
        assert!(rejected("--connections many"));
        assert!(rejected("--connections 0"));
        assert!(rejected("--publish kafka"));
        assert!(rejected("--connections"));
        assert!(rejected("--header NoColon"));
        assert!(rejected("--url http://127.0.0.1:8080/ws"));
        assert!(rejected("--serve-reference"));
        assert!(matches!(
            parse_line("--help"),
            Err(error) if error.kind() == ErrorKind::DisplayHelp
        ));
        assert!(matches!(
            parse_line("--serve-reference 127.0.0.1:18080"),
            Ok(Mode::ServeReference(options)) if options.addr == "127.0.0.1:18080" && options.redis.is_none()
        ));
        assert!(matches!(parse_line("--calibrate"), Ok(Mode::Calibrate(1))));
        assert!(matches!(
            parse_line("--calibrate --calibrate-batch 4"),
            Ok(Mode::Calibrate(4))
        ));
        assert!(rejected("--calibrate --calibrate-batch 0"));
        assert!(rejected("--calibrate-batch 4"));
        assert!(rejected("--reference-redis redis://127.0.0.1:1"));
        assert!(matches!(
            parse_line("--serve-reference 127.0.0.1:18080 --reference-redis redis://127.0.0.1:1 --prefix p:"),
            Ok(Mode::ServeReference(options))
                if options.redis.as_ref().is_some_and(|r| r.url == "redis://127.0.0.1:1" && r.pattern == "p:ch:*")
        ));
        let Ok(Mode::Bench(args)) = parse_line("--publish redis --header A:1 --header B:2") else {
            panic!("repeated headers must parse");
        };
        assert_eq!(args.publish, PublishMode::Redis);
        assert_eq!(args.headers, ["A:1", "B:2"]);
    }
}
