//! The AuthorizationPolicy controller: resolves the Rego modules (inline and from ConfigMaps), compiles them
//! and runs their tests with regorus, and only then makes the bundle the served revision — on the bundle
//! server and in the owned ConfigMap `<name>-bundle`. A spec that fails leaves the previous revision serving.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;

use crate::api::{
    AuthorizationPolicy, AuthorizationPolicyStatus, FIELD_MANAGER, IstioWiring, PolicyMode,
};
use crate::policy::Module;
use crate::policy::bundle::Bundle;
use crate::policy::engine::Limits;
use crate::policy::server::{BundleStore, ServedBundle};
use crate::policy::signing::{SigningKey, sign};
use crate::policy::testing::{Outcome, run_tests};
use crate::rollout::set_condition_status;
use crate::telemetry::Telemetry;

/// Key of the bundle in the `<name>-bundle` ConfigMap.
pub const BUNDLE_KEY: &str = "bundle.tar.gz";
/// Annotation on the ConfigMap naming the revision it holds.
pub const REVISION_ANNOTATION: &str = "sluice.dev/revision";
/// Label on the ConfigMap naming the policy it belongs to.
pub const POLICY_LABEL: &str = "sluice.dev/authorization-policy";
/// A ConfigMap holds at most 1 MiB; leave room for its metadata.
pub const MAX_CONFIGMAP_BUNDLE_BYTES: usize = 1_000_000;
/// How often a settled policy is looked at again (workload counts; everything else is event-driven).
const RESYNC: Duration = Duration::from_secs(600);

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("AuthorizationPolicy {0} has no namespace")]
    NoNamespace(String),
    #[error("compiling or testing the policy panicked: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Why the latest spec did not become a revision. Shown in the status; the previous revision keeps serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// A `configMapRef` names a ConfigMap or key that does not exist.
    ModuleNotFound(String),
    /// The modules do not compile (message has file:line:col).
    Compile(String),
    /// Some `test_*` rules fail or error.
    Tests(String),
    /// The bundle cannot be built or does not fit a ConfigMap.
    Bundle(String),
}

impl Rejection {
    fn message(&self) -> &str {
        match self {
            Rejection::ModuleNotFound(m)
            | Rejection::Compile(m)
            | Rejection::Tests(m)
            | Rejection::Bundle(m) => m,
        }
    }
}

/// A spec that compiled, passed its tests and was packaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub revision: String,
    pub bytes: axum::body::Bytes,
    pub tests: usize,
}

pub type BuildOutcome = Result<Accepted, Rejection>;

struct Context {
    client: Client,
    store: BundleStore,
    telemetry: Arc<Telemetry>,
    limits: Limits,
    /// Signs every served bundle (`--bundle-signing-key`).
    signing: Option<SigningKey>,
    /// Last build per policy, keyed by a digest of its resolved inputs, so a resync does not recompile.
    builds: Mutex<HashMap<ObjectRef<AuthorizationPolicy>, (u64, BuildOutcome)>>,
    failures: Mutex<HashMap<ObjectRef<AuthorizationPolicy>, u32>>,
}

/// The AuthorizationPolicy controller's name in `/readyz`.
pub const READY_COMPONENT: &str = "authorizationpolicies";

