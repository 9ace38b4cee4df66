//! `sluice rollout …` (also the kubectl plugin `kubectl sluice …`): look at Rollouts and steer them. Commands
//! set annotations the operator acts on; nothing here edits a Rollout's spec.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::json;
use thiserror::Error;

use crate::api::{AuthorizationPolicy, Rollout, RolloutPhase, Verdict};
use crate::controller::workload;
use crate::controller::{
    ABORT_ANNOTATION, PAUSED_ANNOTATION, PROMOTE_ANNOTATION, RETRY_ANNOTATION,
};
use crate::rollout::{Stage, stages};

#[derive(Debug, clap::Args)]
pub struct Target {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Show a Rollout: phase, step, weights, each metric against its threshold, recent events.
    Get {
        name: String,
        /// Keep refreshing until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
    /// List the Rollouts of a namespace.
    List {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Skip the analysis of the current step (or continue past a pause); with --full, promote now.
    Promote {
        name: String,
        #[arg(long)]
        full: bool,
    },
    /// Stop the release in progress and send all traffic back to the primary.
    Abort { name: String },
    /// Hold the release where it is; its timers stop until `resume`.
    Pause { name: String },
    /// Continue a paused release.
    Resume { name: String },
    /// Release a failed revision again.
    Retry { name: String },
    /// Put the target back on the promoted revision (abandons the release in progress).
    Undo { name: String },
}

#[derive(Debug, Error)]
pub enum RolloutCliError {
    #[error("cannot load the kubeconfig: {0}")]
    Kubeconfig(String),
    #[error(
        "Error from server (NotFound): {kind} \"{name}\" not found in namespace \"{namespace}\""
    )]
    NotFound {
        kind: &'static str,
        name: String,
        namespace: String,
    },
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Refused(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

pub fn run(target: Target, command: RolloutCommand) -> Result<ExitCode, RolloutCliError> {
    runtime()?.block_on(async move {
        let (client, namespace) = connect(&target).await?;
        rollout_command(client, &namespace, command).await
    })
}

/// `sluice policy status NAME`.
pub fn policy_status(target: Target, name: String) -> Result<ExitCode, RolloutCliError> {
    runtime()?.block_on(async move {
        let (client, namespace) = connect(&target).await?;
        let api: Api<AuthorizationPolicy> = Api::namespaced(client, &namespace);
        let policy = api.get_opt(&name).await?.ok_or(RolloutCliError::NotFound {
            kind: "authorizationpolicies.sluice.dev",
            name,
            namespace,
        })?;
        print(&render_policy(&policy));
        Ok(ExitCode::SUCCESS)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, RolloutCliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RolloutCliError::Runtime)
}

async fn connect(target: &Target) -> Result<(Client, String), RolloutCliError> {
    crate::metrics::install_crypto_provider();
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..Default::default()
    };
    let config = match Kubeconfig::read() {
        Ok(kubeconfig) => kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| RolloutCliError::Kubeconfig(e.to_string()))?,
        Err(_) => kube::Config::infer()
            .await
            .map_err(|e| RolloutCliError::Kubeconfig(e.to_string()))?,
    };
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client =
        Client::try_from(config).map_err(|e| RolloutCliError::Kubeconfig(e.to_string()))?;
    Ok((client, namespace))
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

async fn get_rollout(
    api: &Api<Rollout>,
    name: &str,
    namespace: &str,
) -> Result<Rollout, RolloutCliError> {
    api.get_opt(name)
        .await?
        .ok_or_else(|| RolloutCliError::NotFound {
            kind: "rollouts.sluice.dev",
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        })
}

async fn annotate(
    api: &Api<Rollout>,
    name: &str,
    namespace: &str,
    annotations: serde_json::Value,
) -> Result<(), RolloutCliError> {
    get_rollout(api, name, namespace).await?;
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
    )
    .await?;
    Ok(())
}

async fn rollout_command(
    client: Client,
    namespace: &str,
    command: RolloutCommand,
) -> Result<ExitCode, RolloutCliError> {
    let api: Api<Rollout> = Api::namespaced(client.clone(), namespace);
    let done = |name: &str, what: &str| {
        print(&format!("rollout.sluice.dev/{name} {what}\n"));
        Ok(ExitCode::SUCCESS)
    };
    match command {
        RolloutCommand::Get { name, watch } => get(client, &api, namespace, &name, watch).await,
        RolloutCommand::List { all_namespaces } => {
            let api: Api<Rollout> = if all_namespaces {
                Api::all(client)
            } else {
                api
            };
            let rollouts = api.list(&ListParams::default()).await?;
            print(&render_list(&rollouts.items, all_namespaces));
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Promote { name, full } => {
            let value = if full { "full" } else { "true" };
            annotate(&api, &name, namespace, json!({PROMOTE_ANNOTATION: value})).await?;
            done(
                &name,
                if full {
                    "promotion requested"
                } else {
                    "step promotion requested"
                },
            )
        }
        RolloutCommand::Abort { name } => {
            annotate(&api, &name, namespace, json!({ABORT_ANNOTATION: "true"})).await?;
            done(&name, "abort requested")
        }
        RolloutCommand::Pause { name } => {
            annotate(&api, &name, namespace, json!({PAUSED_ANNOTATION: "true"})).await?;
            done(&name, "paused")
        }
        RolloutCommand::Resume { name } => {
            annotate(&api, &name, namespace, json!({PAUSED_ANNOTATION: null})).await?;
            done(&name, "resumed")
        }
        RolloutCommand::Retry { name } => {
            let rollout = get_rollout(&api, &name, namespace).await?;
            if rollout.status.as_ref().and_then(|s| s.phase) != Some(RolloutPhase::Failed) {
                return Err(RolloutCliError::Refused(format!(
                    "rollout.sluice.dev/{name} has not failed: nothing to retry"
                )));
            }
            annotate(&api, &name, namespace, json!({RETRY_ANNOTATION: "true"})).await?;
            done(&name, "retry requested")
        }
        RolloutCommand::Undo { name } => {
            let rollout = get_rollout(&api, &name, namespace).await?;
            let kind = rollout.spec.target_ref.kind;
            let kind_name = kind.name().to_lowercase();
            let deployments: Api<DynamicObject> = Api::namespaced_with(
                client,
                namespace,
                &crate::controller::workload::api_resource(kind),
            );
            let target = &rollout.spec.target_ref.name;
            let primary_name = format!("{target}-primary");
            let primary = deployments.get_opt(&primary_name).await?.ok_or_else(|| {
                RolloutCliError::Refused(format!(
                    "{kind_name} {primary_name} does not exist yet: there is no promoted revision to go back to"
                ))
            })?;
            let current = deployments.get_opt(target).await?.ok_or_else(|| {
                RolloutCliError::Refused(format!("target {kind_name} {target} not found"))
            })?;
            let template = workload::promoted_target_template(&primary.data, &current.data)
                .ok_or_else(|| {
                    RolloutCliError::Refused(format!(
                        "{kind_name} {primary_name} has no pod template"
                    ))
                })?;
            // The template must hash to the revision the primary records, or the operator would see a new
            // release instead of the promoted one.
            // `DynamicObject::data` lacks `metadata`, where the revision annotation is.
            let recorded = serde_json::to_value(&primary)
                .ok()
                .and_then(|p| workload::primary_revision(&p));
            let mut undone = current.data.clone();
            undone["spec"]["template"] = template.clone();
            let restored = workload::template_revision(&undone);
            if recorded.is_none() || restored != recorded {
                return Err(RolloutCliError::Refused(format!(
                    "{kind_name} {primary_name} records revision {} but its pod template hashes to {}: \
                     it was changed outside Sluice, so there is no promoted revision to restore",
                    recorded.as_deref().unwrap_or("(none)"),
                    restored.as_deref().unwrap_or("(none)"),
                )));
            }
            if current.data.pointer("/spec/template") == Some(&template) {
                return done(
                    &name,
                    &format!("target {target} already runs the promoted revision"),
                );
            }
            // Replace the template whole (a merge would keep keys the abandoned revision added), and only
            // the version read above, so a concurrent edit is not overwritten.
            let resource_version = current.resource_version().unwrap_or_default();
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
                {"op": "replace", "path": "/spec/template", "value": template},
            ]))
            .map_err(|err| RolloutCliError::Refused(format!("cannot build the patch: {err}")))?;
            deployments
                .patch(target, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await?;
            done(
                &name,
                &format!("target {target} reverted to the promoted revision"),
            )
        }
    }
}

