//! `sluice policy test`: discovers and runs Rego `test_*` rules in parallel, reporting like `opa test`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use regorus::Value;
use serde_json::json;

use super::Module;
use super::engine::{CompileError, EvalError, Limits, PolicyEngine, RuleInfo};

/// Worker stack size: regorus' interpreter recurses per rule/function call and expression.
const WORKER_STACK: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Evaluated to something other than `true` (including undefined).
    Fail,
    Error(String),
    /// `todo_*` rules are reported but not run.
    Skip,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestResult {
    /// Package path without `data.` (e.g. `envoy.authz`).
    pub package: String,
    pub name: String,
    pub file: String,
    pub line: Option<u32>,
    pub col: Option<u32>,
    pub outcome: Outcome,
    pub duration: Duration,
    /// `print()` output of the test.
    pub output: Vec<String>,
}

impl TestResult {
    /// Full rule path, e.g. `data.envoy.authz.test_get`.
    pub fn path(&self) -> String {
        format!("data.{}.{}", self.package, self.name)
    }

    fn status(&self) -> &'static str {
        match self.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Error(_) => "ERROR",
            Outcome::Skip => "SKIPPED",
        }
    }

    fn line_text(&self) -> String {
        match self.outcome {
            Outcome::Skip => format!("{}: SKIPPED", self.path()),
            _ => format!(
                "{}: {} ({})",
                self.path(),
                self.status(),
                go_duration(self.duration)
            ),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestReport {
    /// Results in source order (file, then position).
    pub results: Vec<TestResult>,
}

/// Compile `modules` and run every `test_*` rule whose full path (`data.pkg.test_x`) matches `filter`.
pub fn run_tests(
    modules: &[Module],
    data: &serde_json::Value,
    filter: Option<&regex::Regex>,
    limits: Limits,
) -> Result<TestReport, CompileError> {
    let engine = PolicyEngine::compile(modules, data, limits)?;
    let mut seen = std::collections::HashSet::new();
    // A test may have several bodies (incremental definitions); it is still one test.
    let tests: Vec<&RuleInfo> = engine
        .rules()
        .iter()
        .filter(|r| r.name.starts_with("test_") || r.name.starts_with("todo_"))
        .filter(|r| filter.is_none_or(|f| f.is_match(&format!("data.{}.{}", r.package, r.name))))
        .filter(|r| seen.insert((r.package.clone(), r.name.clone())))
        .collect();

    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(tests.len())
        .max(1);
    let work = |mut engine: PolicyEngine| {
        let mut out = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(test) = tests.get(i) else { return out };
            out.push((i, run_one(&mut engine, test)));
        }
    };
    let mut indexed: Vec<(usize, TestResult)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .filter_map(|_| {
                let engine = engine.clone();
                std::thread::Builder::new()
                    .stack_size(WORKER_STACK)
                    .spawn_scoped(s, || work(engine))
                    .ok()
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        // If threads could not be spawned (or one panicked), finish the remaining tests here.
        all.extend(work(engine.clone()));
        all
    });
    indexed.sort_by_key(|(i, _)| *i);
    Ok(TestReport {
        results: indexed.into_iter().map(|(_, r)| r).collect(),
    })
}

fn run_one(engine: &mut PolicyEngine, test: &RuleInfo) -> TestResult {
    let mut result = TestResult {
        package: test.package.clone(),
        name: test.name.clone(),
        file: test.file.clone(),
        line: Some(test.line),
        col: Some(test.col),
        outcome: Outcome::Skip,
        duration: Duration::ZERO,
        output: Vec::new(),
    };
    if test.name.starts_with("todo_") {
        return result;
    }
    engine.keep_prints(true);
    let start = Instant::now();
    let value = engine.eval_value(&result.path(), Value::Undefined);
    result.duration = start.elapsed();
    result.output = engine.take_prints();
    result.outcome = match value {
        Ok(Some(Value::Bool(true))) => Outcome::Pass,
        Ok(_) => Outcome::Fail,
        Err(EvalError::Timeout { limit }) => {
            Outcome::Error(format!("test exceeded the {limit:?} evaluation time limit"))
        }
        Err(e) => Outcome::Error(e.to_string()),
    };
    result
}

const SEPARATOR: &str =
    "--------------------------------------------------------------------------------";

impl TestReport {
    /// True when no test failed or errored (skipped tests do not count as failures).
    pub fn all_passed(&self) -> bool {
        self.results
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Pass | Outcome::Skip))
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }

    /// Human output in `opa test` layout (`verbose` = `opa test -v`).
    pub fn render_text(&self, verbose: bool) -> String {
        let mut s = String::new();
        let failing = |r: &&TestResult| matches!(r.outcome, Outcome::Fail | Outcome::Error(_));
        let detail = |s: &mut String, r: &TestResult| {
            if let Outcome::Error(e) = &r.outcome {
                let _ = writeln!(s, "  {}", e.replace('\n', "\n  "));
            }
            if !r.output.is_empty() && (verbose || failing(&r)) {
                s.push('\n');
                r.output.iter().for_each(|l| {
                    let _ = writeln!(s, "  {l}");
                });
                s.push('\n');
            }
        };
        if !verbose && self.results.iter().any(|r| failing(&r)) {
            let _ = writeln!(s, "FAILURES\n{SEPARATOR}");
            for r in self.results.iter().filter(failing) {
                let _ = writeln!(s, "{}", r.line_text());
                detail(&mut s, r);
                s.push('\n');
            }
            let _ = writeln!(s, "SUMMARY\n{SEPARATOR}");
        }
        if verbose || self.results.iter().any(|r| failing(&r)) {
            let mut file: Option<&str> = None;
            for r in &self.results {
                if file != Some(r.file.as_str()) {
                    if file.is_some() {
                        s.push('\n');
                    }
                    let _ = writeln!(s, "{}:", r.file);
                    file = Some(&r.file);
                }
                let _ = writeln!(s, "{}", r.line_text());
                if verbose {
                    detail(&mut s, r);
                }
            }
            let _ = writeln!(s, "{SEPARATOR}");
        }
        let total = self.results.len();
        let pass = self.count(|o| *o == Outcome::Pass);
        if pass == total {
            let _ = writeln!(s, "PASS: {pass}/{total}");
        } else {
            let counts = [
                ("PASS", pass),
                ("FAIL", self.count(|o| *o == Outcome::Fail)),
                ("SKIPPED", self.count(|o| *o == Outcome::Skip)),
                ("ERROR", self.count(|o| matches!(o, Outcome::Error(_)))),
            ];
            for (label, n) in counts.into_iter().filter(|(_, n)| *n > 0) {
                let _ = writeln!(s, "{label}: {n}/{total}");
            }
        }
        s
    }

    /// JSON array in the shape of `opa test --format json`.
    pub fn render_json(&self) -> serde_json::Value {
        let results = self.results.iter().map(|r| {
            let mut o = json!({
                "location": {"file": r.file, "row": r.line.unwrap_or(0), "col": r.col.unwrap_or(0)},
                "package": format!("data.{}", r.package),
                "name": r.name,
                "duration": u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX),
            });
            match &r.outcome {
                Outcome::Pass => {}
                Outcome::Fail => o["fail"] = json!(true),
                Outcome::Skip => o["skip"] = json!(true),
                Outcome::Error(e) => o["error"] = json!({"code": "eval_error", "message": e}),
            }
            if !r.output.is_empty() {
                // OPA emits raw print output bytes, base64-encoded by Go's JSON encoder.
                let text: String = r.output.iter().map(|l| format!("{l}\n")).collect();
                o["output"] = json!(base64::engine::general_purpose::STANDARD.encode(text));
            }
            o
        });
        serde_json::Value::Array(results.collect())
    }
}

