//! One planning step: given the Rollout, its status and what the controller observed, decide the next status,
//! the desired workloads and traffic split, and the transitions to announce.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::stages::{ReleaseStrategy, Stage, max_weight, stages, strategy, weight_at};
use crate::api::{
    Condition, FailureCounting, MetricVerdict, NoDataPolicy, RolloutPhase, RolloutSpec,
    RolloutStatus, Verdict, Weight,
};

/// What the controller saw of the workloads this time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Hash of the target's pod template; `None` when the target does not exist.
    pub target_revision: Option<String>,
    /// Hash of the primary's pod template; `None` when the primary does not exist yet.
    pub primary_revision: Option<String>,
    /// The canary (target) has all its replicas ready at its current template.
    pub canary_ready: bool,
    /// The primary has all its replicas ready at its current template.
    pub primary_ready: bool,
    /// Someone asked to continue past an indefinite pause, or to skip the current stage's analysis.
    pub promote_requested: bool,
    /// A one-shot command from `sluice rollout` (annotations), besides promote.
    pub command: Option<Command>,
    /// `sluice rollout pause` is in effect (until `resume`).
    pub paused_by_user: bool,
    /// What the Rego gates (`analysis.policies`) and the confirm webhooks said about the next move,
    /// asked after the checks passed.
    pub gate: Option<Gate>,
    /// What the webhooks [`hooks_due`] asked for answered.
    pub hooks: HookAnswers,
}

/// Answers of the webhooks called this time (`None`: not called, or every hook of that type said yes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookAnswers {
    /// A `confirm-rollout` hook said no: the new revision waits. `(hook, why)`.
    pub rollout_unconfirmed: Option<(String, String)>,
    /// A `pre-rollout` hook failed: the release rolls back.
    pub pre_rollout_failed: Option<(String, String)>,
    /// `rollout` hooks that failed with this check; each counts like a failed metric.
    pub rollout_failed: Vec<(String, String)>,
    /// A `rollback` hook answered yes.
    pub rollback_requested: Option<String>,
}

/// Which webhooks the controller must call before planning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HooksDue {
    /// A new revision would start now.
    pub confirm_rollout: bool,
    /// The canary is ready and is about to get traffic.
    pub pre_rollout: bool,
}

/// The next move a passing check leads to, which decides the confirm webhook to ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextMove {
    /// Another stage; `true` when it raises the canary's weight.
    Stage { raises_weight: bool },
    /// The promotion.
    Promotion,
}

/// The answer of the Rego gates, asked after the metrics of a step passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Every policy allowed; their names, for the audit trail.
    Allowed(Vec<String>),
    /// A policy or webhook denied (or could not be asked, which denies: gates fail closed).
    Denied {
        /// `policy NAME` or `webhook NAME`.
        by: String,
        reasons: Vec<String>,
        rollback: bool,
    },
}

/// One-shot commands users give through `sluice rollout` / annotations; each is used once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Skip the remaining analysis and promote the canary now.
    PromoteFull,
    /// Stop the release: everything back to the primary, phase Failed.
    Abort,
    /// Release again a revision that failed.
    Retry,
}

/// Result of the metric checks the controller ran because [`checks_due`] said so.
#[derive(Clone, Debug, PartialEq)]
pub enum Checks {
    /// No checks ran this time.
    NotRun,
    /// Every metric of the stage, with its verdict.
    Ran(Vec<MetricVerdict>),
    /// The metrics provider could not answer: the rollout freezes.
    Unavailable(String),
}

/// The workloads and traffic the controller must converge to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Copy the target's pod template into the primary (create it if missing).
    pub primary_from_target: bool,
    /// The canary runs (true) or is scaled to 0.
    pub canary_up: bool,
    /// Traffic to the canary; the primary gets the rest.
    pub canary_weight: Weight,
    /// The canary's own routes are on: A/B matches, mirrored copies, sticky sessions (only for specs that
    /// configure them).
    pub experiment: bool,
}

/// A transition worth one Event (and, later, one alert).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: Reason,
    pub message: String,
}

/// Why a Rollout changed, as Events, notifications and `sluice_rollout_transitions_total` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A manual command had nothing to act on.
    CommandIgnored,
    /// A dry-run metric failed; it does not gate the release.
    DryRunMetricFailed,
    /// Metrics are unavailable: the weight holds until they are back or the deadline passes.
    Frozen,
    /// The primary was created and routes all traffic.
    Initialized,
    /// The paused annotation holds the release.
    PausedByUser,
    /// The primary runs the new revision and has all traffic.
    Promoted,
    /// Every check passed: the primary takes the canary's revision.
    Promoting,
    /// A gate that held the release lets it move on.
    PromotionAllowed,
    /// A gate holds the release at its step.
    PromotionDenied,
    /// The target went back to the promoted revision mid-release.
    ReleaseAbandoned,
    /// A new revision's release began.
    ReleaseStarted,
    /// A user pause ended.
    Resumed,
    /// A failed revision is released again.
    Retry,
    /// The target changed mid-release: the analysis restarts for the newer revision.
    RevisionChanged,
    /// The release failed (checks, deadline, a gate, a webhook or an abort): all traffic is back on the primary.
    RolledBack,
    /// A manual promote skipped the current step.
    StepPromoted,
    /// The confirm-rollout webhook has not let the revision start.
    WaitingForConfirmation,
    /// The canary's traffic weight moved to the next step.
    WeightChanged,
    /// The spec cannot be acted on; the status message says which field and why.
    InvalidSpec,
}