async fn get(
    client: Client,
    api: &Api<Rollout>,
    namespace: &str,
    name: &str,
    watch: bool,
) -> Result<ExitCode, RolloutCliError> {
    let events: Api<Event> = Api::namespaced(client, namespace);
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let rollout = get_rollout(api, name, namespace).await?;
        // The Rollout's own events only: its target Deployment usually has the same name, and the
        // Deployment controller's events (ScalingReplicaSet, …) regard it.
        let recent = events
            .list(
                &ListParams::default()
                    .fields(&format!("regarding.kind=Rollout,regarding.name={name}")),
            )
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let view = render_rollout(&rollout, &recent);
        if !watch {
            print(&view);
            return Ok(ExitCode::SUCCESS);
        }
        if view != last {
            if tty {
                // Redraw in place.
                print(&format!("\x1b[2J\x1b[H{view}"));
            } else {
                print(&format!("{view}\n"));
            }
            last = view;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// A 20-cell bar: primary share then canary share.
pub fn weight_bar(canary: u8) -> String {
    let cells = (usize::from(canary.min(100)) + 2) / 5;
    format!("[{}{}]", "=".repeat(20 - cells), "#".repeat(cells))
}

fn threshold_text(min: Option<f64>, max: Option<f64>) -> String {
    match (min, max) {
        (Some(min), Some(max)) => format!("{min}..{max}"),
        (Some(min), None) => format!(">= {min}"),
        (None, Some(max)) => format!("<= {max}"),
        (None, None) => "any".into(),
    }
}

/// What `sluice rollout get` prints.
/// One line naming the release strategy and what it adds to the route.
fn describe_strategy(analysis: &crate::api::Analysis) -> String {
    use crate::rollout::{ReleaseStrategy, strategy};
    let iterations = analysis.iterations.unwrap_or(1).max(1);
    let mut text = match strategy(analysis) {
        ReleaseStrategy::Canary => "canary (weighted)".to_owned(),
        ReleaseStrategy::BlueGreen => format!("blue-green, {iterations} iteration(s)"),
        ReleaseStrategy::AbTest => format!(
            "A/B test, {iterations} iteration(s), {} match rule(s)",
            analysis.match_.len()
        ),
    };
    if analysis.mirror {
        let percent = analysis.mirror_weight.map_or(100, |w| w.get());
        let _ = write!(text, ", mirroring {percent}% of requests");
    }
    if let Some(affinity) = &analysis.session_affinity {
        let _ = write!(text, ", sticky sessions (cookie {})", affinity.cookie_name);
    }
    if !analysis.webhooks.is_empty() {
        let _ = write!(text, ", {} webhook(s)", analysis.webhooks.len());
    }
    text
}

pub fn render_rollout(rollout: &Rollout, events: &[Event]) -> String {
    let status = rollout.status.clone().unwrap_or_default();
    let ladder = stages(&rollout.spec.analysis);
    let mut out = String::new();
    let phase = status
        .phase
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "Pending".into());
    let annotations = rollout.annotations();
    let paused = annotations.get(PAUSED_ANNOTATION).map(String::as_str) == Some("true");
    let _ = writeln!(out, "Name:       {}", rollout.name_any());
    let _ = writeln!(
        out,
        "Namespace:  {}",
        rollout.namespace().unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "Target:     {} {}",
        rollout.spec.target_ref.kind.name(),
        rollout.spec.target_ref.name
    );
    let _ = writeln!(
        out,
        "Strategy:   {}",
        describe_strategy(&rollout.spec.analysis)
    );
    let _ = writeln!(
        out,
        "Phase:      {phase}{}",
        if paused { " (paused by user)" } else { "" }
    );
    let _ = writeln!(
        out,
        "Revision:   {}",
        status.revision.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "Promoted:   {}",
        status.last_promoted_revision.as_deref().unwrap_or("-")
    );
    let step = match ladder.get(status.current_step as usize) {
        Some(Stage::Judge(w)) => format!("analysing at {w}"),
        Some(Stage::Pause(Some(d))) => format!("pause {}s", d.as_secs()),
        Some(Stage::Pause(None)) => "pause until promoted".into(),
        None => "-".into(),
    };
    let _ = writeln!(
        out,
        "Step:       {}/{} ({step})",
        (status.current_step as usize + 1).min(ladder.len().max(1)),
        ladder.len()
    );
    let canary = status.canary_weight.get();
    let _ = writeln!(
        out,
        "Traffic:    primary {}% {} canary {canary}%",
        100 - u16::from(canary),
        weight_bar(canary)
    );
    let _ = writeln!(
        out,
        "Failed:     {}/{} checks",
        status.failed_checks,
        rollout.spec.analysis.threshold.max(1)
    );
    if let Some(message) = &status.message {
        let _ = writeln!(out, "Message:    {message}");
    }
    let _ = writeln!(out, "\nMetrics:");
    for metric in &rollout.spec.analysis.metrics {
        let verdict = status.verdicts.iter().find(|v| v.name == metric.name);
        let (value, verdict) = match verdict {
            Some(v) => (
                v.value
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "no data".into()),
                match v.verdict {
                    Verdict::Pass => "pass",
                    Verdict::Fail => "FAIL",
                    Verdict::NoData => "no data",
                },
            ),
            None => ("-".into(), "not checked yet"),
        };
        let range = &metric.threshold_range;
        let _ = writeln!(
            out,
            "  {:<24} {:>10}  want {:<12} {verdict}",
            metric.name,
            value,
            threshold_text(range.min, range.max)
        );
    }
    let gates: Vec<&str> = [
        (PROMOTE_ANNOTATION, "promote requested"),
        (ABORT_ANNOTATION, "abort requested"),
        (RETRY_ANNOTATION, "retry requested"),
    ]
    .iter()
    .filter(|(key, _)| annotations.contains_key(*key))
    .map(|(_, what)| *what)
    .collect();
    if !gates.is_empty() {
        let _ = writeln!(out, "\nPending:    {}", gates.join(", "));
    }
    let mut recent: Vec<&Event> = events.iter().collect();
    recent.sort_by_key(|e| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or_else(|| e.deprecated_last_timestamp.as_ref().map(|t| t.0))
    });
    if !recent.is_empty() {
        let _ = writeln!(out, "\nEvents:");
        for event in recent.iter().rev().take(8).rev() {
            let _ = writeln!(
                out,
                "  {:<8} {:<18} {}",
                event.type_.as_deref().unwrap_or(""),
                event.reason.as_deref().unwrap_or(""),
                event.note.as_deref().unwrap_or("")
            );
        }
    }
    out
}

