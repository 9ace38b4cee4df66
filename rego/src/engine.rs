//! Compiled Rego policies on the regorus interpreter, with sandbox limits and `file:line:col` diagnostics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use regorus::unstable::{Expr, Literal, Module as Ast, Query, Rule, RuleHead};
use regorus::utils::limits::{ExecutionTimerConfig, PolicyLengthConfig};
use regorus::{Engine, LimitError, Value};
use serde::Deserialize as _;

use super::{Module, jwt};

/// Per-evaluation resource limits for untrusted policies, and how builtin errors surface.
///
/// regorus' interpreter enforces a cooperative wall-clock budget; it has no instruction
/// counter (only its RVM does) and memory limits need a process-global mimalloc allocator,
/// so memory is bounded indirectly: `max_range_elements` caps `numbers.range*`, the only
/// builtin that materialises an arbitrarily large collection from scalars in one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one evaluation (one `eval*` call).
    pub max_eval_time: Duration,
    /// Largest array `numbers.range` / `numbers.range_step` may produce.
    pub max_range_elements: u64,
    /// OPA's `--strict-builtin-errors`: a builtin error fails the evaluation instead of making the
    /// call undefined. Off by default, as in OPA.
    pub strict_builtin_errors: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_eval_time: Duration::from_millis(100),
            max_range_elements: 100_000,
            strict_builtin_errors: false,
        }
    }
}

/// Source size limits. OPA has none; regorus' defaults (1,024 columns, 20,000 lines, 1 MiB) refuse
/// real policies that inline PEM certificates, JWKS or tokens on one line. A module is bounded by the
/// bundle's per-file limit instead (16 MiB), and a line only by its module.
fn policy_length_config() -> PolicyLengthConfig {
    const MAX_MODULE_BYTES: usize = 16 << 20;
    PolicyLengthConfig {
        max_col: NonZeroU32::MAX,
        max_file_bytes: NonZeroUsize::new(MAX_MODULE_BYTES).unwrap_or(NonZeroUsize::MIN),
        max_lines: NonZeroUsize::new(MAX_MODULE_BYTES).unwrap_or(NonZeroUsize::MIN),
    }
}

/// Work units between clock reads: amortises `Instant::now` while keeping overshoot tiny.
const TIMER_CHECK_INTERVAL: NonZeroU32 = NonZeroU32::MIN.saturating_add(31);

/// One problem in a policy, located in its source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

impl Diagnostic {
    /// Normalise a regorus error (`\n--> file:line:col\n<snippet>\nerror: msg`) into a diagnostic.
    fn from_regorus(msg: &str) -> Option<Self> {
        let (file, line, col, _) = take_location(msg)?;
        let body = msg.split_once("\nerror: ").map_or(msg, |(_, b)| b);
        let message = if body.contains("\ndepends on: ") {
            // Rule recursion: regorus prints one snippet per rule in the cycle.
            let mut chain = Vec::new();
            let mut rest = body;
            while let Some((f, l, c, tail)) = take_location(rest) {
                chain.push(format!("{f}:{l}:{c}"));
                rest = tail;
            }
            format!("recursion detected: {}", chain.join(" -> "))
        } else {
            body.trim().to_string()
        };
        Some(Self {
            file,
            line,
            col,
            message,
        })
    }

    fn plain(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }
}

/// Find the next `--> file:line:col` marker; return it plus the text after its snippet.
fn take_location(msg: &str) -> Option<(String, u32, u32, &str)> {
    let start = msg.find("\n--> ")? + 5;
    let rest = &msg[start..];
    let (loc, after) = rest.split_once('\n').unwrap_or((rest, ""));
    let mut it = loc.rsplitn(3, ':');
    let col = it.next()?.trim().parse().ok()?;
    let line = it.next()?.parse().ok()?;
    let file = it.next()?.to_string();
    // Skip the three snippet lines (`|`, source line, caret line).
    let after = after.splitn(4, '\n').nth(3).unwrap_or("");
    Some((file, line, col, after))
}

/// Policies failed to parse or compile.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub struct CompileError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.diagnostics.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} errors occurred:", many.len())?;
                many.iter().try_for_each(|d| write!(f, "\n{d}"))
            }
        }
    }
}

/// A policy evaluation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvalError {
    #[error("policy evaluation exceeded its time limit of {limit:?}")]
    Timeout { limit: Duration },
    #[error("`{path}` is not a rule in the loaded policies (packages: {packages})")]
    UnknownRule { path: String, packages: String },
    #[error("input is not a valid JSON document: {0}")]
    Input(String),
    #[error("{0}")]
    Policy(Diagnostic),
    /// A builtin failed in strict mode (OPA's `eval_builtin_error`); the message starts with its name.
    #[error("{0}")]
    Builtin(Diagnostic),
    #[error("policy evaluation failed: {0}")]
    Other(String),
}

