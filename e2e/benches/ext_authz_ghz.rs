//! Envoy ext_authz over gRPC, driven by ghz (the real load generator, pinned in `tools/versions.env`) against
//! the `sluice-authz` sidecar binary: fixed rates of 1,000 and 5,000 checks/s (open loop: latencies p50 / p99
//! / p99.9) and maximum throughput, with the server's CPU seconds and RSS. The server gets one worker thread
//! pinned to one core and ghz the other, so "checks per CPU-second" is throughput per core.
//!
//! `cargo bench -p sluice-e2e --bench ext_authz_ghz` (about 40 s; builds ghz once). `SLUICE_BENCH_SECS` sets
//! each run's duration (default 10). The policy is `policies/envoy-http-authz` (HS256 JWT verified and
//! decoded, role rules), the request its `viewer-get-products` input. OPA-Envoy, the rival, is not run: its
//! module (github.com/open-policy-agent/opa-envoy-plugin) is not served by the Go module proxy here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_e2e::harness::{repo_root, sluice_binary};
use sluice_e2e::opa::ghz_binary;
use sluice_e2e::prometheus::free_port;

/// envoy-types ships the protos ghz needs (data-plane-api and its imports).
fn proto_dirs() -> (PathBuf, Vec<PathBuf>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repo_root())
        .output()
        .expect("cargo metadata");
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata JSON");
    let manifest = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types is a dependency");
    let root = Path::new(manifest).parent().expect("dir").join("proto");
    let imports = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    (
        root.join("data-plane-api/envoy/service/auth/v3/external_auth.proto"),
        imports,
    )
}

struct Server {
    child: Child,
    grpc: u16,
}

impl Server {
    fn start(bundle: &Path) -> Server {
        let binary = sluice_binary()
            .expect("sluice builds")
            .with_file_name("sluice-authz");
        for _ in 0..5 {
            let (grpc, admin) = (free_port().expect("port"), free_port().expect("port"));
            let mut child = Command::new("taskset")
                .args(["-c", "1"])
                .arg(&binary)
                .arg("--bundle")
                .arg(bundle)
                .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
                .args(["--metrics-addr", &format!("127.0.0.1:{admin}")])
                .args(["--threads", "1", "--decision-log-rate", "0"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("sluice-authz starts");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
                let ready =
                    std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok_and(|mut s| {
                        use std::io::{Read, Write};
                        let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                        let mut text = String::new();
                        let _ = s.read_to_string(&mut text);
                        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200")
                    });
                if ready {
                    return Server { child, grpc };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("sluice-authz did not become ready");
    }

    /// (CPU seconds so far, RSS now in MiB, peak RSS in MiB)
    fn usage(&self) -> (f64, f64, f64) {
        sluice_e2e::harness::process_usage(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    label: String,
    ok: u64,
    errors: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    cpu_secs: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

/// What ghz needs besides the server: the request and the protos (located once).
struct Load {
    request: PathBuf,
    proto: PathBuf,
    import_paths: String,
}

fn ghz(server: &Server, load: &Load, rps: u32, secs: u64, label: &str) -> Run {
    let request = &load.request;
    let out = request.with_file_name(format!("ghz-{rps}.json"));
    let (cpu_before, _, _) = server.usage();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(ghz_binary().expect("ghz builds"))
        .args(["--insecure", "--cpus", "1", "--proto"])
        .arg(&load.proto)
        .args(["--import-paths", &load.import_paths])
        .args(["--call", "envoy.service.auth.v3.Authorization.Check"])
        .arg("--data-file")
        .arg(request)
        .args(["--duration", &format!("{secs}s")])
        .args(["--format", "json", "--output"])
        .arg(&out);
    if rps == 0 {
        cmd.args(["--concurrency", "32", "--connections", "4"]);
    } else {
        cmd.args([
            "--rps",
            &rps.to_string(),
            "--concurrency",
            "50",
            "--connections",
            "2",
        ]);
    }
    cmd.arg(format!("127.0.0.1:{}", server.grpc));
    let status = cmd.status().expect("ghz runs");
    assert!(status.success(), "ghz failed: {status}");
    let (cpu_after, rss, peak) = server.usage();
    let report: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("ghz report")).expect("report JSON");
    let mut latencies: Vec<f64> = report["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter(|d| d["status"] == "OK")
        .filter_map(|d| d["latency"].as_f64())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize] / 1e6;
    let ok = latencies.len() as u64;
    let total = report["count"].as_u64().unwrap_or(ok);
    Run {
        label: label.into(),
        ok,
        errors: total.saturating_sub(ok),
        rps: report["rps"].as_f64().unwrap_or(f64::NAN),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        cpu_secs: cpu_after - cpu_before,
        rss_mib: rss,
        peak_rss_mib: peak,
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("SLUICE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 10 });
    let policy = repo_root().join("policies/envoy-http-authz");
    let input: Value = serde_json::from_str(
        &std::fs::read_to_string(policy.join("inputs/viewer-get-products.json")).expect("input"),
    )
    .expect("JSON");
    let dir = tempfile::tempdir().expect("tempdir");
    let request = dir.path().join("check.json");
    std::fs::write(
        &request,
        json!({"attributes": input["attributes"]}).to_string(),
    )
    .expect("request written");
    let (proto, imports) = proto_dirs();
    let load = Load {
        request,
        proto,
        import_paths: imports
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(","),
    };
    let server = Server::start(&policy);
    let version = sluice_testcluster::Versions::pinned()
        .expect("versions")
        .ghz;
    // A short warm-up, not reported.
    let _ = ghz(&server, &load, 500, 1, "warm-up");
    let runs = [
        ghz(&server, &load, 1000, secs, "1,000 checks/s"),
        ghz(&server, &load, 5000, secs, "5,000 checks/s"),
        ghz(&server, &load, 0, secs, "maximum (32 in flight)"),
    ];
    println!(
        "\nsluice-authz (1 worker thread, core 1) under ghz {version} (core 0), {secs} s per run, policy envoy-http-authz\n"
    );
    println!(
        "| load | achieved checks/s | ok | errors | p50 | p99 | p99.9 | server CPU s | checks per CPU-second | RSS after | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {} | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.2} | {:.0} | {:.1} MiB | {:.1} MiB |",
            r.label,
            r.rps,
            r.ok,
            r.errors,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.cpu_secs,
            r.ok as f64 / r.cpu_secs,
            r.rss_mib,
            r.peak_rss_mib
        );
    }
}
