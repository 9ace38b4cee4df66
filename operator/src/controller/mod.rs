//! `sluice operator`: the kube-runtime controller around the planner. It observes the workloads, runs the
//! metric checks the planner asks for, and converges workloads, Services and the route to the plan — writing
//! only what differs, with one field manager.

pub mod authz;
pub mod cache;
pub mod gate;
pub mod outbox;
pub mod webhook;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use thiserror::Error;

use crate::api::{
    AlertProvider, AlertProviderType, AlertSeverity, FIELD_MANAGER, MetricVerdict, Rollout,
    RolloutAlert, RolloutStatus, TargetKind, Verdict, WebhookType,
};

use crate::metrics::{MetricServer, Prometheus, QueryContext};
use crate::notify::{Deliverer, Notification, Severity, Sink};
use crate::rollout::{
    Checks, Desired, Gate, NextMove, Observed, PlanInput, Reason, checks_due, hooks_due, next_move,
    plan, set_condition,
};
use crate::telemetry::Telemetry;
use crate::traffic::{CanaryRoutes, RouteTarget, Router, Split, Waypoint, router_for_mode};
use workload::Names;

/// Finalizer that lets Sluice hand traffic back to the user's workload before a Rollout goes away.
pub const FINALIZER: &str = "sluice.dev/rollout";
/// Annotation that continues a Rollout paused without a duration or skips the current stage's analysis
/// (`true`), or promotes the canary right away (`full`). Used once.
pub const PROMOTE_ANNOTATION: &str = "sluice.dev/promote";
/// Annotation that stops a release and rolls it back (`true`). Used once.
pub const ABORT_ANNOTATION: &str = "sluice.dev/abort";
/// Annotation that releases a failed revision again (`true`). Used once.
pub const RETRY_ANNOTATION: &str = "sluice.dev/retry";
/// Annotation that holds a release where it is while set to `true`.
pub const PAUSED_ANNOTATION: &str = "sluice.dev/paused";

/// The manual control a Rollout's annotations ask for: (promote one step, one-shot command, paused).
pub fn manual_control(
    annotations: &std::collections::BTreeMap<String, String>,
) -> (bool, Option<crate::rollout::Command>, bool) {
    use crate::rollout::Command;
    let set = |key: &str| annotations.get(key).is_some_and(|v| v != "false");
    let promote = annotations.get(PROMOTE_ANNOTATION).map(String::as_str);
    // The safest command wins when several are set.
    let command = if set(ABORT_ANNOTATION) {
        Some(Command::Abort)
    } else if promote == Some("full") {
        Some(Command::PromoteFull)
    } else if set(RETRY_ANNOTATION) {
        Some(Command::Retry)
    } else {
        None
    };
    let promote_step = command.is_none() && promote.is_some_and(|v| v != "false" && v != "full");
    let paused = annotations.get(PAUSED_ANNOTATION).map(String::as_str) == Some("true");
    (promote_step, command, paused)
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("Rollout {0} has no namespace")]
    NoNamespace(String),
    /// The mesh's route CRD is not installed; the message says which and what to install.
    #[error("{0}")]
    RouteApiMissing(String),
    /// An Istio ambient Rollout's waypoint does not exist; the message says which and how to create it.
    #[error("{0}")]
    WaypointMissing(String),
}

/// The condition that says whether the mesh's route resource can be written.
const MESH_READY: &str = "MeshReady";

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    /// What reconciles read instead of the API server.
    pub caches: Arc<cache::Caches>,
    pub prometheus: Prometheus,
    pub recorder: Recorder,
    pub telemetry: Arc<Telemetry>,
    pub deliverer: Deliverer,
    /// Client for `analysis.webhooks`: no alert proxy (hooks usually live in the cluster), each call bounded
    /// by the hook's own timeout.
    pub webhooks: reqwest::Client,
    /// Alert used by Rollouts that configure none (`--default-alert-provider`).
    pub default_alert: Option<RolloutAlert>,
    /// MetricTemplates may use the operator's own cloud identity (`--metric-templates-use-operator-identity`).
    templates_use_operator_identity: bool,
    /// Clients for `MetricTemplate` servers, by template uid and template and Secret resourceVersions.
    template_servers: std::sync::Mutex<std::collections::HashMap<String, MetricServer>>,
    /// Consecutive failed reconciles per Rollout, for exponential backoff.
    failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<Rollout>, u32>>,
    /// The last `confirm-rollout` refusal per Rollout: (when, revision, hook and why). Reused for one interval,
    /// so a waiting revision asks once per interval, not at every reconcile.
    refusals: std::sync::Mutex<std::collections::HashMap<ObjectRef<Rollout>, Refusal>>,
}

type Refusal = (Instant, Option<String>, (String, String));

impl Context {
    fn recent_refusal(
        &self,
        rollout: &Rollout,
        revision: &Option<String>,
    ) -> Option<(String, String)> {
        let interval = rollout
            .spec
            .analysis
            .interval
            .to_std()
            .unwrap_or(Duration::from_secs(60));
        let refusals = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        refusals
            .get(&ObjectRef::from_obj(rollout))
            .filter(|(at, asked_for, _)| asked_for == revision && at.elapsed() < interval)
            .map(|(_, _, refusal)| refusal.clone())
    }

    fn remember_refusal(
        &self,
        rollout: &Rollout,
        revision: &Option<String>,
        refusal: Option<&(String, String)>,
    ) {
        let mut refusals = self
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = ObjectRef::from_obj(rollout);
        match refusal {
            Some(refusal) => {
                refusals.insert(key, (Instant::now(), revision.clone(), refusal.clone()));
            }
            None => {
                refusals.remove(&key);
            }
        }
    }
}

/// The Rollout controller's name in `/readyz`.
pub const READY_COMPONENT: &str = "rollouts";

/// A controller of `api`'s objects, exactly what `Controller::new` builds (a reflector feeding the applied
/// objects), except that the watch's first complete list marks `component` ready in `/readyz`.
/// (`Store::wait_until_ready` cannot be awaited beside the controller: its one-shot wakes one waiter only.)
pub fn watched_controller<K>(
    api: Api<K>,
    telemetry: Arc<Telemetry>,
    component: &'static str,
) -> Controller<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Unpin,
{
    let (reader, writer) = kube::runtime::reflector::store();
    let stream =
        kube::runtime::reflector(writer, watcher::watcher(api, watcher::Config::default()))
            .inspect(move |event| {
                if matches!(event, Ok(watcher::Event::InitDone)) {
                    telemetry.set_ready(component);
                }
            })
            .applied_objects();
    Controller::for_stream(stream, reader)
}

/// Runs the Rollout controller until the watch streams end.
pub async fn run(
    client: Client,
    prometheus: Prometheus,
    telemetry: Arc<Telemetry>,
    deliverer: Deliverer,
    default_alert: Option<RolloutAlert>,
    templates_use_operator_identity: bool,
) {
    let rollouts: Api<Rollout> = Api::all(client.clone());
    let reporter = Reporter {
        controller: "sluice".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let (caches, woken) = cache::Caches::start(client.clone());
    let context = Arc::new(Context {
        client: client.clone(),
        caches: caches.clone(),
        prometheus,
        recorder: Recorder::new(client, reporter),
        telemetry: telemetry.clone(),
        deliverer,
        webhooks: webhook::client(),
        default_alert,
        failures: Default::default(),
        refusals: Default::default(),
        templates_use_operator_identity,
        template_servers: Default::default(),
    });
    // The Rollouts' own watch feeds the controller, and the index that maps a changed workload, Service,
    // route or Namespace (the caches' watches) to the Rollouts it wakes.
    let (reader, writer) = kube::runtime::reflector::store();
    let ready = telemetry.clone();
    let stream = watcher::watcher(rollouts, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|r: &mut Rollout| cache::slim_meta(&mut r.metadata))
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                caches.index_rollout_event(event);
                if matches!(event, watcher::Event::InitDone) {
                    ready.set_ready(READY_COMPONENT);
                }
            }
        })
        .applied_objects();
    Controller::for_stream(stream, reader)
        // A change of anything a Rollout reads wakes it; nothing else does (see `rollout::plan`'s requeue).
        .reconcile_on(woken)
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile round failed");
            }
        })
        .await;
}