impl Reason {
    /// The CamelCase name Events and notifications carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CommandIgnored => "CommandIgnored",
            Reason::DryRunMetricFailed => "DryRunMetricFailed",
            Reason::Frozen => "Frozen",
            Reason::Initialized => "Initialized",
            Reason::PausedByUser => "PausedByUser",
            Reason::Promoted => "Promoted",
            Reason::Promoting => "Promoting",
            Reason::PromotionAllowed => "PromotionAllowed",
            Reason::PromotionDenied => "PromotionDenied",
            Reason::ReleaseAbandoned => "ReleaseAbandoned",
            Reason::ReleaseStarted => "ReleaseStarted",
            Reason::Resumed => "Resumed",
            Reason::Retry => "Retry",
            Reason::RevisionChanged => "RevisionChanged",
            Reason::RolledBack => "RolledBack",
            Reason::StepPromoted => "StepPromoted",
            Reason::WaitingForConfirmation => "WaitingForConfirmation",
            Reason::WeightChanged => "WeightChanged",
            Reason::InvalidSpec => "InvalidSpec",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one planning step.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: RolloutStatus,
    /// `None`: touch nothing (suspended, or no target to work with).
    pub desired: Option<Desired>,
    pub transitions: Vec<Transition>,
    /// When to plan again if nothing else happens first.
    pub requeue_after: Duration,
    /// The one-shot command or promote request was acted on (or refused): remove its annotation.
    pub command_used: bool,
}

/// Everything one planning step depends on.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    pub spec: &'a RolloutSpec,
    pub status: &'a RolloutStatus,
    /// `metadata.generation` of the Rollout, for `observedGeneration`.
    pub generation: i64,
    pub observed: &'a Observed,
    pub checks: &'a Checks,
    pub now: Timestamp,
}

/// How long to wait for readiness before looking again (watch events usually come first).
const READINESS_POLL: Duration = Duration::from_secs(5);

/// When a Rollout with nothing time-bound pending (settled, suspended, or its target missing) is looked at
/// again if no watch event wakes it first: a safety net against a missed event, not a poll. Its reconcile
/// reads only watch caches, so it costs the API server nothing.
pub const IDLE_RESYNC: Duration = Duration::from_secs(15 * 60);

/// Status times are stored with second precision, so they are rounded *up*: a stage stored as started at
/// 12:00:01 really started no later, and intervals measured from it are never cut short.
fn stamp(now: Timestamp) -> Time {
    let whole = now.as_second();
    let ceil = if now.subsec_nanosecond() > 0 {
        whole + 1
    } else {
        whole
    };
    Time(Timestamp::from_second(ceil).unwrap_or(now))
}

pub(crate) fn interval(spec: &RolloutSpec) -> Duration {
    spec.analysis
        .interval
        .to_std()
        .unwrap_or(Duration::from_secs(60))
        .max(Duration::from_secs(1))
}

fn deadline(spec: &RolloutSpec) -> Duration {
    Duration::from_secs(u64::from(spec.progress_deadline_seconds.max(1)))
}

fn elapsed(since: Option<&Time>, now: Timestamp) -> Duration {
    since
        .map(|t| now.duration_since(t.0).unsigned_abs())
        .filter(|_| since.is_some_and(|t| t.0 <= now))
        .unwrap_or(Duration::ZERO)
}

/// How long the current stage has run (its start is stored rounded up, so this never overstates it).
pub fn stage_age(status: &RolloutStatus, now: Timestamp) -> Option<Duration> {
    status
        .stage_started_time
        .as_ref()
        .map(|started| elapsed(Some(started), now))
}

fn later_of<'a>(a: Option<&'a Time>, b: Option<&'a Time>) -> Option<&'a Time> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.0 >= y.0 { x } else { y }),
        (x, y) => x.or(y),
    }
}

/// Whether the controller should run the metric checks now.
pub fn checks_due(
    spec: &RolloutSpec,
    status: &RolloutStatus,
    observed: &Observed,
    now: Timestamp,
) -> bool {
    if spec.suspend
        || spec.skip_analysis
        || observed.paused_by_user
        || status.phase != Some(RolloutPhase::Progressing)
    {
        return false;
    }
    if !observed.canary_ready || observed.target_revision.as_deref() != status.revision.as_deref() {
        return false;
    }
    let ladder = stages(&spec.analysis);
    let stage = ladder.get(status.current_step as usize);
    if !matches!(stage, Some(Stage::Judge(_))) {
        return false;
    }
    let since = later_of(
        status.stage_started_time.as_ref(),
        status.last_check_time.as_ref(),
    );
    status.stage_started_time.is_some() && elapsed(since, now) >= interval(spec)
}

/// Whether a release of the target's revision would start if the planner ran now.
fn would_start(status: &RolloutStatus, observed: &Observed) -> bool {
    let Some(target) = observed.target_revision.as_deref() else {
        return false;
    };
    match status.phase {
        Some(RolloutPhase::Initialized | RolloutPhase::Succeeded | RolloutPhase::Failed) => {
            status.last_promoted_revision.as_deref() != Some(target)
                && status.revision.as_deref() != Some(target)
        }
        _ => false,
    }
}