/// What `sluice rollout list` prints.
pub fn render_list(rollouts: &[Rollout], with_namespace: bool) -> String {
    let mut rows = vec![(
        "NAMESPACE".to_owned(),
        "NAME".to_owned(),
        "PHASE".to_owned(),
        "WEIGHT".to_owned(),
        "MESSAGE".to_owned(),
    )];
    for r in rollouts {
        let status = r.status.clone().unwrap_or_default();
        rows.push((
            r.namespace().unwrap_or_default(),
            r.name_any(),
            status
                .phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "Pending".into()),
            format!("{}%", status.canary_weight.get()),
            status.message.unwrap_or_default(),
        ));
    }
    let width = |f: fn(&(String, String, String, String, String)) -> &String| {
        rows.iter().map(|r| f(r).len()).max().unwrap_or(0)
    };
    let (wn, wname, wp, ww) = (
        width(|r| &r.0),
        width(|r| &r.1),
        width(|r| &r.2),
        width(|r| &r.3),
    );
    let mut out = String::new();
    for (ns, name, phase, weight, message) in &rows {
        if with_namespace {
            let _ = write!(out, "{ns:<wn$}   ");
        }
        let _ = writeln!(
            out,
            "{name:<wname$}   {phase:<wp$}   {weight:<ww$}   {message}"
        );
    }
    out
}