/// The Api of the Rollout's target kind, and the target and primary as the API server has them: for cleanup
/// and for writes that copy the target's template (which the cache does not keep).
async fn workloads(
    rollout: &Rollout,
    names: &Names,
    ctx: &Context,
) -> Result<(Api<DynamicObject>, Option<Value>, Option<Value>), Error> {
    let api = workload_api(rollout, names, ctx);
    let as_json = |o: Option<DynamicObject>| o.and_then(|o| serde_json::to_value(o).ok());
    let target = as_json(api.get_opt(&names.target).await?);
    let primary = as_json(api.get_opt(&names.primary).await?);
    Ok((api, target, primary))
}

fn workload_api(rollout: &Rollout, names: &Names, ctx: &Context) -> Api<DynamicObject> {
    let resource = workload::api_resource(rollout.spec.target_ref.kind);
    Api::namespaced_with(ctx.client.clone(), &names.namespace, &resource)
}

/// The target and primary from the watch cache (slimmed: no pod template, see [`cache::slim_workload`]).
fn cached_workloads(
    rollout: &Rollout,
    names: &Names,
    ctx: &Context,
) -> (Option<Value>, Option<Value>) {
    let kind = rollout.spec.target_ref.kind;
    (
        ctx.caches.workload(kind, &names.namespace, &names.target),
        ctx.caches.workload(kind, &names.namespace, &names.primary),
    )
}

/// Backoff after the n-th consecutive failure: 1s, 2s, 4s … capped at 60s.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// A write refused because the Rollout changed since it was read (the cache lagged): not a failure.
/// Besides 409 Conflict, that is the finalizer helper's JSON-patch `test` failing (422) on a cached copy
/// that does not show the finalizer yet, or its removal finding the Rollout already gone (404): seen on a
/// real API server whenever the target's controller triggers a reconcile before the watch catches up.
fn is_conflict(err: &Error) -> bool {
    let code = |e: &kube::Error| match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    };
    let api_conflict = |e: &kube::Error| code(e) == Some(409);
    use kube::runtime::finalizer::Error as Finalizer;
    match err {
        Error::Kube(e) => api_conflict(e),
        Error::Finalizer(boxed) => match boxed.as_ref() {
            Finalizer::ApplyFailed(Error::Kube(e)) | Finalizer::CleanupFailed(Error::Kube(e)) => {
                api_conflict(e)
            }
            Finalizer::AddFinalizer(e) => matches!(code(e), Some(409 | 422)),
            Finalizer::RemoveFinalizer(e) => matches!(code(e), Some(404 | 409 | 422)),
            _ => false,
        },
        _ => false,
    }
}

fn error_policy(rollout: Arc<Rollout>, err: &Error, ctx: Arc<Context>) -> Action {
    if is_conflict(err) {
        tracing::debug!(rollout = %rollout.name_any(), "the Rollout changed while it was reconciled; replanning");
        return Action::requeue(Duration::from_millis(200));
    }
    ctx.telemetry.reconcile_failed();
    let failures = {
        let mut failures = ctx
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = failures.entry(ObjectRef::from_obj(&*rollout)).or_insert(0);
        *count += 1;
        *count
    };
    let retry = backoff(failures);
    tracing::warn!(rollout = %rollout.name_any(), namespace = ?rollout.namespace(), error = %err, failures, retry_secs = retry.as_secs(), "reconcile failed; retrying");
    // The rollout stays frozen where it is; the planner applies the progress deadline once we are back.
    Action::requeue(retry)
}

