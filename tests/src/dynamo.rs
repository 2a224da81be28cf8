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