/// Runs the AuthorizationPolicy controller until the watch streams end.
pub async fn run(
    client: Client,
    store: BundleStore,
    telemetry: Arc<Telemetry>,
    signing: Option<SigningKey>,
) {
    let policies: Api<AuthorizationPolicy> = Api::all(client.clone());
    let context = Arc::new(Context {
        client: client.clone(),
        store: store.clone(),
        telemetry,
        limits: Limits::default(),
        signing,
        builds: Mutex::default(),
        failures: Mutex::default(),
    });
    // Deletions do not trigger reconciles: a metadata-only watch stops serving deleted policies.
    let deletions = tokio::spawn(forget_deleted_policies(client.clone(), store.clone()));
    let controller =
        super::watched_controller(policies, context.telemetry.clone(), READY_COMPONENT);
    let by_configmap = controller.store();
    let by_deployment = controller.store();
    let by_statefulset = controller.store();
    controller
        // A referenced ConfigMap changed, or our `<name>-bundle` was edited or deleted.
        .watches(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default(),
            move |cm: ConfigMap| {
                let namespace = cm.namespace().unwrap_or_default();
                let name = cm.name_any();
                by_configmap
                    .state()
                    .into_iter()
                    .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
                    .filter(|p| references_configmap(p, &name))
                    .map(|p| ObjectRef::from_obj(&*p))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default(),
            move |d: Deployment| {
                let labels = d
                    .spec
                    .and_then(|s| s.template.metadata)
                    .and_then(|m| m.labels)
                    .unwrap_or_default();
                selecting(&by_deployment, d.metadata.namespace.as_deref(), &labels)
            },
        )
        .watches(
            Api::<StatefulSet>::all(client),
            watcher::Config::default(),
            move |s: StatefulSet| {
                let labels = s
                    .spec
                    .and_then(|s| s.template.metadata)
                    .and_then(|m| m.labels)
                    .unwrap_or_default();
                selecting(&by_statefulset, s.metadata.namespace.as_deref(), &labels)
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            if let Err(err) = result {
                tracing::debug!(error = %err, "authorization policy reconcile round failed");
            }
            futures::future::ready(())
        })
        .await;
    deletions.abort();
}

/// Stops serving the bundles of deleted policies (their ConfigMaps go by garbage collection).
async fn forget_deleted_policies(client: Client, store: BundleStore) {
    let api: Api<kube::core::PartialObjectMeta<AuthorizationPolicy>> = Api::all(client);
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
    while let Some(event) = events.next().await {
        if let Ok(watcher::Event::Delete(meta)) = event
            && let Some(namespace) = meta.namespace()
        {
            tracing::info!(policy = %meta.name_any(), namespace, "policy deleted; no longer serving its bundle");
            store.remove(&namespace, &meta.name_any());
        }
    }
}

fn selecting(
    store: &kube::runtime::reflector::Store<AuthorizationPolicy>,
    namespace: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Vec<ObjectRef<AuthorizationPolicy>> {
    store
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == namespace)
        .filter(|p| selector_matches(&p.spec.selector, labels))
        .map(|p| ObjectRef::from_obj(&*p))
        .collect()
}

fn references_configmap(policy: &AuthorizationPolicy, name: &str) -> bool {
    name == bundle_configmap_name(&policy.name_any())
        || policy
            .spec
            .modules
            .iter()
            .any(|m| m.config_map_ref.as_ref().is_some_and(|r| r.name == name))
}

/// Name of the ConfigMap that holds a policy's bundle.
pub fn bundle_configmap_name(policy: &str) -> String {
    format!("{policy}-bundle")
}

/// Whether a label selector selects `labels`, with Kubernetes semantics (an empty selector selects all).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // The API server rejects other operators; select nothing rather than everything.
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// The manifest metadata `sluice authz` reads: which decision to query and how to enforce it.
pub fn bundle_metadata(policy: &AuthorizationPolicy) -> serde_json::Value {
    json!({
        "sluice": {
            "policy": format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any()),
            "query": policy.spec.query,
            "mode": match policy.spec.mode { PolicyMode::Enforce => "enforce", PolicyMode::DryRun => "dryRun" },
            "failOpen": policy.spec.fail_open,
            "strictBuiltinErrors": policy.spec.strict_builtin_errors,
        }
    })
}

fn error_policy(policy: Arc<AuthorizationPolicy>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.telemetry.reconcile_failed();
    let failures = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(ObjectRef::from_obj(&*policy)).or_insert(0);
        *count += 1;
        *count
    };
    let retry = super::backoff(failures);
    tracing::warn!(policy = %policy.name_any(), namespace = ?policy.namespace(), error = %err, failures, retry_secs = retry.as_secs(), "authorization policy reconcile failed; retrying");
    Action::requeue(retry)
}

/// Reads the modules of the spec, inline or from ConfigMaps in the policy's namespace.
async fn resolve_modules(
    policy: &AuthorizationPolicy,
    configmaps: &Api<ConfigMap>,
) -> Result<Result<Vec<Module>, Rejection>, Error> {
    let mut modules = Vec::with_capacity(policy.spec.modules.len());
    for module in &policy.spec.modules {
        let source = match (&module.rego, &module.config_map_ref) {
            (Some(rego), _) => rego.clone(),
            (None, Some(reference)) => {
                let Some(cm) = configmaps.get_opt(&reference.name).await? else {
                    return Ok(Err(Rejection::ModuleNotFound(format!(
                        "module {}: ConfigMap {:?} not found in namespace {:?}; create it or fix spec.modules[].configMapRef.name",
                        module.name,
                        reference.name,
                        policy.namespace().unwrap_or_default()
                    ))));
                };
                match cm.data.as_ref().and_then(|d| d.get(&reference.key)) {
                    Some(source) => source.clone(),
                    None => {
                        return Ok(Err(Rejection::ModuleNotFound(format!(
                            "module {}: ConfigMap {:?} has no key {:?}",
                            module.name, reference.name, reference.key
                        ))));
                    }
                }
            }
            (None, None) => {
                return Ok(Err(Rejection::ModuleNotFound(format!(
                    "module {} sets neither rego nor configMapRef",
                    module.name
                ))));
            }
        };
        modules.push(Module {
            path: module.name.clone(),
            source,
        });
    }
    Ok(Ok(modules))
}