async fn reconcile(rollout: Arc<Rollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = rollout
        .namespace()
        .ok_or_else(|| Error::NoNamespace(rollout.name_any()))?;
    let api: Api<Rollout> = Api::namespaced(ctx.client.clone(), &namespace);
    let reference = ObjectRef::from_obj(&*rollout);
    let result = finalizer(&api, FINALIZER, rollout, |event| async {
        match event {
            Finalizer::Apply(rollout) => apply(&rollout, &ctx).await,
            Finalizer::Cleanup(rollout) => cleanup(&rollout, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.telemetry.reconcile_took(started.elapsed());
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&reference);
    }
    result
}

/// How long a reconcile waits for the caches' first lists.
const CACHE_WAIT: Duration = Duration::from_millis(500);
/// When a Rollout whose cached copy lags behind Sluice's own write is looked at again, should its watch event
/// not come first.
const STALE_RECHECK: Duration = Duration::from_secs(5);

fn owner(rollout: &Rollout) -> Option<OwnerReference> {
    rollout.controller_owner_ref(&())
}

fn patch_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Merge patches (scale, one-shot annotations, Consul's sync mark) under the same field manager as the
/// applies, so every field Sluice writes is owned by `sluice` in managedFields.
fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Observes, plans, converges. Writes nothing when nothing changed.
async fn apply(cached: &Rollout, ctx: &Context) -> Result<Action, Error> {
    if !ctx.caches.synced() {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    // A cached copy that lags behind Sluice's own last write would plan from the past (and act on it: routes,
    // scaling, webhooks) before the write's precondition caught it. The watch delivers that write soon and
    // wakes the Rollout again; the requeue is only a safety net.
    if ctx.caches.is_stale(cached) {
        return Ok(Action::requeue(STALE_RECHECK));
    }
    let rollout = cached;
    let names = Names::of(rollout);
    let workload_api = workload_api(rollout, &names, ctx);
    let (target, primary) = cached_workloads(rollout, &names, ctx);
    let status = rollout.status.clone().unwrap_or_default();
    let kind = rollout.spec.target_ref.kind.name();

    if let Some(target) = &target
        && workload::selector_labels(target).is_empty()
    {
        return invalid_spec(
                rollout,
                ctx,
                &status,
                format!("{kind} {} has no spec.selector.matchLabels; Sluice needs them to tell primary and canary pods apart", names.target),
            )
            .await;
    }

    let waypoint = match waypoint(rollout, &names, ctx).await {
        Err(missing @ Error::WaypointMissing(_)) => {
            return mesh_missing(rollout, ctx, &status, missing).await;
        }
        found => found?,
    };
    let router = router_for_mode(rollout.spec.provider, waypoint.is_some());
    if ctx.caches.route_starting(&router.api_resource()) {
        return Ok(Action::requeue(CACHE_WAIT));
    }
    if let Some(owner) = owner(rollout)
        && let Some(why) = router.unsupported(&route_target(rollout, &names, owner))
    {
        return invalid_spec(
            rollout,
            ctx,
            &status,
            format!(
                "provider {}: {why}",
                serde_json::to_value(rollout.spec.provider)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        )
        .await;
    }

    if let Some(why) = crate::traffic::invalid_matches(&rollout.spec.analysis.match_) {
        return invalid_spec(rollout, ctx, &status, why).await;
    }

    let (promote_requested, command, paused_by_user) = manual_control(rollout.annotations());
    let mut observed = Observed {
        target_revision: target.as_ref().and_then(workload::revision_of),
        primary_revision: primary.as_ref().and_then(workload::primary_revision),
        canary_ready: target.as_ref().is_some_and(workload::is_ready),
        primary_ready: primary.as_ref().is_some_and(workload::is_ready),
        promote_requested,
        command,
        paused_by_user,
        gate: None,
        hooks: Default::default(),
    };
    let http = &ctx.webhooks;
    // An abort acts at once: no hook is waited for.
    let due = if observed.command == Some(crate::rollout::Command::Abort) {
        Default::default()
    } else {
        hooks_due(&rollout.spec, &status, &observed)
    };
    if due.confirm_rollout {
        let revision = &observed.target_revision;
        observed.hooks.rollout_unconfirmed = match ctx.recent_refusal(rollout, revision) {
            Some(refusal) => Some(refusal),
            None => {
                // The hook is asked about the revision that would start, as Flagger does.
                let upcoming = RolloutStatus {
                    revision: revision.clone(),
                    ..status.clone()
                };
                let answer =
                    webhook::first_refusal(http, rollout, &upcoming, WebhookType::ConfirmRollout)
                        .await;
                ctx.remember_refusal(rollout, revision, answer.as_ref());
                answer
            }
        };
    }
    if due.pre_rollout {
        observed.hooks.pre_rollout_failed =
            webhook::first_refusal(http, rollout, &status, WebhookType::PreRollout).await;
    }
    let now = jiff::Timestamp::now();
    // A step is judged only once the mesh applies its split: until Consul reports the splitter Synced,
    // metrics would describe the previous split.
    let checks_are_due = checks_due(&rollout.spec, &status, &observed, now);
    let synced = if checks_are_due {
        match route_synced(rollout, &names, ctx, router.as_ref()).await {
            Err(missing @ Error::RouteApiMissing(_)) => {
                return mesh_missing(rollout, ctx, &status, missing).await;
            }
            synced => synced?,
        }
    } else {
        false
    };
    let checks = if checks_are_due && synced {
        run_checks(rollout, &names, ctx, waypoint.is_some()).await
    } else {
        Checks::NotRun
    };
    if let Checks::Ran(verdicts) = &checks {
        verdicts.iter().for_each(|v| ctx.telemetry.check(v.verdict));
        observed.hooks.rollout_failed =
            webhook::failures(http, rollout, &status, WebhookType::Rollout).await;
        observed.hooks.rollback_requested =
            webhook::rollback_requested(http, rollout, &status).await;
        // The gates are asked only when the checks would let the release move on.
        if verdicts
            .iter()
            .filter(|v| !v.dry_run)
            .all(|v| v.verdict == Verdict::Pass)
            && observed.hooks.rollout_failed.is_empty()
        {
            observed.gate = ask_gates(rollout, &status, verdicts, ctx).await;
        }
    }
    let generation = rollout.metadata.generation.unwrap_or(0);
    let plan = plan(PlanInput {
        spec: &rollout.spec,
        status: &status,
        generation,
        observed: &observed,
        checks: &checks,
        now,
    });

    let mut next_status = plan.status.clone();
    if let (Some(desired), Some(target)) = (plan.desired, &target) {
        let converged = converge(
            rollout,
            &names,
            ctx,
            router.as_ref(),
            desired,
            (&workload_api, target, primary.as_ref()),
        )
        .await;
        if let Err(missing @ Error::RouteApiMissing(_)) = converged {
            return mesh_missing(rollout, ctx, &status, missing).await;
        }
        converged?;
        let unready = next_status
            .conditions
            .iter()
            .find(|c| c.type_ == MESH_READY && c.status != "True")
            .map(|c| c.message.clone());
        if let Some(what_was_missing) = unready {
            // The status message said what was missing; it no longer holds.
            if next_status.message.as_deref() == Some(what_was_missing.as_str()) {
                next_status.message = None;
            }
            set_condition(
                &mut next_status.conditions,
                MESH_READY,
                true,
                "RouteApplied",
                "the mesh's route resource is served and Sluice's route is applied",
                generation,
                now,
            );
        }
    }
    // Transitions enter the outbox in the same status write as the transition itself, so a restart between
    // here and a successful delivery still delivers.
    let alerts = alerts_of(rollout, ctx);
    let key = format!("{}/{}", names.namespace, rollout.name_any());
    for dropped in outbox::enqueue(&mut next_status, &alerts, &key, &plan.transitions, now) {
        tracing::warn!(rollout = %rollout.name_any(), id = %dropped, "outbox full: dropped the oldest undelivered notification");
    }
    // Status writes carry the resourceVersion they were planned from: a plan made from a stale cache is refused
    // (409) and replanned, instead of overwriting newer status, outbox included.
    let mut version = rollout.resource_version();
    if next_status != status {
        version = write_status(rollout, ctx, &next_status, version).await?;
    }
    if let Some(delivered) =
        deliver_outbox(rollout, ctx, &alerts, &next_status, jiff::Timestamp::now()).await
    {
        (next_status, version) =
            record_delivery(rollout, ctx, &next_status, delivered, version).await?;
    }
    // One-shot commands are used once: a promote must not also skip the next pause or stage.
    if plan.command_used {
        let api: Api<Rollout> = Api::namespaced(ctx.client.clone(), &names.namespace);
        let patch = json!({"metadata": {"annotations": {
            PROMOTE_ANNOTATION: null,
            ABORT_ANNOTATION: null,
            RETRY_ANNOTATION: null,
        }}});
        api.patch(&rollout.name_any(), &merge_params(), &Patch::Merge(patch))
            .await?;
        ctx.caches.wrote_over(rollout, version);
    }
    webhook::notify(http, rollout, &next_status, &plan.transitions);
    for transition in &plan.transitions {
        ctx.telemetry.transition(transition.reason.as_str());
        let event = Event {
            type_: if transition.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: transition.reason.as_str().into(),
            note: Some(transition.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &rollout.object_ref(&())).await {
            tracing::warn!(error = %err, reason = %transition.reason, "could not publish an Event");
        }
        tracing::info!(rollout = %rollout.name_any(), namespace = %names.namespace, reason = %transition.reason, message = %transition.message, "transition");
    }
    ctx.telemetry
        .observe_rollout(&names.namespace, &rollout.name_any(), &next_status);
    let requeue = outbox::next_due(&next_status, jiff::Timestamp::now())
        .map_or(plan.requeue_after, |due| {
            due.max(Duration::from_millis(200)).min(plan.requeue_after)
        });
    Ok(Action::requeue(requeue))
}

/// The Rego gates, then the confirm webhook for the next move (`confirm-traffic-increase` before a weight
/// increase, `confirm-promotion` before the promotion). `None` when the Rollout has neither.
async fn ask_gates(
    rollout: &Rollout,
    status: &RolloutStatus,
    verdicts: &[MetricVerdict],
    ctx: &Context,
) -> Option<Gate> {
    let confirm = match next_move(&rollout.spec, status) {
        NextMove::Promotion => Some(WebhookType::ConfirmPromotion),
        NextMove::Stage {
            raises_weight: true,
        } => Some(WebhookType::ConfirmTrafficIncrease),
        NextMove::Stage { .. } => None,
    }
    .filter(|&t| webhook::of_type(rollout, t).next().is_some());
    if rollout.spec.analysis.policies.is_empty() && confirm.is_none() {
        return None;
    }
    let mut allowed = match rollout.spec.analysis.policies.is_empty() {
        true => Vec::new(),
        false => match gate::ask_gates(&ctx.client, rollout, verdicts).await {
            Gate::Allowed(names) => names,
            denied => return Some(denied),
        },
    };
    if let Some(type_) = confirm {
        if let Some((hook, why)) =
            webhook::first_refusal(&ctx.webhooks, rollout, status, type_).await
        {
            return Some(Gate::Denied {
                by: format!("webhook {hook}"),
                reasons: vec![why],
                rollback: false,
            });
        }
        allowed.extend(webhook::of_type(rollout, type_).map(|h| format!("webhook {}", h.name)));
    }
    Some(Gate::Allowed(allowed))
}

fn alerts_of(rollout: &Rollout, ctx: &Context) -> Vec<RolloutAlert> {
    if rollout.spec.analysis.alerts.is_empty() {
        ctx.default_alert.iter().cloned().collect()
    } else {
        rollout.spec.analysis.alerts.clone()
    }
}

/// Resolves an alert's provider (and its Secret) into a sink.
async fn sink_for(
    alert: &RolloutAlert,
    namespace: &str,
    ctx: &Context,
) -> Result<(Sink, AlertProviderType), String> {
    let provider_ns = alert
        .provider_ref
        .namespace
        .clone()
        .unwrap_or_else(|| namespace.to_owned());
    let providers: Api<AlertProvider> = Api::namespaced(ctx.client.clone(), &provider_ns);
    let provider = providers
        .get_opt(&alert.provider_ref.name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "AlertProvider {provider_ns}/{} not found",
                alert.provider_ref.name
            )
        })?;
    let mut address = provider.spec.address.clone();
    let mut hmac_key = None;
    if let Some(secret_ref) = &provider.spec.secret_ref {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &provider_ns);
        let secret = secrets
            .get_opt(&secret_ref.name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "Secret {provider_ns}/{} of AlertProvider {} not found",
                    secret_ref.name, alert.provider_ref.name
                )
            })?;
        let data = secret.data.unwrap_or_default();
        if let Some(value) = data.get("address") {
            address = Some(String::from_utf8_lossy(&value.0).into_owned());
        }
        hmac_key = data.get("hmacKey").map(|v| v.0.clone());
    }
    let address = address.ok_or_else(|| {
        format!(
            "AlertProvider {provider_ns}/{} has no address",
            alert.provider_ref.name
        )
    })?;
    let spec = &provider.spec;
    let sink = match spec.type_ {
        AlertProviderType::Slack => Sink::Slack {
            address,
            channel: spec.channel.clone(),
            username: spec.username.clone(),
        },
        AlertProviderType::Msteams => Sink::MsTeams { address },
        AlertProviderType::Discord => Sink::Discord {
            address,
            username: spec.username.clone(),
        },
        AlertProviderType::Googlechat => Sink::GoogleChat { address },
        AlertProviderType::Webhook => Sink::Webhook { address, hmac_key },
        AlertProviderType::Alertmanager => Sink::Alertmanager { address },
    };
    Ok((sink, spec.type_))
}

/// Delivers what is due in the outbox; returns the updated status when anything changed.
async fn deliver_outbox(
    rollout: &Rollout,
    ctx: &Context,
    alerts: &[RolloutAlert],
    status: &RolloutStatus,
    now: jiff::Timestamp,
) -> Option<RolloutStatus> {
    let namespace = rollout.namespace().unwrap_or_default();
    let mut next = status.clone();
    for entry in next
        .notifications
        .iter_mut()
        .filter(|e| outbox::due(e, now))
    {
        for alert_name in entry.pending.clone() {
            // An alert removed from the spec no longer wants anything.
            let Some(alert) = alerts.iter().find(|a| a.name == alert_name) else {
                outbox::record(entry, &alert_name, Ok(()), now);
                continue;
            };
            let outcome = match sink_for(alert, &namespace, ctx).await {
                Err(why) => Err(why),
                // Alertmanager receives rollbacks (firing) and their resolution; chat sinks everything else.
                Ok((_, AlertProviderType::Alertmanager))
                    if entry.reason != Reason::RolledBack.as_str() && !entry.resolves =>
                {
                    Ok(())
                }
                Ok((_, kind)) if entry.resolves && kind != AlertProviderType::Alertmanager => {
                    Ok(())
                }
                Ok((sink, _)) => {
                    let notification = Notification {
                        id: entry.id.clone(),
                        namespace: namespace.clone(),
                        rollout: rollout.name_any(),
                        reason: entry.reason.clone(),
                        severity: match entry.severity {
                            AlertSeverity::Info => Severity::Info,
                            AlertSeverity::Warn => Severity::Warn,
                            AlertSeverity::Error => Severity::Error,
                        },
                        message: entry.message.clone(),
                        revision: entry.revision.clone(),
                        at: entry.at.clone(),
                        resolves: entry.resolves,
                    };
                    ctx.deliverer
                        .deliver(&sink, &notification)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            match &outcome {
                Ok(()) => {
                    tracing::info!(rollout = %rollout.name_any(), alert = %alert_name, id = %entry.id, "notification delivered")
                }
                Err(error) => {
                    tracing::warn!(rollout = %rollout.name_any(), alert = %alert_name, id = %entry.id, %error, "notification not delivered; will retry")
                }
            }
            outbox::record(entry, &alert_name, outcome, now);
        }
    }
    next.notifications.retain(|e| !e.pending.is_empty());
    (next != *status).then_some(next)
}

/// Runs every metric of the analysis; any provider error freezes the rollout.
async fn run_checks(rollout: &Rollout, names: &Names, ctx: &Context, waypoint: bool) -> Checks {
    let clock = jiff::Timestamp::now();
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(clock);
    // Windows start no earlier than the stage: only the revision on trial, at this weight, is judged.
    let stage_age = rollout
        .status
        .as_ref()
        .and_then(|status| crate::rollout::stage_age(status, clock));
    let mut verdicts = Vec::new();
    // An error is not a verdict and freezes the release, except on a dry-run metric, which never decides
    // anything: there it is no data, and the error goes to the log.
    let unmeasured = |metric: &crate::api::Metric, why: String| {
        tracing::warn!(rollout = %rollout.name_any(), metric = %metric.name, error = %why, "dry-run metric not measured");
        MetricVerdict {
            name: metric.name.clone(),
            verdict: Verdict::NoData,
            value: None,
            checked_at: now.clone(),
            dry_run: true,
            primary_value: None,
        }
    };
    for written in &rollout.spec.analysis.metrics {
        // A templated metric runs the template's query on the template's server; its errors name the template.
        let (metric, server, source) = match &written.template_ref {
            None => (
                std::borrow::Cow::Borrowed(written),
                MetricServer::Prometheus(ctx.prometheus.clone()),
                None,
            ),
            Some(template) => match metric_template(&names.namespace, written, template, ctx).await
            {
                Ok((query, server, which)) => {
                    let mut metric = written.clone();
                    metric.query = Some(query);
                    (std::borrow::Cow::Owned(metric), server, Some(which))
                }
                Err(why) if written.dry_run => {
                    verdicts.push(unmeasured(written, why));
                    continue;
                }
                Err(why) => return Checks::Unavailable(why),
            },
        };
        let metric = metric.as_ref();
        let window = metric
            .interval
            .as_ref()
            .unwrap_or(&rollout.spec.analysis.interval);
        let query_ctx = QueryContext {
            namespace: names.namespace.clone(),
            target: names.target.clone(),
            service: names.service.clone(),
            interval: window.0.clone(),
            variables: metric.template_variables.clone(),
            statefulset: rollout.spec.target_ref.kind == TargetKind::StatefulSet,
            stage_age,
            waypoint,
        };
        match server
            .observe(rollout.spec.provider, metric, &query_ctx)
            .await
        {
            Ok(observation) => verdicts.push(MetricVerdict {
                name: metric.name.clone(),
                verdict: observation.verdict,
                value: observation.value.filter(|v| v.is_finite()),
                checked_at: now.clone(),
                dry_run: metric.dry_run,
                primary_value: observation.primary_value.filter(|v| v.is_finite()),
            }),
            Err(err) => {
                let why = match &source {
                    Some(which) => format!("{which}: {err}"),
                    None => err.to_string(),
                };
                if metric.dry_run {
                    verdicts.push(unmeasured(metric, why));
                    continue;
                }
                return Checks::Unavailable(why);
            }
        }
    }
    tracing::debug!(rollout = %rollout.name_any(), passed = verdicts.iter().filter(|v| v.verdict == Verdict::Pass).count(), total = verdicts.len(), "checks ran");
    Checks::Ran(verdicts)
}

/// The query of a metric's `MetricTemplate` and a client for its server, with the credentials of its Secret.
/// Clients are kept per template and Secret version, so a check does not set up TLS again. The error says
/// what to fix; it freezes the release like any metrics error.
async fn metric_template(
    namespace: &str,
    metric: &crate::api::Metric,
    template: &crate::api::TemplateRef,
    ctx: &Context,
) -> Result<(String, MetricServer, String), String> {
    let template_ns = template.namespace.as_deref().unwrap_or(namespace);
    let which = format!(
        "MetricTemplate {template_ns}/{} (templateRef of metric {:?})",
        template.name, metric.name
    );
    let templates: Api<crate::api::MetricTemplate> =
        Api::namespaced(ctx.client.clone(), template_ns);
    let found = templates
        .get_opt(&template.name)
        .await
        .map_err(|e| format!("cannot read {which}: {e}"))?
        .ok_or_else(|| format!("{which} not found: create it, or fix the templateRef"))?;
    let provider = &found.spec.provider;
    let secret = match &provider.secret_ref {
        None => None,
        Some(secret_ref) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), template_ns);
            let secret = secrets
                .get_opt(&secret_ref.name)
                .await
                .map_err(|e| {
                    format!(
                        "cannot read Secret {template_ns}/{} of {which}: {e}",
                        secret_ref.name
                    )
                })?
                .ok_or_else(|| {
                    format!(
                        "Secret {template_ns}/{} of {which} not found",
                        secret_ref.name
                    )
                })?;
            // A ServiceAccount token is the operator's key to someone's API access, not a metrics credential:
            // never send one to a template's address.
            if secret.type_.as_deref() == Some("kubernetes.io/service-account-token") {
                return Err(format!(
                    "Secret {template_ns}/{} of {which} is a ServiceAccount token, which Sluice does not send to \
                     metrics servers: put the metrics server's own credentials in an Opaque Secret",
                    secret_ref.name
                ));
            }
            Some(secret)
        }
    };
    let key = format!(
        "{}@{}/{}",
        found.metadata.uid.as_deref().unwrap_or_default(),
        found
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default(),
        secret
            .as_ref()
            .and_then(|s| s.metadata.resource_version.as_deref())
            .unwrap_or_default()
    );
    let query = found.spec.query.clone();
    if let Some(server) = ctx
        .template_servers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
    {
        return Ok((query, server.clone(), which));
    }
    let data: Option<std::collections::BTreeMap<String, Vec<u8>>> = secret.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    });
    let server = match provider.type_ {
        crate::api::MetricProviderType::Prometheus => {
            let access = crate::metrics::ServerAccess::of(provider, data.as_ref())
                .map_err(|why| format!("{which}: {why}"))?;
            let address = provider
                .address
                .clone()
                .unwrap_or_else(|| ctx.prometheus.url().to_owned());
            MetricServer::Prometheus(
                Prometheus::with_access(&address, ctx.prometheus.timeout(), &access)
                    .map_err(|e| format!("{which}: {e}"))?,
            )
        }
        crate::api::MetricProviderType::Graphite => {
            let access = crate::metrics::ServerAccess::of(provider, data.as_ref())
                .map_err(|why| format!("{which}: {why}"))?;
            // The CRD requires an address for graphite; an object stored before that rule still gets a message.
            let address = provider.address.as_deref().ok_or_else(|| {
                format!("{which}: a graphite provider needs an address (the graphite-web base URL)")
            })?;
            MetricServer::Graphite(
                crate::metrics::Graphite::new(address, ctx.prometheus.timeout(), &access)
                    .map_err(|e| format!("{which}: {e}"))?,
            )
        }
        crate::api::MetricProviderType::Influxdb => {
            let access = crate::metrics::ServerAccess::of(provider, data.as_ref())
                .map_err(|why| format!("{which}: {why}"))?;
            let address = provider.address.as_deref().ok_or_else(|| {
                format!("{which}: an influxdb provider needs an address (the InfluxDB base URL)")
            })?;
            let org = data
                .as_ref()
                .and_then(|d| d.get("org"))
                .map(|v| {
                    String::from_utf8(v.clone())
                        .map(|org| org.trim_end_matches(['\r', '\n']).to_owned())
                        .map_err(|_| format!("{which}: key org of the Secret is not UTF-8 text"))
                })
                .transpose()?;
            MetricServer::InfluxDb(
                crate::metrics::InfluxDb::new(
                    address,
                    ctx.prometheus.timeout(),
                    &access,
                    org,
                    provider.database.clone(),
                )
                .map_err(|e| format!("{which}: {e}"))?,
            )
        }
        crate::api::MetricProviderType::Azuremonitor => {
            let address = provider.address.as_deref().ok_or_else(|| {
                format!("{which}: an azuremonitor provider needs the workspace's query endpoint as address")
            })?;
            if provider.insecure_skip_verify {
                return Err(format!(
                    "{which}: an azuremonitor provider does not take insecureSkipVerify: it sends an Entra ID \
                     token, which must only reach Azure Monitor"
                ));
            }
            let cloud =
                crate::metrics::azure_cloud(address).map_err(|e| format!("{which}: {e}"))?;
            let credential = crate::metrics::EntraCredential::resolve(
                |key| secret_text(data.as_ref(), key),
                |name| std::env::var(name).ok().filter(|v| !v.is_empty()),
                cloud,
            )
            .map_err(|e| format!("{which}: {e}"))?;
            if matches!(
                credential.secret,
                crate::metrics::EntraSecret::FederatedTokenFile(_)
            ) {
                operator_identity_allowed(
                    ctx.templates_use_operator_identity,
                    &which,
                    provider,
                    data.as_ref(),
                    "Azure",
                )?;
            }
            let token = crate::metrics::EntraToken::new(credential, ctx.prometheus.timeout())
                .map_err(|e| format!("{which}: {e}"))?;
            MetricServer::Prometheus(
                Prometheus::with_entra_token(
                    address,
                    ctx.prometheus.timeout(),
                    &crate::metrics::ServerAccess::transport(provider, data.as_ref()),
                    token,
                )
                .map_err(|e| format!("{which}: {e}"))?,
            )
        }
        crate::api::MetricProviderType::Cloudwatch => {
            let region = provider
                .region
                .as_deref()
                .ok_or_else(|| format!("{which}: a cloudwatch provider needs a region"))?;
            let credentials = crate::metrics::AwsCredentials::resolve(
                |key| secret_text(data.as_ref(), key),
                |name| std::env::var(name).ok().filter(|v| !v.is_empty()),
            )
            .map_err(|e| format!("{which}: {e}"))?;
            if credentials.are_the_operators() {
                operator_identity_allowed(
                    ctx.templates_use_operator_identity,
                    &which,
                    provider,
                    data.as_ref(),
                    "AWS",
                )?;
                if let Some(address) = provider.address.as_deref() {
                    crate::metrics::operator_identity_may_sign_for(address)
                        .map_err(|e| format!("{which}: {e}"))?;
                }
            }
            MetricServer::CloudWatch(std::sync::Arc::new(
                crate::metrics::CloudWatch::new(
                    provider.address.as_deref(),
                    region,
                    ctx.prometheus.timeout(),
                    &crate::metrics::ServerAccess::transport(provider, data.as_ref()),
                    credentials,
                )
                .map_err(|e| format!("{which}: {e}"))?,
            ))
        }
        crate::api::MetricProviderType::Newrelic => {
            let text = |name: &str| secret_text(data.as_ref(), name);
            let account = text("newrelic_account_id")
                .ok_or_else(|| {
                    format!("{which}: the provider's secretRef Secret needs the key newrelic_account_id (New Relic)")
                })?;
            let account = account.parse::<u64>().map_err(|_| {
                format!("{which}: newrelic_account_id {account:?} is not an account number")
            })?;
            let key = match (text("newrelic_api_key"), text("newrelic_query_key")) {
                (Some(user), None) => crate::metrics::NewRelicKey::User(user),
                (None, Some(query)) => crate::metrics::NewRelicKey::InsightsQuery(query),
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{which}: the Secret holds both newrelic_api_key and newrelic_query_key: keep one \
                         (newrelic_api_key for NerdGraph)"
                    ));
                }
                (None, None) => {
                    return Err(format!(
                        "{which}: the provider's secretRef Secret needs newrelic_api_key (a user key, for \
                         NerdGraph) or newrelic_query_key (Insights)"
                    ));
                }
            };
            MetricServer::NewRelic(
                crate::metrics::NewRelic::new(
                    provider.address.as_deref(),
                    ctx.prometheus.timeout(),
                    &crate::metrics::ServerAccess::transport(provider, data.as_ref()),
                    account,
                    key,
                )
                .map_err(|e| format!("{which}: {e}"))?,
            )
        }
        crate::api::MetricProviderType::Datadog => {
            let key = |name: &str| {
                data.as_ref()
                    .and_then(|d| d.get(name))
                    .and_then(|v| String::from_utf8(v.clone()).ok())
                    .map(|v| v.trim_end_matches(['\r', '\n']).to_owned())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        format!("{which}: the provider's secretRef Secret needs the key {name} (Datadog)")
                    })
            };
            let address = provider
                .address
                .as_deref()
                .unwrap_or(crate::metrics::DEFAULT_DATADOG_ADDRESS);
            MetricServer::Datadog(
                crate::metrics::Datadog::new(
                    address,
                    ctx.prometheus.timeout(),
                    &crate::metrics::ServerAccess::transport(provider, data.as_ref()),
                    key("datadog_api_key")?,
                    key("datadog_application_key")?,
                )
                .map_err(|e| format!("{which}: {e}"))?,
            )
        }
    };
    let mut servers = ctx
        .template_servers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Old versions are dropped wholesale; a few templates per cluster is the norm.
    if servers.len() >= 256 {
        servers.clear();
    }
    servers.insert(key, server.clone());
    Ok((query, server, which))
}

