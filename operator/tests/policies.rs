//! The shipped policy library: `sluice policy test policies/` passes, and Sluice's decisions on each
//! example input agree with the real OPA engine's (recorded in `inputs/*.expected.json` by
//! `SLUICE_BLESS=1 cargo test -p sluice-e2e --test opa_interop`, which checks them against OPA in CI).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

#[test]
fn policy_library_tests_pass() {
    let output = sluice()
        .args(["policy", "test", "-v"])
        .arg(repo().join("policies"))
        .output()
        .expect("sluice runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "sluice policy test policies/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("PASS: "))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    let (passed, total) = summary["PASS: ".len()..]
        .split_once('/')
        .expect("PASS: n/m");
    assert_eq!(passed, total, "{summary}");
    let total: usize = total.trim().parse().expect("a count");
    assert!(total >= 18, "every example has its tests ({total} found)");
}

/// Every `policies/<dir>/inputs/<name>.expected.json` holds a query and the value real OPA returned.
fn reference_cases() -> Vec<(PathBuf, PathBuf, PathBuf)> {
    let mut cases = Vec::new();
    let policies = repo().join("policies");
    for entry in std::fs::read_dir(&policies).expect("policies/ exists") {
        let dir = entry.expect("entry").path();
        let inputs = dir.join("inputs");
        let Ok(files) = std::fs::read_dir(&inputs) else {
            continue;
        };
        for file in files {
            let expected = file.expect("entry").path();
            let name = expected.file_name().unwrap().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".expected.json") {
                cases.push((dir.clone(), inputs.join(format!("{stem}.json")), expected));
            }
        }
    }
    cases.sort();
    cases
}

#[test]
fn decisions_agree_with_real_opa() {
    let cases = reference_cases();
    assert!(cases.len() >= 6, "reference cases found: {cases:?}");
    let mut disagreements = Vec::new();
    for (bundle, input, expected) in &cases {
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(expected).expect("expected file"))
                .expect("expected file is JSON");
        let queries: Vec<(String, serde_json::Value)> = match expected.get("results") {
            Some(results) => results
                .as_object()
                .expect("results is an object")
                .iter()
                .map(|(q, v)| (q.clone(), v.clone()))
                .collect(),
            None => vec![(
                expected["query"].as_str().expect("query").to_owned(),
                expected["result"].clone(),
            )],
        };
        for (query, want) in queries {
            let output = sluice()
                .args(["policy", "eval", "--bundle"])
                .arg(bundle)
                .arg("--input")
                .arg(input)
                .args(["--query", &query])
                .output()
                .expect("sluice runs");
            let got = match output.status.code() {
                Some(0) => serde_json::from_slice(&output.stdout).expect("eval prints JSON"),
                Some(1) => serde_json::Value::Null,
                _ => panic!(
                    "eval of {query} on {} failed: {}",
                    input.display(),
                    String::from_utf8_lossy(&output.stderr)
                ),
            };
            if got != want {
                disagreements.push(format!(
                    "{} {query}: sluice {got}, OPA {want}",
                    input.display()
                ));
            }
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}