/// A test or rule head found while compiling (used by the test runner).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    /// Package path without `data.` (e.g. `envoy.authz`).
    pub package: String,
    /// First component of the rule head (e.g. `allow`, `test_get`).
    pub name: String,
    pub file: String,
    pub line: u32,
    pub col: u32,
}

/// Compiled modules + data; clone one per worker thread (clones share the compiled policy).
#[derive(Clone, Debug)]
pub struct PolicyEngine {
    engine: Engine,
    packages: Arc<[String]>,
    rules: Arc<[RuleInfo]>,
    /// Builtins Sluice adds, to tell their errors apart.
    extensions: Arc<[&'static str]>,
    limits: Limits,
    /// Keep `print()` output for [`PolicyEngine::take_prints`] (the test runner) instead of logging it.
    keep_prints: bool,
}

// Evaluation must be able to move onto worker threads.
const _: fn() = || {
    fn assert_send<T: Send + Sync>() {}
    assert_send::<PolicyEngine>();
};

/// Builtins we add on top of regorus (and overrides that sandbox regorus' own).
fn register_extensions(engine: &mut Engine, limits: Limits) -> Result<Vec<&'static str>, String> {
    let mut names = jwt::register(engine, limits.strict_builtin_errors)?;
    let max = limits.max_range_elements;
    let ext = |e: &mut Engine, name: &'static str, n: u8, f: Box<dyn regorus::Extension>| {
        e.add_extension(name.into(), n, f)
            .map_err(|err| format!("registering {name}: {err}"))
    };
    // Sandboxed: policies must never perform network IO.
    ext(
        engine,
        "http.send",
        1,
        Box::new(|_: Vec<Value>| -> anyhow::Result<Value> {
            anyhow::bail!(
                "http.send is not available in sluice policies (network access is sandboxed)"
            )
        }),
    )?;
    // regorus builds ranges eagerly without checking its timer; cap their size instead.
    ext(
        engine,
        "numbers.range",
        2,
        Box::new(move |a: Vec<Value>| range(&a, max, "numbers.range")),
    )?;
    ext(
        engine,
        "numbers.range_step",
        3,
        Box::new(move |a: Vec<Value>| range(&a, max, "numbers.range_step")),
    )?;
    names.extend(["http.send", "numbers.range", "numbers.range_step"]);
    Ok(names)
}

/// `numbers.range(a, b)` / `numbers.range_step(a, b, step)` with a size cap. Non-integers are
/// undefined (OPA non-strict); a negative/zero step is an error, like OPA.
fn range(args: &[Value], max: u64, name: &str) -> anyhow::Result<Value> {
    // `as_i64` is `None` for fractional numbers.
    let int = |v: Option<&Value>| match v {
        Some(Value::Number(n)) => n.as_i64(),
        _ => None,
    };
    let (Some(a), Some(b)) = (int(args.first()), int(args.get(1))) else {
        return Ok(Value::Undefined);
    };
    let step = match args.get(2) {
        None => 1,
        Some(s) => match (int(Some(s)), s) {
            (Some(s), _) if s > 0 => s,
            // An integer step beyond i64 (OPA has big integers) spans any range in one step.
            (None, Value::Number(n)) if n.is_integer() && n.is_positive() => i64::MAX,
            (Some(_), _) | (None, Value::Number(_)) if s.as_f64().is_ok_and(|f| f <= 0.0) => {
                anyhow::bail!("{name}: step must be a positive integer")
            }
            _ => return Ok(Value::Undefined),
        },
    };
    let count = (a.abs_diff(b) / step.unsigned_abs()).saturating_add(1);
    if count > max {
        anyhow::bail!("{name}: {count} elements exceeds the limit of {max}");
    }
    let dir = if b >= a { step } else { -step };
    // Every element lies between a and b, so it fits i64; i128 keeps the intermediate from overflowing.
    Ok(Value::from(
        (0..count as i128)
            .map(|i| Value::from((i128::from(a) + i * i128::from(dir)) as i64))
            .collect::<Vec<_>>(),
    ))
}