/// Whether a template may query with the operator's own cloud identity: only when the operator allows it, and
/// only over the system's TLS trust (a template's own `ca.crt` or `insecureSkipVerify` could let its author
/// stand in for the cloud's endpoint and collect what the identity signs).
fn operator_identity_allowed(
    allowed: bool,
    which: &str,
    provider: &crate::api::MetricProvider,
    secret: Option<&std::collections::BTreeMap<String, Vec<u8>>>,
    cloud: &str,
) -> Result<(), String> {
    if !allowed {
        return Err(format!(
            "{which} has no keys of its own and would query with the operator's {cloud} identity, which \
             MetricTemplates may use only when the operator runs with --metric-templates-use-operator-identity \
             (whoever may write a MetricTemplate could read any metric that identity can read); or put the \
             template's own credentials in its Secret"
        ));
    }
    if provider.insecure_skip_verify || secret.is_some_and(|d| d.contains_key("ca.crt")) {
        return Err(format!(
            "{which} queries with the operator's {cloud} identity, which is sent only to endpoints the system \
             trusts: remove insecureSkipVerify and the Secret's ca.crt"
        ));
    }
    Ok(())
}

/// A text value of a Secret's data, without a trailing newline; `None` when absent, empty or not UTF-8.
fn secret_text(
    data: Option<&std::collections::BTreeMap<String, Vec<u8>>>,
    key: &str,
) -> Option<String> {
    data.and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.clone()).ok())
        .map(|v| v.trim_end_matches(['\r', '\n']).to_owned())
        .filter(|v| !v.is_empty())
}

