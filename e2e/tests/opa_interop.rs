//! Sluice side by side with the real OPA (built from the module proxy at `OPA_VERSION`):
//! - `opa test` passes on `policies/`, with as many tests as `sluice policy test` runs;
//! - `opa eval` and `sluice policy eval` return the same decision for every example input, and the
//!   committed `inputs/*.expected.json` (the offline record `operator/tests/policies.rs` checks) is what OPA
//!   says (`SLUICE_BLESS=1` rewrites them from OPA);
//! - OPA's `io.jwt.*` answers are the ones recorded in `policies/tools/jwt_reference.json`;
//! - bundles built by `sluice policy build`, plain and signed (RS256, ES256, HS256, with data.json hashed
//!   canonically), load in OPA with OPA's own verification, and OPA refuses tampered, unsigned and
//!   wrongly-keyed ones;
//! - `opa run` instances long-poll signed bundles from `sluice operator`'s bundle server on a real control
//!   plane and report the revision through OPA's status API; one holding the wrong key refuses them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use sluice::api::AuthorizationPolicy;
use sluice::policy::bundle::Bundle;
use sluice_e2e::harness::{OperatorProcess, repo_root, sluice_binary, start_cluster};
use sluice_e2e::opa::{BundleConfig, OpaServer, eval_value, opa};

fn policies() -> PathBuf {
    repo_root().join("policies")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(sluice_binary().expect("sluice builds"))
        .args(args)
        .output()
        .expect("sluice runs")
}

/// `(passed, total)` of `opa test -f json` on `paths`.
fn opa_test(paths: &[&Path]) -> (usize, usize) {
    let mut args = vec![
        "test", "--format", "json", "--ignore", "inputs", "--ignore", "tools",
    ];
    args.extend(paths.iter().map(|p| path_str(p)));
    let output = opa(&args).expect("opa runs");
    let results: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "opa test printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let results = results.as_array().expect("a list of test results");
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.get("fail").is_some() || r.get("error").is_some())
        .map(|r| format!("{}.{}: {}", r["package"], r["name"], r))
        .collect();
    assert!(failed.is_empty(), "OPA fails tests: {failed:#?}");
    (results.len() - failed.len(), results.len())
}

#[test]
fn opa_test_passes_on_the_policy_library_like_sluice_policy_test() {
    let (passed, total) = opa_test(&[&policies()]);
    assert_eq!(passed, total);
    let output = sluice(&["policy", "test", path_str(&policies())]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "sluice policy test failed:\n{stdout}"
    );
    let summary = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PASS: "))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    assert_eq!(
        summary.trim(),
        format!("{total}/{total}"),
        "OPA ran {total} tests"
    );
    // Each directory alone, as a bundle built from it is tested.
    for entry in std::fs::read_dir(policies()).expect("policies/") {
        let dir = entry.expect("entry").path();
        if dir.join("inputs").is_dir() {
            let (passed, total) = opa_test(&[&dir]);
            assert!(total > 0 && passed == total, "{}", dir.display());
        }
    }
}

/// The decisions recorded per example directory (every input of the directory is evaluated for each).
const DECISIONS: &[(&str, &[&str])] = &[
    (
        "envoy-http-authz",
        &[
            "data.envoy.authz.allow",
            "data.envoy.authz.result",
            "data.envoy.authz_verified.allow",
        ],
    ),
    (
        "spiffe-allowlist",
        &["data.envoy.spiffe.allow", "data.envoy.spiffe.result"],
    ),
    (
        "rollout-gate",
        &[
            "data.sluice.rollout.gate.allow",
            "data.sluice.rollout.gate.deny",
        ],
    ),
];