/// Which webhooks to call before planning (`rollout` and `rollback` hooks go with the checks).
pub fn hooks_due(spec: &RolloutSpec, status: &RolloutStatus, observed: &Observed) -> HooksDue {
    if spec.suspend {
        return HooksDue::default();
    }
    let current = observed.target_revision.is_some()
        && observed.target_revision.as_deref() == status.revision.as_deref();
    // A user pause holds a release in progress; it does not stop one from being confirmed.
    HooksDue {
        confirm_rollout: would_start(status, observed),
        pre_rollout: !observed.paused_by_user
            && status.phase == Some(RolloutPhase::Progressing)
            && current
            && observed.canary_ready
            && status.stage_started_time.is_none()
            && !spec.skip_analysis,
    }
}

/// Where a passing check at the current stage leads. Pauses are looked through: a weight increase (or the
/// promotion) that comes after a pause is confirmed before the pause, as the last judged move before it.
pub fn next_move(spec: &RolloutSpec, status: &RolloutStatus) -> NextMove {
    let ladder = stages(&spec.analysis);
    let step = status.current_step as usize;
    let next_judged = ladder.iter().skip(step + 1).find_map(|stage| match stage {
        Stage::Judge(weight) => Some(*weight),
        Stage::Pause(_) => None,
    });
    match next_judged {
        None => NextMove::Promotion,
        Some(next) => NextMove::Stage {
            raises_weight: next.min(max_weight(&ladder)) > status.canary_weight,
        },
    }
}

/// Whether the canary's own routes (A/B matches, mirroring, sticky sessions) are on for this plan.
fn experimenting(spec: &RolloutSpec, status: &RolloutStatus, desired: &Desired) -> bool {
    let analysis = &spec.analysis;
    let configured =
        !analysis.match_.is_empty() || analysis.mirror || analysis.session_affinity.is_some();
    let judging = status.stage_started_time.is_some()
        && matches!(
            status.phase,
            Some(RolloutPhase::Progressing | RolloutPhase::Paused)
        );
    // Matched users stay on the canary until the primary runs its version; a blue-green switch sends
    // everything there anyway, and sticky users follow the weight.
    let promoting_ab = status.phase == Some(RolloutPhase::Promoting)
        && strategy(analysis) == ReleaseStrategy::AbTest;
    configured && desired.canary_up && (judging || promoting_ab)
}

/// Plans one step. Same inputs, same output.
pub fn plan(input: PlanInput<'_>) -> Plan {
    let before = input.status;
    let mut plan = plan_release(input);
    if let Some(desired) = &mut plan.desired {
        desired.experiment = experimenting(input.spec, &plan.status, desired);
    }
    let observed = input.observed;
    // A promote request is used once it moved the release (left a pause, skipped a stage) or could not
    // apply; left in place it would skip a later stage the user never meant to skip.
    let in_release = matches!(
        before.phase,
        Some(RolloutPhase::Progressing | RolloutPhase::Paused)
    );
    let moved =
        plan.status.current_step != before.current_step || plan.status.phase != before.phase;
    if observed.promote_requested && (moved || !in_release) && !input.spec.suspend {
        plan.command_used = true;
        if !in_release {
            plan.transitions.push(ignored("promote", before.phase));
        }
    }
    if observed.command.is_some() && !input.spec.suspend {
        plan.command_used = true;
    }
    plan
}

fn ignored(command: &str, phase: Option<RolloutPhase>) -> Transition {
    Transition {
        warning: true,
        reason: Reason::CommandIgnored,
        message: format!(
            "{command} ignored: nothing to {command} while the rollout is {}",
            phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "new".into())
        ),
    }
}

/// Shifts a stamp by the time a user pause lasted, so pauses do not count against deadlines or intervals.
fn shifted(time: &Option<Time>, by: Duration) -> Option<Time> {
    time.as_ref().map(|t| {
        Time(
            t.0.checked_add(jiff::SignedDuration::try_from(by).unwrap_or_default())
                .unwrap_or(t.0),
        )
    })
}