/// Brings workloads, Services and the route to `desired`, in an order that never drops traffic.
async fn converge(
    rollout: &Rollout,
    names: &Names,
    ctx: &Context,
    router: &dyn Router,
    desired: Desired,
    (deployments, target, primary): (&Api<DynamicObject>, &Value, Option<&Value>),
) -> Result<(), Error> {
    let Some(owner) = owner(rollout) else {
        return Ok(());
    };
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &names.namespace);

    // 1. The primary: created from the target, and rewritten from it when promoting.
    let primary_due = |target: &Value, primary: Option<&Value>| {
        primary.is_none()
            || (desired.primary_from_target
                && primary.and_then(workload::primary_revision) != workload::revision_of(target))
    };
    if primary_due(target, primary) {
        // The primary is copied from the target's template, which the cache does not keep: read both.
        let fresh_target = deployments
            .get_opt(&names.target)
            .await?
            .and_then(|o| serde_json::to_value(o).ok());
        let fresh_primary = deployments
            .get_opt(&names.primary)
            .await?
            .and_then(|o| serde_json::to_value(o).ok());
        if let Some(fresh_target) = fresh_target
            && primary_due(&fresh_target, fresh_primary.as_ref())
        {
            let replicas = fresh_primary
                .as_ref()
                .map(workload::replicas)
                .unwrap_or_else(|| workload::replicas(&fresh_target).max(1));
            let object = workload::primary_workload(
                names,
                rollout.spec.target_ref.kind,
                &fresh_target,
                fresh_primary.as_ref(),
                replicas,
                &owner,
            );
            deployments
                .patch(&names.primary, &patch_params(), &Patch::Apply(object))
                .await?;
        }
    }
    let primary_replicas = primary
        .map(workload::replicas)
        .unwrap_or_else(|| workload::replicas(target).max(1));

    // 2. Services: the apex and -primary select primary pods, -canary the target's.
    let primary_selector = workload::primary_labels(target);
    let canary_selector = workload::selector_labels(target);
    let wanted = [
        (names.service.clone(), primary_selector.clone(), None),
        (
            names.service_primary.clone(),
            primary_selector,
            Some(&owner),
        ),
        (names.service_canary.clone(), canary_selector, Some(&owner)),
    ];
    for (name, selector, service_owner) in wanted {
        let object = workload::service(rollout, names, &name, &selector, service_owner);
        // Applying an unchanged Service is harmless, so a lagging cache costs at most a no-op write.
        let live = ctx.caches.service(&names.namespace, &name);
        if !live
            .as_deref()
            .is_some_and(|l| workload::service_matches(l, &object))
        {
            services
                .patch(&name, &patch_params(), &Patch::Apply(object))
                .await?;
        }
    }

    // 3. Scale the canary up before it gets traffic...
    let canary_replicas = workload::replicas(target);
    let want_canary = if desired.canary_up {
        primary_replicas.max(1)
    } else {
        0
    };
    if desired.canary_up && canary_replicas != want_canary {
        scale(deployments, &names.target, want_canary).await?;
    }

    // 4. ...move traffic...
    let resource = router.api_resource();
    let routes: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &names.namespace, &resource);
    let route_target = route_target(rollout, names, owner.clone());
    let split = Split::with_canary(desired.canary_weight)
        .with_experiment(desired.experiment && !route_target.canary_routes.is_empty());
    let ambient = resource.kind
        != router_for_mode(rollout.spec.provider, false)
            .api_resource()
            .kind;
    let missing = |err| route_error(err, rollout.spec.provider, ambient);
    let observed =
        |route: Option<&Value>| route.and_then(|v| router.observed_split(v, &route_target));
    // A route that does not exist reads as `None`; a 404 left over means the resource itself is not served.
    let fresh_route = async || -> Result<Option<Value>, Error> {
        Ok(routes
            .get_opt(&names.service)
            .await
            .map_err(missing)?
            .and_then(|r| serde_json::to_value(r).ok()))
    };
    let cached = ctx
        .caches
        .route(&resource, &names.namespace, &names.service);
    let mut live_split = match &cached {
        Some(cached) => observed(cached.as_ref()),
        None => observed(fresh_route().await?.as_ref()),
    };
    // The cache may lag behind Sluice's own last change of the route; a change (which also marks a Consul
    // splitter unsynced) is made only if the API server's copy still differs.
    if cached.is_some() && live_split != Some(split) {
        live_split = observed(fresh_route().await?.as_ref());
    }
    if live_split != Some(split) {
        let object = router.desired(&route_target, split);
        routes
            .patch(&names.service, &patch_params(), &Patch::Apply(object))
            .await
            .map_err(missing)?;
        if let Some(unsynced) = router.unsynced_status() {
            routes
                .patch_status(&names.service, &merge_params(), &Patch::Merge(unsynced))
                .await?;
        }
        tracing::info!(rollout = %rollout.name_any(), namespace = %names.namespace, %split, "route updated");
        // Istio routes with a VirtualService, or in ambient mode with an HTTPRoute: a Rollout whose namespace
        // or Service changed mode must not leave the other one splitting traffic.
        if rollout.spec.provider == crate::api::Provider::Istio {
            let ambient = resource.kind != "VirtualService";
            let other = router_for_mode(rollout.spec.provider, !ambient).api_resource();
            let others: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), &names.namespace, &other);
            delete_if_owned(&others, &names.service, &owner.uid).await?;
        }
    }

    // 5. ...and scale it down only once the route sends it nothing.
    if !desired.canary_up && canary_replicas != 0 {
        scale(deployments, &names.target, 0).await?;
    }
    Ok(())
}

