//! Resource figures: this process's CPU time (getrusage) and a server
//! process's CPU time and memory (Linux `/proc/PID/stat` and `/proc/PID/status`).

use serde::Serialize;
use std::{fs, io, time::Duration};

/// CPU time (user + system) this process has used so far.
pub fn own_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given and touches nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One reading of a process's CPU time and memory.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ProcSample {
    /// user + system CPU time, in seconds.
    pub cpu_secs: f64,
    /// Resident set size now, KiB (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set size since the process started, KiB (VmHWM).
    pub hwm_kib: u64,
}

impl ProcSample {
    /// Reads `/proc/PID/stat` (utime, stime) and `/proc/PID/status` (VmRSS, VmHWM).
    pub fn read(pid: u32) -> io::Result<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable /proc/{pid}"),
            )
        };
        // Fields after the parenthesised command name start at field 3 (state);
        // utime and stime are fields 14 and 15.
        let after_comm = stat.rsplit_once(')').ok_or_else(bad)?.1;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .ok_or_else(bad)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_secs = (ticks(11)? + ticks(12)?) as f64 / hz;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .ok_or_else(bad)
        };
        Ok(Self {
            cpu_secs,
            rss_kib: kib("VmRSS:")?,
            hwm_kib: kib("VmHWM:")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let burn: u64 = (0..5_000_000u64).fold(0, |a, b| a.wrapping_add(b * b));
        assert!(burn > 0);
        let sample = ProcSample::read(std::process::id()).unwrap();
        assert!(sample.rss_kib > 0 && sample.hwm_kib >= sample.rss_kib);
        assert!(own_cpu() > Duration::ZERO);
    }
}
