//! End-to-end checks of `sluice authz`, the real binary: gRPC and HTTP ext_authz decisions (allow, deny
//! with status/body/headers, dry-run, undefined, malformed requests), a bundle swapped under load without
//! a failed request, and a bundle server going away without the service losing its policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use sluice_e2e::harness::sluice_binary;
use sluice_e2e::prometheus::free_port;
use tonic::transport::Channel;

const ALLOW_GET: &str = r#"package envoy.authz

default allow := false

allow if input.attributes.request.http.method == "GET"
"#;

const ALLOW_GET_AND_POST: &str = r#"package envoy.authz

default allow := false

allow if input.attributes.request.http.method in {"GET", "POST"}
"#;

const OBJECT_DECISION: &str = r#"package envoy.obj

default result := {
	"allowed": false,
	"http_status": 401,
	"body": "who are you?",
	"headers": {"www-authenticate": "Bearer realm=\"shop\""},
}

result := {
	"allowed": true,
	"headers": {"x-user": user},
	"response_headers_to_add": {"x-served-by": "sluice"},
	"request_headers_to_remove": ["x-api-key"],
} if {
	user := input.attributes.request.http.headers["x-user"]
}

# Defined for GET only: other methods make the decision undefined.
partial := {"allowed": true} if input.attributes.request.http.method == "GET"
"#;