impl PolicyEngine {
    /// Parse and check `modules` (Rego v1) against `data`; every problem is reported with its position.
    pub fn compile(
        modules: &[Module],
        data: &serde_json::Value,
        limits: Limits,
    ) -> Result<Self, CompileError> {
        let fail = |d: Diagnostic| CompileError {
            diagnostics: vec![d],
        };
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        engine.set_strict_builtin_errors(limits.strict_builtin_errors);
        engine.set_policy_length_config(policy_length_config());
        engine.set_gather_prints(true);
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: limits.max_eval_time,
            check_interval: TIMER_CHECK_INTERVAL,
        });
        let extensions = register_extensions(&mut engine, limits)
            .map_err(|m| fail(Diagnostic::plain("<engine>", m)))?;

        let mut diagnostics = Vec::new();
        for m in modules {
            if let Err(e) = engine.add_policy(m.path.clone(), m.source.clone()) {
                let msg = e.to_string();
                diagnostics.push(
                    Diagnostic::from_regorus(&msg)
                        .unwrap_or_else(|| Diagnostic::plain(&m.path, msg)),
                );
            }
        }
        if !diagnostics.is_empty() {
            return Err(CompileError { diagnostics });
        }
        let data = Value::deserialize(data)
            .map_err(|e| fail(Diagnostic::plain("<data>", e.to_string())))?;
        engine
            .add_data(data)
            .map_err(|e| fail(Diagnostic::plain("<data>", e.to_string())))?;

        let ast: Vec<_> = engine.get_modules().clone();
        let (rules, static_diags) = check_modules(&ast, &extensions);
        if !static_diags.is_empty() {
            return Err(CompileError {
                diagnostics: static_diags,
            });
        }
        // Running a trivial query prepares the interpreter (scheduling, safety analysis) once,
        // so clones start ready and unsafe variables surface now rather than per request.
        engine.eval_query("true".into(), false).map_err(|e| {
            let msg = e.to_string();
            fail(
                Diagnostic::from_regorus(&msg)
                    .unwrap_or_else(|| Diagnostic::plain("<policy>", msg)),
            )
        })?;
        let mut packages: Vec<String> = ast.iter().map(|m| package_of(m)).collect();
        packages.sort();
        packages.dedup();
        Ok(Self {
            engine,
            packages: packages.into(),
            rules: rules.into(),
            extensions: extensions.into(),
            limits,
            keep_prints: false,
        })
    }

    /// Package paths (without `data.`), sorted and deduplicated.
    pub fn packages(&self) -> Vec<String> {
        self.packages.to_vec()
    }

    /// Every rule head (first component) of every module, in source order.
    pub fn rules(&self) -> &[RuleInfo] {
        &self.rules
    }

    /// The underlying regorus engine (benchmarks / experiments only; bypasses the wrapper's checks).
    #[doc(hidden)]
    pub fn raw_engine(&mut self) -> &mut Engine {
        &mut self.engine
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Evaluate a Rego query (e.g. `data.envoy.authz.allow`). `None` = undefined.
    /// A query with one result and one expression yields that value; otherwise the OPA-style
    /// result array (`[{"expressions": [...], "bindings": {...}}]`).
    pub fn eval(
        &mut self,
        query: &str,
        input: &serde_json::Value,
    ) -> Result<Option<serde_json::Value>, EvalError> {
        let input = Value::deserialize(input).map_err(|e| EvalError::Input(e.to_string()))?;
        self.engine.set_input(input);
        let results = self.engine.eval_query(query.to_string(), false);
        self.flush_prints();
        let results = results.map_err(|e| self.eval_error(e, query))?;
        let json = |v: &Value| serde_json::to_value(v).map_err(|e| EvalError::Other(e.to_string()));
        match results.result.as_slice() {
            [] => Ok(None),
            [one] if one.expressions.len() == 1 && one.bindings == Value::new_object() => {
                let v = &one.expressions[0].value;
                if *v == Value::Undefined {
                    Ok(None)
                } else {
                    json(v).map(Some)
                }
            }
            _ => serde_json::to_value(&results.result)
                .map(Some)
                .map_err(|e| EvalError::Other(e.to_string())),
        }
    }

    /// OPA's result set of a query: the bindings of its variables, one object per solution
    /// (`[{}]` for a query that is true without variables, `[]` when undefined).
    pub fn query_bindings(
        &mut self,
        query: &str,
        input: &serde_json::Value,
    ) -> Result<Vec<serde_json::Value>, EvalError> {
        let input = Value::deserialize(input).map_err(|e| EvalError::Input(e.to_string()))?;
        self.engine.set_input(input);
        let results = self.engine.eval_query(query.to_string(), false);
        self.flush_prints();
        let results = results.map_err(|e| self.eval_error(e, query))?;
        results
            .result
            .iter()
            .map(|r| serde_json::to_value(&r.bindings).map_err(|e| EvalError::Other(e.to_string())))
            .collect()
    }

    /// Hot path: evaluate one rule (e.g. `data.envoy.authz.allow`) on a regorus input value.
    pub fn eval_value(
        &mut self,
        rule_path: &str,
        input: Value,
    ) -> Result<Option<Value>, EvalError> {
        self.engine.set_input(input);
        let result = self.engine.eval_rule(rule_path.to_string());
        self.flush_prints();
        match result {
            Ok(Value::Undefined) => Ok(None),
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(self.eval_error(e, rule_path)),
        }
    }

    /// Output of `print()` calls since the last call (the test runner shows it for failures).
    pub fn take_prints(&mut self) -> Vec<String> {
        self.engine.take_prints().unwrap_or_default()
    }

    /// Keeps `print()` output for [`PolicyEngine::take_prints`]; otherwise each evaluation logs and drops it.
    pub fn keep_prints(&mut self, keep: bool) {
        self.keep_prints = keep;
    }

    fn flush_prints(&mut self) {
        if self.keep_prints {
            return;
        }
        // Drain every time: a long-running server must not accumulate print() output.
        let lines = self.take_prints();
        if tracing::enabled!(tracing::Level::DEBUG) {
            for line in lines {
                tracing::debug!(target: "sluice::policy::print", "{line}");
            }
        }
    }

    fn eval_error(&self, e: anyhow::Error, path: &str) -> EvalError {
        if e.chain().any(|c| {
            matches!(
                c.downcast_ref::<LimitError>(),
                Some(LimitError::TimeLimitExceeded { .. })
            )
        }) {
            return EvalError::Timeout {
                limit: self.limits.max_eval_time,
            };
        }
        let msg = e.to_string();
        if msg.contains("not a valid rule path") {
            return EvalError::UnknownRule {
                path: path.to_string(),
                packages: self.packages.join(", "),
            };
        }
        match Diagnostic::from_regorus(&msg) {
            Some(d)
                if self.extensions.iter().any(|name| {
                    d.message
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(": "))
                }) =>
            {
                EvalError::Builtin(d)
            }
            Some(d) => EvalError::Policy(d),
            None => EvalError::Other(msg.trim().to_string()),
        }
    }
}

