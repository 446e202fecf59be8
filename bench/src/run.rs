//! One benchmark run, phase by phase: check limits, open the publish path, connect, subscribe, then either
//! publish (warmup, measured window, drain) or hold idle, sampling the hub and the bench from /proc at the
//! window's edges. Returns the [`Report`]; an `Err` means the setup failed and nothing was measured.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::args::Args;
use crate::connections::{Fleet, Plan, Progress, Tally, unix_nanos};
use crate::hostile::{Hostile, HostileFigures};
use crate::proc_stats::{self, ProcSample};
use crate::publisher::{self, Answers, Event, PublishTally, Schedule};
use crate::report::{
    BenchFigures, ConnectFigures, DeliveryFigures, LatencyFigures, PublisherFigures, Report,
    ServerFigures,
};

/// File descriptors the bench needs besides its connections (stdio, runtime, publisher, /proc reads).
const SPARE_FDS: u64 = 64;
/// How often progress counters are polled during setup and drain.
const POLL: Duration = Duration::from_millis(1);
/// Bench CPU share over the window from which the bench, not the hub, is taken as the bottleneck.
const BENCH_BOTTLENECK_SHARE: f64 = 0.9;
/// A publisher this far behind schedule at any time has not held the asked rate.
const BEHIND: Duration = Duration::from_millis(10);

/// The hub's and the bench's CPU over the connect phase.
struct ConnectCost {
    elapsed: Duration,
    /// Before the first connection (also the idle run's RSS baseline).
    server_before: Option<ProcSample>,
    server_after: Option<ProcSample>,
    bench_before: ProcSample,
    bench_after: ProcSample,
}

/// What the measured window saw, before it is turned into a report.
struct Window {
    /// Unix nanoseconds when the window opened.
    start_ns: u64,
    elapsed: Duration,
    server_start: Option<ProcSample>,
    server_end: Option<ProcSample>,
    bench_start: ProcSample,
    bench_end: ProcSample,
    /// The publisher's timing and the publish path's answers; `None` when idle.
    publisher: Option<(PublishTally, Answers)>,
}

