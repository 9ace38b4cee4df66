//! `sluice authz`: the per-request decision service for Envoy's ext_authz filter, compatible with
//! OPA-Envoy's input and result formats. Each request is evaluated on the thread that received it with
//! that thread's own engine, so decisions never queue behind one shared engine.

pub mod cli;
pub mod decision_log;
pub mod grpc;
pub mod http;
pub mod input;
pub mod metrics;
pub mod multipart;
pub mod response;
pub mod source;

/// The decision `sluice authz` evaluates when neither the bundle nor `--query` names one (OPA-Envoy's default).
pub const DEFAULT_QUERY: &str = "data.envoy.authz.allow";

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use decision_log::{DecisionLog, DecisionRecord};
use metrics::AuthzMetrics;
use response::Decision;
use sluice_rego::bundle::Bundle;
use sluice_rego::engine::{EvalError, Limits, PolicyEngine};

/// What to evaluate and how to enforce it, after command-line overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Rule path, e.g. `data.envoy.authz.allow`.
    pub query: String,
    pub dry_run: bool,
    pub fail_open: bool,
    /// Builtin errors fail the evaluation (and so deny, unless `fail_open`) instead of being undefined.
    pub strict_builtin_errors: bool,
}

/// Command-line choices that win over what a Sluice-built bundle's manifest says.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub query: Option<String>,
    pub dry_run: bool,
    pub fail_open: bool,
    pub strict_builtin_errors: bool,
}

impl Overrides {
    /// Effective settings for a bundle: flags first, then the manifest's `metadata.sluice`, then defaults.
    pub fn settings_for(&self, bundle: &Bundle) -> Settings {
        let sluice = bundle
            .manifest
            .metadata
            .as_ref()
            .and_then(|m| m.get("sluice"));
        let field = |name: &str| sluice.and_then(|s| s.get(name));
        Settings {
            query: self
                .query
                .clone()
                .or_else(|| field("query").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| DEFAULT_QUERY.to_owned()),
            dry_run: self.dry_run || field("mode").and_then(Value::as_str) == Some("dryRun"),
            fail_open: self.fail_open || field("failOpen").and_then(Value::as_bool) == Some(true),
            strict_builtin_errors: self.strict_builtin_errors
                || field("strictBuiltinErrors").and_then(Value::as_bool) == Some(true),
        }
    }
}

/// A bundle ready to serve decisions.
pub struct Active {
    pub revision: String,
    pub settings: Settings,
    /// Template each worker thread clones once per activation.
    engine: PolicyEngine,
    /// Unique across the process, so a thread's cached engine is never mistaken for another bundle's.
    generation: u64,
    pub activated_at: SystemTime,
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("bundle {revision}: {source}")]
    Compile {
        revision: String,
        #[source]
        source: sluice_rego::engine::CompileError,
    },
    #[error(
        "bundle {revision} does not define {query}: its packages are {packages}; set --query or fix the bundle"
    )]
    NoSuchRule {
        revision: String,
        query: String,
        packages: String,
    },
}

impl Active {
    /// Compiles a bundle; refuses one that does not define the query, which would deny everything.
    pub fn compile(
        bundle: &Bundle,
        overrides: &Overrides,
        limits: Limits,
    ) -> Result<Active, ActivationError> {
        let revision = bundle.manifest.revision.clone();
        let settings = overrides.settings_for(bundle);
        let limits = Limits {
            strict_builtin_errors: settings.strict_builtin_errors,
            ..limits
        };
        let engine =
            PolicyEngine::compile(&bundle.modules, &bundle.data, limits).map_err(|source| {
                ActivationError::Compile {
                    revision: revision.clone(),
                    source,
                }
            })?;
        let defined = engine.rules().iter().any(|rule| {
            settings.query == format!("data.{}.{}", rule.package, rule.name)
                || settings
                    .query
                    .starts_with(&format!("data.{}.{}.", rule.package, rule.name))
        });
        if !defined {
            return Err(ActivationError::NoSuchRule {
                revision,
                query: settings.query,
                packages: engine.packages().join(", "),
            });
        }
        Ok(Active {
            revision,
            settings,
            engine,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            activated_at: SystemTime::now(),
        })
    }

