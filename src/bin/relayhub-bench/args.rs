//! Command-line flags of the load generator: `--flag value` pairs parsed by hand into [`Args`].
//! `main` calls [`Args::parse`] once; every other module reads the typed result.

use std::fmt;
use std::str::FromStr;

/// Printed by `--help`.
pub const USAGE: &str = "\
relayhub-bench: opens WebSocket subscribers on a relayhub, publishes at a fixed rate, measures delivery.

USAGE: relayhub-bench [--flag value]...

Connections
  --url URL                 hub WebSocket endpoint              [ws://127.0.0.1:8080/ws]
  --connections N           subscriber connections              [100]
  --channels C              channels bench:0..bench:C-1, assigned round robin [1]
  --sources K               source addresses 127.0.0.1..127.0.0.K to spread connections over;
                            0 = no bind, the kernel picks the address and port [4]
  --threads T               receiver threads, one runtime each  [1]
  --connect-concurrency M   handshakes in flight at once         [256]
  --setup-timeout S         give up connecting/subscribing after S seconds [120]
  --hostile H               misbehaving clients beside the measured ones, from 127.0.0.200: stuck readers,
                            4 GiB frame headers, ping floods, subscribe churn, malformed frames [0]

Publishing
  --publish MODE            redis | http | none (none = idle capacity: connect, subscribe, hold) [http]
  --rate R                  publishes per second, all channels together [100]
  --duration D              seconds measured (publishing, or holding with --publish none) [10]
  --warmup S                seconds published before measuring (not counted) [1]
  --drain S                 seconds to wait for late deliveries after publishing [2]
  --payload BYTES           pad each published JSON to about BYTES bytes [0 = no padding]
  --redis-url URL           Redis for --publish redis            [redis://127.0.0.1:6379]
  --prefix P                key prefix of the hub; publishes go to <P>ch:<channel> [relayhub:]
  --http URL                hub HTTP base for --publish http     [derived from --url]
  --header 'Name: value'    extra header on every HTTP publish (repeatable)

Other
  --calibrate               measure this machine's cost of one loopback TCP write and read, then exit
  --serve-reference ADDR:PORT
                            run a plain single-threaded tokio relay on ADDR:PORT until SIGTERM/SIGINT instead
                            of a benchmark: WebSocket subscribe on /ws, POST /api/publish; a baseline to run
                            the same scenarios against (scripts/bench.sh ref-*), not relayhub

Reporting
  --server-pid PID          hub process to sample (RSS, CPU seconds) over the measured window
  --scenario NAME           label copied into the report

Output: a table, then one JSON line (the last line of stdout).
Exit status: 0 all delivered; 1 setup failed (connect, subscribe, publisher); 2 run finished with losses or errors.";

/// Every flag that takes a value; `parse` has one arm for each.
const FLAGS: &[&str] = &[
    "--url",
    "--connections",
    "--channels",
    "--sources",
    "--threads",
    "--connect-concurrency",
    "--setup-timeout",
    "--hostile",
    "--publish",
    "--rate",
    "--duration",
    "--warmup",
    "--drain",
    "--payload",
    "--redis-url",
    "--prefix",
    "--http",
    "--header",
    "--server-pid",
    "--scenario",
];

/// How published messages reach the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Everything the run needs, validated.
#[derive(Clone, Debug)]
pub struct Args {
    /// WebSocket URL every subscriber connects to.
    pub url: String,
    /// Number of subscriber connections.
    pub connections: usize,
    /// Number of channels; connection `i` subscribes to `bench:<i % channels>`.
    pub channels: usize,
    /// Source addresses 127.0.0.1..=127.0.0.K, so one address's ephemeral ports never run out; 0 = no bind.
    pub sources: u8,
    /// Receiver threads, each with its own current-thread runtime.
    pub threads: usize,
    /// WebSocket handshakes in flight at once during the connect phase.
    pub connect_concurrency: usize,
    /// Upper bound on the connect and subscribe phases, in seconds.
    pub setup_timeout: f64,
    /// Hostile clients run beside the measured ones during the publishing window.
    pub hostile: usize,
    /// How messages are published.
    pub publish: PublishMode,
    /// Publishes per second over all channels.
    pub rate: f64,
    /// Measured seconds.
    pub duration: f64,
    /// Seconds published before the measured window (lets every path warm up).
    pub warmup: f64,
    /// Seconds to wait for late deliveries after the last publish.
    pub drain: f64,
    /// Target size of each published JSON document; 0 = no padding.
    pub payload: usize,
    /// Redis used by `--publish redis`.
    pub redis_url: String,
    /// The hub's Redis key prefix.
    pub prefix: String,
    /// HTTP base URL of the hub for `--publish http`.
    pub http: String,
    /// Extra `Name: value` headers sent with every HTTP publish.
    pub headers: Vec<String>,
    /// Hub process to sample from /proc.
    pub server_pid: Option<u32>,
    /// Free-form label copied into the report.
    pub scenario: String,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            url: "ws://127.0.0.1:8080/ws".into(),
            connections: 100,
            channels: 1,
            sources: 4,
            threads: 1,
            connect_concurrency: 256,
            setup_timeout: 120.0,
            hostile: 0,
            publish: PublishMode::Http,
            rate: 100.0,
            duration: 10.0,
            warmup: 1.0,
            drain: 2.0,
            payload: 0,
            redis_url: "redis://127.0.0.1:6379".into(),
            prefix: "relayhub:".into(),
            http: String::new(),
            headers: Vec::new(),
            server_pid: None,
            scenario: String::new(),
        }
    }
}

