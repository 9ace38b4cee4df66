//! A real Prometheus for tests, and a fake mesh for it to scrape.
//!
//! [`PrometheusServer`] runs the real `prometheus` binary (Debian's package, or `$PROMETHEUS`) on a free loopback
//! port with its storage in a temporary directory, scraping the given targets every second. [`FakeMesh`] serves
//! Istio-shaped request counters and latency histograms for any number of workloads, each with a request rate,
//! error ratio and latency the test controls, so Sluice's real queries run against real PromQL evaluation.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tempfile::TempDir;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Where Debian's `prometheus` package installs the server.
pub const DEFAULT_PROMETHEUS: &str = "/usr/bin/prometheus";
/// How long [`PrometheusServer::start`] waits for `/-/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Something the harness could not do; each says what to check.
#[derive(Debug, Error)]
pub enum HarnessError {
    #[error(
        "cannot run {binary}: {source}; install the Debian package that provides it (prometheus, \
         prometheus-alertmanager, graphite-web) or point its variable at it ($PROMETHEUS, $ALERTMANAGER, \
         $GRAPHITE_PYTHON)"
    )]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("the server exited while starting ({status}); its log ends with:\n{log}")]
    Exited { status: String, log: String },
    #[error("the server at {url} was not ready after {waited:?}; its log ends with:\n{log}")]
    NotReady {
        url: String,
        waited: Duration,
        log: String,
    },
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("Prometheus answered {status} to {request}: {body}")]
    Api {
        request: String,
        status: u16,
        body: String,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// A running `prometheus` process, killed (and waited for) on drop.
#[derive(Debug)]
pub struct PrometheusServer {
    binary: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl PrometheusServer {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) every second and waits until it is
    /// ready. `$PROMETHEUS` overrides the binary.
    pub async fn start(targets: &[String]) -> Result<Self, HarnessError> {
        let binary = std::env::var_os("PROMETHEUS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PROMETHEUS));
        let dir = tempfile::Builder::new()
            .prefix("sluice-prometheus-")
            .tempdir()
            .map_err(io_error("creating Prometheus' temporary directory"))?;
        std::fs::write(dir.path().join("prometheus.yml"), scrape_config(targets))
            .map_err(io_error("writing prometheus.yml"))?;
        let mut server = Self {
            binary,
            dir,
            port: 0,
            child: None,
        };
        // The free port we found can be taken before Prometheus binds it; a few tries make that race harmless.
        let mut last = None;
        for _ in 0..3 {
            server.port = free_port()?;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(HarnessError::Exited { status, log })
                    if log.contains("address already in use") =>
                {
                    last = Some(HarnessError::Exited { status, log });
                }
                Err(other) => return Err(other),
            }
        }
        Err(last.unwrap_or(HarnessError::Timeout {
            what: "a free port for Prometheus".into(),
            waited: Duration::ZERO,
        }))
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Kills Prometheus (SIGKILL, like a crashed pod) and waits for it; the URL stops answering.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Prometheus again on the same port with the same storage, and waits until it is ready.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.spawn_and_wait().await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The last lines Prometheus logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs an instant query through the HTTP API and returns its `data` object.
    pub async fn query(&self, promql: &str) -> Result<serde_json::Value, HarnessError> {
        self.query_path(format!("/api/v1/query?query={}", percent_encode(promql)))
            .await
    }

    /// Runs an instant query evaluated at `unix_seconds` (what the query returned then).
    pub async fn query_at(
        &self,
        promql: &str,
        unix_seconds: f64,
    ) -> Result<serde_json::Value, HarnessError> {
        self.query_path(format!(
            "/api/v1/query?query={}&time={unix_seconds:.3}",
            percent_encode(promql)
        ))
        .await
    }

    async fn query_path(&self, path: String) -> Result<serde_json::Value, HarnessError> {
        let (status, body) = http_get(self.addr(), &path).await?;
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| HarnessError::Api {
                request: path.clone(),
                status,
                body: format!("{e}: {body}"),
            })?;
        match json.get("data") {
            Some(data) if status == 200 => Ok(data.clone()),
            _ => Err(HarnessError::Api {
                request: path,
                status,
                body,
            }),
        }
    }

    /// Waits until every target has been scraped at least `scrapes` times (bounded by `timeout`).
    pub async fn wait_for_scrapes(
        &self,
        scrapes: usize,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            // `up` gets one sample per scrape and target, successful or not; `min` covers every target.
            let data = self.query("min(count_over_time(up[5m]))").await;
            let seen = data.ok().and_then(|d| first_value(&d)).unwrap_or(0.0);
            if seen >= scrapes as f64 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("{scrapes} scrapes of every target (saw {seen})"),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_error("opening prometheus.log"))?;
        let stderr = log
            .try_clone()
            .map_err(io_error("opening prometheus.log"))?;
        let child = Command::new(&self.binary)
            .arg(format!(
                "--config.file={}",
                self.dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(HarnessError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if let Ok((200, _)) = http_get(self.addr(), "/-/ready").await {
                return Ok(());
            }
            if started.elapsed() >= READY_TIMEOUT {
                self.stop();
                return Err(HarnessError::NotReady {
                    url: self.url(),
                    waited: READY_TIMEOUT,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn scrape_config(targets: &[String]) -> String {
    let targets = targets
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    // scrape_timeout must not exceed the interval; Prometheus' 10s default would reject a 1s interval.
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: targets\n    static_configs:\n      - targets: [{targets}]\n"
    )
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16, HarnessError> {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_error("finding a free loopback port"))
}

fn first_value(data: &serde_json::Value) -> Option<f64> {
    let sample = match data.get("resultType")?.as_str()? {
        "vector" => data.get("result")?.get(0)?.get("value")?,
        "scalar" => data.get("result")?,
        _ => return None,
    };
    sample.get(1)?.as_str()?.parse().ok()
}

/// A minimal HTTP/1.0 GET (the e2e library has no HTTP client; HTTP/1.0 rules out chunked replies).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), HarnessError> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| HarnessError::Timeout {
            what: format!("GET {path} from {addr}"),
            waited: Duration::from_secs(5),
        })?
        .map_err(io_error(format!("GET {path} from {addr}")))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Istio's default buckets of `istio_request_duration_milliseconds`.
pub const LATENCY_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// How often the fake mesh adds requests to its counters.
pub const TICK: Duration = Duration::from_millis(100);

/// The traffic one workload receives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkloadTraffic {
    /// Requests per second.
    pub rps: f64,
    /// Share of requests answered 500, between 0 and 1.
    pub error_ratio: f64,
    /// Duration of every request in milliseconds.
    pub latency_ms: f64,
}

impl WorkloadTraffic {
    /// No requests at all.
    pub const IDLE: WorkloadTraffic = WorkloadTraffic {
        rps: 0.0,
        error_ratio: 0.0,
        latency_ms: 0.0,
    };

    /// `rps` requests per second, none failing, 20 ms each.
    pub fn healthy(rps: f64) -> Self {
        Self {
            rps,
            error_ratio: 0.0,
            latency_ms: 20.0,
        }
    }
}

/// Requests a workload has served so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative counts per `LATENCY_BUCKETS_MS` bound.
    buckets: [u64; LATENCY_BUCKETS_MS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, latency_ms: f64, requests: u64) {
        for (bucket, le) in self.buckets.iter_mut().zip(LATENCY_BUCKETS_MS) {
            if latency_ms <= le {
                *bucket += requests;
            }
        }
        self.sum += latency_ms * requests as f64;
        self.count += requests;
    }
}

#[derive(Debug)]
struct Workload {
    traffic: WorkloadTraffic,
    // Fractions of a request carried to the next tick, so low rates and ratios come out exact over time.
    pending_requests: f64,
    pending_errors: f64,
    ok: Histogram,
    failed: Histogram,
    /// Istio ambient mode: only the waypoint reports L7 series (`reporter="waypoint"`); there is no sidecar.
    ambient: bool,
}

impl Workload {
    fn new(traffic: WorkloadTraffic) -> Self {
        Self {
            traffic,
            pending_requests: 0.0,
            pending_errors: 0.0,
            ok: Histogram::default(),
            failed: Histogram::default(),
            ambient: false,
        }
    }

    fn advance(&mut self, seconds: f64) {
        let rps = self.traffic.rps.max(0.0);
        self.pending_requests += rps * seconds;
        let requests = self.pending_requests.floor();
        self.pending_requests -= requests;
        self.pending_errors += requests * self.traffic.error_ratio.clamp(0.0, 1.0);
        let errors = self.pending_errors.floor().min(requests);
        self.pending_errors -= errors;
        let latency = self.traffic.latency_ms.max(0.0);
        self.ok.observe(latency, (requests - errors) as u64);
        self.failed.observe(latency, errors as u64);
    }
}

type MeshState = Arc<Mutex<BTreeMap<(String, String), Workload>>>;

fn lock(state: &MeshState) -> MutexGuard<'_, BTreeMap<(String, String), Workload>> {
    // A panicking test thread must not take every later scrape down with it.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stand-in for a mesh's telemetry: `/metrics` in Prometheus text format with Istio's request series.
///
/// For every workload it serves `istio_requests_total` (codes 200 and 500, each once it has been seen, as Envoy
/// does) and the `istio_request_duration_milliseconds` histogram, both for `reporter="destination"` and
/// `reporter="source"`, so a query that forgets the reporter counts every request twice.
#[derive(Debug)]
pub struct FakeMesh {
    addr: SocketAddr,
    state: MeshState,
    server: JoinHandle<()>,
    ticker: JoinHandle<()>,
}

impl FakeMesh {
    /// Serves `/metrics` on a free loopback port and starts counting requests every [`TICK`].
    pub async fn start() -> Result<Self, HarnessError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io_error("binding the fake mesh's port"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("reading the fake mesh's address"))?;
        let state = MeshState::default();
        let app = Router::new()
            .route("/metrics", get(serve_metrics))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            // The server only stops when the mesh is dropped (task aborted); an accept error ends it early.
            let _ = axum::serve(listener, app).await;
        });
        let ticker = tokio::spawn(count_requests(state.clone()));
        Ok(Self {
            addr,
            state,
            server,
            ticker,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The scrape target, `127.0.0.1:PORT`.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Sets the traffic of `workload` in `namespace` from now on; counters it already has are kept.
    pub fn set(&self, workload: &str, namespace: &str, traffic: WorkloadTraffic) {
        lock(&self.state)
            .entry((namespace.to_owned(), workload.to_owned()))
            .and_modify(|w| w.traffic = traffic)
            .or_insert_with(|| Workload::new(traffic));
    }

    /// Puts `workload` in Istio ambient mode (its series come from a waypoint) or takes it out; counters are kept.
    pub fn set_ambient(&self, workload: &str, namespace: &str, ambient: bool) {
        if let Some(w) = lock(&self.state).get_mut(&(namespace.to_owned(), workload.to_owned())) {
            w.ambient = ambient;
        }
    }

    /// Forgets a workload: its series disappear from `/metrics`, as when its pods are gone.
    pub fn remove(&self, workload: &str, namespace: &str) {
        lock(&self.state).remove(&(namespace.to_owned(), workload.to_owned()));
    }

    /// Requests `workload` has served so far.
    pub fn totals(&self, workload: &str, namespace: &str) -> Option<Totals> {
        lock(&self.state)
            .get(&(namespace.to_owned(), workload.to_owned()))
            .map(|w| Totals {
                requests: w.ok.count + w.failed.count,
                errors: w.failed.count,
            })
    }

    /// The current `/metrics` page.
    pub fn render(&self) -> String {
        render_metrics(&lock(&self.state))
    }
}

impl Drop for FakeMesh {
    fn drop(&mut self) {
        self.server.abort();
        self.ticker.abort();
    }
}

async fn count_requests(state: MeshState) {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        ticker.tick().await;
        // Real elapsed time, not the nominal tick, so the rate holds even when the runtime is busy.
        let now = Instant::now();
        let seconds = now.duration_since(last).as_secs_f64();
        last = now;
        for workload in lock(&state).values_mut() {
            workload.advance(seconds);
        }
    }
}

async fn serve_metrics(State(state): State<MeshState>) -> impl IntoResponse {
    let body = render_metrics(&lock(&state));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

fn render_metrics(workloads: &BTreeMap<(String, String), Workload>) -> String {
    let mut requests = String::from("# TYPE istio_requests_total counter\n");
    let mut durations = String::from("# TYPE istio_request_duration_milliseconds histogram\n");
    for ((namespace, name), workload) in workloads {
        let reporters: &[&str] = if workload.ambient {
            &["waypoint"]
        } else {
            &["destination", "source"]
        };
        for reporter in reporters {
            for (code, histogram) in [("200", &workload.ok), ("500", &workload.failed)] {
                if histogram.count == 0 {
                    continue;
                }
                let labels = format!(
                    "reporter=\"{reporter}\",source_workload=\"loadgen\",source_workload_namespace=\"{namespace}\",\
                     destination_workload=\"{name}\",destination_workload_namespace=\"{namespace}\",\
                     destination_service=\"{name}.{namespace}.svc.cluster.local\",\
                     destination_service_name=\"{name}\",request_protocol=\"http\",response_code=\"{code}\""
                );
                let _ = writeln!(
                    requests,
                    "istio_requests_total{{{labels}}} {}",
                    histogram.count
                );
                for (le, count) in LATENCY_BUCKETS_MS.iter().zip(histogram.buckets) {
                    let _ = writeln!(
                        durations,
                        "istio_request_duration_milliseconds_bucket{{{labels},le=\"{le}\"}} {count}"
                    );
                }
                let _ = writeln!(
                    durations,
                    "istio_request_duration_milliseconds_bucket{{{labels},le=\"+Inf\"}} {}\n\
                     istio_request_duration_milliseconds_sum{{{labels}}} {}\n\
                     istio_request_duration_milliseconds_count{{{labels}}} {}",
                    histogram.count, histogram.sum, histogram.count
                );
            }
        }
    }
    requests + &durations + &render_linkerd(workloads) + &render_consul(workloads)
}

/// Writes one histogram's `_bucket`/`_sum`/`_count` lines for `metric` with `labels`.
fn write_histogram(out: &mut String, metric: &str, labels: &str, histogram: &Histogram) {
    for (le, count) in LATENCY_BUCKETS_MS.iter().zip(histogram.buckets) {
        let _ = writeln!(out, "{metric}_bucket{{{labels},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "{metric}_bucket{{{labels},le=\"+Inf\"}} {}\n{metric}_sum{{{labels}}} {}\n{metric}_count{{{labels}}} {}",
        histogram.count, histogram.sum, histogram.count
    );
}

/// Linkerd's proxy series: `response_total` and `response_latency_ms`, inbound on the workload's own proxy and
/// outbound on its callers' (so a query that forgets `direction="inbound"` counts twice).
fn render_linkerd(workloads: &BTreeMap<(String, String), Workload>) -> String {
    let mut responses = String::from("# TYPE response_total counter\n");
    let mut latencies = String::from("# TYPE response_latency_ms histogram\n");
    for ((namespace, name), workload) in workloads {
        for direction in ["inbound", "outbound"] {
            for (code, classification, histogram) in [
                ("200", "success", &workload.ok),
                ("500", "failure", &workload.failed),
            ] {
                if histogram.count == 0 {
                    continue;
                }
                let labels = format!(
                    "direction=\"{direction}\",namespace=\"{namespace}\",deployment=\"{name}\",\
                     pod=\"{name}-7d9f8b6c5-x2x9k\",status_code=\"{code}\",classification=\"{classification}\",tls=\"true\""
                );
                let _ = writeln!(responses, "response_total{{{labels}}} {}", histogram.count);
                write_histogram(&mut latencies, "response_latency_ms", &labels, histogram);
            }
        }
    }
    responses + &latencies
}

/// The Envoy sidecar series Consul exposes: requests to the workload's own app are the `local_app` cluster;
/// requests it makes elsewhere are other clusters (which a query must not count).
fn render_consul(workloads: &BTreeMap<(String, String), Workload>) -> String {
    let mut requests = String::from("# TYPE envoy_cluster_upstream_rq_xx counter\n");
    let mut times = String::from("# TYPE envoy_cluster_upstream_rq_time histogram\n");
    for ((namespace, name), workload) in workloads {
        for cluster in ["local_app", "backend.default.dc1.internal"] {
            for (class, histogram) in [("2", &workload.ok), ("5", &workload.failed)] {
                if histogram.count == 0 {
                    continue;
                }
                let labels = format!(
                    "envoy_cluster_name=\"{cluster}\",envoy_response_code_class=\"{class}\",\
                     namespace=\"{namespace}\",pod=\"{name}-7d9f8b6c5-x2x9k\",local_cluster=\"{name}\""
                );
                let _ = writeln!(
                    requests,
                    "envoy_cluster_upstream_rq_xx{{{labels}}} {}",
                    histogram.count
                );
                write_histogram(
                    &mut times,
                    "envoy_cluster_upstream_rq_time",
                    &labels,
                    histogram,
                );
            }
        }
    }
    requests + &times
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_counted_exactly_over_time() {
        let mut workload = Workload::new(WorkloadTraffic {
            rps: 7.0,
            error_ratio: 0.25,
            latency_ms: 30.0,
        });
        for _ in 0..100 {
            workload.advance(0.1);
        }
        let total = workload.ok.count + workload.failed.count;
        assert!((69..=70).contains(&total), "{total}");
        assert!(
            (17..=18).contains(&workload.failed.count),
            "{}",
            workload.failed.count
        );
        // 30 ms lands in the (25, 50] bucket and every bucket above it.
        assert_eq!(workload.ok.buckets[4], 0);
        assert_eq!(workload.ok.buckets[5], workload.ok.count);
    }

    #[test]
    fn series_appear_once_a_code_has_been_seen() {
        let mut workloads = BTreeMap::new();
        workloads.insert(
            ("test".to_owned(), "idle".to_owned()),
            Workload::new(WorkloadTraffic::IDLE),
        );
        assert!(!render_metrics(&workloads).contains("destination_workload=\"idle\""));
        let mut busy = Workload::new(WorkloadTraffic::healthy(10.0));
        busy.advance(1.0);
        workloads.insert(("test".to_owned(), "busy".to_owned()), busy);
        let page = render_metrics(&workloads);
        assert!(
            page.contains(r#"reporter="destination""#) && page.contains(r#"response_code="200""#)
        );
        assert!(!page.contains(r#"response_code="500""#));
        assert!(page.contains("istio_request_duration_milliseconds_count{"));
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode(r#"up{a="b"}[1m]"#),
            "up%7Ba%3D%22b%22%7D%5B1m%5D"
        );
    }
}