/// Compiles, tests and packages the modules. CPU-bound: run it on a blocking thread.
pub fn build(
    modules: &[Module],
    data: &serde_json::Value,
    metadata: serde_json::Value,
    limits: Limits,
    signing: Option<&SigningKey>,
) -> BuildOutcome {
    let report =
        run_tests(modules, data, None, limits).map_err(|e| Rejection::Compile(e.to_string()))?;
    let failed: Vec<String> = report
        .results
        .iter()
        .filter_map(|r| {
            let what = match &r.outcome {
                Outcome::Fail => "FAIL".to_owned(),
                Outcome::Error(message) => format!("ERROR: {message}"),
                _ => return None,
            };
            let line = r.line.map(|l| format!(":{l}")).unwrap_or_default();
            Some(format!("{}{line}: {}: {what}", r.file, r.path()))
        })
        .collect();
    if !failed.is_empty() {
        let total = report.results.len();
        return Err(Rejection::Tests(format!(
            "{} of {total} tests failed: {}",
            failed.len(),
            failed.join("; ")
        )));
    }
    let tests = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Pass))
        .count();
    let mut bundle = Bundle::from_parts(modules.to_vec(), data.clone(), None, Some(metadata))
        .map_err(|e| Rejection::Bundle(e.to_string()))?;
    if let Some(key) = signing {
        sign(&mut bundle, key)
            .map_err(|e| Rejection::Bundle(format!("cannot sign the bundle: {e}")))?;
    }
    let bytes = bundle
        .to_tar_gz()
        .map_err(|e| Rejection::Bundle(e.to_string()))?;
    if bytes.len() > MAX_CONFIGMAP_BUNDLE_BYTES {
        return Err(Rejection::Bundle(format!(
            "the bundle is {} bytes, more than the {MAX_CONFIGMAP_BUNDLE_BYTES} bytes a ConfigMap can hold; move large data out of spec.data or split the policy",
            bytes.len()
        )));
    }
    Ok(Accepted {
        revision: bundle.manifest.revision.clone(),
        bytes: bytes.into(),
        tests,
    })
}

fn digest(modules: &[Module], data: &serde_json::Value, metadata: &serde_json::Value) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for m in modules {
        m.path.hash(&mut hasher);
        m.source.hash(&mut hasher);
    }
    data.to_string().hash(&mut hasher);
    metadata.to_string().hash(&mut hasher);
    hasher.finish()
}

/// Facts the status is computed from.
pub struct Observation<'a> {
    pub generation: i64,
    pub outcome: &'a BuildOutcome,
    /// The revision being served after this reconcile (the new one, or the previous one on rejection).
    pub served: Option<&'a str>,
    /// Error writing the `<name>-bundle` ConfigMap, if any.
    pub configmap_error: Option<&'a str>,
    pub configmap: &'a str,
    pub bundle_path: &'a str,
    pub matched_workloads: u32,
    /// Istio wiring: `None` when `spec.istio` is unset, else what applying it gave.
    pub mesh: Option<MeshWiring>,
    pub now: Timestamp,
}

/// The outcome of wiring the policy into the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshWiring {
    Applied(String),
    Failed {
        reason: &'static str,
        message: String,
    },
}

/// The status for an observation; conditions keep their transition times when their status holds.
pub fn desired_status(
    previous: Option<&AuthorizationPolicyStatus>,
    seen: &Observation,
) -> AuthorizationPolicyStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let conditions = &mut status.conditions;
    let generation = seen.generation;
    let now = seen.now;
    let set = |conditions: &mut Vec<_>, type_: &str, status: &str, reason: &str, message: &str| {
        set_condition_status(conditions, type_, status, reason, message, generation, now);
    };
    match seen.outcome {
        Err(Rejection::ModuleNotFound(m)) => {
            set(conditions, "Compiled", "False", "ModuleNotFound", m);
            set(conditions, "TestsPassed", "Unknown", "NotCompiled", "");
        }
        Err(Rejection::Compile(m)) => {
            set(conditions, "Compiled", "False", "CompileError", m);
            set(conditions, "TestsPassed", "Unknown", "NotCompiled", "");
        }
        Err(Rejection::Tests(m)) => {
            set(conditions, "Compiled", "True", "Compiled", "");
            set(conditions, "TestsPassed", "False", "TestsFailed", m);
        }
        Err(Rejection::Bundle(_)) | Ok(_) => {
            set(conditions, "Compiled", "True", "Compiled", "");
            let tests = match seen.outcome {
                Ok(a) if a.tests == 0 => "the modules define no test_ rules".to_owned(),
                Ok(a) => format!("{} tests passed", a.tests),
                Err(_) => String::new(),
            };
            set(conditions, "TestsPassed", "True", "TestsPassed", &tests);
        }
    }
    match (seen.outcome, seen.configmap_error) {
        (Err(Rejection::Bundle(m)), _) => {
            set(conditions, "Distributed", "False", "BundleRejected", m);
        }
        (Ok(_), Some(err)) => {
            let message = format!(
                "served at {} but ConfigMap {} could not be written: {err}",
                seen.bundle_path, seen.configmap
            );
            set(
                conditions,
                "Distributed",
                "False",
                "ConfigMapWriteFailed",
                &message,
            );
        }
        (Ok(a), None) => {
            let message = format!(
                "revision {} served at {} and in ConfigMap {}",
                a.revision, seen.bundle_path, seen.configmap
            );
            set(conditions, "Distributed", "True", "Distributed", &message);
        }
        // Nothing new to distribute; the condition keeps describing the served revision.
        (Err(_), _) => {}
    }
    match (seen.outcome, seen.served) {
        (Ok(_), _) if seen.configmap_error.is_none() => {
            set(
                conditions,
                "Ready",
                "True",
                "Ready",
                "the latest spec is being served",
            );
        }
        (Ok(_), _) => set(conditions, "Ready", "False", "DistributionFailed", ""),
        (Err(r), Some(served)) => {
            let message = format!(
                "still serving revision {served}: the latest spec was rejected: {}",
                r.message()
            );
            set(
                conditions,
                "Ready",
                "False",
                "PreviousRevisionServing",
                &message,
            );
        }
        (Err(r), None) => {
            let message = format!("no revision to serve: {}", r.message());
            set(conditions, "Ready", "False", "NoRevision", &message);
        }
    }
    match &seen.mesh {
        Some(MeshWiring::Applied(message)) => {
            set(
                conditions,
                "MeshConfigured",
                "True",
                "IstioPolicyApplied",
                message,
            );
        }
        Some(MeshWiring::Failed { reason, message }) => {
            set(conditions, "MeshConfigured", "False", reason, message);
        }
        None => conditions.retain(|c| c.type_ != "MeshConfigured"),
    }
    status.observed_generation = Some(generation);
    status.revision = seen.served.map(str::to_owned);
    status.matched_workloads = seen.matched_workloads;
    status.last_error = seen.outcome.as_ref().err().map(|r| r.message().to_owned());
    status
}

