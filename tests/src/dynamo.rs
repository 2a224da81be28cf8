//! A private DynamoDB Local for fault tests: on disk (so a restart keeps the
//! data), on its own port and state directory, stopped by PID through the
//! same script `make test` uses.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

pub struct PrivateDynamo {
    dir: PathBuf,
    port: u16,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../infra/dynamodb-local.sh")
}

impl PrivateDynamo {
    pub fn start() -> anyhow::Result<PrivateDynamo> {
        let dir =
            std::env::temp_dir().join(format!("relay-fault-{}", uuid::Uuid::new_v4().simple()));
        let mut dynamo = PrivateDynamo { dir, port: 0 };
        dynamo.port = dynamo.run_start(None)?;
        Ok(dynamo)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it; requests to it fail until `restart`.
    pub fn stop(&self) -> anyhow::Result<()> {
        let status = Command::new(script())
            .arg("stop")
            .env("RELAY_STATE_DIR", self.dir.join("state"))
            .status()?;
        anyhow::ensure!(status.success(), "stopping DynamoDB Local failed");
        Ok(())
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.run_start(Some(self.port)).map(|_| ())
    }

    fn run_start(&self, port: Option<u16>) -> anyhow::Result<u16> {
        let mut command = Command::new(script());
        command
            .arg("start")
            .env("RELAY_STATE_DIR", self.dir.join("state"))
            .env("DYNAMODB_LOCAL_DB_PATH", self.dir.join("db"));
        if let Some(port) = port {
            command.arg(port.to_string());
        }
        let output = command.output()?;
        anyhow::ensure!(
            output.status.success(),
            "starting DynamoDB Local failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout)?;
        let endpoint = stdout.lines().last().context("no endpoint printed")?;
        endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .context("no port in the endpoint")
    }
}

impl Drop for PrivateDynamo {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DynamoDB endpoint in front of another that holds every call of one
/// operation back for `delay` before passing it on. Settlements
/// (`TransactWriteItems`, `SlowSettlements::start`): it makes "settlement
/// trails the answer" last long enough for a test to see what a client
/// sending its next request meanwhile gets; admissions (`UpdateItem`):
/// long enough for a client to leave while its request is admitted.
pub struct SlowSettlements {
    pub endpoint: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for SlowSettlements {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl SlowSettlements {
    pub async fn start(upstream: String, delay: std::time::Duration) -> anyhow::Result<Self> {
        Self::holding(upstream, "TransactWriteItems", delay).await
    }

    /// Holds back each call of `operation` (e.g. `UpdateItem`).
    pub async fn holding(
        upstream: String,
        operation: &'static str,
        delay: std::time::Duration,
    ) -> anyhow::Result<Self> {
        use axum::body::Body;
        use axum::extract::Request;
        use axum::response::Response;

        let client = reqwest::Client::new();
        let forward = move |request: Request| {
            let (client, upstream) = (client.clone(), upstream.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let target = parts
                    .headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if target.rsplit('.').next() == Some(operation) {
                    tokio::time::sleep(delay).await;
                }
                let mut outgoing = client.request(parts.method, format!("{upstream}{}", parts.uri));
                for (name, value) in &parts.headers {
                    if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
                        outgoing = outgoing.header(name, value);
                    }
                }
                let answer = match outgoing.body(body).send().await {
                    Ok(answer) => answer,
                    Err(_) => {
                        let mut response = Response::new(Body::empty());
                        *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                        return response;
                    }
                };
                let mut response = Response::builder().status(answer.status());
                for (name, value) in answer.headers() {
                    if name != http::header::CONTENT_LENGTH
                        && name != http::header::TRANSFER_ENCODING
                    {
                        response = response.header(name, value);
                    }
                }
                let bytes = answer.bytes().await.unwrap_or_default();
                response
                    .body(Body::from(bytes))
                    .unwrap_or_else(|_| Response::new(Body::empty()))
            }
        };
        let app = axum::Router::new().fallback(forward);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(SlowSettlements { endpoint, server })
    }
}