fn plan_release(input: PlanInput<'_>) -> Plan {
    let PlanInput {
        spec,
        status,
        generation,
        observed,
        checks,
        now,
    } = input;
    let mut next = status.clone();
    let mut transitions = Vec::new();
    let mut requeue_after = interval(spec);

    if spec.suspend {
        return Plan {
            status: next,
            desired: None,
            transitions,
            requeue_after: IDLE_RESYNC,
            command_used: false,
        };
    }
    let Some(target_revision) = observed.target_revision.clone() else {
        next.message = Some(format!("target {} not found", spec.target_ref.name));
        return finish(
            next,
            status,
            generation,
            now,
            None,
            transitions,
            // The target's creation is a watch event.
            IDLE_RESYNC,
        );
    };

    // Manual control first: commands override what the release would do next.
    let in_release = matches!(
        status.phase,
        Some(RolloutPhase::Progressing | RolloutPhase::Paused)
    );
    let current = status.revision.as_deref() == Some(target_revision.as_str());
    if let Some(command) = observed.command {
        match command {
            Command::Abort if in_release => {
                next.paused_at = None;
                rollback(
                    &mut next,
                    now,
                    "aborted by the user".into(),
                    &mut transitions,
                );
                let desired = steady(&mut next);
                return finish(
                    next,
                    status,
                    generation,
                    now,
                    Some(desired),
                    transitions,
                    requeue_after,
                );
            }
            Command::PromoteFull if in_release && current && observed.canary_ready => {
                next.paused_at = None;
                let desired = begin_promotion(
                    spec,
                    &mut next,
                    now,
                    "promoted by the user, skipping the remaining analysis",
                    &mut transitions,
                );
                return finish(
                    next,
                    status,
                    generation,
                    now,
                    Some(desired),
                    transitions,
                    READINESS_POLL,
                );
            }
            Command::Retry
                if status.phase == Some(RolloutPhase::Failed)
                    && current
                    && status.last_promoted_revision.as_deref()
                        != Some(target_revision.as_str()) =>
            {
                transitions.push(Transition {
                    warning: false,
                    reason: Reason::Retry,
                    message: format!("the user asked to release revision {target_revision} again"),
                });
                start_release(&mut next, &target_revision, now, spec, &mut transitions);
                let desired = running(Weight::ZERO);
                return finish(
                    next,
                    status,
                    generation,
                    now,
                    Some(desired),
                    transitions,
                    READINESS_POLL,
                );
            }
            Command::Abort => transitions.push(ignored("abort", status.phase)),
            Command::PromoteFull if in_release => transitions.push(Transition {
                warning: true,
                reason: Reason::CommandIgnored,
                message:
                    "promote --full ignored: the canary is not ready yet; try again once it is"
                        .into(),
            }),
            Command::PromoteFull => transitions.push(ignored("promote", status.phase)),
            Command::Retry => transitions.push(ignored("retry", status.phase)),
        }
    }
    // A user pause holds the release where it is; its timers restart where they stopped on resume.
    if observed.paused_by_user && in_release && current {
        if next.paused_at.is_none() {
            next.paused_at = Some(stamp(now));
            transitions.push(Transition {
                warning: false,
                reason: Reason::PausedByUser,
                message: format!("paused by the user at {}", status.canary_weight),
            });
        }
        next.message = Some(format!(
            "paused by the user at {}; `sluice rollout resume` continues",
            status.canary_weight
        ));
        let desired = running(status.canary_weight);
        return finish(
            next,
            status,
            generation,
            now,
            Some(desired),
            transitions,
            Duration::from_secs(300),
        );
    }
    let resumed;
    let status = match &status.paused_at {
        Some(paused_at) => {
            let paused_for = elapsed(Some(paused_at), now);
            let mut timers = status.clone();
            timers.paused_at = None;
            timers.last_progress_time = shifted(&status.last_progress_time, paused_for);
            timers.stage_started_time = shifted(&status.stage_started_time, paused_for);
            timers.last_check_time = shifted(&status.last_check_time, paused_for);
            next.paused_at = None;
            next.last_progress_time = timers.last_progress_time.clone();
            next.stage_started_time = timers.stage_started_time.clone();
            next.last_check_time = timers.last_check_time.clone();
            transitions.push(Transition {
                warning: false,
                reason: Reason::Resumed,
                message: format!("resumed after a pause of {}s", paused_for.as_secs()),
            });
            resumed = timers;
            &resumed
        }
        None => status,
    };

    let desired = match status.phase {
        None | Some(RolloutPhase::Initializing) => {
            next.phase = Some(RolloutPhase::Initializing);
            next.revision = Some(target_revision.clone());
            next.canary_weight = Weight::ZERO;
            if observed.primary_revision.as_deref() == Some(target_revision.as_str())
                && observed.primary_ready
            {
                next.phase = Some(RolloutPhase::Initialized);
                next.last_promoted_revision = Some(target_revision.clone());
                next.message = Some(format!(
                    "primary {}-primary runs revision {target_revision}",
                    spec.target_ref.name
                ));
                transitions.push(Transition {
                    warning: false,
                    reason: Reason::Initialized,
                    message: format!(
                        "created {}-primary and routed all traffic to it",
                        spec.target_ref.name
                    ),
                });
            } else {
                next.message = Some("waiting for the primary to become ready".into());
                requeue_after = READINESS_POLL;
            }
            Desired {
                primary_from_target: true,
                canary_up: false,
                canary_weight: Weight::ZERO,
                experiment: false,
            }
        }
        Some(RolloutPhase::Initialized | RolloutPhase::Succeeded | RolloutPhase::Failed) => {
            let promoted =
                status.last_promoted_revision.as_deref() == Some(target_revision.as_str());
            let already_tried = status.revision.as_deref() == Some(target_revision.as_str());
            if promoted || already_tried {
                // Settled: only a change (of the target, the Rollout, what it routes) starts anything.
                requeue_after = IDLE_RESYNC;
                steady(&mut next)
            } else if let Some((hook, why)) = &observed.hooks.rollout_unconfirmed {
                let message = format!(
                    "revision {target_revision} waits for webhook {hook} (confirm-rollout): {why}"
                );
                if status.message.as_deref() != Some(message.as_str()) {
                    transitions.push(Transition {
                        warning: false,
                        reason: Reason::WaitingForConfirmation,
                        message: message.clone(),
                    });
                }
                next.message = Some(message);
                steady(&mut next)
            } else {
                start_release(&mut next, &target_revision, now, spec, &mut transitions);
                requeue_after = READINESS_POLL;
                running(Weight::ZERO)
            }
        }
        Some(RolloutPhase::Progressing | RolloutPhase::Paused) => {
            if status.revision.as_deref() != Some(target_revision.as_str()) {
                if status.last_promoted_revision.as_deref() == Some(target_revision.as_str()) {
                    // The target went back to what the primary runs: nothing left to release.
                    set_phase(&mut next, RolloutPhase::Succeeded, now);
                    next.revision = Some(target_revision.clone());
                    next.message = Some("the target was reverted to the promoted revision".into());
                    transitions.push(Transition {
                        warning: false,
                        reason: Reason::ReleaseAbandoned,
                        message: "the target was reverted to the promoted revision; all traffic is on the primary".into(),
                    });
                    steady(&mut next)
                } else {
                    requeue_after = READINESS_POLL;
                    restart_release(
                        &mut next,
                        status,
                        &target_revision,
                        now,
                        spec,
                        &mut transitions,
                    )
                }
            } else {
                let (desired, requeue) = progress(
                    spec,
                    status,
                    &mut next,
                    observed,
                    checks,
                    now,
                    &mut transitions,
                );
                requeue_after = requeue;
                desired
            }
        }
        Some(RolloutPhase::Promoting)
            if status.revision.as_deref() != Some(target_revision.as_str())
                && observed.primary_revision.as_deref() != status.revision.as_deref() =>
        {
            // A newer revision arrived before the primary took the judged one: judge the newer one.
            requeue_after = READINESS_POLL;
            restart_release(
                &mut next,
                status,
                &target_revision,
                now,
                spec,
                &mut transitions,
            )
        }
        Some(RolloutPhase::Promoting) => {
            let promoted_revision = status.revision.clone().unwrap_or_default();
            let primary_done = observed.primary_revision.as_deref()
                == Some(promoted_revision.as_str())
                && observed.primary_ready;
            if primary_done {
                set_phase(&mut next, RolloutPhase::Succeeded, now);
                next.last_promoted_revision = Some(promoted_revision.clone());
                next.canary_weight = Weight::ZERO;
                next.message = Some(format!("revision {promoted_revision} promoted"));
                transitions.push(Transition {
                    warning: false,
                    reason: Reason::Promoted,
                    message: format!("revision {promoted_revision} promoted: all traffic on the primary, canary scaled to 0"),
                });
                STOPPED
            } else if elapsed(status.last_progress_time.as_ref(), now) > deadline(spec) {
                rollback(
                    &mut next,
                    now,
                    format!(
                        "the primary did not become ready with revision {promoted_revision} within {}s",
                        spec.progress_deadline_seconds
                    ),
                    &mut transitions,
                );
                steady(&mut next)
            } else {
                requeue_after = READINESS_POLL;
                // Keep the canary serving its share until the primary runs the new revision, but only while
                // the canary still runs the judged revision: a newer one pushed meanwhile gets no traffic.
                let judged =
                    observed.target_revision.as_deref() == Some(promoted_revision.as_str());
                if !judged {
                    next.canary_weight = Weight::ZERO;
                }
                Desired {
                    primary_from_target: judged,
                    canary_up: true,
                    canary_weight: next.canary_weight,
                    experiment: false,
                }
            }
        }
    };
    finish(
        next,
        status,
        generation,
        now,
        Some(desired),
        transitions,
        requeue_after,
    )
}

