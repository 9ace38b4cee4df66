//! The real OPA (built from the module proxy at the version pinned in `tools/versions.env`): its CLI for
//! `opa test`/`opa eval`/`opa bench`, and `opa run --server` instances that long-poll a bundle server and
//! report what they activated through OPA's status API (`GET /v1/status`).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The pinned `opa` binary, built on first use (about 3 minutes on 2 cores; then cached by version).
pub fn opa_binary() -> Result<PathBuf, BoxError> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            sluice_testcluster::PolicyTools::ensure(&|line| eprintln!("{line}"))
                .map(|tools| tools.opa)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(Into::into)
}

/// The pinned `ghz` binary, built on first use.
pub fn ghz_binary() -> Result<PathBuf, BoxError> {
    sluice_testcluster::PolicyTools::ensure(&|line| eprintln!("{line}"))
        .map(|tools| tools.ghz)
        .map_err(Into::into)
}

/// Runs `opa ARGS` and returns its output (whatever its exit status).
pub fn opa(args: &[&str]) -> Result<Output, BoxError> {
    Ok(Command::new(opa_binary()?)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// The value of the first expression of `opa eval --format json` output; `None` when undefined.
pub fn eval_value(stdout: &[u8]) -> Result<Option<Value>, BoxError> {
    let doc: Value = serde_json::from_slice(stdout)?;
    if let Some(errors) = doc.get("errors") {
        return Err(format!("opa eval failed: {errors}").into());
    }
    Ok(doc.pointer("/result/0/expressions/0/value").cloned())
}

/// How an OPA server instance gets its bundle.
#[derive(Clone, Debug)]
pub struct BundleConfig {
    /// Base URL of the bundle server, e.g. `http://127.0.0.1:41234`.
    pub server: String,
    /// Path under it, e.g. `bundles/default/shop-authz`.
    pub resource: String,
    /// Long-poll timeout OPA asks for (`polling.long_polling_timeout_seconds`).
    pub long_poll_secs: u64,
    /// `(keyid, algorithm, key)` to verify signed bundles with (`keys` + `bundles.*.signing.keyid`).
    pub verification: Option<(String, String, String)>,
    /// Base URL OPA's status plugin also POSTs its reports to (`<url>/status`), as it does on every activation.
    pub status_receiver: Option<String>,
}

impl BundleConfig {
    /// OPA's configuration file for this bundle, with the status plugin on (no remote service: the
    /// snapshot is read from `GET /v1/status`) and decision logs off.
    pub fn config(&self) -> Value {
        let mut bundle = json!({
            "service": "sluice",
            "resource": self.resource,
            "persist": false,
            "polling": {
                "long_polling_timeout_seconds": self.long_poll_secs,
                "min_delay_seconds": 1,
                "max_delay_seconds": 2,
            },
        });
        let mut config = json!({
            "services": {"sluice": {"url": self.server}},
            "status": {"prometheus": true},
        });
        if let Some(url) = &self.status_receiver {
            config["services"]["status"] = json!({"url": url});
            config["status"] = json!({"service": "status", "prometheus": true});
        }
        if let Some((keyid, algorithm, key)) = &self.verification {
            bundle["signing"] = json!({"keyid": keyid});
            config["keys"] = json!({keyid: {"algorithm": algorithm, "key": key}});
        }
        config["bundles"] = json!({"authz": bundle});
        config
    }
}

/// What an OPA instance's status API says about its bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleStatus {
    pub active_revision: Option<String>,
    /// The error of the last download or activation, if it failed.
    pub error: Option<String>,
}

/// `opa run --server` on a free loopback port, killed on drop.
pub struct OpaServer {
    child: Child,
    pub url: String,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl OpaServer {
    pub fn start(bundle: &BundleConfig) -> Result<OpaServer, BoxError> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("opa.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&bundle.config())?)?;
        let log_path = dir.path().join("opa.log");
        let log = std::fs::File::create(&log_path)?;
        // Ports are picked by binding :0 and released; retry on the rare race with another process.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = crate::prometheus::free_port()?;
            let addr = format!("127.0.0.1:{port}");
            let mut child = Command::new(opa_binary()?)
                .args(["run", "--server", "--addr", &addr, "--log-level", "error"])
                .arg("--config-file")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone()?)
                .spawn()?;
            let url = format!("http://{addr}");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                if let Some(status) = child.try_wait()? {
                    last_error = format!(
                        "opa exited ({status}): {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    break;
                }
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return Ok(OpaServer {
                        child,
                        url,
                        log_path,
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            if last_error.is_empty() {
                last_error = format!("opa did not listen on {addr} within 20 s");
            }
        }
        Err(last_error.into())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The `authz` bundle's state from `GET /v1/status`.
    pub async fn bundle_status(&self, http: &reqwest::Client) -> Result<BundleStatus, BoxError> {
        let bytes = http
            .get(format!("{}/v1/status", self.url))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let body: Value = serde_json::from_slice(&bytes)?;
        let bundle = body.pointer("/result/bundles/authz");
        let text = |field: &str| {
            bundle
                .and_then(|b| b.get(field))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let error = bundle
            .and_then(|b| b.get("message"))
            .and_then(Value::as_str);
        let errors = bundle.and_then(|b| b.get("errors")).map(Value::to_string);
        Ok(BundleStatus {
            active_revision: text("active_revision"),
            error: match (error, errors) {
                (Some(message), Some(details)) if !message.is_empty() => {
                    Some(format!("{message}: {details}"))
                }
                (Some(message), _) if !message.is_empty() => Some(message.to_owned()),
                _ => None,
            },
        })
    }

    /// Waits (at most 30 s, then panics with the status and OPA's log) until the status API reports
    /// `revision` active; returns how long that took.
    pub async fn wait_active(&self, http: &reqwest::Client, revision: &str) -> Duration {
        let started = Instant::now();
        loop {
            let status = self
                .bundle_status(http)
                .await
                .expect("OPA status API answers");
            if status.active_revision.as_deref() == Some(revision) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "OPA never activated {revision}: {status:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /v1/data/<path>` with `input`; `None` when the document is undefined.
    pub async fn decide(
        &self,
        http: &reqwest::Client,
        path: &str,
        input: &Value,
    ) -> Result<Option<Value>, BoxError> {
        let bytes = http
            .post(format!("{}/v1/data/{path}", self.url))
            .header("content-type", "application/json")
            .body(json!({"input": input}).to_string())
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let body: Value = serde_json::from_slice(&bytes)?;
        Ok(body.get("result").cloned())
    }
}

impl Drop for OpaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