/// Runs the benchmark the flags describe.
pub fn run(args: &Args) -> Result<Report, String> {
    let needed = args.connections as u64 + SPARE_FDS;
    if let Some(soft) = proc_stats::open_files_soft_limit()
        && needed > soft
    {
        return Err(format!(
            "{} connections need about {needed} open files, but this process may open only {soft} \
             (soft RLIMIT_NOFILE): raise it with `ulimit -n` (up to the hard limit, `ulimit -Hn`) or use fewer \
             connections",
            args.connections
        ));
    }
    let target = resolve(&args.url)?;
    let plan = Arc::new(Plan {
        url: args.url.clone(),
        target,
        sources: Plan::loopback_sources(target, args.sources),
        connections: args.connections,
        channels: args.channels,
        threads: args.threads,
        connect_concurrency: args.connect_concurrency,
        warmup_count: args.warmup_count(),
        measured_count: args.measured_count(),
    });
    let server_before_connect = sample_server(args.server_pid)?;
    // Open the publish path first: a wrong Redis URL or HTTP address fails before thousands of connections.
    let sink = publisher::open_sink(args)?;

    let bench_before_connect = sample_self()?;
    let fleet = Fleet::start(plan.clone())
        .map_err(|error| format!("starting receiver threads: {error}"))?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.setup_timeout);
    log::info!(
        "connecting {} WebSockets to {} from {} sources",
        plan.connections,
        target,
        plan.sources.len()
    );
    let connecting = Instant::now();
    let connected = wait_until(deadline, || {
        let progress = &fleet.progress;
        progress.connected.load(Ordering::Relaxed) + progress.connect_failed.load(Ordering::Relaxed)
            >= plan.connections
    });
    let connect_elapsed = connecting.elapsed();
    let connect_cost = ConnectCost {
        elapsed: connect_elapsed,
        server_before: server_before_connect,
        server_after: sample_server(args.server_pid)?,
        bench_before: bench_before_connect,
        bench_after: sample_self()?,
    };
    let failed = fleet.progress.connect_failed.load(Ordering::Relaxed);
    if !connected || failed > 0 {
        let done = fleet.progress.connected.load(Ordering::Relaxed);
        return Err(abort(
            fleet,
            format!(
                "{done} of {} connections opened, {failed} failed after {:.1} s",
                plan.connections,
                connect_elapsed.as_secs_f64()
            ),
        ));
    }
    log::info!(
        "connected in {:.3} s; subscribing to {} channels",
        connect_elapsed.as_secs_f64(),
        plan.channels
    );

    let subscribing = Instant::now();
    fleet.subscribe();
    let subscribed = wait_until(deadline, || {
        let progress = &fleet.progress;
        progress.subscribed.load(Ordering::Relaxed)
            + progress.subscribe_failed.load(Ordering::Relaxed)
            >= plan.connections
    });
    let subscribe_elapsed = subscribing.elapsed();
    let refused = fleet.progress.subscribe_failed.load(Ordering::Relaxed);
    if !subscribed || refused > 0 {
        let done = fleet.progress.subscribed.load(Ordering::Relaxed);
        return Err(abort(
            fleet,
            format!(
                "{done} of {} subscribes acknowledged, {refused} failed",
                plan.connections
            ),
        ));
    }
    log::info!("subscribed in {:.3} s", subscribe_elapsed.as_secs_f64());
    let hostile = if args.hostile > 0 {
        log::info!("starting {} hostile clients", args.hostile);
        let path = ws_path(&args.url);
        match Hostile::start(target, path, args.hostile, plan.channels) {
            Ok(hostile) => Some(hostile),
            Err(error) => return Err(abort(fleet, format!("starting hostile clients: {error}"))),
        }
    } else {
        None
    };

    let window = match sink {
        None => hold_idle(args, &fleet.progress)?,
        Some(sink) => {
            let schedule = Schedule {
                rate: args.rate,
                warmup_count: plan.warmup_count,
                measured_count: plan.measured_count,
                channels: plan.channels,
                payload: args.payload,
            };
            match publish(args, sink, schedule, &plan, &fleet.progress) {
                Ok(window) => window,
                Err(error) => return Err(abort(fleet, error)),
            }
        }
    };
    let hostile = hostile.map(Hostile::stop);
    log::info!("closing connections");
    let first_error = fleet.progress.first_error();
    let dropped = fleet.progress.dropped.load(Ordering::Relaxed);
    let tally = fleet.stop();
    Ok(report(
        args,
        &plan,
        &connect_cost,
        subscribe_elapsed,
        window,
        tally,
        dropped,
        first_error,
        hostile,
    ))
}

/// The path part of a `ws://host:port/path` URL.
fn ws_path(url: &str) -> String {
    let rest = url.trim_start_matches("ws://");
    rest.find('/')
        .map_or_else(|| "/".to_string(), |i| rest[i..].to_string())
}

/// `--publish none`: hold the subscribed connections for the duration.
fn hold_idle(args: &Args, progress: &Progress) -> Result<Window, String> {
    log::info!("holding idle for {} s", args.duration);
    let server_start = sample_server(args.server_pid)?;
    let bench_start = sample_self()?;
    let started = Instant::now();
    let start_ns = unix_nanos();
    let hold = Duration::from_secs_f64(args.duration);
    wait_until(started + hold, || {
        progress.dropped.load(Ordering::Relaxed) > 0
    });
    let elapsed = started.elapsed();
    Ok(Window {
        start_ns,
        elapsed,
        server_start,
        server_end: sample_server(args.server_pid)?,
        bench_start,
        bench_end: sample_self()?,
        publisher: None,
    })
}

