//! The processes under test: DynamoDB Local (through the repo's script,
//! stopped by its PID even when the bench fails), fake upstreams and relays
//! (children killed when dropped), all on 127.0.0.1.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

/// DynamoDB Local started by `infra/dynamodb-local.sh start` in the bench's
/// own state dir; dropping it runs `stop`, which signals only the PID the
/// script recorded.
pub struct Dynamo {
    script: PathBuf,
    state_dir: PathBuf,
    pub endpoint: String,
    pub pid: u32,
}

impl Dynamo {
    pub fn start(root: &Path, state_dir: &Path) -> anyhow::Result<Dynamo> {
        let script = root.join("infra/dynamodb-local.sh");
        let output = std::process::Command::new(&script)
            .arg("start")
            .env("RELAY_STATE_DIR", state_dir)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {} start", script.display()))?;
        // From here on, a failure must still stop what may have started.
        let mut dynamo = Dynamo {
            script,
            state_dir: state_dir.to_owned(),
            endpoint: String::new(),
            pid: 0,
        };
        if !output.status.success() {
            bail!("infra/dynamodb-local.sh start failed ({})", output.status);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        dynamo.endpoint = stdout
            .lines()
            .last()
            .map(str::trim)
            .filter(|l| l.starts_with("http://127.0.0.1:"))
            .context("infra/dynamodb-local.sh start printed no 127.0.0.1 endpoint")?
            .to_owned();
        let pidfile = state_dir.join("dynamodb-local.pid");
        dynamo.pid = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?
            .trim()
            .parse()
            .context("DynamoDB Local's pid file")?;
        Ok(dynamo)
    }
}

impl Drop for Dynamo {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .arg("stop")
            .env("RELAY_STATE_DIR", &self.state_dir)
            .stdout(Stdio::null())
            .status();
    }
}

/// A child process under test; killed (SIGKILL) when dropped.
pub struct Service {
    pub pid: u32,
    pub base_url: String,
    child: Child,
    /// Kept open so the child never writes into a closed pipe.
    _stdout: Option<ChildStdout>,
}

impl Service {
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

fn log_files(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok((Stdio::from(file.try_clone()?), Stdio::from(file)))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Starts `fake-upstream` on a free port; `event_delay_ms` spaces its SSE
/// events, each then stamped with its send time.
pub async fn start_fake(
    bin: &Path,
    event_delay_ms: u64,
    log: &Path,
    name: &str,
) -> anyhow::Result<Service> {
    let (_, stderr) = log_files(log)?;
    let mut command = Command::new(bin);
    command.args([
        "--port",
        "0",
        "--event-delay-ms",
        &event_delay_ms.to_string(),
    ]);
    if event_delay_ms > 0 {
        command.arg("--stamp-events");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child
        .id()
        .with_context(|| format!("{name} exited at once"))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), lines.read_line(&mut line))
        .await
        .with_context(|| format!("{name} did not say where it listens within 10 s"))??;
    let base_url = line
        .trim()
        .strip_prefix("listening on ")
        .filter(|u| u.starts_with("http://127.0.0.1:"))
        .with_context(|| format!("unexpected first line from {name}: {line:?}"))?
        .to_owned();
    Ok(Service {
        pid,
        base_url,
        child,
        _stdout: Some(lines.into_inner()),
    })
}

/// A free TCP port on 127.0.0.1 (the kernel's pick; the short window before
/// the relay binds it is acceptable on a bench machine).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// One `GET path` over a fresh connection; the status code, or `None` when
/// nothing answers yet.
pub async fn probe(port: u16, path: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        let text = std::str::from_utf8(&head).ok()?;
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// Starts `relay-local` with `env` on `port` and measures the time from
/// exec to its first answered request (`GET /api/hello`, answered without
/// I/O), polling every millisecond.
pub async fn start_relay(
    bin: &Path,
    env: &[(String, String)],
    port: u16,
    log: &Path,
    name: &str,
) -> anyhow::Result<(Service, Duration)> {
    let (stdout, stderr) = log_files(log)?;
    let mut command = Command::new(bin);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "RELAY_SECRET_ARN",
    ] {
        command.env_remove(var);
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("relay exited at once")?;
    let mut service = Service {
        pid,
        base_url: format!("http://127.0.0.1:{port}"),
        child,
        _stdout: None,
    };
    let deadline = started + Duration::from_secs(60);
    loop {
        if probe(port, "/api/hello").await == Some(200) {
            return Ok((service, started.elapsed()));
        }
        if service.exited() {
            bail!(
                "{name} exited before answering; last lines of {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not answer within 60 s; last lines of {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