/// Go's `time.Duration` formatting (what `opa test` prints), e.g. `1.2ms`, `607.186µs`.
fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    let (value, unit) = match ns {
        0 => return "0s".into(),
        n if n < 1_000 => return format!("{n}ns"),
        n if n < 1_000_000 => (n as f64 / 1e3, "µs"),
        n if n < 1_000_000_000 => (n as f64 / 1e6, "ms"),
        n => (n as f64 / 1e9, "s"),
    };
    let text = format!("{value:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"package authz

allow if {
    input.user in data.admins
}

greeting(name) := sprintf("hi %s", [name])
"#;

    const TESTS: &str = r#"package authz_test

import data.authz

test_with_input if {
    authz.allow with input as {"user": "alice"} with data.admins as ["alice"]
}

test_with_data if {
    not authz.allow with input as {"user": "alice"} with data.admins as []
}

test_mock_function if {
    authz.greeting("bob") == "mocked" with authz.greeting as mock_greeting
}

mock_greeting(_) := "mocked"

test_fails if {
    print("checking alice")
    authz.allow with input as {"user": "mallory"}
}

test_undefined if {
    input.nothing
}

test_errors if {
    x := http.send({"method": "GET", "url": "http://x"})
}

todo_later if {
    false
}
"#;

    fn modules() -> Vec<Module> {
        vec![
            Module {
                path: "authz.rego".into(),
                source: POLICY.into(),
            },
            Module {
                path: "authz_test.rego".into(),
                source: TESTS.into(),
            },
        ]
    }

    fn run(filter: Option<&str>) -> TestReport {
        let filter = filter.map(|f| regex::Regex::new(f).unwrap());
        run_tests(
            &modules(),
            &json!({"admins": ["root"]}),
            filter.as_ref(),
            Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn outcomes_and_mocking() {
        let report = run(None);
        let outcome = |n: &str| {
            report
                .results
                .iter()
                .find(|r| r.name == n)
                .map(|r| r.outcome.clone())
                .unwrap()
        };
        assert_eq!(outcome("test_with_input"), Outcome::Pass);
        assert_eq!(outcome("test_with_data"), Outcome::Pass);
        assert_eq!(outcome("test_mock_function"), Outcome::Pass);
        assert_eq!(outcome("test_fails"), Outcome::Fail);
        assert_eq!(outcome("test_undefined"), Outcome::Fail);
        assert!(
            matches!(outcome("test_errors"), Outcome::Error(e) if e.contains("authz_test.rego:29:") && e.contains("sandboxed"))
        );
        assert_eq!(outcome("todo_later"), Outcome::Skip);
        assert!(!report.all_passed());
        // Source order is preserved despite parallel execution.
        let names: Vec<_> = report.results.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names[0], "test_with_input");
        assert_eq!(names[6], "todo_later");
        let fails = report
            .results
            .iter()
            .find(|r| r.name == "test_fails")
            .unwrap();
        assert_eq!(
            fails.output,
            vec!["authz_test.rego:20: checking alice".to_string()]
        );
        assert_eq!((fails.line, fails.col), (Some(19), Some(1)));
    }

    #[test]
    fn filter_and_all_passed() {
        let report = run(Some("test_with_"));
        assert_eq!(report.results.len(), 2);
        assert!(report.all_passed());
        assert_eq!(report.render_text(false), "PASS: 2/2\n");
        let verbose = report.render_text(true);
        assert!(
            verbose.starts_with("authz_test.rego:\ndata.authz_test.test_with_input: PASS ("),
            "{verbose}"
        );
        assert!(
            verbose.ends_with(&format!("{SEPARATOR}\nPASS: 2/2\n")),
            "{verbose}"
        );
    }

    #[test]
    fn text_report_like_opa() {
        let text = run(None).render_text(false);
        assert!(
            text.starts_with(&format!(
                "FAILURES\n{SEPARATOR}\ndata.authz_test.test_fails: FAIL ("
            )),
            "{text}"
        );
        assert!(
            text.contains("  authz_test.rego:20: checking alice\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("SUMMARY\n{SEPARATOR}\nauthz_test.rego:\n")),
            "{text}"
        );
        assert!(
            text.contains("data.authz_test.todo_later: SKIPPED\n"),
            "{text}"
        );
        assert!(
            text.ends_with("PASS: 3/7\nFAIL: 2/7\nSKIPPED: 1/7\nERROR: 1/7\n"),
            "{text}"
        );
    }

    #[test]
    fn json_report_like_opa() {
        let report = run(Some("test_fails|todo|test_errors|test_with_input"));
        let v = report.render_json();
        assert_eq!(
            v[0]["location"],
            json!({"file": "authz_test.rego", "row": 5, "col": 1})
        );
        assert_eq!(v[0]["package"], json!("data.authz_test"));
        assert_eq!(v[0]["name"], json!("test_with_input"));
        assert!(v[0].get("fail").is_none() && v[0]["duration"].as_u64().unwrap() > 0);
        assert_eq!(v[1]["fail"], json!(true));
        assert_eq!(
            v[1]["output"],
            json!(
                base64::engine::general_purpose::STANDARD
                    .encode("authz_test.rego:20: checking alice\n")
            )
        );
        assert_eq!(v[2]["error"]["code"], json!("eval_error"));
        assert_eq!(v[3]["skip"], json!(true));
    }

    #[test]
    fn compile_errors_are_returned() {
        let bad = [Module {
            path: "t.rego".into(),
            source: "package t\n\ntest_x if {\n".into(),
        }];
        let err = run_tests(&bad, &json!({}), None, Limits::default()).unwrap_err();
        assert_eq!(err.diagnostics[0].file, "t.rego");
    }

    #[test]
    fn durations_format_like_go() {
        assert_eq!(go_duration(Duration::from_nanos(607_186)), "607.186µs");
        assert_eq!(go_duration(Duration::from_micros(1_200)), "1.2ms");
        assert_eq!(go_duration(Duration::from_nanos(850)), "850ns");
        assert_eq!(go_duration(Duration::from_millis(1_500)), "1.5s");
    }
}
