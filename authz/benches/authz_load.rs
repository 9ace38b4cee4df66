//! Load test of `sluice authz` (issue 5): handler latency at 1k/5k checks/s and max throughput in-process, then the same over gRPC against the real binary.
//!
//! `cargo bench --bench authz_load` (about 90 s); `SLUICE_BENCH_SECS=1` for a quick run. Two policies:
//! an OPA-Envoy style method/path policy and an RBAC policy that verifies and decodes an HS256 JWT.
//! Open-loop latencies are measured from each request's planned start, so a stall delays the
//! requests behind it in the figures too (no coordinated omission).

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::protobuf::Timestamp;
use serde_json::json;
use sluice_authz::grpc::grpc_response;
use sluice_authz::input::{InputOptions, input_from_check_request, policy_input};
use sluice_authz::metrics::AuthzMetrics;
use sluice_authz::response::{Decision, ResponseOptions, check_response};
use sluice_authz::{Active, Authorizer, Overrides};
use sluice_rego::Module;
use sluice_rego::bundle::{Bundle, LoadOptions};
use sluice_rego::engine::Limits;
use tonic::transport::Channel;

/// Our version of OPA-Envoy's example policy: method and path rules on `input.parsed_path`, no JWT.
const OPA_ENVOY_POLICY: &str = r#"package envoy.authz

import rego.v1

import input.attributes.request.http as http_request

default allow := false

# Anyone may read the people directory and the health endpoint.
allow if {
	http_request.method == "GET"
	input.parsed_path[0] == "people"
}

allow if {
	http_request.method == "GET"
	input.parsed_path == ["health"]
}

# Only the frontend may create people, and only as JSON.
allow if {
	http_request.method == "POST"
	input.parsed_path == ["people"]
	input.source_principal == "spiffe://cluster.local/ns/default/sa/frontend"
	startswith(http_request.headers["content-type"], "application/json")
}

# Deletes need an admin header and may not touch the admin tree.
allow if {
	http_request.method == "DELETE"
	input.parsed_path[0] == "people"
	count(input.parsed_path) == 2
	http_request.headers["x-admin"] == "true"
	not input.parsed_path[1] == "admin"
}
"#;

/// RBAC: the bearer token is HS256-verified and decoded; its roles map to method/path grants in data.
const RBAC_POLICY: &str = r#"package envoy.rbac

import rego.v1

import input.attributes.request.http as http_request

bearer := t if {
	v := http_request.headers.authorization
	startswith(v, "Bearer ")
	t := substring(v, 7, -1)
}

claims := payload if {
	io.jwt.verify_hs256(bearer, data.rbac.jwt_secret)
	[_, payload, _] := io.jwt.decode(bearer)
	now := time.now_ns() / 1000000000
	payload.nbf <= now
	now < payload.exp
	payload.iss == data.rbac.issuer
}

request_path := concat("/", array.concat([""], input.parsed_path))

allow if {
	some role in claims.roles
	some grant in data.rbac.grants[role]
	grant.method in {"*", http_request.method}
	glob.match(grant.path, ["/"], request_path)
}

default result := {"allowed": false, "http_status": 403, "body": "forbidden"}

result := {
	"allowed": true,
	"headers": {"x-user": claims.sub, "x-roles": concat(",", claims.roles)},
} if allow
"#;

const HMAC_SECRET: &str = "bench-secret-0123456789abcdef";
const REQUEST_PATH: &str = "/people/alice?verbose=true&fields=name,email";

struct Policy {
    name: &'static str,
    bundle: Bundle,
}

fn policies() -> Vec<Policy> {
    let opa = Bundle::from_parts(
        vec![Module {
            path: "envoy/authz.rego".into(),
            source: OPA_ENVOY_POLICY.into(),
        }],
        json!({}),
        None,
        None,
    )
    .expect("OPA-Envoy example bundle builds");
    let rbac = rbac_bundle(RBAC_POLICY);
    vec![
        Policy {
            name: "opa-envoy",
            bundle: opa,
        },
        Policy {
            name: "rbac-jwt",
            bundle: rbac,
        },
    ]
}