/// A release in progress: the canary runs and gets `weight`; the primary keeps its template.
fn running(weight: Weight) -> Desired {
    Desired {
        primary_from_target: false,
        canary_up: true,
        canary_weight: weight,
        experiment: false,
    }
}

/// After a rollback and between releases: everything on the primary, canary scaled to 0.
const STOPPED: Desired = Desired {
    primary_from_target: false,
    canary_up: false,
    canary_weight: Weight::ZERO,
    experiment: false,
};

/// Between releases: everything on the primary, canary scaled to 0.
fn steady(next: &mut RolloutStatus) -> Desired {
    next.canary_weight = Weight::ZERO;
    STOPPED
}

fn set_phase(status: &mut RolloutStatus, phase: RolloutPhase, now: Timestamp) {
    if status.phase != Some(phase) {
        status.phase = Some(phase);
        status.last_transition_time = Some(Time(now));
    }
}

fn start_release(
    next: &mut RolloutStatus,
    revision: &str,
    now: Timestamp,
    spec: &RolloutSpec,
    transitions: &mut Vec<Transition>,
) {
    set_phase(next, RolloutPhase::Progressing, now);
    next.revision = Some(revision.to_owned());
    next.canary_weight = Weight::ZERO;
    next.current_step = 0;
    next.iterations = 0;
    next.failed_checks = 0;
    next.verdicts.clear();
    next.last_progress_time = Some(stamp(now));
    next.stage_started_time = None;
    next.last_check_time = None;
    next.message = Some(format!(
        "waiting for the canary {} to become ready",
        spec.target_ref.name
    ));
    transitions.push(Transition {
        warning: false,
        reason: Reason::ReleaseStarted,
        message: format!("new revision {revision} detected; starting the canary analysis"),
    });
}

/// The target changed before the release finished: the new revision starts from the first stage.
fn restart_release(
    next: &mut RolloutStatus,
    status: &RolloutStatus,
    revision: &str,
    now: Timestamp,
    spec: &RolloutSpec,
    transitions: &mut Vec<Transition>,
) -> Desired {
    transitions.push(Transition {
        warning: false,
        reason: Reason::RevisionChanged,
        message: format!(
            "revision {revision} replaced {} before it was promoted; the analysis restarts",
            status.revision.as_deref().unwrap_or("?")
        ),
    });
    start_release(next, revision, now, spec, transitions);
    running(Weight::ZERO)
}

fn rollback(
    next: &mut RolloutStatus,
    now: Timestamp,
    why: String,
    transitions: &mut Vec<Transition>,
) {
    set_phase(next, RolloutPhase::Failed, now);
    next.canary_weight = Weight::ZERO;
    next.message = Some(format!("rolled back: {why}"));
    transitions.push(Transition {
        warning: true,
        reason: Reason::RolledBack,
        message: format!("rolled back: {why}"),
    });
}

