//! OPA's own conformance cases, run through Sluice's engine with the semantics of OPA's test runner
//! (`v1/topdown/exported_test.go`): modules named `test-<i>.rego`, the query's result set compared as a
//! set of binding objects (numbers by value), `want_error` as a substring of the error, and
//! `strict_error` cases in strict builtin-error mode.
//!
//! The cases are not copied into this repository: they are read from `../shared/conformance/opa-jwt`
//! next to the workspace. `OPA_CASES_DIR=<dir> cargo test -p sluice --test opa_conformance -- --ignored`
//! runs any other folder of OPA cases and only reports.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use sluice::policy::Module;
use sluice::policy::engine::{EvalError, Limits, PolicyEngine};

/// Cases that fail on purpose, by note, with the reason (also listed in docs/policies.md).
const INTENDED_DIFFERENCES: &[(&str, &str)] = &[];

#[derive(Debug, Deserialize)]
struct CaseFile {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    note: String,
    query: String,
    #[serde(default)]
    modules: Vec<String>,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    input_term: Option<String>,
    #[serde(default)]
    want_result: Option<Vec<BTreeMap<String, Value>>>,
    #[serde(default)]
    want_error: Option<String>,
    #[serde(default)]
    want_error_code: Option<String>,
    #[serde(default)]
    strict_error: bool,
    #[serde(default)]
    sort_bindings: bool,
}

fn shared_cases() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/opa-jwt")
}

fn case_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Numbers compared by value: integral numbers as integers, others as floats.
fn canonical(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => (f as i64).to_string(),
            (_, _, Some(f)) => format!("{f:e}"),
            _ => n.to_string(),
        },
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        Value::Object(fields) => {
            let mut fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), canonical(v)))
                .collect();
            fields.sort();
            format!("{{{}}}", fields.join(","))
        }
        other => other.to_string(),
    }
}

/// A result set as a sorted, deduplicated list of canonical binding objects.
fn result_set(bindings: impl IntoIterator<Item = Value>, sort_bindings: bool) -> Vec<String> {
    let mut set: Vec<String> = bindings
        .into_iter()
        .map(|mut b| {
            if sort_bindings && let Value::Object(fields) = &mut b {
                for v in fields.values_mut() {
                    if let Value::Array(items) = v {
                        items.sort_by_key(canonical);
                    }
                }
            }
            canonical(&b)
        })
        .collect();
    set.sort();
    set.dedup();
    set
}

/// Runs one case; `Err` says why it failed.
fn run_case(case: &Case) -> Result<(), String> {
    let modules: Vec<Module> = case
        .modules
        .iter()
        .enumerate()
        .map(|(i, source)| Module {
            path: format!("test-{i}.rego"),
            source: source.clone(),
        })
        .collect();
    let limits = Limits {
        // Debug builds verify RSA signatures slowly; the cases are about semantics, not speed.
        max_eval_time: Duration::from_secs(10),
        strict_builtin_errors: case.strict_error,
        ..Limits::default()
    };
    let data = case.data.clone().unwrap_or_else(|| json!({}));
    let mut engine = match PolicyEngine::compile(&modules, &data, limits) {
        Ok(engine) => engine,
        Err(e) => {
            return match (&case.want_error, &case.want_error_code) {
                (Some(want), _) if e.to_string().contains(want.as_str()) => Ok(()),
                (None, Some(code)) if code.starts_with("rego_") => Ok(()),
                _ => Err(format!("compile error: {e}")),
            };
        }
    };
    let input = match (&case.input, &case.input_term) {
        (Some(input), _) => input.clone(),
        (None, Some(term)) => engine
            .eval(term, &Value::Null)
            .map_err(|e| format!("input_term: {e}"))?
            .unwrap_or(Value::Null),
        (None, None) => Value::Null,
    };
    let outcome = engine.query_bindings(&case.query, &input);
    if case.want_error.is_some() || case.want_error_code.is_some() {
        let e = match outcome {
            Ok(got) => return Err(format!("want an error, got {}", Value::from(got))),
            Err(e) => e,
        };
        if let Some(want) = &case.want_error
            && !e.to_string().contains(want.as_str())
        {
            return Err(format!(
                "error {:?} does not contain {want:?}",
                e.to_string()
            ));
        }
        let code_ok = match case.want_error_code.as_deref() {
            None => true,
            Some("eval_builtin_error") => {
                matches!(e, EvalError::Builtin(_) | EvalError::Policy(_))
            }
            Some(code) if code.starts_with("rego_") => false,
            Some(_) => true,
        };
        if !code_ok {
            return Err(format!("error {e} is not a {:?}", case.want_error_code));
        }
        return Ok(());
    }
    let got = outcome.map_err(|e| format!("unexpected error: {e}"))?;
    let Some(want) = &case.want_result else {
        return Err("case has neither want_result nor want_error".into());
    };
    let want = result_set(
        want.iter()
            .map(|b| Value::Object(b.clone().into_iter().collect())),
        case.sort_bindings,
    );
    let got = result_set(got, case.sort_bindings);
    if want == got {
        Ok(())
    } else {
        Err(format!("want {want:?}, got {got:?}"))
    }
}