async fn reconcile(policy: Arc<AuthorizationPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = policy.name_any();
    let namespace = policy
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let key = ObjectRef::from_obj(&*policy);
    let client = &ctx.client;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);

    let outcome = match resolve_modules(&policy, &configmaps).await? {
        Err(rejection) => Err(rejection),
        Ok(modules) => {
            let data = policy.spec.data.clone().unwrap_or_else(|| json!({}));
            let metadata = bundle_metadata(&policy);
            let digest = digest(&modules, &data, &metadata);
            let cached = {
                let builds = ctx.builds.lock().unwrap_or_else(|e| e.into_inner());
                builds
                    .get(&key)
                    .filter(|(d, _)| *d == digest)
                    .map(|(_, o)| o.clone())
            };
            match cached {
                Some(outcome) => outcome,
                None => {
                    let limits = Limits {
                        strict_builtin_errors: policy.spec.strict_builtin_errors,
                        ..ctx.limits
                    };
                    let signing = ctx.signing.clone();
                    let outcome = tokio::task::spawn_blocking(move || {
                        build(&modules, &data, metadata, limits, signing.as_ref())
                    })
                    .await?;
                    ctx.builds
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone(), (digest, outcome.clone()));
                    outcome
                }
            }
        }
    };

    let configmap_name = bundle_configmap_name(&name);
    let existing = configmaps.get_opt(&configmap_name).await?;
    let existing_revision = existing
        .as_ref()
        .and_then(|cm| cm.annotations().get(REVISION_ANNOTATION).cloned());
    let mut configmap_error = None;
    match &outcome {
        Ok(accepted) => {
            if existing_revision.as_deref() != Some(accepted.revision.as_str()) {
                let object = bundle_configmap(&policy, &configmap_name, accepted);
                if let Err(err) = configmaps
                    .patch(
                        &configmap_name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(object),
                    )
                    .await
                {
                    tracing::warn!(policy = %name, namespace, error = %err, "cannot write the bundle ConfigMap");
                    configmap_error = Some(err.to_string());
                }
            }
            if ctx.store.publish(
                &namespace,
                &name,
                ServedBundle {
                    revision: accepted.revision.clone(),
                    bytes: accepted.bytes.clone(),
                },
            ) {
                tracing::info!(policy = %name, namespace, revision = %accepted.revision, tests = accepted.tests, "serving a new bundle revision");
            }
        }
        Err(rejection) => {
            tracing::info!(policy = %name, namespace, reason = rejection.message(), "policy spec rejected; the previous revision keeps serving");
            // After a restart the last good revision is still in the ConfigMap: keep serving it.
            if ctx.store.current(&namespace, &name).is_none()
                && let (Some(cm), Some(revision)) = (&existing, &existing_revision)
                && let Some(bytes) = cm.binary_data.as_ref().and_then(|d| d.get(BUNDLE_KEY))
            {
                ctx.store.publish(
                    &namespace,
                    &name,
                    ServedBundle {
                        revision: revision.clone(),
                        bytes: bytes.0.clone().into(),
                    },
                );
            }
        }
    }
    let served = ctx
        .store
        .current(&namespace, &name)
        .map(|b| b.revision.clone());

    let matched_workloads = matched_workloads(client, &namespace, &policy.spec.selector).await?;
    let mesh = wire_istio(client, &policy, &namespace).await?;
    let bundle_path = format!("/bundles/{namespace}/{name}");
    let now = Timestamp::now();
    let observation = Observation {
        generation: policy.metadata.generation.unwrap_or_default(),
        outcome: &outcome,
        served: served.as_deref(),
        configmap_error: configmap_error.as_deref(),
        configmap: &configmap_name,
        bundle_path: &bundle_path,
        matched_workloads,
        mesh,
        now: Timestamp::from_second(now.as_second()).unwrap_or(now),
    };
    let status = desired_status(policy.status.as_ref(), &observation);
    if policy.status.as_ref() != Some(&status) {
        let api: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), &namespace);
        let patch = json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    }
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    Ok(Action::requeue(RESYNC))
}

