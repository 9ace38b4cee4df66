//! A real Alertmanager (Debian's `prometheus-alertmanager`) on a free loopback port, for tests that check
//! the alerts Sluice sends. Killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::prometheus::{HarnessError, free_port, http_get};

const DEFAULT_ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

pub struct AlertmanagerServer {
    _dir: TempDir,
    port: u16,
    child: Child,
}

impl AlertmanagerServer {
    /// Starts Alertmanager (no clustering, a receiver that drops everything) and waits until it is ready.
    /// `$ALERTMANAGER` overrides the binary.
    pub async fn start() -> Result<Self, HarnessError> {
        let binary = std::env::var_os("ALERTMANAGER")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_ALERTMANAGER.into());
        let dir = tempfile::Builder::new()
            .prefix("sluice-alertmanager-")
            .tempdir()
            .map_err(|source| HarnessError::Spawn {
                binary: "tempdir".into(),
                source,
            })?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n",
        )
        .map_err(|source| HarnessError::Spawn {
            binary: "alertmanager.yml".into(),
            source,
        })?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).map_err(|source| {
            HarnessError::Spawn {
                binary: "alertmanager.log".into(),
                source,
            }
        })?;
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let server = AlertmanagerServer {
            _dir: dir,
            port,
            child,
        };
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(server.addr(), "/-/ready").await {
                return Ok(server);
            }
            if started.elapsed() > Duration::from_secs(20) {
                return Err(HarnessError::Timeout {
                    what: "Alertmanager to become ready".into(),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The alerts Alertmanager holds (`GET /api/v2/alerts`), active and resolved-but-retained alike.
    pub async fn alerts(&self) -> Result<Vec<Value>, HarnessError> {
        let (status, body) = http_get(self.addr(), "/api/v2/alerts").await?;
        let parsed: Value = serde_json::from_str(&body).map_err(|e| HarnessError::Api {
            request: "/api/v2/alerts".into(),
            status,
            body: format!("{e}: {body}"),
        })?;
        Ok(parsed.as_array().cloned().unwrap_or_default())
    }
}

impl Drop for AlertmanagerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