/// The RBAC bundle with `source` as its policy.
fn rbac_bundle(source: &str) -> Bundle {
    Bundle::from_parts(
        vec![Module {
            path: "envoy/rbac.rego".into(),
            source: source.into(),
        }],
        json!({"rbac": {
            "jwt_secret": HMAC_SECRET,
            "issuer": "https://idp.example.com",
            "grants": {
                "reader": [{"method": "GET", "path": "/people/*"}, {"method": "GET", "path": "/health"}],
                "writer": [{"method": "POST", "path": "/people"}, {"method": "PUT", "path": "/people/*"}],
                "admin": [{"method": "*", "path": "/**"}],
            },
        }}),
        None,
        Some(json!({"sluice": {"query": "data.envoy.rbac.result"}})),
    )
    .expect("RBAC bundle builds")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn jwt() -> String {
    let now = unix_now();
    let claims = json!({
        "sub": "alice", "iss": "https://idp.example.com", "aud": "people",
        "roles": ["auditor", "reader"], "nbf": now - 60, "exp": now + 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
    )
    .expect("HS256 token encodes")
}

fn peer(ip: &str, port: u32, principal: &str) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        principal: principal.into(),
        ..Default::default()
    }
}

/// What Envoy sends for `GET /people/alice?...` from the frontend through an Istio sidecar.
fn check_request(token: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "people.default.svc.cluster.local:8080"),
        (":method", "GET"),
        (":path", REQUEST_PATH),
        (":scheme", "http"),
        ("accept", "application/json"),
        ("authorization", &format!("Bearer {token}")),
        ("user-agent", "frontend/1.4.2 (rust-reqwest)"),
        ("x-request-id", "0b7e6c0c-6a57-4b0f-9d2a-4b2a1f1c7d3e"),
        ("x-forwarded-proto", "http"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-envoy-attempt-count", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(
                "10.0.3.17",
                43102,
                "spiffe://cluster.local/ns/default/sa/frontend",
            )),
            destination: Some(peer(
                "10.0.5.2",
                8080,
                "spiffe://cluster.local/ns/default/sa/people",
            )),
            request: Some(Request {
                time: Some(Timestamp {
                    seconds: i64::try_from(unix_now()).unwrap_or_default(),
                    nanos: 0,
                }),
                http: Some(HttpRequest {
                    id: "1386745463939425".into(),
                    method: "GET".into(),
                    headers,
                    path: REQUEST_PATH.into(),
                    host: "people.default.svc.cluster.local:8080".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Figures

#[derive(Clone, Copy, Default)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Percentiles (nearest rank) in µs of nanosecond samples.
fn latency(mut ns: Vec<u64>) -> Latency {
    if ns.is_empty() {
        return Latency::default();
    }
    ns.sort_unstable();
    let at = |q: f64| {
        let rank = (q * ns.len() as f64).ceil() as usize;
        ns[rank.clamp(1, ns.len()) - 1] as f64 / 1e3
    };
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: at(1.0),
    }
}

struct Row {
    section: &'static str,
    policy: &'static str,
    scenario: String,
    target: Option<f64>,
    achieved: f64,
    latency: Latency,
    note: String,
}

fn print_header() {
    println!(
        "{:<9} {:<10} {:<30} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}  notes",
        "section",
        "policy",
        "scenario",
        "target/s",
        "achieved",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs"
    );
}

fn print_row(r: &Row) {
    let target = r.target.map_or("max".to_owned(), |t| format!("{t:.0}"));
    let l = &r.latency;
    println!(
        "{:<9} {:<10} {:<30} {:>8} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1}  {}",
        r.section, r.policy, r.scenario, target, r.achieved, l.p50, l.p99, l.p999, l.max, r.note
    );
}

fn report(rows: &mut Vec<Row>, row: Row) {
    print_row(&row);
    rows.push(row);
}

/// Waits for `t` with a short spin at the end, so the wake-up jitter stays out of the figures.
fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > Duration::from_micros(300) {
            std::thread::sleep(left - Duration::from_micros(200));
        } else {
            std::hint::spin_loop();
        }
    }
}

fn planned(t0: Instant, i: u64, rate: f64) -> Instant {
    t0 + Duration::from_nanos((i as f64 * 1e9 / rate) as u64)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// In-process handler

/// What the gRPC front end does per request, minus protobuf decoding and transport.
fn handle(authorizer: &Authorizer, request: &CheckRequest) -> bool {
    let verdict = authorizer.check(REQUEST_PATH, |options| policy_input(request, options));
    let response = grpc_response(verdict).expect("a bundle is active");
    response.status.is_some_and(|s| s.code == 0)
}

fn authorizer_for(bundle: &Bundle) -> Arc<Authorizer> {
    let authorizer = Authorizer::new(AuthzMetrics::new(), None, InputOptions::default());
    let active = Active::compile(bundle, &Overrides::default(), Limits::default())
        .expect("bundle compiles and defines its query");
    authorizer.activate(active);
    Arc::new(authorizer)
}

/// Mean µs per call of `f` over `iters` calls (after a warm-up).
fn mean_us(iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(iters)
}

/// Where one decision's time goes, stage by stage in the order the handler runs them (1 thread, means).
fn breakdown(name: &str, authorizer: &Authorizer, request: &CheckRequest) -> String {
    let active = authorizer.active().expect("a bundle is active");
    let options = InputOptions::default();
    let iters = 20_000u32;
    let mut stages = [Duration::ZERO; 4];
    for i in 0..iters + iters / 10 {
        let t0 = Instant::now();
        let input = input_from_check_request(black_box(request), &options).expect("input builds");
        let t1 = Instant::now();
        let value = regorus::Value::from(input);
        let t2 = Instant::now();
        let result = active.evaluate(value).expect("policy evaluates");
        let t3 = Instant::now();
        let decision = Decision::from_result(result.as_ref()).expect("a valid decision");
        black_box(check_response(&decision, &ResponseOptions::default()));
        let t4 = Instant::now();
        if i >= iters / 10 {
            for (stage, d) in stages.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                *stage += d;
            }
        }
    }
    let [build, convert, evaluate, respond] =
        stages.map(|d| d.as_secs_f64() * 1e6 / f64::from(iters));
    let whole = mean_us(iters, || {
        black_box(handle(authorizer, black_box(request)));
    });
    format!(
        "{name:<19} input build {build:5.1} | serde→regorus::Value {convert:5.1} | evaluate (+result→serde) {evaluate:5.1} | decision+CheckResponse {respond:4.1} | whole handler {whole:5.1} µs",
    )
}

/// Fixed-rate run: achieved rate, latency from the planned start, service time, start lateness.
fn handler_open_loop(
    authorizer: &Authorizer,
    request: &CheckRequest,
    rate: f64,
    secs: f64,
) -> (f64, Latency, Latency, Latency) {
    let n = (rate * secs) as u64;
    let mut response = Vec::with_capacity(n as usize);
    let mut service = Vec::with_capacity(n as usize);
    let mut lateness = Vec::with_capacity(n as usize);
    let mut denied = 0u64;
    let t0 = Instant::now() + Duration::from_millis(5);
    for i in 0..n {
        let at = planned(t0, i, rate);
        wait_until(at);
        let start = Instant::now();
        if !handle(authorizer, request) {
            denied += 1;
        }
        let end = Instant::now();
        response.push(nanos(end - at));
        service.push(nanos(end - start));
        lateness.push(nanos(start - at));
    }
    assert_eq!(denied, 0, "every benchmark request must be allowed");
    let achieved = n as f64 / t0.elapsed().as_secs_f64();
    (
        achieved,
        latency(response),
        latency(service),
        latency(lateness),
    )
}

fn handler_closed_loop(
    authorizer: &Authorizer,
    request: &CheckRequest,
    threads: usize,
    secs: f64,
) -> (f64, Latency) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let samples: Vec<Vec<u64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut samples = Vec::with_capacity(200_000);
                    loop {
                        let start = Instant::now();
                        if start >= deadline {
                            return samples;
                        }
                        black_box(handle(authorizer, request));
                        samples.push(nanos(start.elapsed()));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("handler thread panicked"))
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let all: Vec<u64> = samples.into_iter().flatten().collect();
    (all.len() as f64 / elapsed, latency(all))
}