fn opa_eval(dir: &Path, input: &Path, query: &str) -> Option<Value> {
    let output = opa(&[
        "eval",
        "--format",
        "json",
        "--ignore",
        "inputs",
        "--data",
        path_str(dir),
        "--input",
        path_str(input),
        query,
    ])
    .expect("opa runs");
    assert!(
        output.status.success(),
        "opa eval {query} on {} failed: {}{}",
        input.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eval_value(&output.stdout).expect("opa eval output")
}

fn sluice_eval(dir: &Path, input: &Path, query: &str) -> Option<Value> {
    let output = sluice(&[
        "policy",
        "eval",
        "--bundle",
        path_str(dir),
        "--input",
        path_str(input),
        "--query",
        query,
    ]);
    match output.status.code() {
        Some(0) => Some(serde_json::from_slice(&output.stdout).expect("eval prints JSON")),
        Some(1) => None,
        _ => panic!(
            "sluice policy eval {query} on {} failed: {}",
            input.display(),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[test]
fn opa_eval_and_sluice_policy_eval_agree_on_every_example_input() {
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let version = sluice_testcluster::Versions::pinned()
        .expect("versions")
        .opa;
    let mut disagreements = Vec::new();
    let mut compared = 0;
    for (directory, queries) in DECISIONS {
        let dir = policies().join(directory);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(dir.join("inputs"))
            .expect("inputs/")
            .map(|e| e.expect("entry").path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && !p.to_string_lossy().ends_with(".expected.json")
            })
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{directory} has inputs");
        for input in inputs {
            let stem = input
                .file_stem()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let expected_path = dir.join("inputs").join(format!("{stem}.expected.json"));
            let mut results = serde_json::Map::new();
            for query in *queries {
                let from_opa = opa_eval(&dir, &input, query);
                let from_sluice = sluice_eval(&dir, &input, query);
                compared += 1;
                if from_opa != from_sluice {
                    disagreements.push(format!(
                        "{directory}/inputs/{stem}.json {query}: OPA {from_opa:?}, Sluice {from_sluice:?}"
                    ));
                }
                results.insert(query.to_string(), from_opa.unwrap_or(Value::Null));
            }
            let record = json!({
                "engine": format!("OPA {version} (opa eval), written by SLUICE_BLESS=1 cargo test -p sluice-e2e --test opa_interop"),
                "input": format!("inputs/{stem}.json"),
                "results": results,
            });
            if bless {
                let mut text = serde_json::to_string_pretty(&record).expect("JSON");
                text.push('\n');
                std::fs::write(&expected_path, text).expect("expected file written");
            } else {
                let committed: Value = serde_json::from_str(
                    &std::fs::read_to_string(&expected_path).unwrap_or_else(|e| {
                        panic!(
                            "{}: {e} (SLUICE_BLESS=1 writes it)",
                            expected_path.display()
                        )
                    }),
                )
                .expect("expected file is JSON");
                if committed["results"] != record["results"] {
                    disagreements.push(format!(
                        "{}: committed {} but OPA says {} (SLUICE_BLESS=1 rewrites it)",
                        expected_path.display(),
                        committed["results"],
                        record["results"]
                    ));
                }
            }
        }
    }
    assert!(compared >= 40, "{compared} decisions compared");
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

#[test]
fn opa_io_jwt_answers_are_the_recorded_reference() {
    let path = policies().join("tools").join("jwt_reference.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("reference")).expect("JSON");
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    let mut reference = reference;
    let cases = reference["cases"].as_array_mut().expect("cases");
    assert!(cases.len() >= 30);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut disagreements = Vec::new();
    for (i, case) in cases.iter_mut().enumerate() {
        let builtin = case["builtin"].as_str().expect("builtin").to_owned();
        let args = case["args"].as_array().expect("args");
        let call = (0..args.len())
            .map(|n| format!("input.args[{n}]"))
            .collect::<Vec<_>>()
            .join(", ");
        let input = dir.path().join(format!("{i}.json"));
        std::fs::write(&input, json!({"args": args}).to_string()).expect("input");
        // Strict builtin errors, as the reference was recorded: an error is an error, not undefined.
        let output = opa(&[
            "eval",
            "--format",
            "json",
            "--strict-builtin-errors",
            "--input",
            path_str(&input),
            &format!("{builtin}({call})"),
        ])
        .expect("opa runs");
        let doc: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        let got = match doc.pointer("/result/0/expressions/0/value") {
            Some(value) => ("value", value.clone()),
            None if doc.get("errors").is_some() => ("error", Value::Null),
            None => ("undefined", Value::Null),
        };
        if bless {
            let object = case.as_object_mut().expect("case is an object");
            object.remove("result");
            object.remove("error");
            object.insert("outcome".into(), json!(got.0));
            match got.0 {
                "value" => {
                    object.insert("result".into(), got.1.clone());
                }
                _ => {
                    let message = doc.pointer("/errors/0/message").cloned();
                    object.insert("error".into(), message.unwrap_or(Value::Null));
                }
            }
            continue;
        }
        let want = match case["outcome"].as_str() {
            Some("value") => ("value", case["result"].clone()),
            Some("error") => ("error", Value::Null),
            other => panic!("case {i}: unknown outcome {other:?}"),
        };
        if got != want {
            disagreements.push(format!(
                "case {i} ({}): OPA {got:?}, recorded {want:?}",
                case["note"]
            ));
        }
    }
    if bless {
        let version = sluice_testcluster::Versions::pinned()
            .expect("versions")
            .opa;
        reference["about"] = json!(format!(
            "Outputs of OPA's io.jwt builtins (OPA {version}, `opa eval --strict-builtin-errors`), written by \
             SLUICE_BLESS=1 cargo test -p sluice-e2e --test opa_interop and checked against the real OPA in CI; \
             regression cases of Sluice's io.jwt extensions (operator/tests/jwt_reference.rs). HS256 secret: \
             sluice-demo-secret. RS256/ES256 public keys: see the args. outcome 'value': the call returned \
             result; 'error': the builtin raised an error, fatal with --strict-builtin-errors; in OPA's default \
             mode (opa eval, opa test, OPA-Envoy, and Sluice) such a call is undefined instead."
        ));
        let mut text = serde_json::to_string_pretty(&reference).expect("JSON");
        text.push('\n');
        std::fs::write(&path, text).expect("reference written");
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

const RSA_PRIVATE: &str = "rego/src/testdata/rsa_private.pem";
const RSA_PUBLIC: &str = "rego/src/testdata/rsa_public.pem";
const RSA_OTHER_PUBLIC: &str = "rego/src/testdata/rsa_other_public.pem";
const EC_PRIVATE: &str = "rego/src/testdata/ec_private.pem";
const EC_PUBLIC: &str = "rego/src/testdata/ec_public.pem";

fn testdata(path: &str) -> String {
    path_str(&repo_root().join(path)).to_owned()
}

/// `sluice policy build DIR -o OUT [extra...]`.
fn build_bundle(dir: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["policy", "build", path_str(dir), "--output", path_str(out)];
    args.extend_from_slice(extra);
    let output = sluice(&args);
    assert!(
        output.status.success(),
        "sluice policy build failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// OPA loads `bundle`, verifying it with `verification` (`opa build --bundle B --verification-key ...`, OPA's
/// own bundle verification; `opa eval` has no such flags), then `opa eval --bundle` evaluates `query`.
/// `Ok(value)` when OPA loads the bundle, `Err(output)` when it refuses it.
fn opa_eval_bundle(bundle: &Path, verification: &[&str], query: &str) -> Result<Value, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let verified = dir.path().join("verified.tar.gz");
    let loaded = if verification.is_empty() {
        bundle.to_owned()
    } else {
        let mut args = vec![
            "build",
            "--bundle",
            path_str(bundle),
            "--output",
            path_str(&verified),
        ];
        args.extend_from_slice(verification);
        let output = opa(&args).expect("opa runs");
        if !output.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        verified
    };
    let output = opa(&[
        "eval",
        "--format",
        "json",
        "--bundle",
        path_str(&loaded),
        query,
    ])
    .expect("opa runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(text);
    }
    eval_value(&output.stdout)
        .map_err(|e| format!("{e}: {text}"))?
        .ok_or_else(|| format!("undefined: {text}"))
}

/// Rewrites one file of a .tar.gz bundle, keeping everything else (including `.signatures.json`).
fn tamper(bundle: &Path, out: &Path, file: &str, edit: impl Fn(&str) -> String) {
    let bytes = std::fs::read(bundle).expect("bundle");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut found = false;
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("entry");
        let name = entry.path().expect("path").to_string_lossy().into_owned();
        let mut content = String::new();
        entry.read_to_string(&mut content).expect("UTF-8 entry");
        if name.trim_start_matches('/') == file {
            content = edit(&content);
            found = true;
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        // OPA and Sluice trim the leading '/' Sluice writes; the tar crate only writes relative names.
        builder
            .append_data(
                &mut header,
                name.trim_start_matches('/'),
                content.as_bytes(),
            )
            .expect("append");
    }
    assert!(found, "{file} is in the bundle");
    let gz = builder.into_inner().expect("tar").finish().expect("gzip");
    std::fs::write(out, gz).expect("tampered bundle written");
}

#[test]
fn bundles_built_by_sluice_load_in_opa_and_opa_refuses_altered_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A policy with data.json whose canonical form differs from its text (key order, spacing, escapes,
    // number literals), so OPA's structured-file digest is what is checked.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("envoy/authz")).expect("dirs");
    std::fs::write(
        src.join("envoy/authz/policy.rego"),
        "package envoy.authz\n\ndefault allow := false\n\nallow if input.method in data.envoy.authz.methods\n\nsettings := data.envoy.authz.limits\n",
    )
    .expect("module");
    std::fs::write(
        src.join("envoy/authz/data.json"),
        r#"{ "methods": ["GET", "HEAD"], "limits": {"z": 1.50, "a": "<tag> & \u00e9", "big": 12345678901234567890, "e": 1e3} }"#,
    )
    .expect("data");
    let query = "data.envoy.authz.settings";
    let want = opa_eval(&src, &src.join("envoy/authz/data.json"), query).expect("defined");

    let plain = dir.path().join("plain.tar.gz");
    build_bundle(&src, &plain, &[]);
    assert_eq!(opa_eval_bundle(&plain, &[], query), Ok(want.clone()));

    let rsa_args = [
        "--verification-key",
        &testdata(RSA_PUBLIC),
        "--verification-key-id",
        "sluice",
    ];
    let rsa = dir.path().join("rsa.tar.gz");
    build_bundle(
        &src,
        &rsa,
        &[
            "--signing-key",
            &testdata(RSA_PRIVATE),
            "--signing-alg",
            "RS256",
            "--key-id",
            "sluice",
        ],
    );
    assert_eq!(opa_eval_bundle(&rsa, &rsa_args, query), Ok(want.clone()));

    let ec = dir.path().join("ec.tar.gz");
    build_bundle(
        &src,
        &ec,
        &[
            "--signing-key",
            &testdata(EC_PRIVATE),
            "--signing-alg",
            "ES256",
        ],
    );
    let ec_args = [
        "--verification-key",
        &testdata(EC_PUBLIC),
        "--signing-alg",
        "ES256",
    ];
    assert_eq!(opa_eval_bundle(&ec, &ec_args, query), Ok(want.clone()));

    let secret = dir.path().join("secret");
    std::fs::write(&secret, "sluice-interop-secret").expect("secret");
    let hs = dir.path().join("hs.tar.gz");
    build_bundle(
        &src,
        &hs,
        &["--signing-key", path_str(&secret), "--signing-alg", "HS256"],
    );
    let hs_args = [
        "--verification-key",
        "sluice-interop-secret",
        "--signing-alg",
        "HS256",
    ];
    assert_eq!(opa_eval_bundle(&hs, &hs_args, query), Ok(want.clone()));

    // What OPA must refuse.
    let refused = |bundle: &Path, args: &[&str], why: &str| {
        let result = opa_eval_bundle(bundle, args, query);
        assert!(
            result.is_err(),
            "OPA loaded a bundle it must refuse ({why}): {result:?}"
        );
    };
    refused(&plain, &rsa_args, "unsigned, a key is configured");
    refused(
        &rsa,
        &[
            "--verification-key",
            &testdata(RSA_OTHER_PUBLIC),
            "--verification-key-id",
            "sluice",
        ],
        "signed with another key",
    );
    let module_edited = dir.path().join("module-edited.tar.gz");
    tamper(&rsa, &module_edited, "envoy/authz/policy.rego", |rego| {
        format!("{rego}\nallow if true\n")
    });
    refused(&module_edited, &rsa_args, "a module changed after signing");
    let data_edited = dir.path().join("data-edited.tar.gz");
    tamper(&rsa, &data_edited, "data.json", |data| {
        data.replace("HEAD", "POST")
    });
    refused(&data_edited, &rsa_args, "data changed after signing");
    // The same edits are refused by Sluice's own loader.
    for bundle in [&module_edited, &data_edited] {
        let output = sluice(&[
            "policy",
            "eval",
            "--bundle",
            path_str(bundle),
            "--verification-key",
            &testdata(RSA_PUBLIC),
            "--query",
            query,
        ]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "sluice loaded a tampered bundle: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

const POLICY: &str = r#"package envoy.authz

default allow := false

allow if input.attributes.request.http.method in data.envoy.authz.methods
"#;

fn policy(methods: &[&str]) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "interop", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "interop"}},
            "modules": [{"name": "authz.rego", "rego": POLICY}],
            "data": {"envoy": {"authz": {"methods": methods}}},
        }
    })
}

fn request(method: &str) -> Value {
    json!({"attributes": {"request": {"http": {"method": method}}}})
}

async fn decide(http: &reqwest::Client, opa: &OpaServer, method: &str) -> Option<Value> {
    opa.decide(http, "envoy/authz/allow", &request(method))
        .await
        .expect("decision")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opa_long_polls_signed_bundles_from_the_operator_and_reports_the_revision() {
    let cluster = start_cluster()
        .await
        .expect("control plane with Sluice installed");
    let key_id = "sluice-interop";
    let operator = OperatorProcess::start_with(
        &cluster.operator_kubeconfig,
        "http://127.0.0.1:9",
        &cluster.dir.path().join("operator.log"),
        &[
            "--bundle-signing-key",
            &testdata(RSA_PRIVATE),
            "--bundle-signing-key-id",
            key_id,
        ],
    )
    .expect("operator starts");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let policies: Api<AuthorizationPolicy> = Api::namespaced(cluster.client.clone(), "default");
    let apply = |methods: &'static [&'static str]| {
        let policies = policies.clone();
        async move {
            policies
                .patch(
                    "interop",
                    &PatchParams::apply("e2e").force(),
                    &Patch::Apply(policy(methods)),
                )
                .await
                .expect("policy applied");
        }
    };
    let served_revision = |previous: Option<String>| {
        let policies = policies.clone();
        let operator_log = operator.log();
        async move {
            let started = Instant::now();
            loop {
                let p = policies.get("interop").await.expect("policy readable");
                let current =
                    p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation;
                if let Some(revision) = p.status.as_ref().and_then(|s| s.revision.clone())
                    && current
                    && Some(&revision) != previous.as_ref()
                {
                    return revision;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no new revision served: {:#?}\n{operator_log}",
                    p.status
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    apply(&["GET"]).await;
    let first = served_revision(None).await;

    let bundle = |verification: Option<(&str, &str)>| BundleConfig {
        server: operator.bundle_url.clone(),
        resource: "bundles/default/interop".into(),
        long_poll_secs: 30,
        verification: verification.map(|(id, pem)| {
            (
                id.to_owned(),
                "RS256".to_owned(),
                std::fs::read_to_string(repo_root().join(pem)).expect("key"),
            )
        }),
        status_receiver: None,
    };
    let verifying = OpaServer::start(&bundle(Some((key_id, RSA_PUBLIC)))).expect("opa starts");
    let wrong_key =
        OpaServer::start(&bundle(Some((key_id, RSA_OTHER_PUBLIC)))).expect("opa starts");

    verifying.wait_active(&http, &first).await;
    assert_eq!(decide(&http, &verifying, "GET").await, Some(json!(true)));
    assert_eq!(decide(&http, &verifying, "HEAD").await, Some(json!(false)));

    // A new revision reaches the long-polling OPA without waiting for a polling interval.
    apply(&["GET", "HEAD"]).await;
    let applied = Instant::now();
    let second = served_revision(Some(first.clone())).await;
    verifying.wait_active(&http, &second).await;
    let propagation = applied.elapsed();
    assert_eq!(decide(&http, &verifying, "HEAD").await, Some(json!(true)));
    assert!(
        propagation < Duration::from_secs(10),
        "apply → active on OPA took {propagation:?}"
    );
    eprintln!("apply → revision active on OPA (long polling, signed): {propagation:?}");

    // The instance holding another key refuses every revision, and says why.
    let status = wrong_key
        .bundle_status(&http)
        .await
        .expect("status API answers");
    assert_eq!(status.active_revision, None, "{status:?}");
    let error = status.error.unwrap_or_default();
    assert!(
        error.contains("verification") || error.contains("signature"),
        "the status names the signature failure: {error}\n{}",
        wrong_key.log()
    );
    assert_eq!(decide(&http, &wrong_key, "GET").await, None);
    drop(operator);
}

/// A policy that exposes everything the request mapping produces to the decision.
const MAPPING_POLICY: &str = r#"package interop

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	input.parsed_path == ["api", "products"]
}

allow if input.parsed_path[0] == "public"

admin if input.parsed_path[0] == "admin"

admin if input.parsed_body.role == "admin"

admin if "admin" in input.parsed_query.role

result := {
	"allow": allow,
	"admin": object.get({"a": admin}, "a", false),
	"path": input.parsed_path,
	"query": input.parsed_query,
	"body": object.get(input, "parsed_body", null),
	"truncated": object.get(input, "truncated_body", null),
}
"#;

/// Adversarial requests (paths with `//`, `%2F`, dot segments, odd queries, bodies of each parsed type):
/// Sluice maps each to its `input` like OPA-Envoy, then Sluice's engine and the real OPA (`opa eval` on the
/// same input) decide; the decisions must be identical. This checks the engines on the mapping's edge
/// cases; the mapping itself can only be compared with OPA-Envoy, which is not available here (see
/// docs/benchmarks.md).
#[test]
fn sluice_and_opa_decide_alike_on_adversarial_requests() {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use sluice::authz::input::{InputOptions, policy_input};
    use sluice::policy::Module;
    use sluice::policy::engine::{Limits, PolicyEngine};

    let request = |method: &str, path: &str, content_type: &str, body: &str, partial: bool| {
        let mut headers = HashMap::from([("content-type".to_owned(), content_type.to_owned())]);
        if !body.is_empty() {
            headers.insert(
                "content-length".into(),
                (body.len() + usize::from(partial)).to_string(),
            );
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: method.into(),
                        path: path.into(),
                        host: "shop.local".into(),
                        headers,
                        body: body.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    };
    let json = "application/json";
    let form = "application/x-www-form-urlencoded";
    let cases = [
        request("GET", "/api/products", json, "", false),
        request("GET", "//api//products", json, "", false),
        request("GET", "/api/%2Fproducts", json, "", false),
        request("GET", "/api/./products", json, "", false),
        request("GET", "/api/x/../products", json, "", false),
        request("GET", "/api/products/", json, "", false),
        request("GET", "/API/products", json, "", false),
        request("GET", "/%61dmin/users", json, "", false),
        request("GET", "/admin%2Fusers", json, "", false),
        request("GET", "/public/../admin", json, "", false),
        request("GET", "/api/products;role=admin", json, "", false),
        request(
            "GET",
            "/api/products?role=admin&role=viewer",
            json,
            "",
            false,
        ),
        request(
            "GET",
            "/api/products?role=ad%6Din&x=%20y+z",
            json,
            "",
            false,
        ),
        request("GET", "/api/products?role&=&a=b=c&&", json, "", false),
        request("GET", "/api/products?q=%26role%3Dadmin", json, "", false),
        request("GET", "/api/caf%C3%A9/%E2%9C%93?%C3%BC=1", json, "", false),
        request(
            "POST",
            "/api/orders",
            json,
            r#"{"role":"admin","n":12345678901234567890}"#,
            false,
        ),
        request(
            "POST",
            "/api/orders",
            json,
            r#"{"role":"viewer","role":"admin"}"#,
            false,
        ),
        request("POST", "/api/orders", json, r#"{"role":"adm"#, true),
        request(
            "POST",
            "/api/orders",
            form,
            "role=admin&role=viewer&x=%2F",
            false,
        ),
        request("POST", "/api/orders", form, "a=1&b", true),
        request(
            "POST",
            "/api/orders",
            "multipart/form-data; boundary=b",
            "--b\r\nContent-Disposition: form-data; name=\"role\"\r\n\r\nadmin\r\n--b--\r\n",
            false,
        ),
        request("POST", "/api/orders", "text/plain", "role=admin", false),
    ];
    let modules = [Module {
        path: "interop.rego".into(),
        source: MAPPING_POLICY.into(),
    }];
    let mut engine =
        PolicyEngine::compile(&modules, &json!({}), Limits::default()).expect("compiles");
    let example = Bundle::load(&policies().join("envoy-http-authz"), &Default::default())
        .expect("example loads");
    let mut example_engine =
        PolicyEngine::compile(&example.modules, &example.data, Limits::default())
            .expect("compiles");
    let dir = tempfile::tempdir().expect("tempdir");
    let policy_file = dir.path().join("interop.rego");
    std::fs::write(&policy_file, MAPPING_POLICY).expect("policy written");
    let mut disagreements = Vec::new();
    let mut decided = 0;
    for (i, case) in cases.iter().enumerate() {
        let path = &case
            .attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap()
            .path;
        let input = match policy_input(case, &InputOptions::default()) {
            Ok(input) => input.into_rego(),
            // Refused requests are denied before any policy runs, by both (OPA-Envoy answers 400).
            Err(_) => continue,
        };
        decided += 1;
        let input_json = serde_json::to_value(&input).expect("input as JSON");
        let input_file = dir.path().join(format!("{i}.json"));
        std::fs::write(&input_file, input_json.to_string()).expect("input written");
        let example_dir = policies().join("envoy-http-authz");
        for (compiled, policy, query) in [
            (&mut engine, policy_file.as_path(), "data.interop.result"),
            (
                &mut example_engine,
                example_dir.as_path(),
                "data.envoy.authz.allow",
            ),
        ] {
            let from_sluice = compiled
                .eval_value(query, input.clone())
                .expect("evaluates")
                .map(|v| serde_json::to_value(&v).expect("JSON"));
            let from_opa = opa_eval(policy, &input_file, query);
            if from_sluice != from_opa {
                disagreements.push(format!(
                    "{path} {query}: Sluice {from_sluice:?}, OPA {from_opa:?}"
                ));
            }
        }
    }
    assert!(
        decided >= 18,
        "only {decided} of {} requests were mapped",
        cases.len()
    );
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}