/// The Progressing / Paused phase: wait for readiness, judge the stage, move up the ladder.
#[allow(clippy::too_many_arguments)]
fn progress(
    spec: &RolloutSpec,
    status: &RolloutStatus,
    next: &mut RolloutStatus,
    observed: &Observed,
    checks: &Checks,
    now: Timestamp,
    transitions: &mut Vec<Transition>,
) -> (Desired, Duration) {
    let ladder = stages(&spec.analysis);
    let interval = interval(spec);
    let since_progress = elapsed(status.last_progress_time.as_ref(), now);
    let since_stage = elapsed(status.stage_started_time.as_ref(), now);
    let step = (status.current_step as usize).min(ladder.len().saturating_sub(1));
    let stage = ladder
        .get(step)
        .copied()
        .unwrap_or(Stage::Judge(Weight::ZERO));
    let paused = matches!(stage, Stage::Pause(_));

    if spec.skip_analysis && observed.canary_ready {
        return (
            begin_promotion(spec, next, now, "skipAnalysis is set", transitions),
            READINESS_POLL,
        );
    }
    // The deadline counts from the last progress; pauses are waits the user asked for (gate holds restart it).
    if !paused && since_progress > deadline(spec) {
        let why = if !observed.canary_ready {
            format!(
                "the canary did not become ready within {}s",
                spec.progress_deadline_seconds
            )
        } else if let Checks::Unavailable(reason) = checks {
            format!(
                "no progress within {}s while metrics were unavailable ({reason})",
                spec.progress_deadline_seconds
            )
        } else {
            format!(
                "no progress within {}s ({})",
                spec.progress_deadline_seconds,
                next.message.clone().unwrap_or_default()
            )
        };
        rollback(next, now, why, transitions);
        return (STOPPED, interval);
    }
    if !observed.canary_ready {
        next.message = Some(format!(
            "waiting for the canary {} to become ready",
            spec.target_ref.name
        ));
        return (running(status.canary_weight), READINESS_POLL);
    }
    if let Some((hook, why)) = &observed.hooks.pre_rollout_failed {
        rollback(
            next,
            now,
            format!("pre-rollout webhook {hook} failed: {why}"),
            transitions,
        );
        return (STOPPED, interval);
    }
    // The canary is ready: the first stage takes effect.
    if status.stage_started_time.is_none() {
        let first = weight_at(&ladder, 0);
        next.canary_weight = first;
        next.last_progress_time = Some(stamp(now));
        next.stage_started_time = Some(stamp(now));
        next.message = Some(stage_message(spec, &stage, first));
        if first > Weight::ZERO {
            transitions.push(Transition {
                warning: false,
                reason: Reason::WeightChanged,
                message: format!("canary ready; routing {first} of traffic to it"),
            });
        }
        return (running(first), interval);
    }
    match stage {
        Stage::Pause(duration) => {
            next.phase = Some(if duration.is_none() {
                RolloutPhase::Paused
            } else {
                RolloutPhase::Progressing
            });
            let done = match duration {
                Some(d) => since_stage >= d,
                None => observed.promote_requested,
            };
            if done {
                return advance(spec, &ladder, step, next, now, transitions);
            }
            let wait = duration
                .map(|d| d.saturating_sub(since_stage))
                .unwrap_or(READINESS_POLL);
            next.message = Some(match duration {
                Some(d) => format!("paused for {}s at {}", d.as_secs(), status.canary_weight),
                None => format!("paused at {} until promoted", status.canary_weight),
            });
            (
                running(status.canary_weight),
                wait.max(Duration::from_secs(1)),
            )
        }
        Stage::Judge(weight) if observed.promote_requested => {
            transitions.push(Transition {
                warning: false,
                reason: Reason::StepPromoted,
                message: format!("the user promoted the canary past the analysis at {weight}"),
            });
            advance(spec, &ladder, step, next, now, transitions)
        }
        Stage::Judge(weight) => match checks {
            Checks::NotRun => {
                let since = later_of(
                    status.stage_started_time.as_ref(),
                    status.last_check_time.as_ref(),
                );
                let wait = interval
                    .saturating_sub(elapsed(since, now))
                    .max(Duration::from_millis(200));
                (running(weight), wait)
            }
            Checks::Unavailable(reason) => {
                if !status
                    .message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("frozen"))
                {
                    transitions.push(Transition {
                        warning: true,
                        reason: Reason::Frozen,
                        message: format!(
                            "frozen at {weight}: metrics unavailable ({reason}); nothing is promoted until they are back"
                        ),
                    });
                }
                next.message = Some(format!(
                    "frozen at {weight}: metrics unavailable ({reason})"
                ));
                next.last_check_time = Some(stamp(now));
                (running(weight), interval)
            }
            Checks::Ran(_) if observed.hooks.rollback_requested.is_some() => {
                let hook = observed
                    .hooks
                    .rollback_requested
                    .clone()
                    .unwrap_or_default();
                rollback(
                    next,
                    now,
                    format!("webhook {hook} (rollback) asked for a rollback at {weight}"),
                    transitions,
                );
                (STOPPED, interval)
            }
            Checks::Ran(verdicts) => judge(
                spec,
                &ladder,
                step,
                weight,
                verdicts,
                observed,
                next,
                now,
                transitions,
            ),
        },
    }
}