// ---------------------------------------------------------------------------------------------
// The real binary over gRPC

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running `sluice authz`; killed when dropped (also while unwinding from a panic).
struct Server {
    child: Child,
    grpc: u16,
    admin: u16,
    stderr: PathBuf,
}

impl Server {
    fn start(bundle: &Path, extra: &[&str], dir: &Path) -> Server {
        let (grpc, http, admin) = (free_port(), free_port(), free_port());
        let stderr = dir.join(format!("authz-{grpc}.err"));
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-authz"))
            .arg("--bundle")
            .arg(bundle)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{admin}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            // Decision logs (when on) go to /dev/null: their cost is producing them, not the terminal.
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("server stderr file"))
            .spawn()
            .expect("`sluice authz` starts");
        Server {
            child,
            grpc,
            admin,
            stderr,
        }
    }

    fn died(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        Some(format!("sluice authz exited with {status}:\n{log}"))
    }

    async fn connect(&mut self, connections: usize, probe: &CheckRequest) -> Vec<Client> {
        let uri = format!("http://127.0.0.1:{}", self.grpc);
        let started = Instant::now();
        // Ready once a Check is answered (before the bundle is active it fails with UNAVAILABLE).
        loop {
            if let Some(why) = self.died() {
                panic!("{why}");
            }
            if let Ok(mut client) = AuthorizationClient::connect(uri.clone()).await
                && client.check(probe.clone()).await.is_ok()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "sluice authz not ready after 30 s; stderr: {}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut clients = Vec::new();
        for _ in 0..connections {
            // Each endpoint connects separately: one HTTP/2 connection per client.
            let channel = Channel::from_shared(uri.clone())
                .expect("valid URI")
                .connect()
                .await
                .expect("gRPC connects");
            clients.push(AuthorizationClient::new(channel));
        }
        clients
    }

    /// The server's own decision-latency histogram (cumulative `le` buckets in seconds and counts).
    fn histogram(&self) -> Vec<(f64, f64)> {
        let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.admin)) else {
            return Vec::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let mut text = String::new();
        if stream.write_all(request.as_bytes()).is_err()
            || stream.read_to_string(&mut text).is_err()
        {
            return Vec::new();
        }
        let prefix = "sluice_authz_decision_duration_seconds_bucket{le=\"";
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(prefix)?;
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Client = AuthorizationClient<Channel>;

/// Server-side view between two histogram scrapes: share ≤ 0.5 ms and the bucket holding p99.
fn server_side(before: &[(f64, f64)], after: &[(f64, f64)]) -> String {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let old = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - old)
        })
        .collect();
    let Some(&(_, total)) = diff.last().filter(|d| d.1 > 0.0) else {
        return "server histogram unavailable".into();
    };
    let under = diff
        .iter()
        .find(|d| (d.0 - 0.0005).abs() < 1e-9)
        .map_or(0.0, |d| d.1);
    let p99 = diff
        .iter()
        .find(|d| d.1 >= 0.99 * total)
        .map_or(f64::INFINITY, |d| d.0);
    format!(
        "server handler: {:.2}% ≤500, p99 ≤{}",
        100.0 * under / total,
        p99 * 1e6
    )
}

