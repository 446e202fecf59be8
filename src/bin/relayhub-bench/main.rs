//! relayhub-bench: the load generator of relayhub. It opens many WebSocket subscribers on a hub, publishes
//! at a fixed rate through Redis or the hub's HTTP API, and reports delivery rate, loss, latency and the
//! hub's CPU and memory cost. Independent of the `relayhub` library: it speaks only the wire protocol.
//!
//! # Layout
//! - `args`: the `--flag value` command line.
//! - `run`: one run, phase by phase (connect, subscribe, publish or hold, drain), building the report.
//! - `connections`: the subscriber fleet (receiver threads, one WebSocket task per connection).
//! - `frames`: cheap parsing of what the hub sends.
//! - `hostile`: `--hostile N`, misbehaving raw-socket clients run beside the measured ones.
//! - `publisher`: the paced publisher thread and its Redis and HTTP sinks.
//! - `proc_stats`: CPU seconds and RSS from /proc, and the open-file limit.
//! - `report`: the figures, as a table and as one JSON line.
//! - `calibrate`: the kernel's cost of one loopback write and read, the floor under every delivery.
//! - `reference`: `--serve-reference`, a plain single-threaded relay to run the same scenarios against.

mod args;
mod calibrate;
mod connections;
mod frames;
mod hostile;
mod proc_stats;
mod publisher;
mod reference;
mod report;
mod run;

use std::process::ExitCode;

use args::{Args, ParseOutcome, USAGE};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(ParseOutcome::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ParseOutcome::Calibrate) => return calibrate(),
        Err(ParseOutcome::ServeReference(addr)) => {
            return match reference::serve(&addr) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("relayhub-bench: reference relay: {error}");
                    ExitCode::from(1)
                }
            };
        }
        Err(ParseOutcome::Invalid(message)) => {
            eprintln!("relayhub-bench: {message}");
            return ExitCode::from(1);
        }
    };
    match run::run(&args) {
        Ok(report) => {
            print!("{}", report.table());
            println!("{}", report.json_line());
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(error) => {
            eprintln!("relayhub-bench: {error}");
            let failure =
                serde_json::json!({ "scenario": args.scenario, "ok": false, "error": error });
            println!("{failure}");
            ExitCode::from(1)
        }
    }
}

fn calibrate() -> ExitCode {
    match calibrate::run() {
        Ok(floor) => {
            println!(
                "loopback TCP, {} socket pairs, {}-byte messages: write {:.2} us, read {:.2} us of CPU per message",
                floor.pairs, floor.message_bytes, floor.write_us, floor.read_us
            );
            println!(
                "a hub doing nothing but one write per delivery would reach {:.0} deliveries per CPU-second",
                floor.write_bound_per_cpu_second
            );
            println!("{}", serde_json::json!(floor));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("relayhub-bench: calibration failed: {error}");
            ExitCode::from(1)
        }
    }
}