struct Report {
    total: usize,
    passed: usize,
    /// Per top-level directory: (passed, total).
    by_dir: BTreeMap<String, (usize, usize)>,
    failures: Vec<(String, String)>,
}

impl Report {
    fn render(&self) -> String {
        let mut s = format!("{} of {} OPA cases pass\n", self.passed, self.total);
        for (dir, (passed, total)) in &self.by_dir {
            let _ = writeln!(s, "  {dir}: {passed}/{total}");
        }
        for (note, why) in &self.failures {
            let _ = writeln!(s, "FAIL {note}: {why}");
        }
        s
    }
}

fn run_dir(dir: &Path) -> Report {
    let mut report = Report {
        total: 0,
        passed: 0,
        by_dir: BTreeMap::new(),
        failures: Vec::new(),
    };
    for path in case_files(dir) {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let file: CaseFile = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not an OPA case file: {e}", path.display()));
        let group = path
            .strip_prefix(dir)
            .ok()
            .and_then(|p| p.components().next())
            .filter(|_| path.parent() != Some(dir))
            .map_or_else(
                || ".".to_string(),
                |c| c.as_os_str().to_string_lossy().into_owned(),
            );
        for case in &file.cases {
            // regorus recurses deeply on large policies; give each case a roomy stack.
            let outcome = std::thread::scope(|s| {
                std::thread::Builder::new()
                    .stack_size(64 << 20)
                    .spawn_scoped(s, || run_case(case))
                    .expect("spawn a case thread")
                    .join()
                    .unwrap_or_else(|_| Err("panicked".into()))
            });
            let entry = report.by_dir.entry(group.clone()).or_default();
            entry.1 += 1;
            report.total += 1;
            match outcome {
                Ok(()) => {
                    entry.0 += 1;
                    report.passed += 1;
                }
                Err(why) => report.failures.push((case.note.clone(), why)),
            }
        }
    }
    report
}

#[test]
fn opa_jwt_conformance_cases_pass() {
    let dir = shared_cases();
    assert!(
        dir.is_dir(),
        "OPA's JWT conformance cases are missing: expected them at {} (the `shared/` folder next to \
         the workspace, from the steering repository)",
        dir.display()
    );
    let report = run_dir(&dir);
    println!("{}", report.render());
    assert_eq!(
        report.total, 127,
        "the case folder changed; update this test"
    );
    let unexpected: Vec<_> = report
        .failures
        .iter()
        .filter(|(note, _)| !INTENDED_DIFFERENCES.iter().any(|(n, _)| n == note))
        .collect();
    assert!(unexpected.is_empty(), "{}", report.render());
    for (note, _) in INTENDED_DIFFERENCES {
        assert!(
            report.failures.iter().any(|(n, _)| n == note),
            "{note} now passes: remove it from INTENDED_DIFFERENCES and docs/policies.md"
        );
    }
}

/// The runner itself: a wrong result, a missing error or the wrong error text fail a case.
#[test]
fn runner_rejects_wrong_answers() {
    let case = |want_result: Option<Value>, want_error: Option<&str>| Case {
        note: "self-test".into(),
        query: "data.t.p = x".into(),
        modules: vec!["package t\n\np := io.jwt.decode(input.t)[1].n\n".into()],
        data: None,
        input: Some(json!({"t": "e30.eyJuIjogMS4wfQ.c2ln"})),
        input_term: None,
        want_result: want_result.map(|w| serde_json::from_value(w).expect("bindings")),
        want_error: want_error.map(str::to_string),
        want_error_code: None,
        strict_error: want_error.is_some(),
        sort_bindings: false,
    };
    // 1.0 and 1 are the same number.
    assert_eq!(run_case(&case(Some(json!([{"x": 1}])), None)), Ok(()));
    assert!(run_case(&case(Some(json!([{"x": 2}])), None)).is_err());
    assert!(run_case(&case(Some(json!([])), None)).is_err());
    assert!(run_case(&case(None, Some("no such error"))).is_err());
}

/// `OPA_CASES_DIR=<dir>`: run another folder of OPA's cases and print the counts (never fails).
#[test]
#[ignore = "needs OPA_CASES_DIR"]
fn other_opa_cases() {
    let Some(dir) = std::env::var_os("OPA_CASES_DIR") else {
        eprintln!("set OPA_CASES_DIR to a folder of OPA case files");
        return;
    };
    println!("{}", run_dir(Path::new(&dir)).render());
}
