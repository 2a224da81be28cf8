//! Throughput at a fixed concurrency from `wrk` (Debian's package): a lua
//! script makes it POST the benchmark request, and its summary is parsed.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

/// What one `wrk` run reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_second: f64,
    /// Answers with a status outside 2xx/3xx.
    pub non_2xx: u64,
    pub socket_errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl WrkResult {
    /// Fails unless every answer was 2xx/3xx and no socket failed: a figure
    /// taken over errors would measure the errors.
    pub fn ensure_clean(&self, what: &str) -> anyhow::Result<()> {
        if self.non_2xx > 0 || self.socket_errors > 0 {
            bail!(
                "{what}: {} non-2xx answers and {} socket errors in {} requests",
                self.non_2xx,
                self.socket_errors,
                self.requests
            );
        }
        Ok(())
    }
}

/// A lua long-bracket string that `text` cannot close early.
fn lua_string(text: &str) -> String {
    let mut level = 1;
    while text.contains(&format!("]{}]", "=".repeat(level))) {
        level += 1;
    }
    let eq = "=".repeat(level);
    format!("[{eq}[{text}]{eq}]")
}

/// Writes the script that makes every request a POST of `body` to `path`
/// with `headers`.
pub fn write_script(
    file: &Path,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> anyhow::Result<()> {
    let mut script = String::from("wrk.method = \"POST\"\n");
    script.push_str(&format!("wrk.path = {}\n", lua_string(path)));
    for (name, value) in headers {
        script.push_str(&format!(
            // The spaces keep `[[` from opening a long string.
            "wrk.headers[ {} ] = {}\n",
            lua_string(name),
            lua_string(value)
        ));
    }
    script.push_str(&format!("wrk.body = {}\n", lua_string(body)));
    std::fs::write(file, script).with_context(|| format!("writing {}", file.display()))
}

/// Runs `wrk` against `url` for `duration` with `connections` connections.
pub async fn run(
    script: &Path,
    url: &str,
    connections: u32,
    threads: u32,
    duration: Duration,
) -> anyhow::Result<WrkResult> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("10s")
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(duration + Duration::from_secs(30), output)
        .await
        .context("wrk did not finish in time")?
        .context("running wrk (make bench-tools installs it)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("reading wrk's output:\n{stdout}"))
}

/// `1.23ms`, `456.00us`, `1.02s`, `2.00m` in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(value * factor)
}

pub fn parse(output: &str) -> anyhow::Result<WrkResult> {
    let mut requests = None;
    let mut rps = None;
    let mut non_2xx = 0;
    let mut socket_errors = 0;
    let mut p50 = f64::NAN;
    let mut p99 = f64::NAN;
    for line in output.lines() {
        let line = line.trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rps = rest.trim().parse::<f64>().ok();
        } else if words.get(1) == Some(&"requests") && words.get(2) == Some(&"in") {
            requests = words.first().and_then(|w| w.parse::<u64>().ok());
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = rest.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if words.len() == 2 && words[0] == "50%" {
            p50 = duration_ms(words[1]).unwrap_or(f64::NAN);
        } else if words.len() == 2 && words[0] == "99%" {
            p99 = duration_ms(words[1]).unwrap_or(f64::NAN);
        }
    }
    match (requests, rps) {
        (Some(requests), Some(requests_per_second)) => Ok(WrkResult {
            requests,
            requests_per_second,
            non_2xx,
            socket_errors,
            p50_ms: p50,
            p99_ms: p99,
        }),
        _ => bail!("no request count or Requests/sec line"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 5s test @ http://127.0.0.1:4000
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    1.20ms  25.00ms   90.00%
    Req/Sec     5.20k   300.00     6.00k    70.00%
  Latency Distribution
     50%    2.95ms
     75%    3.50ms
     90%    4.10ms
     99%  812.00us
  51234 requests in 5.00s, 40.12MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  10246.80
Transfer/sec:      8.02MB
";

    #[test]
    fn summary_is_parsed() {
        let r = parse(OUTPUT).unwrap();
        assert_eq!(r.requests, 51234);
        assert_eq!(r.requests_per_second, 10246.80);
        assert_eq!((r.non_2xx, r.socket_errors), (7, 3));
        assert_eq!(r.p50_ms, 2.95);
        assert!((r.p99_ms - 0.812).abs() < 1e-9);
        assert!(parse("garbage").is_err());
    }

    #[test]
    fn script_sets_method_headers_and_body() {
        let dir = std::env::temp_dir().join(format!("relay-bench-wrk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("s.lua");
        let headers = [("x-api-key".to_owned(), "k".to_owned())];
        write_script(&file, "/v1/messages", &headers, "{}").unwrap();
        let script = std::fs::read_to_string(&file).unwrap();
        assert!(script.contains("wrk.headers[ [=[x-api-key]=] ] = [=[k]=]"));
        assert!(script.contains("wrk.body = [=[{}]=]"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lua_strings_cannot_be_closed_by_their_content() {
        assert_eq!(lua_string("a"), "[=[a]=]");
        assert_eq!(lua_string("x]=]y"), "[==[x]=]y]==]");
    }
}