/// Name of the Istio AuthorizationPolicy Sluice creates for a policy with `spec.istio`.
pub fn istio_policy_name(policy: &str) -> String {
    format!("{policy}-ext-authz")
}

fn istio_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The Istio AuthorizationPolicy (`action: CUSTOM`) that sends the selected workloads' requests to the
/// extension provider, or why the selector cannot be expressed in Istio.
pub fn istio_policy_spec(
    selector: &LabelSelector,
    wiring: &IstioWiring,
) -> Result<serde_json::Value, String> {
    if selector
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(
            "Istio selects workloads by labels only: replace spec.selector.matchExpressions with matchLabels"
                .into(),
        );
    }
    let rule = if wiring.paths.is_empty() {
        json!({})
    } else {
        json!({"to": [{"operation": {"paths": wiring.paths}}]})
    };
    let mut spec = json!({
        "action": "CUSTOM",
        "provider": {"name": wiring.provider},
        "rules": [rule],
    });
    // No selector: Istio applies the policy to every workload in the namespace, as ours selects all.
    if let Some(labels) = selector.match_labels.as_ref().filter(|l| !l.is_empty()) {
        spec["selector"] = json!({"matchLabels": labels});
    }
    Ok(spec)
}

/// Creates, updates or removes the Istio AuthorizationPolicy; writes only when it differs.
async fn wire_istio(
    client: &Client,
    policy: &AuthorizationPolicy,
    namespace: &str,
) -> Result<Option<MeshWiring>, Error> {
    let name = istio_policy_name(&policy.name_any());
    let api = istio_api(client, namespace);
    let Some(wiring) = &policy.spec.istio else {
        // Only a policy that once had wiring can own an Istio object: don't probe Istio otherwise.
        let had_wiring = policy
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "MeshConfigured"));
        if had_wiring {
            match api.delete(&name, &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
        }
        return Ok(None);
    };
    let spec = match istio_policy_spec(&policy.spec.selector, wiring) {
        Ok(spec) => spec,
        Err(message) => {
            return Ok(Some(MeshWiring::Failed {
                reason: "SelectorNotSupported",
                message,
            }));
        }
    };
    let applied = format!(
        "Istio AuthorizationPolicy {name} sends requests to extension provider {:?}",
        wiring.provider
    );
    let existing = match api.get_opt(&name).await {
        Ok(existing) => existing,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Ok(Some(MeshWiring::Failed {
                reason: "IstioNotInstalled",
                message: "the security.istio.io/v1 AuthorizationPolicy API is not served: install Istio (or Azure Service Mesh), or remove spec.istio".into(),
            }));
        }
        Err(err) => return Err(err.into()),
    };
    if existing.as_ref().and_then(|o| o.data.get("spec")) == Some(&spec) {
        return Ok(Some(MeshWiring::Applied(applied)));
    }
    let owner = owner_reference(policy);
    let object = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "sluice",
                POLICY_LABEL: policy.name_any(),
            },
            "ownerReferences": [owner],
        },
        "spec": spec,
    });
    match api
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
    {
        Ok(_) => Ok(Some(MeshWiring::Applied(applied))),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Some(MeshWiring::Failed {
            reason: "IstioNotInstalled",
            message: "the security.istio.io/v1 AuthorizationPolicy API is not served: install Istio (or Azure Service Mesh), or remove spec.istio".into(),
        })),
        Err(kube::Error::Api(e)) => Ok(Some(MeshWiring::Failed {
            reason: "IstioPolicyRejected",
            message: format!("the API server refused Istio AuthorizationPolicy {name}: {}", e.message),
        })),
        Err(err) => Err(err.into()),
    }
}

fn owner_reference(policy: &AuthorizationPolicy) -> OwnerReference {
    OwnerReference {
        api_version: "sluice.dev/v1alpha1".into(),
        kind: "AuthorizationPolicy".into(),
        name: policy.name_any(),
        uid: policy.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn bundle_configmap(
    policy: &AuthorizationPolicy,
    name: &str,
    accepted: &Accepted,
) -> serde_json::Value {
    let owner = owner_reference(policy);
    let bytes: BTreeMap<String, ByteString> =
        BTreeMap::from([(BUNDLE_KEY.to_owned(), ByteString(accepted.bytes.to_vec()))]);
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": policy.namespace(),
            "labels": {
                "app.kubernetes.io/managed-by": "sluice",
                POLICY_LABEL: policy.name_any(),
            },
            "annotations": { REVISION_ANNOTATION: accepted.revision },
            "ownerReferences": [owner],
        },
        "binaryData": bytes,
    })
}