/// What `sluice policy status` prints.
pub fn render_policy(policy: &AuthorizationPolicy) -> String {
    let status = policy.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "Name:       {}", policy.name_any());
    let _ = writeln!(
        out,
        "Namespace:  {}",
        policy.namespace().unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "Revision:   {}",
        status.revision.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "Workloads:  {}", status.matched_workloads);
    let _ = writeln!(out, "Query:      {}", policy.spec.query);
    if let Some(error) = &status.last_error {
        let _ = writeln!(out, "Last error: {error}");
    }
    let _ = writeln!(out, "\nConditions:");
    let order: BTreeMap<&str, usize> = [
        "Compiled",
        "TestsPassed",
        "Distributed",
        "MeshConfigured",
        "Ready",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| (*t, i))
    .collect();
    let mut conditions = status.conditions.clone();
    conditions.sort_by_key(|c| order.get(c.type_.as_str()).copied().unwrap_or(99));
    for c in conditions {
        let _ = writeln!(
            out,
            "  {:<15} {:<8} {:<24} {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_the_canary_share() {
        assert_eq!(weight_bar(0), format!("[{}]", "=".repeat(20)));
        assert_eq!(weight_bar(100), format!("[{}]", "#".repeat(20)));
        assert_eq!(
            weight_bar(30),
            format!("[{}{}]", "=".repeat(14), "#".repeat(6))
        );
        for w in 0..=100 {
            assert_eq!(weight_bar(w).chars().count(), 22);
        }
    }

    fn rollout(status: serde_json::Value, annotations: serde_json::Value) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "podinfo", "namespace": "shop", "annotations": annotations},
            "spec": {
                "targetRef": {"kind": "Deployment", "name": "podinfo"},
                "service": {"port": 9898},
                "analysis": {"interval": "10s", "threshold": 3, "stepWeight": 20, "maxWeight": 60,
                    "metrics": [
                        {"name": "request-success-rate", "thresholdRange": {"min": 99}},
                        {"name": "request-duration", "thresholdRange": {"max": 500}},
                    ]},
            },
            "status": status,
        }))
        .expect("rollout")
    }

    #[test]
    fn get_shows_phase_step_weights_metrics_and_pending_commands() {
        let r = rollout(
            json!({
                "phase": "Progressing", "canaryWeight": 40, "currentStep": 1, "failedChecks": 1,
                "revision": "abc", "lastPromotedRevision": "xyz", "message": "analysing the canary at 40%",
                "verdicts": [
                    {"name": "request-success-rate", "verdict": "pass", "value": 99.5, "checkedAt": "2026-11-25T10:00:00Z"},
                    {"name": "request-duration", "verdict": "fail", "value": 812.0, "checkedAt": "2026-11-25T10:00:00Z"},
                ],
            }),
            json!({"sluice.dev/paused": "true", "sluice.dev/abort": "true"}),
        );
        let view = render_rollout(&r, &[]);
        insta::assert_snapshot!(view);
        assert!(view.contains("Phase:      Progressing (paused by user)"));
        assert!(view.contains("Step:       2/3 (analysing at 40%)"));
        assert!(view.contains("primary 60%"));
    }

    #[test]
    fn list_is_a_table() {
        let rows = [
            rollout(
                json!({"phase": "Succeeded", "message": "revision abc promoted"}),
                json!({}),
            ),
            rollout(json!({}), json!({})),
        ];
        let table = render_list(&rows, true);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NAMESPACE   NAME      PHASE"),
            "{table}"
        );
        assert!(lines[1].contains("Succeeded") && lines[1].contains("revision abc promoted"));
        assert!(lines[2].contains("Pending"));
    }

    #[test]
    fn strategy_line_names_what_the_release_adds() {
        let analysis = |extra: serde_json::Value| -> crate::api::Analysis {
            let mut base = json!({"interval": "1m"});
            if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            serde_json::from_value(base).expect("analysis")
        };
        let cases = [
            (json!({}), "blue-green, 1 iteration(s)"),
            (
                json!({"iterations": 4, "mirror": true, "mirrorWeight": 25}),
                "blue-green, 4 iteration(s), mirroring 25% of requests",
            ),
            (
                json!({"iterations": 2, "match": [{"headers": {"x-canary": {"exact": "1"}}}]}),
                "A/B test, 2 iteration(s), 1 match rule(s)",
            ),
            (
                json!({"stepWeight": 10, "sessionAffinity": {"cookieName": "c"}, "webhooks": [{"name": "load", "url": "http://l/"}]}),
                "canary (weighted), sticky sessions (cookie c), 1 webhook(s)",
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(describe_strategy(&analysis(extra)), want);
        }
    }
}