/// A 404 on a route read that maps a missing object to `None`, or on an apply (which creates a missing object),
/// means the cluster does not serve the route resource: the mesh's CRD is not installed.
fn route_error(err: kube::Error, provider: crate::api::Provider, ambient: bool) -> Error {
    match err {
        kube::Error::Api(status) if status.code == 404 => {
            Error::RouteApiMissing(crate::traffic::missing_route_api(provider, ambient))
        }
        other => other.into(),
    }
}

fn route_target(rollout: &Rollout, names: &Names, owner: OwnerReference) -> RouteTarget {
    RouteTarget {
        name: names.service.clone(),
        namespace: names.namespace.clone(),
        apex: names.service.clone(),
        primary: names.service_primary.clone(),
        canary: names.service_canary.clone(),
        port: rollout.spec.service.port,
        hosts: rollout.spec.service.hosts.clone(),
        gateways: rollout.spec.service.gateways.clone(),
        owner,
        canary_routes: canary_routes(rollout),
    }
}

/// The A/B, mirroring and sticky-session routes the Rollout asks for.
fn canary_routes(rollout: &Rollout) -> CanaryRoutes {
    let analysis = &rollout.spec.analysis;
    CanaryRoutes {
        matches: analysis.match_.clone(),
        mirror: analysis
            .mirror
            .then(|| analysis.mirror_weight.unwrap_or(crate::api::Weight::FULL)),
        affinity: analysis.session_affinity.clone(),
        cookie_value: rollout
            .status
            .as_ref()
            .and_then(|s| s.revision.clone())
            .unwrap_or_else(|| "sluice".into()),
    }
}

