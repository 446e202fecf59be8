//! Reads a process's CPU time and resident memory from Linux's /proc, and this process's open-file limit.
//! The run samples the hub and the bench itself at the start and end of the measured window.

use std::fs;
use std::io;

/// Clock ticks per second of the utime/stime fields (`_SC_CLK_TCK`, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// User plus system CPU seconds since the process started, all threads.
    pub cpu_seconds: f64,
    /// Resident set size in KiB (`VmRSS`).
    pub rss_kib: u64,
    /// The largest resident set size the process has had, in KiB (`VmHWM`).
    pub peak_rss_kib: u64,
}

/// Which process to read: a pid, or `None` for this one.
pub fn sample(pid: Option<u32>) -> io::Result<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_string(),
    };
    let stat = fs::read_to_string(format!("{dir}/stat"))?;
    let status = fs::read_to_string(format!("{dir}/status"))?;
    Ok(ProcSample {
        cpu_seconds: cpu_seconds(&stat).ok_or_else(|| malformed(&dir, "stat"))?,
        rss_kib: status_kib(&status, "VmRSS:").ok_or_else(|| malformed(&dir, "status"))?,
        peak_rss_kib: status_kib(&status, "VmHWM:").ok_or_else(|| malformed(&dir, "status"))?,
    })
}

/// The soft `RLIMIT_NOFILE` of this process, from /proc/self/limits.
pub fn open_files_soft_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// utime + stime: fields 14 and 15 of /proc/<pid>/stat, counted after the `(comm)` field, which may hold spaces.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the comm come field 3 (state) onwards, so utime is the 12th of these, stime the 13th.
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / CLK_TCK)
}

/// A `Name:   123 kB` line of /proc/<pid>/status, in KiB.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

fn malformed(dir: &str, file: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected format of {dir}/{file}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_skips_a_comm_with_spaces() {
        let stat =
            "4242 (relay hub) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
    }

    #[test]
    fn rss_is_read_in_kib() {
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t   12345 kB\nThreads: 3\n", "VmRSS:"),
            Some(12345)
        );
    }

    #[test]
    fn this_process_can_be_sampled() {
        let own = sample(None).expect("/proc/self is readable on Linux");
        assert!(own.rss_kib > 0);
        assert!(open_files_soft_limit().is_some());
    }
}