/// Deployments and StatefulSets in the namespace whose pods the selector selects.
async fn matched_workloads(
    client: &Client,
    namespace: &str,
    selector: &LabelSelector,
) -> Result<u32, Error> {
    let params = ListParams::default();
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace)
        .list(&params)
        .await?;
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .list(&params)
        .await?;
    let templates = deployments
        .items
        .into_iter()
        .filter_map(|d| d.spec.map(|s| s.template))
        .chain(
            statefulsets
                .items
                .into_iter()
                .filter_map(|s| s.spec.map(|s| s.template)),
        );
    let count = templates
        .filter(|t| {
            let labels = t
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            selector_matches(selector, &labels)
        })
        .count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let pod = labels(&[("app", "shop"), ("tier", "web")]);
        let all = LabelSelector::default();
        assert!(selector_matches(&all, &pod));
        assert!(selector_matches(&all, &labels(&[])));
        let by_label = |k: &str, v: &str| LabelSelector {
            match_labels: Some(labels(&[(k, v)])),
            ..Default::default()
        };
        assert!(selector_matches(&by_label("app", "shop"), &pod));
        assert!(!selector_matches(&by_label("app", "cart"), &pod));
        assert!(!selector_matches(&by_label("missing", "x"), &pod));
        let by_expr = |e: LabelSelectorRequirement| LabelSelector {
            match_expressions: Some(vec![e]),
            ..Default::default()
        };
        let cases = [
            (expr("tier", "In", &["web", "api"]), true),
            (expr("tier", "In", &["api"]), false),
            (expr("absent", "In", &["x"]), false),
            (expr("tier", "NotIn", &["api"]), true),
            (expr("tier", "NotIn", &["web"]), false),
            (expr("absent", "NotIn", &["x"]), true),
            (expr("tier", "Exists", &[]), true),
            (expr("absent", "Exists", &[]), false),
            (expr("absent", "DoesNotExist", &[]), true),
            (expr("tier", "DoesNotExist", &[]), false),
            (expr("tier", "Bogus", &[]), false),
        ];
        for (requirement, expected) in cases {
            let description = format!("{requirement:?}");
            assert_eq!(
                selector_matches(&by_expr(requirement), &pod),
                expected,
                "{description}"
            );
        }
        // Labels and expressions are ANDed.
        let both = LabelSelector {
            match_labels: Some(labels(&[("app", "shop")])),
            match_expressions: Some(vec![expr("tier", "In", &["api"])]),
        };
        assert!(!selector_matches(&both, &pod));
    }

    fn observation<'a>(outcome: &'a BuildOutcome, served: Option<&'a str>) -> Observation<'a> {
        Observation {
            generation: 3,
            outcome,
            served,
            configmap_error: None,
            configmap: "authz-bundle",
            bundle_path: "/bundles/shop/authz",
            matched_workloads: 2,
            mesh: None,
            now: Timestamp::from_second(1_700_000_000).unwrap(),
        }
    }

    fn condition<'a>(status: &'a AuthorizationPolicyStatus, type_: &str) -> (&'a str, &'a str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition"));
        (c.status.as_str(), c.reason.as_str())
    }

    fn accepted(revision: &str) -> BuildOutcome {
        Ok(Accepted {
            revision: revision.into(),
            bytes: Default::default(),
            tests: 4,
        })
    }

    #[test]
    fn an_accepted_spec_is_ready_everywhere() {
        let outcome = accepted("r1");
        let status = desired_status(None, &observation(&outcome, Some("r1")));
        assert_eq!(status.revision.as_deref(), Some("r1"));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.matched_workloads, 2);
        assert_eq!(status.last_error, None);
        for type_ in ["Compiled", "TestsPassed", "Distributed", "Ready"] {
            assert_eq!(condition(&status, type_).0, "True", "{type_}");
            let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
            assert_eq!(c.observed_generation, Some(3));
        }
        // Reconciling the same facts again yields the same status: nothing to write.
        assert_eq!(
            desired_status(Some(&status), &observation(&outcome, Some("r1"))),
            status
        );
    }

    #[test]
    fn a_broken_module_keeps_the_previous_revision_and_says_where() {
        let good = accepted("r1");
        let before = desired_status(None, &observation(&good, Some("r1")));
        let broken = Err(Rejection::Compile(
            "authz.rego:7:3: unexpected token".into(),
        ));
        let after = desired_status(Some(&before), &observation(&broken, Some("r1")));
        assert_eq!(after.revision.as_deref(), Some("r1"));
        assert_eq!(condition(&after, "Compiled"), ("False", "CompileError"));
        assert_eq!(condition(&after, "TestsPassed"), ("Unknown", "NotCompiled"));
        assert_eq!(condition(&after, "Distributed"), ("True", "Distributed"));
        assert_eq!(
            condition(&after, "Ready"),
            ("False", "PreviousRevisionServing")
        );
        assert!(
            after
                .last_error
                .as_deref()
                .unwrap()
                .contains("authz.rego:7:3")
        );
        let ready = after
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert!(
            ready.message.contains("still serving revision r1"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn failing_tests_and_missing_modules_are_reported() {
        let failing = Err(Rejection::Tests("1 of 3 tests failed".into()));
        let status = desired_status(None, &observation(&failing, None));
        assert_eq!(condition(&status, "Compiled"), ("True", "Compiled"));
        assert_eq!(condition(&status, "TestsPassed"), ("False", "TestsFailed"));
        assert_eq!(condition(&status, "Ready"), ("False", "NoRevision"));
        assert_eq!(status.revision, None);

        let missing = Err(Rejection::ModuleNotFound(
            "ConfigMap \"rego\" not found".into(),
        ));
        let status = desired_status(None, &observation(&missing, None));
        assert_eq!(condition(&status, "Compiled"), ("False", "ModuleNotFound"));
    }

    #[test]
    fn a_configmap_write_failure_is_not_ready() {
        let outcome = accepted("r1");
        let mut seen = observation(&outcome, Some("r1"));
        seen.configmap_error = Some("forbidden");
        let status = desired_status(None, &seen);
        assert_eq!(
            condition(&status, "Distributed"),
            ("False", "ConfigMapWriteFailed")
        );
        assert_eq!(condition(&status, "Ready"), ("False", "DistributionFailed"));
    }

    #[test]
    fn istio_wiring_selects_by_labels_and_reports_what_it_cannot_express() {
        let wiring = IstioWiring {
            provider: "sluice-authz".into(),
            paths: vec![],
        };
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "shop")])),
            ..Default::default()
        };
        assert_eq!(
            istio_policy_spec(&selector, &wiring).unwrap(),
            json!({
                "action": "CUSTOM",
                "provider": {"name": "sluice-authz"},
                "rules": [{}],
                "selector": {"matchLabels": {"app": "shop"}},
            })
        );
        let narrowed = IstioWiring {
            paths: vec!["/api/*".into()],
            ..wiring.clone()
        };
        let spec = istio_policy_spec(&LabelSelector::default(), &narrowed).unwrap();
        assert_eq!(
            spec["rules"],
            json!([{"to": [{"operation": {"paths": ["/api/*"]}}]}])
        );
        assert!(
            spec.get("selector").is_none(),
            "an empty selector covers the namespace"
        );
        let expressions = LabelSelector {
            match_expressions: Some(vec![expr("tier", "In", &["web"])]),
            ..Default::default()
        };
        let err = istio_policy_spec(&expressions, &wiring).unwrap_err();
        assert!(err.contains("matchExpressions"), "{err}");
    }

    #[test]
    fn mesh_condition_follows_the_wiring() {
        let outcome = accepted("r1");
        let mut seen = observation(&outcome, Some("r1"));
        seen.mesh = Some(MeshWiring::Failed {
            reason: "IstioNotInstalled",
            message: "not served".into(),
        });
        let status = desired_status(None, &seen);
        assert_eq!(
            condition(&status, "MeshConfigured"),
            ("False", "IstioNotInstalled")
        );
        seen.mesh = Some(MeshWiring::Applied("applied".into()));
        let status = desired_status(Some(&status), &seen);
        assert_eq!(
            condition(&status, "MeshConfigured"),
            ("True", "IstioPolicyApplied")
        );
        seen.mesh = None;
        let status = desired_status(Some(&status), &seen);
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.type_ != "MeshConfigured")
        );
    }

    const GOOD: &str =
        "package envoy.authz\n\ndefault allow := false\n\nallow if input.method == \"GET\"\n";
    const GOOD_TEST: &str = "package envoy.authz\n\ntest_get if allow with input as {\"method\": \"GET\"}\n\ntest_post if not allow with input as {\"method\": \"POST\"}\n";

    fn module(path: &str, source: &str) -> Module {
        Module {
            path: path.into(),
            source: source.into(),
        }
    }

    #[test]
    fn build_compiles_tests_and_packages() {
        let modules = [
            module("authz.rego", GOOD),
            module("authz_test.rego", GOOD_TEST),
        ];
        let built =
            build(&modules, &json!({}), json!({}), Limits::default(), None).expect("accepted");
        assert_eq!(built.tests, 2);
        // Deterministic: the same inputs give the same revision.
        let again =
            build(&modules, &json!({}), json!({}), Limits::default(), None).expect("accepted");
        assert_eq!(built.revision, again.revision);
        assert_eq!(built.bytes, again.bytes);
        let other = build(
            &modules[..1],
            &json!({}),
            json!({}),
            Limits::default(),
            None,
        )
        .expect("accepted");
        assert_ne!(built.revision, other.revision);
    }

    #[test]
    fn served_bundles_are_signed_with_the_operator_key() {
        use crate::policy::bundle::LoadOptions;
        use crate::policy::signing::{SigningAlgorithm, VerificationKey};
        const PRIVATE: &str = include_str!("../../../rego/src/testdata/rsa_private.pem");
        const PUBLIC: &str = include_str!("../../../rego/src/testdata/rsa_public.pem");
        const OTHER: &str = include_str!("../../../rego/src/testdata/rsa_other_public.pem");
        let modules = [module("authz.rego", GOOD)];
        let key = SigningKey::from_pem(SigningAlgorithm::RS256, PRIVATE.as_bytes())
            .expect("key")
            .with_key_id("sluice");
        let signed = build(
            &modules,
            &json!({}),
            json!({}),
            Limits::default(),
            Some(&key),
        )
        .expect("accepted");
        let unsigned =
            build(&modules, &json!({}), json!({}), Limits::default(), None).expect("accepted");
        assert_eq!(
            signed.revision, unsigned.revision,
            "signing keeps the revision"
        );
        let verify = |pem: &str| LoadOptions {
            verification_key: Some(
                VerificationKey::from_pem(SigningAlgorithm::RS256, pem.as_bytes()).expect("key"),
            ),
            ..LoadOptions::default()
        };
        Bundle::from_tar_gz(&signed.bytes, &verify(PUBLIC)).expect("verifies with the public key");
        assert!(Bundle::from_tar_gz(&signed.bytes, &verify(OTHER)).is_err());
        assert!(Bundle::from_tar_gz(&unsigned.bytes, &verify(PUBLIC)).is_err());
    }

    /// `spec.data` holding `raw` bytes that gzip cannot shrink (a xorshift stream, base64-encoded).
    fn incompressible_data(raw: usize) -> serde_json::Value {
        use base64::Engine;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let bytes: Vec<u8> = (0..raw)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        json!({"blob": base64::engine::general_purpose::STANDARD.encode(bytes)})
    }

    /// The real size check of `build`: a bundle that fits in a ConfigMap is accepted, one that does not is
    /// refused with its size, and the status says the bundle was rejected.
    #[test]
    fn a_bundle_too_big_for_a_configmap_is_rejected() {
        let modules = [
            module("authz.rego", GOOD),
            module("authz_test.rego", GOOD_TEST),
        ];
        let fits = build(
            &modules,
            &incompressible_data(MAX_CONFIGMAP_BUNDLE_BYTES / 2),
            json!({}),
            Limits::default(),
            None,
        )
        .expect("half the limit is accepted");
        assert!(fits.bytes.len() <= MAX_CONFIGMAP_BUNDLE_BYTES);
        assert!(
            fits.bytes.len() > MAX_CONFIGMAP_BUNDLE_BYTES / 2,
            "the data did not stay incompressible: {} bytes",
            fits.bytes.len()
        );

        let too_big = build(
            &modules,
            &incompressible_data(MAX_CONFIGMAP_BUNDLE_BYTES + MAX_CONFIGMAP_BUNDLE_BYTES / 10),
            json!({}),
            Limits::default(),
            None,
        );
        let message = match &too_big {
            Err(Rejection::Bundle(message)) => message.clone(),
            other => panic!(
                "expected the bundle to be rejected, got {:?}",
                other.as_ref().map(|a| a.bytes.len())
            ),
        };
        let size: usize = message
            .strip_prefix("the bundle is ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no size in {message:?}"));
        assert!(size > MAX_CONFIGMAP_BUNDLE_BYTES, "{message}");
        assert!(message.contains("a ConfigMap can hold"), "{message}");

        let status = desired_status(None, &observation(&too_big, None));
        assert_eq!(
            condition(&status, "Distributed"),
            ("False", "BundleRejected")
        );
        assert_eq!(status.revision, None);
    }

    #[test]
    fn build_rejects_compile_errors_with_position_and_failing_tests_by_name() {
        let broken = [module("authz.rego", "package envoy.authz\n\nallow if {\n")];
        match build(&broken, &json!({}), json!({}), Limits::default(), None) {
            Err(Rejection::Compile(message)) => {
                assert!(message.contains("authz.rego:"), "{message}")
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
        let failing_test = "package envoy.authz\n\ntest_post_allowed if allow with input as {\"method\": \"POST\"}\n";
        let modules = [
            module("authz.rego", GOOD),
            module("authz_test.rego", failing_test),
        ];
        match build(&modules, &json!({}), json!({}), Limits::default(), None) {
            Err(Rejection::Tests(message)) => {
                assert!(message.contains("test_post_allowed"), "{message}");
                assert!(message.contains("authz_test.rego"), "{message}");
            }
            other => panic!("expected failing tests, got {other:?}"),
        }
    }
}