/// Publishing runs: warmup, measured window, drain.
fn publish(
    args: &Args,
    sink: Box<dyn publisher::Sink>,
    schedule: Schedule,
    plan: &Plan,
    progress: &Progress,
) -> Result<Window, String> {
    log::info!(
        "publishing {} warmup + {} measured messages at {}/s via {}",
        schedule.warmup_count,
        schedule.measured_count,
        schedule.rate,
        args.publish
    );
    let (events_tx, events) = mpsc::channel();
    // Answers normally arrive long before the drain ends; past it plus a second they count as failed.
    let answer_wait = Duration::from_secs_f64(args.drain + 1.0);
    let publisher = publisher::spawn(sink, schedule, answer_wait, events_tx)
        .map_err(|error| format!("starting the publisher: {error}"))?;
    let mut opened = None;
    let tally = loop {
        match events.recv() {
            Ok(Event::Measuring) => {
                opened = Some((
                    Instant::now(),
                    unix_nanos(),
                    sample_server(args.server_pid)?,
                    sample_self()?,
                ));
            }
            Ok(Event::Sent(tally)) => break tally,
            Ok(Event::GaveUp(error)) => return Err(error),
            Err(_) => return Err("the publisher thread ended without a result".into()),
        }
    };
    let Some((started, start_ns, server_start, bench_start)) = opened else {
        return Err("the publisher never reached the measured window".into());
    };
    let expected = plan.expected_total();
    log::info!("published; draining for up to {} s", args.drain);
    let drain_end = Instant::now() + Duration::from_secs_f64(args.drain);
    wait_until(drain_end, || {
        progress.measured_received.load(Ordering::Relaxed) >= expected
    });
    let (elapsed, server_end, bench_end) = (
        started.elapsed(),
        sample_server(args.server_pid)?,
        sample_self()?,
    );
    let answers = publisher
        .join()
        .map_err(|_| "the publisher thread panicked".to_string())?;
    Ok(Window {
        start_ns,
        elapsed,
        server_start,
        server_end,
        bench_start,
        bench_end,
        publisher: Some((tally, answers)),
    })
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    plan: &Plan,
    connect: &ConnectCost,
    subscribe_elapsed: Duration,
    window: Window,
    tally: Tally,
    dropped: usize,
    first_error: Option<String>,
    hostile: Option<HostileFigures>,
) -> Report {
    let window_s = window.elapsed.as_secs_f64();
    let mut warnings = Vec::new();
    let publishing = window.publisher.is_some();

    let bench_cpu = window.bench_end.cpu_seconds - window.bench_start.cpu_seconds;
    let bench = BenchFigures {
        cpu_seconds: bench_cpu,
        cpu_share: bench_cpu / window_s,
        rss_kib: window.bench_end.rss_kib,
        bottleneck: bench_cpu / window_s >= BENCH_BOTTLENECK_SHARE,
    };
    if bench.bottleneck {
        warnings.push(format!(
            "the load generator used {:.0} % of a core over the window: it was the bottleneck, so the server's \
             figures (deliveries/s, deliveries per CPU-second, latency) are lower bounds",
            bench.cpu_share * 100.0
        ));
    }

    let deliveries = publishing.then(|| {
        let expected = plan.expected_total();
        let delivering_ns = tally
            .last_delivery_ns
            .saturating_sub(window.start_ns)
            .max(1);
        DeliveryFigures {
            expected,
            received: tally.received,
            missing: expected.saturating_sub(tally.received),
            per_second: tally.received as f64 / (delivering_ns as f64 / 1e9),
            warmup_received: tally.warmup_received,
            out_of_order: tally.out_of_order,
            unexpected: tally.unexpected,
            incomplete_connections: tally.incomplete_connections,
            error_frames: tally.error_frames,
        }
    });
    if let Some(deliveries) = &deliveries
        && deliveries.missing > 0
    {
        warnings.push(format!(
            "{} of {} deliveries had not arrived {} s after the last publish",
            deliveries.missing, deliveries.expected, args.drain
        ));
    }

    let latency_ms = (publishing && tally.received > 0).then(|| {
        let ms = |ns: u64| ns as f64 / 1e6;
        let histogram = &tally.latency_ns;
        LatencyFigures {
            p50: ms(histogram.value_at_quantile(0.50)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1e6,
        }
    });

    let publisher = window.publisher.as_ref().map(|(publisher, answers)| {
        let achieved_rate = if publisher.measured_elapsed.is_zero() {
            0.0
        } else {
            // n publishes span n - 1 intervals of the schedule.
            plan.measured_count.saturating_sub(1) as f64 / publisher.measured_elapsed.as_secs_f64()
        };
        if publisher.max_lag > BEHIND {
            warnings.push(format!(
                "the publisher fell behind schedule: max lag {:.1} ms, {} publishes more than 1 ms late",
                publisher.max_lag.as_secs_f64() * 1e3,
                publisher.late
            ));
        }
        if answers.no_receivers > 0 {
            warnings.push(format!(
                "{} publishes reached no Redis subscriber: is the hub in redis mode with prefix {:?}?",
                answers.no_receivers, args.prefix
            ));
        }
        if answers.failed > 0 {
            warnings.push(format!(
                "{} publishes failed; first: {}",
                answers.failed,
                answers.first_error.as_deref().unwrap_or("?")
            ));
        }
        PublisherFigures {
            published: publisher.published,
            succeeded: answers.succeeded,
            errors: answers.failed,
            late: publisher.late,
            max_lag_ms: publisher.max_lag.as_secs_f64() * 1e3,
            achieved_rate,
            no_receivers: answers.no_receivers,
        }
    });

    let server = match (
        args.server_pid,
        connect.server_before,
        window.server_start,
        window.server_end,
    ) {
        (Some(pid), Some(before), Some(start), Some(end)) => {
            let cpu_seconds = end.cpu_seconds - start.cpu_seconds;
            Some(ServerFigures {
                pid,
                rss_before_connect_kib: before.rss_kib,
                rss_start_kib: start.rss_kib,
                rss_end_kib: end.rss_kib,
                peak_rss_kib: end.peak_rss_kib,
                rss_per_connection_bytes: (!publishing).then(|| {
                    (end.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / plan.connections as f64
                }),
                cpu_seconds,
                cpu_share: cpu_seconds / window_s,
                deliveries_per_cpu_second: (publishing && cpu_seconds > 0.0)
                    .then(|| tally.received as f64 / cpu_seconds),
            })
        }
        _ => None,
    };
    if dropped > 0 {
        warnings.push(format!(
            "{dropped} subscribed connections were closed or broken during the run"
        ));
    }

    let ok = dropped == 0
        && tally.error_frames == 0
        && deliveries
            .as_ref()
            .is_none_or(|deliveries| deliveries.missing == 0)
        && publisher
            .as_ref()
            .is_none_or(|publisher| publisher.errors == 0);
    Report {
        scenario: args.scenario.clone(),
        publish: args.publish.to_string(),
        connections: plan.connections,
        channels: plan.channels,
        sources: plan.sources.len(),
        threads: plan.threads,
        rate: if publishing { args.rate } else { 0.0 },
        duration_s: args.duration,
        warmup_s: if publishing { args.warmup } else { 0.0 },
        payload_bytes: args.payload,
        connect: connect_figures(plan.connections, connect),
        subscribe_s: subscribe_elapsed.as_secs_f64(),
        window_s,
        publisher,
        deliveries,
        latency_ms,
        server,
        bench,
        dropped,
        endings: tally.endings,
        first_error,
        hostile,
        warnings,
        ok,
    }
}

fn connect_figures(connections: usize, cost: &ConnectCost) -> ConnectFigures {
    let seconds = cost.elapsed.as_secs_f64();
    let server_cpu_seconds = match (cost.server_before, cost.server_after) {
        (Some(before), Some(after)) => Some(after.cpu_seconds - before.cpu_seconds),
        _ => None,
    };
    let bench_cpu = cost.bench_after.cpu_seconds - cost.bench_before.cpu_seconds;
    ConnectFigures {
        seconds,
        per_second: connections as f64 / seconds,
        server_cpu_seconds,
        per_server_cpu_second: server_cpu_seconds
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| connections as f64 / cpu),
        bench_cpu_share: bench_cpu / seconds,
    }
}

/// Stops the fleet after a failed setup and returns the error with the first connection error appended.
fn abort(fleet: Fleet, error: String) -> String {
    let first = fleet.progress.first_error();
    let _ = fleet.stop();
    match first {
        Some(first) => format!("{error}; first error: {first}"),
        None => error,
    }
}

/// Polls `done` until it holds (true) or the deadline passes (false).
fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// The hub's address from `ws://host[:port]/path`, IPv4 preferred.
fn resolve(url: &str) -> Result<SocketAddr, String> {
    let authority = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default();
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|error| format!("resolving {authority}: {error}"))?
        .collect();
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{authority} has no address"))
}

fn sample_server(pid: Option<u32>) -> Result<Option<ProcSample>, String> {
    pid.map(|pid| {
        proc_stats::sample(Some(pid))
            .map_err(|error| format!("reading /proc/{pid} (--server-pid): {error}"))
    })
    .transpose()
}

fn sample_self() -> Result<ProcSample, String> {
    proc_stats::sample(None).map_err(|error| format!("reading /proc/self: {error}"))
}