/// Whether the mesh has taken the live route into effect (Consul's `Synced`); a missing route is not.
async fn route_synced(
    rollout: &Rollout,
    names: &Names,
    ctx: &Context,
    router: &dyn Router,
) -> Result<bool, Error> {
    if !router.waits_for_sync() {
        return Ok(true);
    }
    let resource = router.api_resource();
    // The cache sees the mesh's status change as soon as the API server does, and the change wakes the Rollout.
    if let Some(cached) = ctx
        .caches
        .route(&resource, &names.namespace, &names.service)
    {
        return Ok(cached.is_some_and(|v| router.synced(&v)));
    }
    let routes: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &names.namespace, &resource);
    let live = routes.get_opt(&names.service).await.map_err(|err| {
        let ambient = resource.kind
            != router_for_mode(rollout.spec.provider, false)
                .api_resource()
                .kind;
        route_error(err, rollout.spec.provider, ambient)
    })?;
    Ok(live
        .and_then(|r| serde_json::to_value(r).ok())
        .is_some_and(|v| router.synced(&v)))
}

async fn scale(deployments: &Api<DynamicObject>, name: &str, replicas: i32) -> Result<(), Error> {
    let patch = json!({"spec": {"replicas": replicas}});
    deployments
        .patch_scale(name, &merge_params(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// Writes the status if the Rollout is still at `version` (when given); returns the new resourceVersion.
async fn write_status(
    rollout: &Rollout,
    ctx: &Context,
    status: &RolloutStatus,
    version: Option<String>,
) -> Result<Option<String>, Error> {
    let namespace = rollout.namespace().unwrap_or_default();
    let api: Api<Rollout> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut patch =
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout", "status": status});
    if let Some(version) = &version {
        patch["metadata"] = json!({"resourceVersion": version});
    }
    let written = api
        .patch_status(&rollout.name_any(), &patch_params(), &Patch::Apply(patch))
        .await?;
    ctx.caches.wrote_over(rollout, version);
    Ok(written.resource_version())
}

/// Records what the outbox delivered, on the status written at `version`; returns the status and its new
/// version. Someone may have changed the Rollout during the delivery (an annotation, say): then the delivery is
/// merged into the newer status, or the next round would send it again.
async fn record_delivery(
    rollout: &Rollout,
    ctx: &Context,
    planned: &RolloutStatus,
    delivered: RolloutStatus,
    version: Option<String>,
) -> Result<(RolloutStatus, Option<String>), Error> {
    match write_status(rollout, ctx, &delivered, version).await {
        Err(err) if is_conflict(&err) => {
            let api: Api<Rollout> =
                Api::namespaced(ctx.client.clone(), &rollout.namespace().unwrap_or_default());
            let newer = api.get(&rollout.name_any()).await?;
            let mut merged = newer.status.clone().unwrap_or_default();
            outbox::merge_delivery(&mut merged, planned, &delivered);
            let version = write_status(rollout, ctx, &merged, newer.resource_version()).await?;
            Ok((merged, version))
        }
        written => Ok((delivered, written?)),
    }
}

/// Reports a spec Sluice cannot act on, and backs off instead of looping.
async fn invalid_spec(
    rollout: &Rollout,
    ctx: &Context,
    status: &RolloutStatus,
    why: String,
) -> Result<Action, Error> {
    let mut next = status.clone();
    let mut version = rollout.resource_version();
    let generation = rollout.metadata.generation.unwrap_or(0);
    next.message = Some(why.clone());
    next.observed_generation = Some(generation);
    set_condition(
        &mut next.conditions,
        "InvalidSpec",
        true,
        "InvalidSpec",
        &why,
        generation,
        jiff::Timestamp::now(),
    );
    let alerts = alerts_of(rollout, ctx);
    if &next != status {
        let transition = crate::rollout::Transition {
            warning: true,
            reason: Reason::InvalidSpec,
            message: why.clone(),
        };
        let key = format!(
            "{}/{}",
            rollout.namespace().unwrap_or_default(),
            rollout.name_any()
        );
        outbox::enqueue(
            &mut next,
            &alerts,
            &key,
            &[transition],
            jiff::Timestamp::now(),
        );
        version = write_status(rollout, ctx, &next, version).await?;
        ctx.telemetry.transition(Reason::InvalidSpec.as_str());
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidSpec".into(),
            note: Some(why),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &rollout.object_ref(&())).await {
            tracing::warn!(error = %err, "could not publish an Event");
        }
    }
    // Notifications keep flowing while the spec is invalid.
    if let Some(delivered) =
        deliver_outbox(rollout, ctx, &alerts, &next, jiff::Timestamp::now()).await
    {
        (next, _) = record_delivery(rollout, ctx, &next, delivered, version).await?;
    }
    let retry =
        outbox::next_due(&next, jiff::Timestamp::now()).map_or(Duration::from_secs(300), |due| {
            due.max(Duration::from_millis(200))
                .min(Duration::from_secs(300))
        });
    Ok(Action::requeue(retry))
}

/// The mesh's route CRD is missing: says so in a condition, the status message and a Warning Event (once per
/// change), leaves everything else as it was, and backs off (the error goes to `error_policy`).
async fn mesh_missing(
    rollout: &Rollout,
    ctx: &Context,
    status: &RolloutStatus,
    missing: Error,
) -> Result<Action, Error> {
    let reason = match &missing {
        Error::WaypointMissing(_) => "WaypointMissing",
        _ => "RouteAPIMissing",
    };
    let why = missing.to_string();
    let mut next = status.clone();
    let generation = rollout.metadata.generation.unwrap_or(0);
    next.message = Some(why.clone());
    set_condition(
        &mut next.conditions,
        MESH_READY,
        false,
        reason,
        &why,
        generation,
        jiff::Timestamp::now(),
    );
    if &next != status {
        write_status(rollout, ctx, &next, rollout.resource_version()).await?;
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(why.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &rollout.object_ref(&())).await {
            tracing::warn!(error = %err, "could not publish an Event");
        }
    }
    Err(missing)
}

/// The waypoint of a Rollout in Istio ambient mode, from the labels of its Service and namespace; `None` outside
/// ambient mode and for other meshes.
async fn waypoint_label(
    rollout: &Rollout,
    names: &Names,
    ctx: &Context,
) -> Result<Option<Waypoint>, Error> {
    if !matches!(
        rollout.spec.provider,
        crate::api::Provider::Istio | crate::api::Provider::GatewayApi
    ) {
        return Ok(None);
    }
    let namespace_labels = ctx.caches.namespace_labels(&names.namespace);
    let service_labels = ctx
        .caches
        .service(&names.namespace, &names.service)
        .map(|s| s.labels().clone())
        .unwrap_or_default();
    Ok(crate::traffic::waypoint_of(
        &names.namespace,
        &names.service,
        &namespace_labels,
        &service_labels,
    ))
}

/// [`waypoint_label`], and `WaypointMissing` when the waypoint's Gateway (or Gateway API itself) is not there.
async fn waypoint(
    rollout: &Rollout,
    names: &Names,
    ctx: &Context,
) -> Result<Option<Waypoint>, Error> {
    let Some(waypoint) = waypoint_label(rollout, names, ctx).await? else {
        return Ok(None);
    };
    let gateway = kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
        "gateways",
    );
    let gateways: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &waypoint.namespace, &gateway);
    match gateways.get_opt(&waypoint.name).await {
        Ok(Some(_)) => Ok(Some(waypoint)),
        Ok(None) => Err(Error::WaypointMissing(crate::traffic::missing_waypoint(
            &waypoint,
        ))),
        // A 404 that is not an object's NotFound: Gateway API itself is not served.
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Err(Error::WaypointMissing(format!(
                "{} is in Istio ambient mode ({}), but this cluster does not serve Gateway \
             (gateway.networking.k8s.io/v1), which waypoints are: install the Gateway API CRDs and Istio's \
             ambient profile, or remove the label",
                waypoint.labelled,
                crate::traffic::USE_WAYPOINT
            )))
        }
        Err(err) => Err(err.into()),
    }
}

