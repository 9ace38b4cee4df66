//! Sluice's `io.jwt.*` extensions against the real OPA engine's answers, recorded in
//! `policies/tools/jwt_reference.json` by the real OPA (`e2e/tests/opa_interop.rs`). OPA's errors are strict there; in OPA's
//! default mode (and Sluice's) a builtin error makes the expression undefined.

use std::path::Path;

use serde_json::{Value, json};
use sluice::policy::Module;
use sluice::policy::engine::{Limits, PolicyEngine};

#[test]
fn jwt_builtins_agree_with_opa() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/tools/jwt_reference.json");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference file"))
            .expect("JSON");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut disagreements = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let builtin = case["builtin"].as_str().expect("builtin");
        let args = case["args"].as_array().expect("args");
        let call = (0..args.len())
            .map(|n| format!("input.args[{n}]"))
            .collect::<Vec<_>>()
            .join(", ");
        let module = Module {
            path: "t.rego".into(),
            source: format!("package t\n\nr := {builtin}({call})\n"),
        };
        let mut engine =
            PolicyEngine::compile(&[module], &json!({}), Limits::default()).expect("compiles");
        let got = engine
            .eval("data.t.r", &json!({"args": args}))
            .unwrap_or_else(|e| panic!("case {i}: evaluation failed: {e}"));
        let want = match case["outcome"].as_str() {
            Some("value") => Some(case["result"].clone()),
            _ => None,
        };
        if got != want {
            disagreements.push(format!(
                "case {i} {builtin} ({}): sluice {got:?}, OPA {want:?}",
                case["note"].as_str().unwrap_or_default()
            ));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}