fn stage_message(spec: &RolloutSpec, stage: &Stage, weight: Weight) -> String {
    let analysis = &spec.analysis;
    match (stage, strategy(analysis)) {
        (Stage::Pause(_), _) => format!("paused at {weight}"),
        (Stage::Judge(_), ReleaseStrategy::Canary) => format!("analysing the canary at {weight}"),
        (Stage::Judge(_), ReleaseStrategy::AbTest) => {
            "analysing the canary on the requests that match (A/B test)".to_owned()
        }
        (Stage::Judge(_), ReleaseStrategy::BlueGreen) if analysis.mirror => format!(
            "analysing the canary on a mirrored copy of {} of the requests (blue-green)",
            analysis.mirror_weight.unwrap_or(Weight::FULL)
        ),
        (Stage::Judge(_), ReleaseStrategy::BlueGreen) => {
            "analysing the canary without user traffic (blue-green)".to_owned()
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn judge(
    spec: &RolloutSpec,
    ladder: &[Stage],
    step: usize,
    weight: Weight,
    verdicts: &[MetricVerdict],
    observed: &Observed,
    next: &mut RolloutStatus,
    now: Timestamp,
    transitions: &mut Vec<Transition>,
) -> (Desired, Duration) {
    let interval = interval(spec);
    next.last_check_time = Some(stamp(now));
    // A dry-run metric only reports: an Event when it turns failed, nothing that gates.
    for metric in spec.analysis.metrics.iter().filter(|m| m.dry_run) {
        let failed_now = verdicts
            .iter()
            .find(|v| v.name == metric.name)
            .filter(|v| v.verdict == Verdict::Fail);
        let failed_before = next
            .verdicts
            .iter()
            .any(|v| v.name == metric.name && v.verdict == Verdict::Fail);
        if let (Some(v), false) = (failed_now, failed_before) {
            transitions.push(Transition {
                warning: false,
                reason: Reason::DryRunMetricFailed,
                message: format!(
                    "dry-run metric failed at {weight}: {} (not gating)",
                    describe(v)
                ),
            });
        }
    }
    next.verdicts = verdicts.to_vec();
    // A metric the spec asks for but the controller did not report is no data, never a pass.
    let verdict_of = |name: &str| verdicts.iter().find(|v| v.name == name);
    let mut failed = Vec::new();
    let mut held = Vec::new();
    for metric in spec.analysis.metrics.iter().filter(|m| !m.dry_run) {
        match verdict_of(&metric.name) {
            Some(v) if v.verdict == Verdict::Pass => {}
            Some(v) if v.verdict == Verdict::Fail => failed.push(describe(v)),
            other => {
                let text = other
                    .map(describe)
                    .unwrap_or_else(|| format!("{}: no data", metric.name));
                match metric.on_no_data {
                    NoDataPolicy::Fail => failed.push(text),
                    NoDataPolicy::Hold => held.push(text),
                }
            }
        }
    }
    failed.extend(
        observed
            .hooks
            .rollout_failed
            .iter()
            .map(|(hook, why)| format!("webhook {hook}: {why}")),
    );
    if !failed.is_empty() {
        next.failed_checks += 1;
        let threshold = spec.analysis.threshold.max(1);
        next.message = Some(format!(
            "check failed at {weight} ({}/{threshold}): {}",
            next.failed_checks,
            failed.join(", ")
        ));
        if next.failed_checks >= threshold {
            rollback(
                next,
                now,
                format!(
                    "{} failed checks at {weight}: {}",
                    next.failed_checks,
                    failed.join(", ")
                ),
                transitions,
            );
            return (STOPPED, interval);
        }
        return (running(weight), interval);
    }
    if !held.is_empty() {
        next.message = Some(format!("holding at {weight}: {}", held.join(", ")));
        return (running(weight), interval);
    }
    if spec.analysis.failure_counting == FailureCounting::Consecutive {
        next.failed_checks = 0;
    }
    match observed.gate.as_ref() {
        Some(Gate::Denied {
            by,
            reasons,
            rollback: true,
        }) => {
            let why = format!("{by} denied the promotion: {}", reasons.join("; "));
            self::rollback(next, now, why, transitions);
            return (STOPPED, interval);
        }
        Some(Gate::Denied { by, reasons, .. }) => {
            let message = format!("held at {weight} by {by}: {}", reasons.join("; "));
            // A hold is a wait someone asked for: the deadline starts again from each held check, so only
            // what happens after the last one (no data, failed checks, a stuck canary) counts against it.
            next.last_progress_time = Some(stamp(now));
            // One Event per new reason, not one per check.
            if next.message.as_deref() != Some(message.as_str()) {
                transitions.push(Transition {
                    warning: true,
                    reason: Reason::PromotionDenied,
                    message: message.clone(),
                });
            }
            next.message = Some(message);
            return (running(weight), interval);
        }
        Some(Gate::Allowed(policies)) => transitions.push(Transition {
            warning: false,
            reason: Reason::PromotionAllowed,
            message: format!(
                "{} allowed moving on from {weight} at {}",
                policies.join(", "),
                now
            ),
        }),
        None => {}
    }
    next.iterations += 1;
    advance(spec, ladder, step, next, now, transitions)
}

fn describe(v: &MetricVerdict) -> String {
    let against = v
        .primary_value
        .map(|primary| format!(" (primary {primary:.2})"))
        .unwrap_or_default();
    match (v.verdict, v.value) {
        (Verdict::NoData, _) => format!("{}: no data", v.name),
        (_, Some(value)) => format!("{} {value:.2}{against}", v.name),
        (_, None) => v.name.clone(),
    }
}

/// Moves to the stage after `step`, or promotes after the last one.
fn advance(
    spec: &RolloutSpec,
    ladder: &[Stage],
    step: usize,
    next: &mut RolloutStatus,
    now: Timestamp,
    transitions: &mut Vec<Transition>,
) -> (Desired, Duration) {
    let interval = interval(spec);
    if step + 1 >= ladder.len() {
        return (
            begin_promotion(spec, next, now, "every stage passed", transitions),
            READINESS_POLL,
        );
    }
    let next_step = step + 1;
    let weight = weight_at(ladder, next_step).min(max_weight(ladder));
    next.phase = Some(RolloutPhase::Progressing);
    next.current_step = u32::try_from(next_step).unwrap_or(u32::MAX);
    next.last_progress_time = Some(stamp(now));
    next.stage_started_time = Some(stamp(now));
    let stage = ladder[next_step];
    next.message = Some(stage_message(spec, &stage, weight));
    if weight != next.canary_weight {
        transitions.push(Transition {
            warning: false,
            reason: Reason::WeightChanged,
            message: format!(
                "checks passed at {}; routing {weight} to the canary",
                next.canary_weight
            ),
        });
    }
    next.canary_weight = weight;
    let wait = match stage {
        Stage::Pause(Some(d)) => d.max(Duration::from_secs(1)),
        Stage::Pause(None) => READINESS_POLL,
        Stage::Judge(_) => interval,
    };
    (running(weight), wait)
}

fn begin_promotion(
    spec: &RolloutSpec,
    next: &mut RolloutStatus,
    now: Timestamp,
    why: &str,
    transitions: &mut Vec<Transition>,
) -> Desired {
    set_phase(next, RolloutPhase::Promoting, now);
    next.last_progress_time = Some(stamp(now));
    let revision = next.revision.clone().unwrap_or_default();
    next.message = Some(format!("promoting revision {revision}: {why}"));
    // Blue-green: every request moves to the judged version at once while the primary is rewritten, and
    // back to the primary once it runs that version.
    let switch = strategy(&spec.analysis) == ReleaseStrategy::BlueGreen;
    let how = if switch {
        "; all traffic switched to the canary"
    } else {
        ""
    };
    if switch {
        next.canary_weight = Weight::FULL;
    }
    transitions.push(Transition {
        warning: false,
        reason: Reason::Promoting,
        message: format!("{why}{how}; copying revision {revision} to the primary"),
    });
    Desired {
        primary_from_target: true,
        canary_up: true,
        canary_weight: next.canary_weight,
        experiment: false,
    }
}

/// Sets conditions and observedGeneration. Everything else was decided by the caller.
fn finish(
    mut next: RolloutStatus,
    before: &RolloutStatus,
    generation: i64,
    now: Timestamp,
    desired: Option<Desired>,
    transitions: Vec<Transition>,
    requeue_after: Duration,
) -> Plan {
    next.observed_generation = Some(generation);
    let phase = next.phase;
    let frozen = next
        .message
        .as_deref()
        .is_some_and(|m| m.starts_with("frozen"));
    let (ready, ready_reason) = match phase {
        Some(RolloutPhase::Failed) => (false, "RolledBack"),
        None | Some(RolloutPhase::Initializing) => (false, "Initializing"),
        _ => (true, "Serving"),
    };
    let (progressing, progressing_reason) = match phase {
        Some(RolloutPhase::Progressing) if frozen => (true, "Frozen"),
        Some(RolloutPhase::Progressing) => (true, "Analysing"),
        Some(RolloutPhase::Paused) => (true, "Paused"),
        Some(RolloutPhase::Promoting) => (true, "Promoting"),
        Some(RolloutPhase::Failed) => (false, "RolledBack"),
        _ => (false, "Idle"),
    };
    let promoted = matches!(
        phase,
        Some(RolloutPhase::Initialized | RolloutPhase::Succeeded)
    );
    let promoted_reason = match phase {
        Some(RolloutPhase::Initialized) => "Initialized",
        Some(RolloutPhase::Succeeded) => "Succeeded",
        Some(RolloutPhase::Failed) => "RolledBack",
        _ => "ReleaseInProgress",
    };
    let message = next.message.clone().unwrap_or_default();
    set_condition(
        &mut next.conditions,
        "Ready",
        ready,
        ready_reason,
        &message,
        generation,
        now,
    );
    set_condition(
        &mut next.conditions,
        "Progressing",
        progressing,
        progressing_reason,
        &message,
        generation,
        now,
    );
    set_condition(
        &mut next.conditions,
        "Promoted",
        promoted,
        promoted_reason,
        &message,
        generation,
        now,
    );
    set_condition(
        &mut next.conditions,
        "InvalidSpec",
        false,
        "Valid",
        "",
        generation,
        now,
    );
    if next.phase != before.phase && next.last_transition_time == before.last_transition_time {
        next.last_transition_time = Some(Time(now));
    }
    Plan {
        status: next,
        desired,
        transitions,
        requeue_after,
        command_used: false,
    }
}

/// Updates or adds a condition; `lastTransitionTime` moves only when the status flips.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" };
    set_condition_status(conditions, type_, status, reason, message, generation, now);
}

/// [`set_condition`] for any status, `Unknown` included.
pub fn set_condition_status(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: i64,
    now: Timestamp,
) {
    let status = status.to_owned();
    let existing = conditions.iter_mut().find(|c| c.type_ == type_);
    match existing {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message.to_owned();
            c.observed_generation = Some(generation);
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation: Some(generation),
            last_transition_time: Time(now),
        }),
    }
}