fn package_of(m: &Ast) -> String {
    ref_path(&m.package.refr).unwrap_or_else(|| m.package.refr.span().text().to_string())
}

/// Dotted path of a reference like `a.b["c"]`; `None` when it has dynamic parts.
fn ref_path(e: &Expr) -> Option<String> {
    match e {
        Expr::Var {
            value: Value::String(s),
            ..
        } => Some(s.to_string()),
        Expr::RefDot {
            refr,
            field: (_, Value::String(f)),
            ..
        } => Some(format!("{}.{f}", ref_path(refr)?)),
        Expr::RefBrack { refr, index, .. } => match index.as_ref() {
            Expr::String {
                value: Value::String(f),
                ..
            } => Some(format!("{}.{f}", ref_path(refr)?)),
            _ => None,
        },
        _ => None,
    }
}

fn head_ref(rule: &Rule) -> &Expr {
    match rule {
        Rule::Spec {
            head:
                RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } | RuleHead::Func { refr, .. },
            ..
        } => refr,
        Rule::Default { refr, .. } => refr,
    }
}

/// Leading component of a rule head (`a` for `a.b[x] contains ...`).
fn head_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Var {
            value: Value::String(s),
            ..
        } => Some(s.to_string()),
        Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } => head_name(refr),
        _ => None,
    }
}