/// What parsing can end in besides a valid [`Args`].
pub enum ParseOutcome {
    /// `--help` was asked for.
    Help,
    /// `--calibrate` was asked for.
    Calibrate,
    /// `--serve-reference ADDR:PORT` was asked for: serve the reference relay there.
    ServeReference(String),
    /// A flag or value was wrong; the message says which.
    Invalid(String),
}

impl Args {
    /// Parses the flags that follow the program name.
    pub fn parse(mut flags: impl Iterator<Item = String>) -> Result<Args, ParseOutcome> {
        let mut args = Args::default();
        while let Some(flag) = flags.next() {
            if flag == "--help" || flag == "-h" {
                return Err(ParseOutcome::Help);
            }
            if flag == "--calibrate" {
                return Err(ParseOutcome::Calibrate);
            }
            if flag == "--serve-reference" {
                let addr = flags
                    .next()
                    .ok_or_else(|| ParseOutcome::Invalid(format!("{flag} needs ADDR:PORT")))?;
                return Err(ParseOutcome::ServeReference(addr));
            }
            if !FLAGS.contains(&flag.as_str()) {
                return Err(ParseOutcome::Invalid(format!(
                    "unknown flag {flag} (see --help)"
                )));
            }
            let value = flags
                .next()
                .ok_or_else(|| ParseOutcome::Invalid(format!("{flag} needs a value")))?;
            match flag.as_str() {
                "--url" => args.url = value,
                "--connections" => args.connections = number(&flag, &value)?,
                "--channels" => args.channels = number(&flag, &value)?,
                "--sources" => args.sources = number(&flag, &value)?,
                "--threads" => args.threads = number(&flag, &value)?,
                "--connect-concurrency" => args.connect_concurrency = number(&flag, &value)?,
                "--setup-timeout" => args.setup_timeout = number(&flag, &value)?,
                "--hostile" => args.hostile = number(&flag, &value)?,
                "--publish" => {
                    args.publish = match value.as_str() {
                        "redis" => PublishMode::Redis,
                        "http" => PublishMode::Http,
                        "none" => PublishMode::None,
                        _ => return Err(invalid(&flag, &value, "redis, http or none")),
                    }
                }
                "--rate" => args.rate = number(&flag, &value)?,
                "--duration" => args.duration = number(&flag, &value)?,
                "--warmup" => args.warmup = number(&flag, &value)?,
                "--drain" => args.drain = number(&flag, &value)?,
                "--payload" => args.payload = number(&flag, &value)?,
                "--redis-url" => args.redis_url = value,
                "--prefix" => args.prefix = value,
                "--http" => args.http = value,
                "--header" => {
                    if !value.contains(':') {
                        return Err(invalid(&flag, &value, "'Name: value'"));
                    }
                    args.headers.push(value);
                }
                "--server-pid" => args.server_pid = Some(number(&flag, &value)?),
                "--scenario" => args.scenario = value,
                _ => {
                    return Err(ParseOutcome::Invalid(format!(
                        "unknown flag {flag} (see --help)"
                    )));
                }
            }
        }
        args.validate()?;
        Ok(args)
    }

    /// Checks ranges and fills the values derived from others.
    fn validate(&mut self) -> Result<(), ParseOutcome> {
        let positive = |name: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ParseOutcome::Invalid(format!("{name} must be positive")))
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
            return Err(ParseOutcome::Invalid(
                "--warmup and --drain must not be negative".into(),
            ));
        }
        if !self.url.starts_with("ws://") {
            return Err(ParseOutcome::Invalid(format!(
                "--url {} must start with ws:// (the bench speaks plain WebSocket)",
                self.url
            )));
        }
        if self.http.is_empty() {
            let host_port = self.url["ws://".len()..]
                .split('/')
                .next()
                .unwrap_or_default();
            self.http = format!("http://{host_port}");
        }
        if !self.http.starts_with("http://") {
            return Err(ParseOutcome::Invalid(format!(
                "--http {} must start with http://",
                self.http
            )));
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

fn number<T: FromStr>(flag: &str, value: &str) -> Result<T, ParseOutcome> {
    value.parse().map_err(|_| invalid(flag, value, "a number"))
}

fn invalid(flag: &str, value: &str, expected: &str) -> ParseOutcome {
    ParseOutcome::Invalid(format!("{flag} {value}: expected {expected}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Args, ParseOutcome> {
        Args::parse(line.split_whitespace().map(String::from))
    }

    #[test]
    fn smoke_flags_parse_and_derive_the_http_base() {
        let Ok(args) = parse(
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
    fn unknown_flags_and_bad_values_are_rejected() {
        assert!(matches!(parse("--nope 1"), Err(ParseOutcome::Invalid(_))));
        assert!(matches!(
            parse("--connections many"),
            Err(ParseOutcome::Invalid(_))
        ));
        assert!(matches!(
            parse("--publish kafka"),
            Err(ParseOutcome::Invalid(_))
        ));
        assert!(matches!(
            parse("--connections"),
            Err(ParseOutcome::Invalid(_))
        ));
        assert!(matches!(parse("--help"), Err(ParseOutcome::Help)));
        assert!(matches!(
            parse("--serve-reference 127.0.0.1:18080"),
            Err(ParseOutcome::ServeReference(addr)) if addr == "127.0.0.1:18080"
        ));
        assert!(matches!(
            parse("--serve-reference"),
            Err(ParseOutcome::Invalid(_))
        ));
    }
}
