//! Process accounting from /proc: CPU time (utime + stime, all threads,
//! exited ones included) and resident memory.

use std::path::Path;

use anyhow::{Context, bail};

/// Clock ticks per second of /proc/<pid>/stat's times (`getconf CLK_TCK`,
/// 100 on Linux unless told otherwise).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Fields of /proc/<pid>/stat from field 3 (the state) on; the command
/// name before them may contain spaces and parentheses.
fn stat_fields(path: &Path) -> anyhow::Result<Vec<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(close) = text.rfind(')') else {
        bail!("unexpected format of {}", path.display());
    };
    // Field 3 (the state letter) is not a number: keep its place with 0.
    Ok(text[close + 1..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect())
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let fields = stat_fields(Path::new(&format!("/proc/{pid}/stat")))?;
    // utime and stime are fields 14 and 15: indexes 11 and 12 from field 3.
    match (fields.get(11), fields.get(12)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("/proc/{pid}/stat has too few fields"),
    }
}

/// cutime + cstime of this process: the CPU of children already waited for
/// (the load generator's), in clock ticks.
pub fn children_cpu_ticks() -> anyhow::Result<u64> {
    let fields = stat_fields(Path::new("/proc/self/stat"))?;
    match (fields.get(13), fields.get(14)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("/proc/self/stat has too few fields"),
    }
}

/// A `kB` field of /proc/<pid>/status (`VmRSS`, `VmHWM`), in MB.
pub fn status_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    Ok(status_kb(pid, field)? as f64 / 1024.0)
}

/// A `kB` field of /proc/<pid>/status, in kB.
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let number = rest.trim().trim_end_matches("kB").trim();
            return number
                .parse()
                .with_context(|| format!("{field} in {path}: `{rest}`"));
        }
    }
    bail!("{field} not found in {path}")
}

/// CPU ticks of several processes at one moment.
pub struct CpuMark(Vec<(u32, u64)>);

impl CpuMark {
    pub fn take(pids: &[u32]) -> anyhow::Result<CpuMark> {
        pids.iter()
            .map(|&pid| Ok((pid, cpu_ticks(pid)?)))
            .collect::<anyhow::Result<_>>()
            .map(CpuMark)
    }

    /// Milliseconds of CPU per request of `pid` since this mark.
    pub fn per_request(
        &self,
        pid: u32,
        requests: u64,
        ticks_per_second: f64,
    ) -> anyhow::Result<f64> {
        let before = self
            .0
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, t)| *t)
            .context("pid not marked")?;
        let after = cpu_ticks(pid)?;
        Ok((after.saturating_sub(before)) as f64 * 1000.0
            / ticks_per_second
            / requests.max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        cpu_ticks(pid).unwrap();
        children_cpu_ticks().unwrap();
        assert!(status_kb(pid, "VmRSS").unwrap() > 0);
        assert!(status_kb(pid, "VmHWM").unwrap() >= status_kb(pid, "VmRSS").unwrap() / 2);
        assert!(status_kb(pid, "NoSuchField").is_err());
    }
}