    /// Evaluates the query with this thread's engine (cloned from the template on first use).
    pub fn evaluate(&self, input: regorus::Value) -> Result<Option<Value>, EvalError> {
        thread_local! {
            static WORKER: RefCell<Option<(u64, PolicyEngine)>> = const { RefCell::new(None) };
        }
        WORKER.with(|worker| {
            let mut worker = worker.borrow_mut();
            let engine = match &mut *worker {
                Some((generation, engine)) if *generation == self.generation => engine,
                slot => &mut slot.insert((self.generation, self.engine.clone())).1,
            };
            let result = engine.eval_value(&self.settings.query, input)?;
            result
                .map(|v| serde_json::to_value(&v).map_err(|e| EvalError::Other(e.to_string())))
                .transpose()
        })
    }
}

/// The decision service shared by the gRPC and HTTP front ends.
pub struct Authorizer {
    active: RwLock<Option<Arc<Active>>>,
    pub metrics: AuthzMetrics,
    pub log: Option<DecisionLog>,
    pub input_options: input::InputOptions,
    decision_ids: AtomicU64,
    id_prefix: String,
}

/// The result of one check, before it is turned into a gRPC or HTTP response.
pub enum Verdict {
    /// No bundle is active yet.
    NotReady,
    /// The request could not be turned into an input document.
    BadRequest(input::InputError),
    /// The policy decided (possibly in dry-run).
    Decided {
        decision: Decision,
        dry_run: bool,
        decision_id: String,
    },
    /// The policy could not decide: undefined, a malformed result or an evaluation error.
    Failed {
        error: String,
        fail_open: bool,
        decision_id: String,
    },
}

impl Authorizer {
    pub fn new(
        metrics: AuthzMetrics,
        log: Option<DecisionLog>,
        input_options: input::InputOptions,
    ) -> Self {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Authorizer {
            active: RwLock::new(None),
            metrics,
            log,
            input_options,
            decision_ids: AtomicU64::new(0),
            id_prefix: format!("{:x}-{:x}", std::process::id(), started.as_millis()),
        }
    }

    /// The bundle serving decisions now.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps in a new bundle atomically; requests in flight finish on the one they started with.
    pub fn activate(&self, active: Active) {
        self.metrics
            .activated(&active.revision, active.activated_at);
        tracing::info!(revision = %active.revision, query = %active.settings.query, dry_run = active.settings.dry_run, "bundle activated");
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(active));
    }

    pub fn is_ready(&self) -> bool {
        self.active().is_some()
    }

    /// Decides on an OPA-Envoy input built by the caller (`build` returns it or an input error).
    pub fn check(
        &self,
        path: &str,
        build: impl FnOnce(&input::InputOptions) -> Result<input::PolicyInput, input::InputError>,
    ) -> Verdict {
        let started = Instant::now();
        let Some(active) = self.active() else {
            self.metrics.decided("not_ready", started.elapsed());
            return Verdict::NotReady;
        };
        let input = match build(&self.input_options) {
            Ok(input) => input,
            Err(err) => {
                self.metrics.decided("bad_request", started.elapsed());
                return Verdict::BadRequest(err);
            }
        };
        let decision_id = format!(
            "{}-{}",
            self.id_prefix,
            self.decision_ids.fetch_add(1, Ordering::Relaxed)
        );
        let logged_input = self
            .log
            .as_ref()
            .filter(|log| log.sample())
            .map(|_| input.document.clone());
        let result = active.evaluate(input.into_rego());
        let outcome = match &result {
            Ok(value) => Decision::from_result(value.as_ref()).map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        let latency = started.elapsed();
        let settings = &active.settings;
        let (label, allowed) = match &outcome {
            Ok(d) if d.allowed() => ("allow", true),
            Ok(_) if settings.dry_run => ("dry_run_deny", true),
            Ok(_) => ("deny", false),
            Err(_) => ("error", settings.fail_open),
        };
        self.metrics.decided(label, latency);
        if let (Some(log), Some(input)) = (&self.log, logged_input) {
            log.record(DecisionRecord {
                decision_id: decision_id.clone(),
                revision: active.revision.clone(),
                query: settings.query.clone(),
                path: path.to_owned(),
                input,
                result: result.as_ref().ok().cloned().flatten(),
                allowed,
                dry_run: settings.dry_run,
                error: outcome.as_ref().err().cloned(),
                latency,
            });
        }
        match outcome {
            Ok(decision) => Verdict::Decided {
                decision,
                dry_run: settings.dry_run,
                decision_id,
            },
            Err(error) => {
                tracing::debug!(error, revision = %active.revision, "policy could not decide");
                Verdict::Failed {
                    error,
                    fail_open: settings.fail_open,
                    decision_id,
                }
            }
        }
    }
}

/// How long a bundle loader waits between attempts after a failure: 1s, 2s, 4s … capped at 30s.
pub fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(5)).min(Duration::from_secs(30))
}
