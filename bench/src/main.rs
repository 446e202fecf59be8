//! relayhub-bench: the load generator of relayhub. It opens many WebSocket subscribers on a hub, publishes
//! at a fixed rate through Redis or the hub's HTTP API, and reports delivery rate, loss, latency and the
//! hub's CPU and memory cost. Independent of the `relayhub` library: it speaks only the wire protocol.
//!
//! # Layout
//! - `args`: the command line (clap).
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

use args::Mode;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match args::parse(std::env::args_os()) {
        Ok(Mode::Bench(args)) => args,
        Ok(Mode::Calibrate(batch)) => return calibrate(batch),
        Ok(Mode::ServeReference(options)) => {
            return match reference::serve(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("relayhub-bench: reference relay: {error}");
                    ExitCode::from(1)
                }
            };
        }
        Err(error) => {
            // Help goes to stdout with status 0; a bad flag to stderr with status 1 (2 means "ran, with losses").
            let _ = error.print();
            return match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            };
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

fn calibrate(batch: usize) -> ExitCode {
    match calibrate::run(batch) {
        Ok(floor) => {
            println!(
                "loopback TCP, {} socket pairs, {}-byte messages, {} per write: write {:.2} us of CPU per message, read {:.2} us per read",
                floor.pairs, floor.message_bytes, floor.batch, floor.write_us, floor.read_us
            );
            println!(
                "a hub doing nothing but these writes would reach {:.0} deliveries per CPU-second",
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