/// Static checks regorus only does lazily (or not at all): calls to unknown functions,
/// and recursive functions (regorus would overflow the stack). Several `x := v if ...` definitions are
/// fine, as in OPA 1.x: conflicting values are an evaluation error.
fn check_modules(
    ast: &[regorus::unstable::Ref<Ast>],
    extensions: &[&str],
) -> (Vec<RuleInfo>, Vec<Diagnostic>) {
    let mut rules = Vec::new();
    let mut functions: BTreeSet<String> = BTreeSet::new();
    let mut documents: BTreeSet<String> = BTreeSet::new();
    for m in ast {
        let pkg = package_of(m);
        for r in &m.policy {
            let head = head_ref(r);
            let span = head.span();
            if let Some(name) = head_name(head) {
                rules.push(RuleInfo {
                    package: pkg.clone(),
                    name,
                    file: span.source.file().clone(),
                    line: span.line,
                    col: span.col,
                });
            }
            let Some(path) = ref_path(head) else { continue };
            let full = format!("data.{pkg}.{path}");
            let is_fn = matches!(
                r.as_ref(),
                Rule::Spec {
                    head: RuleHead::Func { .. },
                    ..
                }
            ) || matches!(r.as_ref(), Rule::Default { args, .. } if !args.is_empty());
            if is_fn {
                functions.insert(full)
            } else {
                documents.insert(full)
            };
        }
    }

    let mut diags = Vec::new();
    let mut calls: BTreeMap<String, Vec<(String, Diagnostic)>> = BTreeMap::new();
    for m in ast {
        let pkg = package_of(m);
        let imports: HashMap<String, String> = m
            .imports
            .iter()
            .filter_map(|i| {
                let target = ref_path(&i.refr)?;
                let alias = i
                    .r#as
                    .as_ref()
                    .map(|s| s.text().to_string())
                    .or_else(|| target.rsplit('.').next().map(str::to_string))?;
                Some((alias, target))
            })
            .collect();
        for r in &m.policy {
            let head = head_ref(r);
            let owner = ref_path(head)
                .map(|p| format!("data.{pkg}.{p}"))
                .unwrap_or_default();
            let mut found = Vec::new();
            visit_rule(r, &mut |e| {
                if let Expr::Call { fcn, span, .. } = e
                    && let Some(name) = ref_path(fcn)
                {
                    found.push((name, span.clone()));
                }
            });
            for (name, span) in found {
                let diag = |message: String| Diagnostic {
                    file: span.source.file().clone(),
                    line: span.line,
                    col: span.col,
                    message,
                };
                let (first, rest) = name.split_once('.').unwrap_or((&name, ""));
                let target = if first == "data" {
                    name.clone()
                } else if let Some(t) = imports.get(first) {
                    if rest.is_empty() {
                        t.clone()
                    } else {
                        format!("{t}.{rest}")
                    }
                } else {
                    format!("data.{pkg}.{name}")
                };
                if functions.contains(&target) {
                    calls
                        .entry(owner.clone())
                        .or_default()
                        .push((target, diag(String::new())));
                } else if !(regorus::unstable::BUILTINS.contains_key(name.as_str())
                    || extensions.contains(&name.as_str())
                    || name == "print"
                    || documents.contains(&target))
                {
                    diags.push(diag(format!("undefined function {name}")));
                }
            }
        }
    }
    diags.extend(find_cycles(&calls));
    (rules, diags)
}