async fn ok(client: &mut Client, request: CheckRequest) -> bool {
    match client.check(request).await {
        Ok(response) => response.into_inner().status.is_some_and(|s| s.code == 0),
        Err(_) => false,
    }
}

/// `concurrency` closed-loop callers spread over the connections, until `deadline`.
async fn closed_loop(
    clients: &[Client],
    request: &CheckRequest,
    concurrency: usize,
    deadline: Instant,
) -> (Vec<u64>, u64) {
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = request.clone();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(100_000);
                let mut failed = 0u64;
                while Instant::now() < deadline {
                    let start = Instant::now();
                    if !ok(&mut client, request.clone()).await {
                        failed += 1;
                    }
                    samples.push(nanos(start.elapsed()));
                }
                (samples, failed)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (samples, f) = task.await.expect("client task panicked");
        all.extend(samples);
        failed += f;
    }
    (all, failed)
}

struct OpenLoop {
    achieved: f64,
    response: Latency,
    /// From the actual send, i.e. without the sender's own lateness.
    sent: Latency,
    lateness_p99: f64,
    failed: u64,
}

/// Sends at `rate` from a plain thread (tokio's timer is 1 ms coarse) into the client runtime.
fn grpc_open_loop(
    runtime: &tokio::runtime::Runtime,
    clients: &[Client],
    request: &CheckRequest,
    rate: f64,
    secs: f64,
) -> OpenLoop {
    let n = (rate * secs) as u64;
    let t0 = Instant::now() + Duration::from_millis(5);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = planned(t0, i, rate);
        // Sleep only: spinning would take CPU from the server on this 2-core machine. The wake-up
        // lateness is part of the figures and reported separately.
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let mut client = clients[i as usize % clients.len()].clone();
        let request = request.clone();
        tasks.push(runtime.spawn(async move {
            let sent = Instant::now();
            let allowed = ok(&mut client, request).await;
            let done = Instant::now();
            (
                nanos(done - at),
                nanos(sent - at),
                nanos(done - sent),
                allowed,
                done,
            )
        }));
    }
    runtime.block_on(async {
        let mut response = Vec::with_capacity(tasks.len());
        let mut lateness = Vec::with_capacity(tasks.len());
        let mut sent = Vec::with_capacity(tasks.len());
        let mut failed = 0;
        let mut last = t0;
        for task in tasks {
            let (r, late, s, allowed, done) = task.await.expect("client task panicked");
            response.push(r);
            lateness.push(late);
            sent.push(s);
            failed += u64::from(!allowed);
            last = last.max(done);
        }
        OpenLoop {
            achieved: n as f64 / (last - t0).as_secs_f64(),
            response: latency(response),
            sent: latency(sent),
            lateness_p99: latency(lateness).p99,
            failed,
        }
    })
}