/// A Rollout is being deleted: give the traffic back to the user's Deployment, then remove what Sluice made.
async fn cleanup(rollout: &Rollout, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(rollout);
    let (deployments, target, primary) = workloads(rollout, &names, ctx).await?;
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &names.namespace);
    // The route to remove is the one the Rollout's mode made: an HTTPRoute for Istio in ambient mode.
    let ambient = waypoint_label(rollout, &names, ctx).await?.is_some();
    let router = router_for_mode(rollout.spec.provider, ambient);
    let plan = workload::cleanup(
        rollout,
        &names,
        router.api_resource(),
        target.as_ref(),
        primary.as_ref(),
    );
    if let Some(replicas) = plan.scale_target_to {
        scale(&deployments, &names.target, replicas).await?;
    }
    if let Some(object) = plan.apex_service {
        services
            .patch(&names.service, &patch_params(), &Patch::Apply(object))
            .await?;
    }
    let (route, route_name) = &plan.route;
    // The route of the other Istio mode too, should the mode have changed without a route update since.
    if rollout.spec.provider == crate::api::Provider::Istio
        && let Some(uid) = rollout.metadata.uid.as_deref()
    {
        let other = router_for_mode(rollout.spec.provider, !ambient).api_resource();
        let others: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &names.namespace, &other);
        delete_if_owned(&others, route_name, uid).await?;
    }
    let routes: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &names.namespace, route);
    delete_if_present(&routes, route_name).await?;
    for name in &plan.services {
        delete_if_present(&services, name).await?;
    }
    for name in &plan.workloads {
        delete_if_present(&deployments, name).await?;
    }
    let metrics: Vec<String> = rollout
        .spec
        .analysis
        .metrics
        .iter()
        .map(|m| m.name.clone())
        .collect();
    ctx.telemetry
        .forget_rollout(&names.namespace, &rollout.name_any(), &metrics);
    ctx.caches.forget(rollout);
    tracing::info!(rollout = %rollout.name_any(), namespace = %names.namespace, "cleaned up; traffic is back on the target");
    Ok(Action::await_change())
}

/// Deletes `name` if it exists and `owner_uid` owns it; a resource the cluster does not serve holds nothing.
async fn delete_if_owned(
    api: &Api<DynamicObject>,
    name: &str,
    owner_uid: &str,
) -> Result<(), Error> {
    let live = match api.get_opt(name).await {
        Ok(live) => live,
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(err) => return Err(err.into()),
    };
    if live.is_some_and(|o| o.owner_references().iter().any(|r| r.uid == owner_uid)) {
        delete_if_present(api, name).await?;
    }
    Ok(())
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_cloud_identity_is_opt_in_and_only_over_system_trust() {
        let provider = |insecure: bool| crate::api::MetricProvider {
            type_: crate::api::MetricProviderType::Cloudwatch,
            address: None,
            secret_ref: None,
            headers: Default::default(),
            database: None,
            region: Some("eu-west-1".into()),
            insecure_skip_verify: insecure,
        };
        let which = "MetricTemplate shop/errors";
        assert_eq!(
            operator_identity_allowed(true, which, &provider(false), None, "AWS"),
            Ok(())
        );
        assert!(
            operator_identity_allowed(false, which, &provider(false), None, "AWS")
                .is_err_and(|e| e.contains("--metric-templates-use-operator-identity"))
        );
        assert!(
            operator_identity_allowed(true, which, &provider(true), None, "AWS")
                .is_err_and(|e| e.contains("remove insecureSkipVerify"))
        );
        let with_ca = std::collections::BTreeMap::from([("ca.crt".to_owned(), b"PEM".to_vec())]);
        assert!(
            operator_identity_allowed(true, which, &provider(false), Some(&with_ca), "Azure")
                .is_err_and(|e| e.contains("ca.crt"))
        );
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn a_lagging_cache_is_replanned_not_reported() {
        use kube::runtime::finalizer::Error as Finalizer;
        let api = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("refused", "Invalid")
                    .with_code(code)
                    .boxed(),
            )
        };
        let finalizer = |e: Finalizer<Error>| Error::Finalizer(Box::new(e));
        assert!(is_conflict(&Error::Kube(api(409))));
        assert!(is_conflict(&finalizer(Finalizer::AddFinalizer(api(422)))));
        assert!(is_conflict(&finalizer(Finalizer::AddFinalizer(api(409)))));
        assert!(is_conflict(&finalizer(Finalizer::RemoveFinalizer(api(
            404
        )))));
        assert!(is_conflict(&finalizer(Finalizer::ApplyFailed(
            Error::Kube(api(409))
        ))));
        // Real failures still count, back off and are logged.
        assert!(!is_conflict(&Error::Kube(api(422))));
        assert!(!is_conflict(&finalizer(Finalizer::AddFinalizer(api(403)))));
        assert!(!is_conflict(&finalizer(Finalizer::ApplyFailed(
            Error::Kube(api(500))
        ))));
        assert!(!is_conflict(&finalizer(Finalizer::RemoveFinalizer(api(
            500
        )))));
    }
}
