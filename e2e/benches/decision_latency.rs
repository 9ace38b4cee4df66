//! Decision latency, same policies, same inputs, same machine, same run: `opa bench` (the real OPA, pinned in
//! `tools/versions.env`) against Sluice's engine evaluating the rule the way `sluice authz` does (one
//! compiled engine, the input converted once, `eval_rule` per decision).
//!
//! `cargo bench -p sluice-e2e --bench decision_latency` (about 30 s; builds OPA once). Prints a Markdown table
//! for docs/benchmarks.md. `SLUICE_BENCH_SECS` sets Sluice's measuring time per case (default 2).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::policy::bundle::{Bundle, LoadOptions};
use sluice::policy::engine::{Limits, PolicyEngine};
use sluice_e2e::harness::repo_root;
use sluice_e2e::opa::opa;

/// (directory under policies/, query, input file under inputs/)
const CASES: &[(&str, &str, &str)] = &[
    (
        "envoy-http-authz",
        "data.envoy.authz.allow",
        "viewer-get-products",
    ),
    ("envoy-http-authz", "data.envoy.authz.allow", "no-token"),
    (
        "envoy-http-authz",
        "data.envoy.authz.result",
        "admin-delete-order",
    ),
    (
        "spiffe-allowlist",
        "data.envoy.spiffe.allow",
        "frontend-get-product",
    ),
    (
        "rollout-gate",
        "data.sluice.rollout.gate.deny",
        "everything-wrong",
    ),
];

struct Figures {
    median_ns: f64,
    p99_ns: f64,
    allocs_per_op: Option<f64>,
}

fn opa_bench(dir: &Path, query: &str, input: &Path) -> Figures {
    let output = opa(&[
        "bench",
        "--format",
        "json",
        "--ignore",
        "inputs",
        "--data",
        dir.to_str().expect("path"),
        "--input",
        input.to_str().expect("path"),
        query,
    ])
    .expect("opa runs");
    assert!(
        output.status.success(),
        "opa bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let doc: Value = serde_json::from_slice(&output.stdout).expect("opa bench JSON");
    let extra = &doc["Extra"];
    let n = doc["N"].as_f64().expect("N");
    Figures {
        median_ns: extra["histogram_timer_rego_query_eval_ns_median"]
            .as_f64()
            .expect("median"),
        p99_ns: extra["histogram_timer_rego_query_eval_ns_99%"]
            .as_f64()
            .expect("p99"),
        allocs_per_op: doc["MemAllocs"].as_f64().map(|a| a / n),
    }
}

fn sluice_bench(dir: &Path, query: &str, input: &Path, budget: Duration) -> Figures {
    let bundle = Bundle::load(dir, &LoadOptions::default()).expect("bundle loads");
    let mut engine =
        PolicyEngine::compile(&bundle.modules, &bundle.data, Limits::default()).expect("compiles");
    let json = std::fs::read_to_string(input).expect("input");
    let input = regorus::Value::from_json_str(&json).expect("input is JSON");
    // Warm up (first evaluation builds regorus' caches), then time each decision.
    for _ in 0..100 {
        engine.eval_value(query, input.clone()).expect("evaluates");
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget {
        let t = Instant::now();
        std::hint::black_box(engine.eval_value(query, input.clone()).expect("evaluates"));
        samples.push(t.elapsed().as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    Figures {
        median_ns: at(0.5),
        p99_ns: at(0.99),
        allocs_per_op: None,
    }
}

fn us(ns: f64) -> String {
    format!("{:.1} µs", ns / 1000.0)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and expects a quick run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("SLUICE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 0.2 } else { 2.0 });
    let policies = repo_root().join("policies");
    let version = sluice_testcluster::Versions::pinned()
        .expect("versions")
        .opa;
    println!(
        "Decision latency: opa bench (OPA {version}) vs Sluice's engine, same policy and input\n"
    );
    println!(
        "| policy | query | input | OPA median | OPA p99 | OPA allocs/op | Sluice median | Sluice p99 | median ratio OPA/Sluice |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (dir, query, input) in CASES {
        let dir_path = policies.join(dir);
        let input_path = dir_path.join("inputs").join(format!("{input}.json"));
        let o = opa_bench(&dir_path, query, &input_path);
        let s = sluice_bench(&dir_path, query, &input_path, Duration::from_secs_f64(secs));
        println!(
            "| {dir} | `{query}` | {input} | {} | {} | {:.0} | {} | {} | {:.1}× |",
            us(o.median_ns),
            us(o.p99_ns),
            o.allocs_per_op.unwrap_or(f64::NAN),
            us(s.median_ns),
            us(s.p99_ns),
            o.median_ns / s.median_ns
        );
    }
}