struct E2e<'a> {
    runtime: &'a tokio::runtime::Runtime,
    request: &'a CheckRequest,
    secs: f64,
    policy: &'static str,
    section: &'static str,
}

impl E2e<'_> {
    fn warm_up(&self, clients: &[Client]) {
        let deadline = Instant::now() + Duration::from_millis(500);
        let (_, failed) = self
            .runtime
            .block_on(closed_loop(clients, self.request, 8, deadline));
        assert_eq!(failed, 0, "warm-up checks must all be allowed");
    }

    fn fixed(&self, server: &Server, clients: &[Client], rate: f64) -> Row {
        let before = server.histogram();
        let run = grpc_open_loop(self.runtime, clients, self.request, rate, self.secs);
        let after = server.histogram();
        Row {
            section: self.section,
            policy: self.policy,
            scenario: format!("gRPC open loop {} conns", clients.len()),
            target: Some(rate),
            achieved: run.achieved,
            latency: run.response,
            note: format!(
                "{}; from send p50/p99 {:.0}/{:.0}; sender lateness p99 {:.0}{}",
                server_side(&before, &after),
                run.sent.p50,
                run.sent.p99,
                run.lateness_p99,
                failures(run.failed)
            ),
        }
    }

    fn max(&self, server: &Server, clients: &[Client], concurrency: usize) -> Row {
        let before = server.histogram();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(self.secs);
        let (samples, failed) =
            self.runtime
                .block_on(closed_loop(clients, self.request, concurrency, deadline));
        let achieved = samples.len() as f64 / t0.elapsed().as_secs_f64();
        let after = server.histogram();
        Row {
            section: self.section,
            policy: self.policy,
            scenario: format!("gRPC closed {concurrency} callers/{} conns", clients.len()),
            target: None,
            achieved,
            latency: latency(samples),
            note: format!("{}{}", server_side(&before, &after), failures(failed)),
        }
    }
}