/// Report each function that can reach itself through calls (OPA: rego_recursion_error).
fn find_cycles(calls: &BTreeMap<String, Vec<(String, Diagnostic)>>) -> Vec<Diagnostic> {
    fn reaches(
        calls: &BTreeMap<String, Vec<(String, Diagnostic)>>,
        from: &str,
        goal: &str,
        seen: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> bool {
        for (to, _) in calls.get(from).into_iter().flatten() {
            if to == goal {
                return true;
            }
            if seen.insert(to.clone()) {
                path.push(to.clone());
                if reaches(calls, to, goal, seen, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut out = Vec::new();
    for (f, edges) in calls {
        let mut path = vec![f.clone()];
        if reaches(calls, f, f, &mut BTreeSet::new(), &mut path)
            && let Some((_, at)) = edges.first()
        {
            path.push(f.clone());
            out.push(Diagnostic {
                message: format!("function {f} is recursive: {}", path.join(" -> ")),
                ..at.clone()
            });
        }
    }
    out
}

fn visit_rule(rule: &Rule, f: &mut dyn FnMut(&Expr)) {
    match rule {
        Rule::Spec { head, bodies, .. } => {
            match head {
                RuleHead::Compr { refr, assign, .. } => {
                    visit_expr(refr, f);
                    if let Some(a) = assign {
                        visit_expr(&a.value, f);
                    }
                }
                RuleHead::Set { refr, key, .. } => {
                    visit_expr(refr, f);
                    if let Some(k) = key {
                        visit_expr(k, f);
                    }
                }
                RuleHead::Func { args, assign, .. } => {
                    args.iter().for_each(|a| visit_expr(a, f));
                    if let Some(a) = assign {
                        visit_expr(&a.value, f);
                    }
                }
            }
            for b in bodies {
                if let Some(a) = &b.assign {
                    visit_expr(&a.value, f);
                }
                visit_query(&b.query, f);
            }
        }
        Rule::Default { value, .. } => visit_expr(value, f),
    }
}

fn visit_query(q: &Query, f: &mut dyn FnMut(&Expr)) {
    for s in &q.stmts {
        match &s.literal {
            Literal::SomeVars { .. } => {}
            Literal::SomeIn {
                key,
                value,
                collection,
                ..
            } => {
                key.iter().for_each(|k| visit_expr(k, f));
                visit_expr(value, f);
                visit_expr(collection, f);
            }
            Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => visit_expr(expr, f),
            Literal::Every { domain, query, .. } => {
                visit_expr(domain, f);
                visit_query(query, f);
            }
        }
        for w in &s.with_mods {
            visit_expr(&w.r#as, f);
        }
    }
}

fn visit_expr(e: &Expr, f: &mut dyn FnMut(&Expr)) {
    f(e);
    match e {
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            items.iter().for_each(|i| visit_expr(i, f))
        }
        Expr::Object { fields, .. } => fields.iter().for_each(|(_, k, v)| {
            visit_expr(k, f);
            visit_expr(v, f);
        }),
        Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
            visit_expr(term, f);
            visit_query(query, f);
        }
        Expr::ObjectCompr {
            key, value, query, ..
        } => {
            visit_expr(key, f);
            visit_expr(value, f);
            visit_query(query, f);
        }
        Expr::Call { params, .. } => params.iter().for_each(|p| visit_expr(p, f)),
        Expr::UnaryExpr { expr, .. } => visit_expr(expr, f),
        Expr::RefDot { refr, .. } => visit_expr(refr, f),
        Expr::RefBrack { refr, index, .. } => {
            visit_expr(refr, f);
            visit_expr(index, f);
        }
        Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::ArithExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => {
            visit_expr(lhs, f);
            visit_expr(rhs, f);
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            key.iter().for_each(|k| visit_expr(k, f));
            visit_expr(value, f);
            visit_expr(collection, f);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn module(path: &str, source: &str) -> Module {
        Module {
            path: path.into(),
            source: source.into(),
        }
    }

    fn compile(src: &str) -> Result<PolicyEngine, CompileError> {
        PolicyEngine::compile(&[module("p.rego", src)], &json!({}), Limits::default())
    }

    const AUTHZ: &str = r#"package envoy.authz

default allow := false

allow if {
    input.method == "GET"
    input.user in data.readers
}

reason := sprintf("user %s", [input.user])
"#;

    #[test]
    fn evaluates_rules_and_queries() {
        let mut e = PolicyEngine::compile(
            &[module("envoy/authz.rego", AUTHZ)],
            &json!({"readers": ["alice"]}),
            Limits::default(),
        )
        .unwrap();
        assert_eq!(e.packages(), vec!["envoy.authz".to_string()]);
        let input = json!({"method": "GET", "user": "alice"});
        assert_eq!(
            e.eval("data.envoy.authz.allow", &input).unwrap(),
            Some(json!(true))
        );
        assert_eq!(
            e.eval("data.envoy.authz.allow", &json!({"user": "bob"}))
                .unwrap(),
            Some(json!(false))
        );
        assert_eq!(e.eval("data.envoy.authz.reason", &json!({})).unwrap(), None);
        let v = e
            .eval_value("data.envoy.authz.reason", Value::from(input))
            .unwrap();
        assert_eq!(v, Some(Value::from("user alice")));
        assert!(matches!(
            e.eval_value("data.envoy.nope", Value::new_object()),
            Err(EvalError::UnknownRule { .. })
        ));
    }

    #[test]
    fn clones_evaluate_in_parallel() {
        let e = PolicyEngine::compile(
            &[module("a.rego", AUTHZ)],
            &json!({"readers": ["alice"]}),
            Limits::default(),
        )
        .unwrap();
        std::thread::scope(|s| {
            for _ in 0..2 {
                let mut e = e.clone();
                s.spawn(move || {
                    for _ in 0..100 {
                        let input = Value::from(json!({"method": "GET", "user": "alice"}));
                        assert_eq!(
                            e.eval_value("data.envoy.authz.allow", input).unwrap(),
                            Some(Value::from(true))
                        );
                    }
                });
            }
        });
    }

    #[test]
    fn parse_errors_carry_file_line_col_for_every_file() {
        let err = PolicyEngine::compile(
            &[
                module(
                    "envoy/authz.rego",
                    "package envoy.authz\n\nallow if {\n    input.x == \n}\n",
                ),
                module("b.rego", "package b\n\nallow {\n  true\n}\n"),
            ],
            &json!({}),
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.diagnostics.len(), 2, "{err}");
        let d = &err.diagnostics[0];
        assert_eq!((d.file.as_str(), d.line), ("envoy/authz.rego", 5), "{d}");
        let d = &err.diagnostics[1];
        assert_eq!((d.file.as_str(), d.line, d.col), ("b.rego", 3, 7));
        assert!(d.message.contains("`if` keyword is required"), "{d}");
        assert!(
            err.to_string()
                .starts_with("2 errors occurred:\nenvoy/authz.rego:5:"),
            "{err}"
        );
    }

    #[test]
    fn v1_rule_heads() {
        let mut e = compile("package p\n\nd contains x if { some x in [1, 2] }\no[k] := 1 if { some k in [\"a\"] }\n").unwrap();
        assert_eq!(e.eval("data.p.d", &json!({})).unwrap(), Some(json!([1, 2])));
        assert_eq!(
            e.eval("data.p.o", &json!({})).unwrap(),
            Some(json!({"a": 1}))
        );
    }

    #[test]
    fn print_output_is_not_accumulated_by_long_running_evaluators() {
        let mut e =
            compile("package p\n\nallow if {\n  print(\"seen\", input.n)\n  true\n}\n").unwrap();
        for n in 0..3 {
            assert_eq!(
                e.eval_value("data.p.allow", Value::from(json!({"n": n})))
                    .unwrap(),
                Some(Value::Bool(true))
            );
        }
        assert!(e.take_prints().is_empty());
        e.keep_prints(true);
        e.eval_value("data.p.allow", Value::from(json!({"n": 7})))
            .unwrap();
        assert_eq!(e.take_prints().len(), 1);
    }

    #[test]
    fn compile_time_checks() {
        let err = compile("package p\n\nallow if {\n  y == 1\n}\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "p.rego:4:3: use of undefined variable `y` is unsafe"
        );

        // Conditional `:=` definitions are allowed (OPA 1.x); conflicting values fail at evaluation.
        let mut e = compile(
            "package p\n\ndefault s := 403\ns := 200 if input.ok\ns := 401 if not input.ok\n",
        )
        .unwrap();
        assert_eq!(
            e.eval("data.p.s", &json!({"ok": true})).unwrap(),
            Some(json!(200))
        );
        assert_eq!(
            e.eval("data.p.s", &json!({"ok": false})).unwrap(),
            Some(json!(401))
        );
        let mut conflict = compile("package p\n\nx := 1\nx := 2\n").unwrap();
        assert!(conflict.eval("data.p.x", &json!({})).is_err());

        let err = compile("package p\n\nx := foo.bar(1)\n").unwrap_err();
        assert_eq!(err.to_string(), "p.rego:3:13: undefined function foo.bar");

        // Recursive functions would overflow regorus' stack: reject them up front.
        let err = compile("package p\n\nf(n) := g(n)\ng(n) := f(n + 1)\nx := f(1)\n").unwrap_err();
        assert_eq!(err.diagnostics.len(), 2, "{err}");
        assert!(
            err.diagnostics[0]
                .message
                .contains("function data.p.f is recursive: data.p.f -> data.p.g -> data.p.f"),
            "{err}"
        );

        // Imports, other packages and builtins resolve.
        let ok = [
            module("lib.rego", "package lib\n\ndouble(x) := x * 2\n"),
            module(
                "p.rego",
                "package p\n\nimport data.lib\n\nx := lib.double(2) + data.lib.double(1) + count([1])\ny := io.jwt.decode(\"a.b.c\")\n",
            ),
        ];
        let mut e = PolicyEngine::compile(&ok, &json!({}), Limits::default()).unwrap();
        assert_eq!(e.eval("data.p.x", &json!({})).unwrap(), Some(json!(7)));
        assert_eq!(e.packages(), vec!["lib".to_string(), "p".to_string()]);
    }

    #[test]
    fn rule_recursion_is_an_eval_error_with_positions() {
        let mut e = compile("package p\n\nx if y\ny if x\n").unwrap();
        let err = e.eval_value("data.p.x", Value::new_object()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p.rego:3:1: recursion detected: p.rego:3:1 -> p.rego:4:1 -> p.rego:3:1"
        );
    }

    #[test]
    fn http_send_is_sandboxed() {
        let mut e = compile(
            "package p\n\nx := http.send({\"method\": \"GET\", \"url\": \"http://example.com\"})\n",
        )
        .unwrap();
        let err = e.eval_value("data.p.x", Value::new_object()).unwrap_err();
        assert!(
            matches!(&err, EvalError::Policy(d) if d.line == 3 && d.message.contains("sandboxed")),
            "{err}"
        );
    }

    #[test]
    fn builtin_errors_are_undefined_like_opa() {
        let mut e = compile("package p\n\nx := to_number(\"abc\")\ny := numbers.range(1, 1.5)\nz := numbers.range_step(10, 1, 3)\n").unwrap();
        assert_eq!(e.eval("data.p.x", &json!({})).unwrap(), None);
        assert_eq!(e.eval("data.p.y", &json!({})).unwrap(), None);
        assert_eq!(
            e.eval("data.p.z", &json!({})).unwrap(),
            Some(json!([10, 7, 4, 1]))
        );
    }

    #[test]
    fn limits_stop_hostile_policies() {
        let mut e = compile(
            "package p\n\nbig := count([y | some y in numbers.range(1, 1e9)])\nslow := count([1 | some i in numbers.range(1, 5000); some j in numbers.range(1, 5000)])\nok := count(numbers.range(1, 1000))\n",
        )
        .unwrap();
        // Outcomes only: how fast the refusals come is for benchmarks, not for a debug build on a busy machine.
        let err = e.eval_value("data.p.big", Value::new_object()).unwrap_err();
        assert!(
            err.to_string().contains("exceeds the limit of 100000"),
            "{err}"
        );
        let err = e
            .eval_value("data.p.slow", Value::new_object())
            .unwrap_err();
        assert_eq!(
            err,
            EvalError::Timeout {
                limit: Duration::from_millis(100)
            }
        );
        // The engine stays usable after a timeout.
        assert_eq!(
            e.eval_value("data.p.ok", Value::new_object()).unwrap(),
            Some(Value::from(1000))
        );
    }

    #[test]
    fn extensions_take_an_output_argument_like_builtins() {
        // OPA's form `f(args..., out)`: the last argument receives (or is compared with) the result.
        let mut e = compile(
            "package p\n\nparts := [h, c] if {\n  io.jwt.decode(input.t, [h, c, _])\n}\nsame if io.jwt.decode(input.t, io.jwt.decode(input.t))\nnot_it if not io.jwt.decode(input.t, [1, 2, 3])\n",
        )
        .unwrap();
        let input = json!({"t": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"});
        assert_eq!(
            e.eval("data.p.parts", &input).unwrap(),
            Some(json!([{"alg": "HS256"}, {"sub": "a"}]))
        );
        assert_eq!(e.eval("data.p.same", &input).unwrap(), Some(json!(true)));
        assert_eq!(e.eval("data.p.not_it", &input).unwrap(), Some(json!(true)));
        let bindings = e
            .query_bindings("io.jwt.decode(input.t, [_, c, _])", &input)
            .unwrap();
        assert_eq!(bindings, vec![json!({"c": {"sub": "a"}})]);
    }

    #[test]
    fn long_lines_compile_like_in_opa() {
        // regorus refuses lines over 1,024 columns by default; inlined certificates are longer.
        let long = "a".repeat(100_000);
        let mut e = compile(&format!("package p\n\nx := count(\"{long}\")\n")).unwrap();
        assert_eq!(
            e.eval("data.p.x", &json!({})).unwrap(),
            Some(json!(100_000))
        );
    }

    #[test]
    fn strict_builtin_errors_fail_the_evaluation() {
        let src = "package p\n\nx := io.jwt.decode(\"nope\")\ny := to_number(\"abc\")\n";
        let mut lenient = compile(src).unwrap();
        assert_eq!(lenient.eval("data.p.x", &json!({})).unwrap(), None);
        let strict = Limits {
            strict_builtin_errors: true,
            ..Limits::default()
        };
        let mut e = PolicyEngine::compile(&[module("p.rego", src)], &json!({}), strict).unwrap();
        match e.eval("data.p.x", &json!({})).unwrap_err() {
            EvalError::Builtin(d) => assert_eq!(
                (d.line, d.message.as_str()),
                (3, "io.jwt.decode: encoded JWT had no period separators")
            ),
            other => panic!("expected a builtin error, got {other:?}"),
        }
        // regorus' own builtins follow the same switch.
        assert!(e.eval("data.p.y", &json!({})).is_err());
    }

    #[test]
    fn range_step_accepts_big_steps_and_names_bad_ones_like_opa() {
        let mut e =
            compile("package p\n\nbig := numbers.range_step(0, 10, 99999999999999999999)\n")
                .unwrap();
        assert_eq!(e.eval("data.p.big", &json!({})).unwrap(), Some(json!([0])));
        let mut e = compile("package p\n\nneg := numbers.range_step(0, 10, -2)\n").unwrap();
        let err = e.eval("data.p.neg", &json!({})).unwrap_err();
        assert!(
            err.to_string()
                .contains("numbers.range_step: step must be a positive integer"),
            "{err}"
        );
    }

    #[test]
    fn diagnostic_parsing_handles_plain_messages() {
        assert_eq!(Diagnostic::from_regorus("data must be object"), None);
    }
}