/// Writes a policy directory and builds it into a bundle with `sluice policy build`.
fn build_bundle(dir: &Path, name: &str, modules: &[(&str, &str)]) -> PathBuf {
    let source = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&source).expect("policy dir");
    for (file, rego) in modules {
        std::fs::write(source.join(file), rego).expect("module written");
    }
    let out = dir.join(format!("{name}.tar.gz"));
    let status = Command::new(sluice_binary().expect("sluice binary"))
        .args(["policy", "build", "--skip-tests", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .expect("sluice policy build runs");
    assert!(status.success(), "bundle {name} builds");
    out
}

/// Replaces `target` atomically, as a ConfigMap volume update does.
fn swap_file(from: &Path, target: &Path) {
    let staging = target.with_extension("staging");
    std::fs::copy(from, &staging).expect("staged");
    std::fs::rename(&staging, target).expect("renamed");
}

struct Authz {
    child: Child,
    grpc: u16,
    http: u16,
    admin: u16,
    stdout: PathBuf,
}

impl Authz {
    fn start(bundle: &str, extra: &[&str], dir: &Path) -> Authz {
        let (grpc, http, admin) = (
            free_port().expect("port"),
            free_port().expect("port"),
            free_port().expect("port"),
        );
        let stdout = dir.join(format!("authz-{grpc}.out"));
        let child = Command::new(sluice_binary().expect("sluice binary"))
            .args(["authz", "--bundle", bundle])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{admin}")])
            .args([
                "--poll-interval-secs",
                "1",
                "--long-poll-secs",
                "5",
                "--threads",
                "2",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(
                std::fs::File::create(dir.join(format!("authz-{grpc}.err"))).expect("stderr file"),
            )
            .spawn()
            .expect("sluice authz starts");
        Authz {
            child,
            grpc,
            http,
            admin,
            stdout,
        }
    }

    async fn wait_ready(&self, http: &reqwest::Client) -> String {
        let started = Instant::now();
        loop {
            if let Ok(response) = http
                .get(format!("http://127.0.0.1:{}/readyz", self.admin))
                .send()
                .await
                && response.status() == 200
            {
                return response.text().await.unwrap_or_default();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "sluice authz never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn grpc_client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://127.0.0.1:{}", self.grpc))
            .await
            .expect("gRPC connects")
    }

    async fn metrics(&self, http: &reqwest::Client) -> String {
        http.get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    fn decision_logs(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Authz {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn check_request(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: "shop.local".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<HashMap<_, _>>(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(client: &mut AuthorizationClient<Channel>, request: CheckRequest) -> CheckResponse {
    client
        .check(request)
        .await
        .expect("Check answers")
        .into_inner()
}

fn code(response: &CheckResponse) -> i32 {
    response.status.as_ref().map(|s| s.code).unwrap_or_default()
}

fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_decisions_follow_opa_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = http_client();
    let boolean = build_bundle(dir.path(), "bool", &[("authz.rego", ALLOW_GET)]);
    let object = build_bundle(dir.path(), "object", &[("obj.rego", OBJECT_DECISION)]);

    // A boolean decision.
    let authz = Authz::start(boolean.to_str().unwrap(), &[], dir.path());
    let ready = authz.wait_ready(&http).await;
    assert!(ready.contains("revision"), "{ready}");
    let mut grpc = authz.grpc_client().await;
    let allowed = check(&mut grpc, check_request("GET", "/items", &[])).await;
    assert_eq!(code(&allowed), 0);
    let denied = check(&mut grpc, check_request("DELETE", "/items", &[])).await;
    assert_eq!(code(&denied), 7);
    // The same over HTTP: the original method and path arrive as the check request.
    let response = http
        .get(format!("http://127.0.0.1:{}/items", authz.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = http
        .delete(format!("http://127.0.0.1:{}/items", authz.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // A malformed request (bad escape) is refused with OPA-Envoy's parse error, not a crash.
    let malformed = check(&mut grpc, check_request("GET", "/items%zz", &[])).await;
    assert_eq!(code(&malformed), 7);
    match malformed.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            assert_eq!(d.status.map(|s| s.code), Some(400));
            assert!(d.body.starts_with("request_parse_error"), "{}", d.body);
        }
        other => panic!("expected a denied 400, got {other:?}"),
    }
    let metrics = authz.metrics(&http).await;
    assert!(
        metrics.contains(r#"sluice_authz_decisions_total{result="allow"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_authz_decisions_total{result="deny"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_authz_bundle_info{revision="),
        "{metrics}"
    );
    // Decision logs: one JSON line per decision, with the revision and a masked authorization header.
    check(
        &mut grpc,
        check_request("GET", "/items", &[("authorization", "Bearer secret")]),
    )
    .await;
    let logs = sluice_e2e::harness::eventually(Duration::from_secs(5), || {
        let logs = authz.decision_logs();
        (logs.len() >= 5).then_some(logs)
    })
    .expect("decision logs written");
    let last = logs.last().unwrap();
    assert!(
        last["revision"].as_str().is_some_and(|r| !r.is_empty()),
        "{last}"
    );
    assert_eq!(
        last["input"]["attributes"]["request"]["http"]["headers"]["authorization"],
        "***"
    );
    assert_eq!(last["allowed"], true);
    drop(authz);

    // An object decision: headers, status and body are mapped like OPA-Envoy's.
    let authz = Authz::start(
        object.to_str().unwrap(),
        &["--query", "data.envoy.obj.result"],
        dir.path(),
    );
    authz.wait_ready(&http).await;
    let mut grpc = authz.grpc_client().await;
    let denied = check(&mut grpc, check_request("GET", "/", &[])).await;
    assert_eq!(code(&denied), 7);
    match denied.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            assert_eq!(d.status.map(|s| s.code), Some(401));
            assert_eq!(d.body, "who are you?");
            let header = d.headers[0].header.as_ref().unwrap();
            assert_eq!(
                (header.key.as_str(), header.value.as_str()),
                ("www-authenticate", "Bearer realm=\"shop\"")
            );
        }
        other => panic!("expected a denied response, got {other:?}"),
    }
    let allowed = check(&mut grpc, check_request("GET", "/", &[("x-user", "alice")])).await;
    assert_eq!(code(&allowed), 0);
    match allowed.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            let header = ok.headers[0].header.as_ref().unwrap();
            assert_eq!(
                (header.key.as_str(), header.value.as_str()),
                ("x-user", "alice")
            );
            assert_eq!(ok.headers_to_remove, vec!["x-api-key".to_owned()]);
            let added = ok.response_headers_to_add[0].header.as_ref().unwrap();
            assert_eq!(
                (added.key.as_str(), added.value.as_str()),
                ("x-served-by", "sluice")
            );
        }
        other => panic!("expected an OK response, got {other:?}"),
    }
    let response = http
        .get(format!("http://127.0.0.1:{}/", authz.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"shop\""
    );
    assert_eq!(response.text().await.unwrap(), "who are you?");
    let response = http
        .get(format!("http://127.0.0.1:{}/", authz.http))
        .header("x-user", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-user"], "alice");
    drop(authz);

    // Undefined fails closed by default, and open with --fail-open.
    let authz = Authz::start(
        object.to_str().unwrap(),
        &["--query", "data.envoy.obj.partial"],
        dir.path(),
    );
    authz.wait_ready(&http).await;
    let mut grpc = authz.grpc_client().await;
    assert_eq!(
        code(&check(&mut grpc, check_request("GET", "/", &[])).await),
        0
    );
    let undefined = check(&mut grpc, check_request("POST", "/", &[])).await;
    assert_eq!(code(&undefined), 7, "{undefined:?}");
    let response = http
        .post(format!("http://127.0.0.1:{}/", authz.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    drop(authz);
    let authz = Authz::start(
        object.to_str().unwrap(),
        &["--query", "data.envoy.obj.partial", "--fail-open"],
        dir.path(),
    );
    authz.wait_ready(&http).await;
    let mut grpc = authz.grpc_client().await;
    assert_eq!(
        code(&check(&mut grpc, check_request("POST", "/", &[])).await),
        0
    );
    drop(authz);

    // Dry-run evaluates and logs the denial, but allows.
    let authz = Authz::start(boolean.to_str().unwrap(), &["--dry-run"], dir.path());
    authz.wait_ready(&http).await;
    let mut grpc = authz.grpc_client().await;
    assert_eq!(
        code(&check(&mut grpc, check_request("DELETE", "/", &[])).await),
        0
    );
    let response = http
        .delete(format!("http://127.0.0.1:{}/", authz.http))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = authz.metrics(&http).await;
    assert!(
        metrics.contains(r#"sluice_authz_decisions_total{result="dry_run_deny"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_swapped_under_load_fails_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = http_client();
    let v1 = build_bundle(dir.path(), "v1", &[("authz.rego", ALLOW_GET)]);
    let v2 = build_bundle(dir.path(), "v2", &[("authz.rego", ALLOW_GET_AND_POST)]);
    let broken = dir.path().join("broken.tar.gz");
    std::fs::write(&broken, b"this is not a gzip tarball").unwrap();
    let mounted = dir.path().join("mounted.tar.gz");
    swap_file(&v1, &mounted);
    let authz = Authz::start(
        mounted.to_str().unwrap(),
        &["--decision-log-rate", "0"],
        dir.path(),
    );
    authz.wait_ready(&http).await;

    // Clients hammer the service while the bundle changes under it.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let checks = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut grpc = authz.grpc_client().await;
        let (stop, failures, checks) = (stop.clone(), failures.clone(), checks.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match grpc.check(check_request("GET", "/items", &[])).await {
                    Ok(r) if code(r.get_ref()) == 0 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                checks.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut grpc = authz.grpc_client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A broken bundle is refused; the old one keeps serving.
    swap_file(&broken, &mounted);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        code(&check(&mut grpc, check_request("POST", "/", &[])).await),
        7
    );
    // The new bundle is picked up without a restart.
    swap_file(&v2, &mounted);
    let started = Instant::now();
    while code(&check(&mut grpc, check_request("POST", "/", &[])).await) != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new bundle was never activated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let total = checks.load(Ordering::Relaxed);
    println!("{total} checks during two bundle swaps");
    assert!(total > 100, "the load ran ({total} checks)");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no check failed during the swaps"
    );
    let metrics = authz.metrics(&http).await;
    assert!(
        metrics.contains("sluice_authz_bundle_load_errors_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_revision_keeps_serving_when_the_bundle_server_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = http_client();
    let v1 = std::fs::read(build_bundle(dir.path(), "v1", &[("authz.rego", ALLOW_GET)])).unwrap();
    // A stand-in for the operator's bundle server, serving one revision.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let server = tokio::spawn({
        let requests = requests.clone();
        let app = axum::Router::new().route(
            "/bundles/shop/authz",
            axum::routing::get(move || {
                requests.fetch_add(1, Ordering::Relaxed);
                let body = v1.clone();
                async move { ([("etag", "\"v1\"")], body) }
            }),
        );
        async move { axum::serve(listener, app).await }
    });
    let url = format!("http://{addr}/bundles/shop/authz");
    let authz = Authz::start(&url, &[], dir.path());
    authz.wait_ready(&http).await;
    let mut grpc = authz.grpc_client().await;
    assert_eq!(
        code(&check(&mut grpc, check_request("GET", "/", &[])).await),
        0
    );

    server.abort();
    let _ = server.await;
    // The next polls fail; decisions go on with the last revision.
    let started = Instant::now();
    loop {
        let metrics = authz.metrics(&http).await;
        if !metrics.contains("sluice_authz_bundle_load_errors_total 0") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the outage was never noticed:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        code(&check(&mut grpc, check_request("GET", "/", &[])).await),
        0
    );
    assert_eq!(
        code(&check(&mut grpc, check_request("POST", "/", &[])).await),
        7
    );
    let ready = http
        .get(format!("http://127.0.0.1:{}/readyz", authz.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "still ready on the last revision");
}

const GUARDED: &str = r#"package envoy.guard

# Denials that ask for statuses Envoy's HTTP client would read as an allow (200) or as an
# authorization-server error (5xx, then failure_mode_allow decides).
default result := {"allowed": false, "http_status": 200, "body": "denied"}

result := {"allowed": false, "http_status": 503, "body": "maintenance"} if input.parsed_path[0] == "maintenance"

result := {"allowed": true} if input.parsed_path[0] == "open"

# A deny list keyed on one exact big number: its f64 neighbour must not match.
result := {"allowed": false, "http_status": 403, "body": "blocked id"} if {
	input.parsed_path[0] == "ids"
	input.parsed_body.id == 12345678901234567891
}

result := {"allowed": true} if {
	input.parsed_path[0] == "ids"
	input.parsed_body.id != 12345678901234567891
}

# A hidden form field: the role the backend's multipart reader sees.
result := {"allowed": false, "http_status": 403, "body": "no admins"} if {
	input.parsed_path[0] == "upload"
	"admin" in input.parsed_body.role
}

result := {"allowed": true} if {
	input.parsed_path[0] == "upload"
	not "admin" in object.get(input.parsed_body, "role", [])
}
"#;

/// The security rules of HTTP mode, against the real binary: a denial is never answered 200 or 5xx,
/// a body without Envoy's partial-body signal is refused, big numbers and multipart fields are read
/// as OPA-Envoy reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_fails_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = http_client();
    let bundle = build_bundle(dir.path(), "guard", &[("guard.rego", GUARDED)]);
    let authz = Authz::start(
        bundle.to_str().unwrap(),
        &["--query", "data.envoy.guard.result"],
        dir.path(),
    );
    authz.wait_ready(&http).await;
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", authz.http);

    let denied = http.get(url("/anything")).send().await.unwrap();
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.text().await.unwrap(), "denied");
    let maintenance = http.get(url("/maintenance")).send().await.unwrap();
    assert_eq!(maintenance.status(), 403);
    assert_eq!(http.get(url("/open")).send().await.unwrap().status(), 200);

    // A body without x-envoy-auth-partial-body: Envoy may have cut it, so it is refused.
    let unsignalled = http
        .post(url("/open"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=1")
        .send()
        .await
        .unwrap();
    assert_eq!(unsignalled.status(), 400);
    assert!(
        unsignalled
            .text()
            .await
            .unwrap()
            .contains("x-envoy-auth-partial-body"),
    );

    let post = |path: &'static str, content_type: &'static str, body: &'static str| {
        http.post(url(path))
            .header("content-type", content_type)
            .header("x-envoy-auth-partial-body", "false")
            .body(body)
            .send()
    };
    let json = "application/json";
    let blocked = post("/ids", json, r#"{"id": 12345678901234567891}"#)
        .await
        .unwrap();
    assert_eq!(blocked.status(), 403);
    let neighbour = post("/ids", json, r#"{"id": 12345678901234567890}"#)
        .await
        .unwrap();
    assert_eq!(neighbour.status(), 200, "the f64 neighbour is another id");

    let form = "multipart/form-data; boundary=b";
    let hidden_role = "--b\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--b\r\ncontent-disposition: FORM-DATA; NAME=\"role\"\r\n\r\nadmin\r\n--b--\r\n";
    assert_eq!(
        post("/upload", form, hidden_role).await.unwrap().status(),
        403
    );
    let mid_line = "--b\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nx--b\r\nContent-Disposition: form-data; name=\"role\"\r\n\r\nadmin\r\n--b--\r\n";
    assert_eq!(
        post("/upload", form, mid_line).await.unwrap().status(),
        200,
        "a boundary in the middle of a line is content, as for Go"
    );
    let two_dispositions = "--b\r\nContent-Disposition: form-data; name=\"role\"\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nadmin\r\n--b--\r\n";
    assert_eq!(
        post("/upload", form, two_dispositions)
            .await
            .unwrap()
            .status(),
        403,
        "the first Content-Disposition wins, as for Go"
    );
}
