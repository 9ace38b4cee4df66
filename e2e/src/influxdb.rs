//! A real InfluxDB for tests: Debian's `influxd` (1.x, InfluxQL) with authentication on, its storage in a
//! temporary directory and both of its ports on free loopback ports. An admin user and one database are created
//! at start; points are written with the line protocol, as Telegraf would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::prometheus::{HarnessError, free_port};

/// Where Debian's `influxdb` package installs the server.
pub const DEFAULT_INFLUXD: &str = "/usr/bin/influxd";
/// How long [`InfluxServer::start`] waits for `/ping`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The admin user [`InfluxServer::start`] creates.
pub const ADMIN: (&str, &str) = ("sluice", "s3cret-pass");

/// A running `influxd`, killed (and waited for) on drop.
#[derive(Debug)]
pub struct InfluxServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    http: reqwest::Client,
}

impl InfluxServer {
    /// Starts influxd with authentication on, creates the [`ADMIN`] user and `database`. `$INFLUXD` overrides
    /// the binary.
    pub async fn start(database: &str) -> Result<Self, HarnessError> {
        let binary = std::env::var_os("INFLUXD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_INFLUXD));
        let dir = tempfile::Builder::new()
            .prefix("sluice-influxdb-")
            .tempdir()
            .map_err(io_error("creating InfluxDB's temporary directory"))?;
        sluice::metrics::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| HarnessError::Io {
                context: "building an HTTP client".into(),
                source: std::io::Error::other(e),
            })?;
        let mut server = Self {
            dir,
            port: 0,
            child: None,
            http,
        };
        // Free ports can be taken before influxd binds them; a few tries make that race harmless.
        let mut last = None;
        for _ in 0..3 {
            match server.spawn_and_wait(&binary).await {
                Ok(()) => {
                    server.create(database).await?;
                    return Ok(server);
                }
                Err(HarnessError::Exited { status, log })
                    if log.contains("address already in use") =>
                {
                    last = Some(HarnessError::Exited { status, log });
                }
                Err(other) => return Err(other),
            }
        }
        Err(last.unwrap_or(HarnessError::Timeout {
            what: "free ports for InfluxDB".into(),
            waited: Duration::ZERO,
        }))
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes line-protocol `lines` into `database`, with timestamps in seconds.
    pub async fn write(&self, database: &str, lines: &str) -> Result<(), HarnessError> {
        let response = self
            .http
            .post(format!("{}/write", self.url()))
            .query(&[("db", database), ("precision", "s")])
            .basic_auth(ADMIN.0, Some(ADMIN.1))
            .body(lines.to_owned())
            .send()
            .await
            .map_err(|e| api_error("POST /write", e))?;
        self.expect_success("POST /write", response).await
    }

    /// Kills influxd and waits for it; the URL stops answering.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn create(&self, database: &str) -> Result<(), HarnessError> {
        // The first user may be created without credentials, and must be an admin.
        let statements = [
            (
                format!(
                    "CREATE USER {} WITH PASSWORD '{}' WITH ALL PRIVILEGES",
                    ADMIN.0, ADMIN.1
                ),
                false,
            ),
            (format!("CREATE DATABASE {database}"), true),
        ];
        for (statement, authenticated) in statements {
            let mut request = self
                .http
                .post(format!("{}/query", self.url()))
                .query(&[("q", statement.as_str())]);
            if authenticated {
                request = request.basic_auth(ADMIN.0, Some(ADMIN.1));
            }
            let response = request.send().await.map_err(|e| api_error(&statement, e))?;
            self.expect_success(&statement, response).await?;
        }
        Ok(())
    }

    async fn expect_success(
        &self,
        request: &str,
        response: reqwest::Response,
    ) -> Result<(), HarnessError> {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        if (200..300).contains(&status) && !body.contains("\"error\"") {
            Ok(())
        } else {
            Err(HarnessError::Api {
                request: request.to_owned(),
                status,
                body,
            })
        }
    }

    async fn spawn_and_wait(&mut self, binary: &PathBuf) -> Result<(), HarnessError> {
        self.port = free_port()?;
        let rpc_port = free_port()?;
        let root = self.dir.path().display().to_string();
        let config = format!(
            "reporting-enabled = false\n\
             bind-address = \"127.0.0.1:{rpc_port}\"\n\
             [meta]\n  dir = \"{root}/meta\"\n\
             [data]\n  dir = \"{root}/data\"\n  wal-dir = \"{root}/wal\"\n  query-log-enabled = false\n\
             [monitor]\n  store-enabled = false\n\
             [http]\n  bind-address = \"127.0.0.1:{}\"\n  auth-enabled = true\n  log-enabled = false\n\
             [ifql]\n  enabled = false\n",
            self.port
        );
        let config_path = self.dir.path().join("influxdb.conf");
        std::fs::write(&config_path, config).map_err(io_error("writing influxdb.conf"))?;
        let log_path = self.dir.path().join("influxd.log");
        let log = std::fs::File::create(&log_path).map_err(io_error("opening influxd.log"))?;
        let stderr = log.try_clone().map_err(io_error("opening influxd.log"))?;
        let child = Command::new(binary)
            .arg("-config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                binary: format!("{} (Debian's influxdb)", binary.display()),
                source,
            })?;
        self.child = Some(child);
        let tail = || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(HarnessError::Exited {
                    status: status.to_string(),
                    log: tail(),
                });
            }
            let ping = self.http.get(format!("{}/ping", self.url())).send().await;
            if ping.is_ok_and(|r| r.status().as_u16() == 204) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.stop();
                return Err(HarnessError::NotReady {
                    url: self.url(),
                    waited: READY_TIMEOUT,
                    log: tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for InfluxServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn api_error(request: &str, e: reqwest::Error) -> HarnessError {
    HarnessError::Api {
        request: request.to_owned(),
        status: 0,
        body: e.to_string(),
    }
}

fn io_error(context: &str) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.to_owned();
    move |source| HarnessError::Io { context, source }
}