fn failures(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} FAILED/denied")
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// The 1-minute load average, to tell a noisy machine from a slow server.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "n/a".into())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn main() {
    let secs: f64 = std::env::var("SLUICE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(5.0);
    let connections = env_usize("SLUICE_BENCH_CONNECTIONS", 4);
    let concurrency = env_usize("SLUICE_BENCH_CONCURRENCY", 32);
    let dir = tempfile::tempdir().expect("temporary directory");
    let token = jwt();
    let request = check_request(&token);
    let policies = policies();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "sluice authz load test: {secs} s per scenario, {cores} cores, load average {} at start; \
         latencies in µs.\n\
         Open loop: requests start at planned times and latency counts from the planned start.",
        load_average()
    );
    let mut rows = Vec::new();

    // Loads every bundle the way the server does, from a .tar.gz on disk.
    let mut bundles = Vec::new();
    for policy in &policies {
        let path = dir.path().join(format!("{}.tar.gz", policy.name));
        let bytes = policy.bundle.to_tar_gz().expect("bundle archives");
        std::fs::write(&path, &bytes).expect("bundle written");
        let loaded =
            Bundle::from_tar_gz(&bytes, &LoadOptions::default()).expect("bundle archive loads");
        bundles.push((path, loaded));
    }

    println!("\n== Handler (in-process), where the time goes: mean µs per stage, 1 thread ==");
    let decode_only = rbac_bundle(
        &RBAC_POLICY.replace("\tio.jwt.verify_hs256(bearer, data.rbac.jwt_secret)\n", ""),
    );
    let variants = policies
        .iter()
        .zip(&bundles)
        .map(|(policy, (_, bundle))| (policy.name, bundle))
        .chain([("rbac-jwt decode only", &decode_only)]);
    for (name, bundle) in variants {
        let authorizer = authorizer_for(bundle);
        assert!(
            handle(&authorizer, &request),
            "{name} must allow the request"
        );
        println!("{}", breakdown(name, &authorizer, &request));
    }

    println!();
    print_header();
    for (policy, (_, bundle)) in policies.iter().zip(&bundles) {
        let authorizer = authorizer_for(bundle);
        for rate in [1000.0, 5000.0] {
            let (achieved, response, service, late) =
                handler_open_loop(&authorizer, &request, rate, secs);
            let note = format!(
                "service time p50/p99/p99.9 {:.1}/{:.1}/{:.1}; start lateness p99 {:.0}",
                service.p50, service.p99, service.p999, late.p99
            );
            report(
                &mut rows,
                Row {
                    section: "handler",
                    policy: policy.name,
                    scenario: "open loop 1 thread".into(),
                    target: Some(rate),
                    achieved,
                    latency: response,
                    note,
                },
            );
        }
        for threads in [1, 2] {
            let (achieved, lat) = handler_closed_loop(&authorizer, &request, threads, secs);
            report(
                &mut rows,
                Row {
                    section: "handler",
                    policy: policy.name,
                    scenario: format!("closed loop {threads} thread(s)"),
                    target: None,
                    achieved,
                    latency: lat,
                    note: String::new(),
                },
            );
        }
    }

    // The client runtime: one thread keeps the generator's share of the 2 cores small.
    let client_threads = env_usize("SLUICE_BENCH_CLIENT_THREADS", 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()
        .expect("client runtime");
    println!(
        "\n== End to end: real `sluice authz` over gRPC on 127.0.0.1 ({connections} HTTP/2 connections, \
         client runtime {client_threads} thread(s)) ==\n\
         CAVEAT: the load generator shares the {cores} cores with the server, so these figures are a floor."
    );
    let runs: [(&str, &[&str]); 2] = [("e2e", &["--decision-log-rate", "0"]), ("e2e+log", &[])];
    for (section, extra) in runs {
        for (policy, (path, _)) in policies.iter().zip(&bundles) {
            // Decision logs are measured once, on the heavier policy.
            if section == "e2e+log" && policy.name != "rbac-jwt" {
                continue;
            }
            let mut server = Server::start(path, extra, dir.path());
            let clients = runtime.block_on(server.connect(connections, &request));
            let e2e = E2e {
                runtime: &runtime,
                request: &request,
                secs,
                policy: policy.name,
                section,
            };
            e2e.warm_up(&clients);
            for rate in [1000.0, 5000.0] {
                report(&mut rows, e2e.fixed(&server, &clients, rate));
            }
            report(&mut rows, e2e.max(&server, &clients, concurrency));
            if let Some(why) = server.died() {
                panic!("{why}");
            }
        }
    }
    drop(runtime);

    println!("\n== Summary (targets: handler p99 < 500 µs at 1k/s; ≥ 20k checks/s) ==");
    print_header();
    for row in &rows {
        print_row(row);
    }
    println!(
        "load average {} at the end (it counts this bench too; much above 3 means other work shared the cores).",
        load_average()
    );
    println!(
        "e2e+log = default --decision-log-rate 100 (stdout to /dev/null); e2e = --decision-log-rate 0.\n\
         e2e figures include the tonic client, which runs on the same {cores} cores as the server."
    );
    let url = format!("http://127.0.0.1:PORT{REQUEST_PATH}");
    let auth = format!("authorization: Bearer {token}");
    if on_path("h2load") {
        println!(
            "HTTP mode (sluice authz --http-addr 127.0.0.1:PORT): h2load --h1 -n 100000 -c 32 -H '{auth}' '{url}'"
        );
    }
    if on_path("wrk") {
        println!(
            "HTTP mode (sluice authz --http-addr 127.0.0.1:PORT): wrk -t1 -c32 -d5s -H '{auth}' '{url}'"
        );
    }
}
