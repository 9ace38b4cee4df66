//! Where `sluice authz` gets its bundle: a file or directory (re-read when it changes, e.g. a mounted
//! ConfigMap), or the operator's bundle server (long polling with ETag). A bundle that fails to load or
//! compile is reported and never replaces the one serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_rego::bundle::{Bundle, LoadOptions};
use sluice_rego::engine::Limits;

use super::{Active, Authorizer, Overrides, retry_delay};

/// `--bundle`: a URL of an OPA bundle server, or a local path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleSource {
    Path(PathBuf),
    Url(String),
}

impl std::str::FromStr for BundleSource {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s.starts_with("http://") || s.starts_with("https://") {
            BundleSource::Url(s.to_owned())
        } else {
            BundleSource::Path(PathBuf::from(s))
        })
    }
}

/// How bundles are loaded and compiled.
#[derive(Clone)]
pub struct Loader {
    pub authorizer: Arc<Authorizer>,
    pub overrides: Overrides,
    pub options: Arc<LoadOptions>,
    pub limits: Limits,
}

impl Loader {
    /// Loads, compiles and activates a bundle; on failure the active one stays.
    fn activate(&self, loaded: Result<Bundle, String>, origin: &str) -> bool {
        let result = loaded.and_then(|bundle| {
            Active::compile(&bundle, &self.overrides, self.limits).map_err(|e| e.to_string())
        });
        match result {
            Ok(active) => {
                self.authorizer.activate(active);
                true
            }
            Err(error) => {
                self.authorizer.metrics.bundle_errors.inc();
                let serving = self.authorizer.active().map(|a| a.revision.clone());
                tracing::warn!(
                    origin,
                    error,
                    ?serving,
                    "bundle not activated; the active one keeps serving"
                );
                false
            }
        }
    }

    /// Re-reads `path` every `interval` and activates it when its content changed.
    pub async fn watch_path(self, path: PathBuf, interval: Duration) {
        let mut last: Option<Vec<u8>> = None;
        loop {
            let loader = self.clone();
            let path = path.clone();
            let previous = last.clone();
            // Reading and compiling are blocking work.
            let seen =
                tokio::task::spawn_blocking(move || loader.reload_path(&path, previous)).await;
            if let Ok(Some(fingerprint)) = seen {
                last = Some(fingerprint);
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Loads `path` when its fingerprint differs from `previous`; returns the new fingerprint.
    fn reload_path(&self, path: &std::path::Path, previous: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let origin = path.display().to_string();
        if path.is_dir() {
            // A directory's fingerprint is the revision of what it holds.
            let bundle = Bundle::from_dir(path, &self.options).map_err(|e| e.to_string());
            let fingerprint = match &bundle {
                Ok(b) => b.manifest.revision.clone().into_bytes(),
                Err(e) => e.clone().into_bytes(),
            };
            if previous.as_deref() == Some(fingerprint.as_slice()) {
                return None;
            }
            self.activate(bundle, &origin);
            return Some(fingerprint);
        }
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) => {
                if previous.is_none() {
                    tracing::warn!(origin, error = %err, "cannot read the bundle; retrying");
                }
                return None;
            }
        };
        let fingerprint = ring::digest::digest(&ring::digest::SHA256, &bytes)
            .as_ref()
            .to_vec();
        if previous.as_deref() == Some(fingerprint.as_slice()) {
            return None;
        }
        let bundle = Bundle::from_tar_gz(&bytes, &self.options).map_err(|e| e.to_string());
        self.activate(bundle, &origin);
        Some(fingerprint)
    }

    /// Long-polls an OPA bundle server: `If-None-Match` with the current ETag and `Prefer: wait=N`, so
    /// a new revision arrives as soon as it is published. Errors back off and keep the last revision.
    pub async fn poll_url(self, url: String, wait: Duration) {
        let client = match reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(wait + Duration::from_secs(10))
            .build()
        {
            Ok(client) => client,
            Err(err) => {
                tracing::error!(error = %err, "cannot build an HTTP client for the bundle server");
                return;
            }
        };
        let mut etag: Option<String> = None;
        let mut failures = 0u32;
        loop {
            let mut request = client
                .get(&url)
                .header("prefer", format!("modes=snapshot;wait={}", wait.as_secs()));
            if let Some(etag) = &etag {
                request = request.header("if-none-match", etag);
            }
            let outcome = match request.send().await {
                Err(err) => Err(format!(
                    "cannot reach the bundle server: {}",
                    error_chain(&err)
                )),
                Ok(response) if response.status() == reqwest::StatusCode::NOT_MODIFIED => Ok(None),
                Ok(response) if response.status().is_success() => {
                    let new_etag = response
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let too_big = self.options.limits.max_compressed_bytes;
                    match response.bytes().await {
                        Ok(bytes) if bytes.len() as u64 > too_big => Err(format!(
                            "bundle of {} bytes exceeds the {too_big}-byte limit",
                            bytes.len()
                        )),
                        Ok(bytes) => Ok(Some((new_etag, bytes))),
                        Err(err) => Err(format!("reading the bundle: {}", error_chain(&err))),
                    }
                }
                Ok(response) => Err(format!("bundle server answered {}", response.status())),
            };
            match outcome {
                Ok(None) => failures = 0,
                Ok(Some((new_etag, bytes))) => {
                    failures = 0;
                    let loader = self.clone();
                    let origin = url.clone();
                    let activated = tokio::task::spawn_blocking(move || {
                        let bundle =
                            Bundle::from_tar_gz(&bytes, &loader.options).map_err(|e| e.to_string());
                        loader.activate(bundle, &origin)
                    })
                    .await
                    .unwrap_or(false);
                    // A broken revision is remembered too, so it is not downloaded again and again.
                    if activated || new_etag.is_some() {
                        etag = new_etag;
                    }
                }
                Err(error) => {
                    self.authorizer.metrics.bundle_errors.inc();
                    let delay = retry_delay(failures);
                    failures = failures.saturating_add(1);
                    let serving = self.authorizer.active().map(|a| a.revision.clone());
                    tracing::warn!(
                        url,
                        error,
                        ?serving,
                        retry_secs = delay.as_secs(),
                        "bundle download failed; the active bundle keeps serving"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        assert_eq!(
            "http://sluice.sluice-system:8181/bundles/shop/authz".parse::<BundleSource>(),
            Ok(BundleSource::Url(
                "http://sluice.sluice-system:8181/bundles/shop/authz".into()
            ))
        );
        assert_eq!(
            "/bundle/bundle.tar.gz".parse::<BundleSource>(),
            Ok(BundleSource::Path("/bundle/bundle.tar.gz".into()))
        );
        assert_eq!(
            "policies/envoy-http-authz".parse::<BundleSource>(),
            Ok(BundleSource::Path("policies/envoy-http-authz".into()))
        );
    }
}
