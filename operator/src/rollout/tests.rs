//! Planner scenarios and invariants, driven by a small simulated world (no client, no clock).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::api::{MetricVerdict, RolloutPhase, RolloutSpec, RolloutStatus, Verdict, Weight};

fn spec(analysis: serde_json::Value) -> RolloutSpec {
    serde_json::from_value(json!({
        "targetRef": {"kind": "Deployment", "name": "podinfo"},
        "service": {"port": 9898},
        "progressDeadlineSeconds": 60,
        "analysis": analysis,
    }))
    .expect("valid spec")
}

fn canary_spec() -> RolloutSpec {
    spec(json!({
        "interval": "5s", "threshold": 2, "stepWeight": 20, "maxWeight": 60,
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    }))
}

/// How the simulated metrics answer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Health {
    Good,
    Bad,
    NoData,
    Unavailable,
    /// One verdict per metric, in spec order (metrics past the last entry get the last one).
    Each([Verdict; 2]),
}

/// The world the controller would see: workloads that follow the desired state, metrics that follow `health`.
struct World {
    spec: RolloutSpec,
    status: RolloutStatus,
    observed: Observed,
    now: Timestamp,
    canary_can_be_ready: bool,
    health: Health,
    /// What the webhooks answer when the controller calls them.
    hooks: HookAnswers,
    log: Vec<(Plan, Checks)>,
    /// Beside each `log` entry: the status the planner started from, and the time it planned at.
    history: Vec<(RolloutStatus, Timestamp)>,
}

impl World {
    fn new(spec: RolloutSpec) -> World {
        World {
            spec,
            status: RolloutStatus::default(),
            observed: Observed {
                target_revision: Some("r1".into()),
                ..Observed::default()
            },
            now: "2026-01-01T00:00:00Z".parse().expect("timestamp"),
            canary_can_be_ready: true,
            health: Health::Good,
            hooks: HookAnswers::default(),
            log: Vec::new(),
            history: Vec::new(),
        }
    }

    fn checks(&self) -> Checks {
        if !checks_due(&self.spec, &self.status, &self.observed, self.now) {
            return Checks::NotRun;
        }
        let verdict_of = |index: usize| match self.health {
            Health::Good => Verdict::Pass,
            Health::Bad => Verdict::Fail,
            Health::NoData => Verdict::NoData,
            Health::Each(verdicts) => verdicts[index.min(verdicts.len() - 1)],
            Health::Unavailable => Verdict::NoData,
        };
        if self.health == Health::Unavailable {
            return Checks::Unavailable("connection refused".into());
        }
        Checks::Ran(
            self.spec
                .analysis
                .metrics
                .iter()
                .enumerate()
                .map(|(index, m)| {
                    let verdict = verdict_of(index);
                    MetricVerdict {
                        name: m.name.clone(),
                        verdict,
                        value: match verdict {
                            Verdict::Pass => Some(99.9),
                            Verdict::Fail => Some(80.0),
                            Verdict::NoData => None,
                        },
                        checked_at: Time(self.now),
                        dry_run: m.dry_run,
                        primary_value: None,
                    }
                })
                .collect(),
        )
    }

    /// One reconcile, then the world converges to what was asked, then `dt` passes.
    fn tick(&mut self, dt: Duration) -> Plan {
        let before = self.status.clone();
        let checks = self.checks();
        // The controller calls only the hooks that are due.
        let due = hooks_due(&self.spec, &self.status, &self.observed);
        let ran = matches!(checks, Checks::Ran(_));
        let mut observed = self.observed.clone();
        observed.hooks = HookAnswers {
            rollout_unconfirmed: self
                .hooks
                .rollout_unconfirmed
                .clone()
                .filter(|_| due.confirm_rollout),
            pre_rollout_failed: self
                .hooks
                .pre_rollout_failed
                .clone()
                .filter(|_| due.pre_rollout),
            rollout_failed: if ran {
                self.hooks.rollout_failed.clone()
            } else {
                Vec::new()
            },
            rollback_requested: self.hooks.rollback_requested.clone().filter(|_| ran),
        };
        let input = PlanInput {
            spec: &self.spec,
            status: &self.status,
            generation: 1,
            observed: &observed,
            checks: &checks,
            now: self.now,
        };
        let plan = plan(input);
        assert_eq!(
            plan,
            super::plan(input),
            "the planner must be deterministic"
        );
        if let Some(desired) = plan.desired {
            if desired.primary_from_target {
                self.observed.primary_revision = self.observed.target_revision.clone();
                self.observed.primary_ready = true;
            }
            self.observed.canary_ready = desired.canary_up && self.canary_can_be_ready;
        }
        self.status = plan.status.clone();
        // The controller removes one-shot annotations the plan used.
        if plan.command_used {
            self.observed.promote_requested = false;
            self.observed.command = None;
        }
        self.history.push((before, self.now));
        self.log.push((plan.clone(), checks));
        self.now += jiff::SignedDuration::try_from(dt).expect("duration");
        plan
    }

    fn run(&mut self, seconds: u64) {
        for _ in 0..seconds {
            self.tick(Duration::from_secs(1));
        }
    }

    fn phase(&self) -> Option<RolloutPhase> {
        self.status.phase
    }

    fn weights(&self) -> Vec<u8> {
        let mut seen: Vec<u8> = Vec::new();
        for (plan, _) in &self.log {
            if let Some(d) = plan.desired
                && seen.last() != Some(&d.canary_weight.get())
            {
                seen.push(d.canary_weight.get());
            }
        }
        seen
    }

    fn reasons(&self) -> Vec<&'static str> {
        self.log
            .iter()
            .flat_map(|(p, _)| p.transitions.iter().map(|t| t.reason.as_str()))
            .collect()
    }

    /// Ticks with `health` until the planner has been handed one check's results; returns that plan.
    fn judge_once(&mut self, health: Health) -> Plan {
        self.health = health;
        for _ in 0..600 {
            let ran = matches!(self.checks(), Checks::Ran(_));
            let plan = self.tick(Duration::from_secs(1));
            if ran {
                return plan;
            }
        }
        panic!("no check ran in 600s: {:?}", self.status.message)
    }

    fn new_revision(&mut self, revision: &str) {
        self.observed.target_revision = Some(revision.into());
        self.observed.canary_ready = false;
    }
}

fn initialized(spec: RolloutSpec) -> World {
    let mut world = World::new(spec);
    world.run(3);
    assert_eq!(world.phase(), Some(RolloutPhase::Initialized));
    world.log.clear();
    world.history.clear();
    world
}

#[test]
fn first_sight_creates_the_primary_and_routes_everything_to_it() {
    let mut world = World::new(canary_spec());
    let plan = world.tick(Duration::from_secs(1));
    assert_eq!(plan.status.phase, Some(RolloutPhase::Initializing));
    assert_eq!(
        plan.desired,
        Some(Desired {
            primary_from_target: true,
            canary_up: false,
            canary_weight: Weight::ZERO,
            experiment: false
        })
    );
    let plan = world.tick(Duration::from_secs(1));
    assert_eq!(plan.status.phase, Some(RolloutPhase::Initialized));
    assert_eq!(plan.status.last_promoted_revision.as_deref(), Some("r1"));
    assert_eq!(world.reasons(), vec!["Initialized"]);
}

#[test]
fn a_healthy_release_walks_every_step_and_is_promoted() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert_eq!(world.weights(), vec![0, 20, 40, 60, 0]);
    assert_eq!(world.status.last_promoted_revision.as_deref(), Some("r2"));
    assert_eq!(world.observed.primary_revision.as_deref(), Some("r2"));
    assert!(
        !world.observed.canary_ready,
        "the canary is scaled to 0 after promotion"
    );
    assert_eq!(
        world.reasons(),
        vec![
            "ReleaseStarted",
            "WeightChanged",
            "WeightChanged",
            "WeightChanged",
            "Promoting",
            "Promoted"
        ]
    );
    // Each weight was held for one full interval before the next.
    let changes: Vec<Timestamp> = world
        .log
        .iter()
        .filter(|(p, _)| {
            p.transitions
                .iter()
                .any(|t| t.reason == Reason::WeightChanged)
        })
        .filter_map(|(p, _)| p.status.stage_started_time.as_ref().map(|t| t.0))
        .collect();
    for pair in changes.windows(2) {
        assert!(pair[1].duration_since(pair[0]).as_secs() >= 5, "{pair:?}");
    }
}

#[test]
fn failing_checks_roll_back_at_the_threshold() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.health = Health::Bad;
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert_eq!(world.status.failed_checks, 2);
    let last = &world.log.last().expect("ticks").0;
    assert_eq!(
        last.desired,
        Some(Desired {
            primary_from_target: false,
            canary_up: false,
            canary_weight: Weight::ZERO,
            experiment: false
        })
    );
    let rolled_back: Vec<_> = world
        .log
        .iter()
        .flat_map(|(p, _)| &p.transitions)
        .filter(|t| t.reason == Reason::RolledBack)
        .collect();
    assert_eq!(rolled_back.len(), 1, "exactly one rollback transition");
    assert!(
        rolled_back[0]
            .message
            .contains("request-success-rate 80.00"),
        "{}",
        rolled_back[0].message
    );
    assert_eq!(
        world.observed.primary_revision.as_deref(),
        Some("r1"),
        "the primary keeps the old revision"
    );
    // The failed revision is not retried until the target changes again.
    world.health = Health::Good;
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    world.new_revision("r3");
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
}

#[test]
fn no_data_holds_and_the_deadline_rolls_back() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.health = Health::NoData;
    world.run(50);
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    assert_eq!(
        world.status.canary_weight.get(),
        20,
        "held at the first step"
    );
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert!(
        world
            .status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("no progress within 60s"))
    );
}

/// Analysis with two metrics (the second with `onNoData: second_no_data`), a threshold of 2 and the given
/// failure counting.
fn two_metric_spec(counting: &str, second_no_data: &str) -> RolloutSpec {
    spec(json!({
        "interval": "5s", "threshold": 2, "stepWeights": [10, 20, 30, 40],
        "failureCounting": counting,
        "metrics": [
            {"name": "request-success-rate", "thresholdRange": {"min": 99}},
            {"name": "request-duration", "thresholdRange": {"max": 500}, "onNoData": second_no_data}
        ]
    }))
}

#[test]
fn consecutive_counting_forgives_failures_a_pass_follows_and_cumulative_does_not() {
    for counting in ["cumulative", "consecutive"] {
        let mut world = initialized(two_metric_spec(counting, "hold"));
        world.new_revision("r2");
        assert_eq!(world.judge_once(Health::Bad).status.failed_checks, 1);
        let passed = world.judge_once(Health::Good);
        assert_eq!(
            passed.status.failed_checks,
            if counting == "consecutive" { 0 } else { 1 },
            "{counting}: a passing check"
        );
        assert_eq!(
            passed.status.canary_weight.get(),
            20,
            "{counting}: moved on"
        );
        // The second failure reaches the threshold only when the first one still counts.
        let second = world.judge_once(Health::Bad);
        let rolled_back = second
            .transitions
            .iter()
            .any(|t| t.reason == Reason::RolledBack);
        assert_eq!(rolled_back, counting == "cumulative", "{counting}");
        assert_eq!(
            world.phase(),
            Some(if counting == "cumulative" {
                RolloutPhase::Failed
            } else {
                RolloutPhase::Progressing
            })
        );
    }
}

#[test]
fn no_data_fails_the_check_only_for_a_metric_with_on_no_data_fail() {
    for policy in ["hold", "fail"] {
        let mut world = initialized(two_metric_spec("cumulative", policy));
        world.new_revision("r2");
        // The first metric passes; the second has no data.
        let quiet = Health::Each([Verdict::Pass, Verdict::NoData]);
        let first = world.judge_once(quiet);
        let second = world.judge_once(quiet);
        let message = second.status.message.clone().unwrap_or_default();
        if policy == "fail" {
            assert_eq!(first.status.failed_checks, 1);
            assert_eq!(world.phase(), Some(RolloutPhase::Failed));
            assert!(message.contains("request-duration: no data"), "{message}");
        } else {
            assert_eq!(second.status.failed_checks, 0);
            assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
            assert_eq!(
                world.status.canary_weight.get(),
                10,
                "held at the first step"
            );
            assert!(message.starts_with("holding at 10%"), "{message}");
        }
    }
}

#[test]
fn every_metric_is_read_whichever_one_fails() {
    for verdicts in [
        [Verdict::Pass, Verdict::Fail],
        [Verdict::Fail, Verdict::Pass],
    ] {
        let mut world = initialized(two_metric_spec("cumulative", "hold"));
        world.new_revision("r2");
        world.judge_once(Health::Each(verdicts));
        world.judge_once(Health::Each(verdicts));
        assert_eq!(world.phase(), Some(RolloutPhase::Failed), "{verdicts:?}");
        assert!(
            world.weights().iter().all(|w| *w <= 10),
            "{verdicts:?}: never moved past the first step: {:?}",
            world.weights()
        );
    }
}

#[test]
fn a_dry_run_metric_is_reported_but_never_gates() {
    let mut spec = two_metric_spec("cumulative", "fail");
    spec.analysis.metrics[1].dry_run = true;
    let mut world = initialized(spec);
    world.new_revision("r2");
    // The gating metric passes; the dry-run one fails, then has no data (onNoData: fail), then fails again.
    let first = world.judge_once(Health::Each([Verdict::Pass, Verdict::Fail]));
    assert_eq!(first.status.failed_checks, 0);
    assert_eq!(first.status.canary_weight.get(), 20, "moved on");
    let reported = first
        .status
        .verdicts
        .iter()
        .find(|v| v.name == "request-duration")
        .map(|v| (v.verdict, v.dry_run));
    assert_eq!(reported, Some((Verdict::Fail, true)), "shown in the status");
    let dry_events = |plan: &Plan| {
        plan.transitions
            .iter()
            .filter(|t| t.reason == Reason::DryRunMetricFailed)
            .map(|t| t.message.clone())
            .collect::<Vec<_>>()
    };
    let events = dry_events(&first);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains("request-duration 80.00") && events[0].contains("not gating"),
        "{events:?}"
    );
    // Failing again is not news; failing after a non-failure is.
    let again = world.judge_once(Health::Each([Verdict::Pass, Verdict::Fail]));
    assert!(dry_events(&again).is_empty());
    let quiet = world.judge_once(Health::Each([Verdict::Pass, Verdict::NoData]));
    assert_eq!(
        quiet.status.failed_checks, 0,
        "no data on a dry-run metric never fails a check"
    );
    assert_eq!(
        dry_events(&world.judge_once(Health::Each([Verdict::Pass, Verdict::Fail]))).len(),
        1
    );
    world.run(120);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    // The gating metric still decides.
    let mut spec = two_metric_spec("cumulative", "hold");
    spec.analysis.metrics[1].dry_run = true;
    let mut world = initialized(spec);
    world.new_revision("r2");
    world.judge_once(Health::Each([Verdict::Fail, Verdict::Pass]));
    world.judge_once(Health::Each([Verdict::Fail, Verdict::Pass]));
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
}

#[test]
fn with_every_metric_dry_run_a_release_walks_its_steps_on_time_alone() {
    let mut spec = two_metric_spec("cumulative", "fail");
    for metric in &mut spec.analysis.metrics {
        metric.dry_run = true;
    }
    let mut world = initialized(spec);
    world.new_revision("r2");
    world.health = Health::Bad;
    world.run(120);
    assert_eq!(
        world.phase(),
        Some(RolloutPhase::Succeeded),
        "{:?}",
        world.status.message
    );
    assert_eq!(world.weights(), vec![0, 10, 20, 30, 40, 0]);
    assert_eq!(world.status.failed_checks, 0);
}

#[test]
fn unavailable_metrics_freeze_then_roll_back_at_the_deadline() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(12);
    let frozen_at = world.status.canary_weight;
    assert!(frozen_at.get() > 0);
    world.health = Health::Unavailable;
    world.run(20);
    assert_eq!(
        world.status.canary_weight, frozen_at,
        "weights stay while frozen"
    );
    let progressing = world
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .expect("condition");
    assert_eq!(progressing.reason, "Frozen");
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert!(
        world
            .status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("metrics unavailable"))
    );
}

#[test]
fn a_canary_that_never_becomes_ready_is_rolled_back_at_the_deadline() {
    let mut world = initialized(canary_spec());
    world.canary_can_be_ready = false;
    world.new_revision("r2");
    world.run(59);
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    world.run(3);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert!(
        world
            .status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("did not become ready"))
    );
}

#[test]
fn a_new_revision_mid_release_restarts_the_analysis() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(12);
    assert!(world.status.canary_weight.get() >= 20);
    world.new_revision("r3");
    world.tick(Duration::from_secs(1));
    assert_eq!(world.status.revision.as_deref(), Some("r3"));
    assert_eq!(world.status.canary_weight, Weight::ZERO);
    assert_eq!(world.status.current_step, 0);
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert_eq!(world.status.last_promoted_revision.as_deref(), Some("r3"));
    assert!(world.reasons().contains(&"RevisionChanged"));
}

#[test]
fn explicit_steps_pause_and_wait_for_a_manual_promote() {
    let mut world = initialized(spec(json!({
        "interval": "2s",
        "steps": [{"setWeight": 10}, {"pause": {"duration": "5s"}}, {"setWeight": 30}, {"pause": {}}, {"setWeight": 50}],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    })));
    world.new_revision("r2");
    world.run(200);
    assert_eq!(
        world.phase(),
        Some(RolloutPhase::Paused),
        "an indefinite pause waits, deadline or not"
    );
    assert_eq!(world.status.canary_weight.get(), 30);
    world.observed.promote_requested = true;
    world.run(20);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert_eq!(world.weights(), vec![0, 10, 30, 50, 0]);
}

#[test]
fn suspend_touches_nothing_and_skip_analysis_promotes_at_once() {
    let mut suspended = canary_spec();
    suspended.suspend = true;
    let mut world = initialized(canary_spec());
    world.spec = suspended;
    world.new_revision("r2");
    let before = world.status.clone();
    let plan = world.tick(Duration::from_secs(1));
    assert_eq!(plan.desired, None);
    assert_eq!(plan.status, before);

    let mut skip = canary_spec();
    skip.skip_analysis = true;
    let mut world = initialized(skip);
    world.new_revision("r2");
    world.run(10);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert!(
        world
            .log
            .iter()
            .all(|(_, checks)| *checks == Checks::NotRun),
        "no metric is queried"
    );
}

#[test]
fn a_settled_rollout_waits_for_a_change_and_a_release_for_its_interval() {
    let mut world = initialized(canary_spec());
    let settled = world.tick(Duration::from_secs(1));
    assert_eq!(settled.requeue_after, IDLE_RESYNC);

    world.new_revision("r2");
    world.run(12);
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    let releasing = world.tick(Duration::from_secs(1));
    assert!(
        releasing.requeue_after <= Duration::from_secs(5),
        "{:?}",
        releasing.requeue_after
    );

    world.health = Health::Bad;
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert_eq!(
        world.tick(Duration::from_secs(1)).requeue_after,
        IDLE_RESYNC
    );

    // A revision waiting for its confirm-rollout hook asks again each interval.
    world.hooks.rollout_unconfirmed = Some(("gate".into(), "not yet".into()));
    world.new_revision("r3");
    let waiting = world.tick(Duration::from_secs(1));
    assert_eq!(waiting.requeue_after, Duration::from_secs(5));

    // Suspended, or without a target: only a change can start anything.
    let mut suspended = canary_spec();
    suspended.suspend = true;
    world.spec = suspended;
    assert_eq!(
        world.tick(Duration::from_secs(1)).requeue_after,
        IDLE_RESYNC
    );
    world.spec = canary_spec();
    world.observed.target_revision = None;
    assert_eq!(
        world.tick(Duration::from_secs(1)).requeue_after,
        IDLE_RESYNC
    );
}

#[test]
fn a_steady_rollout_plans_the_same_status_again() {
    let mut world = initialized(canary_spec());
    let before = world.status.clone();
    world.run(5);
    assert_eq!(
        world.status, before,
        "no status change means no status write"
    );
}

fn arbitrary_spec() -> impl Strategy<Value = RolloutSpec> {
    let strategy = prop_oneof![
        (1u8..=60, 10u8..=100)
            .prop_map(|(step, max)| json!({"stepWeight": step, "maxWeight": max.max(step)})),
        proptest::collection::btree_set(1u8..=100, 1..5)
            .prop_map(|ws| json!({"stepWeights": ws.into_iter().collect::<Vec<_>>()})),
        (1u32..4).prop_map(|n| json!({"iterations": n})),
    ];
    let on_no_data = || prop_oneof![Just("hold"), Just("fail")];
    (
        strategy,
        1u64..6,
        1u32..6,
        (on_no_data(), on_no_data()),
        any::<bool>(),
        20u32..90,
        (any::<bool>(), any::<bool>()),
    )
        .prop_map(|(strategy, interval, threshold, (first, second), consecutive, deadline, (dry_first, dry_second))| {
            let mut analysis = json!({
                "interval": format!("{interval}s"),
                "threshold": threshold,
                "failureCounting": if consecutive { "consecutive" } else { "cumulative" },
                "metrics": [
                    {"name": "request-success-rate", "thresholdRange": {"min": 99}, "onNoData": first},
                    {"name": "request-duration", "thresholdRange": {"max": 500}, "onNoData": second}
                ]
            });
            if let (Some(a), Some(s)) = (analysis.as_object_mut(), strategy.as_object()) {
                a.extend(s.clone());
            }
            let mut spec = spec(analysis);
            spec.progress_deadline_seconds = deadline;
            // At least one metric gates (with none, no-data could not end the release at the deadline).
            spec.analysis.metrics[0].dry_run = dry_first && !dry_second;
            spec.analysis.metrics[1].dry_run = dry_second;
            spec
        })
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        Just(Verdict::Pass),
        Just(Verdict::Fail),
        Just(Verdict::NoData)
    ]
}

/// Metrics that agree (all good, all bad, …) and metrics that disagree, one verdict each: a planner that
/// judged by one metric alone, or by the first, must meet the second kind.
fn health() -> impl Strategy<Value = Health> {
    prop_oneof![
        1 => Just(Health::Good),
        1 => Just(Health::Bad),
        1 => Just(Health::NoData),
        1 => Just(Health::Unavailable),
        4 => proptest::array::uniform2(verdict()).prop_map(Health::Each),
    ]
}

/// What one judged check must do to the failure count, by the spec's rules written out independently of
/// the planner: a metric fails the check when it fails or (with `onNoData: fail`) has no data; a check with
/// no failure but some metric without data holds; only a check where every metric passed moves on, and
/// with `failureCounting: consecutive` it forgives the failures before it.
#[derive(Debug, PartialEq)]
enum Judgement {
    Failed,
    Held,
    Passed,
}

fn judgement(spec: &RolloutSpec, verdicts: &[MetricVerdict]) -> Judgement {
    let of = |name: &str| verdicts.iter().find(|v| v.name == name).map(|v| v.verdict);
    // Dry-run metrics never gate.
    let metrics: Vec<&crate::api::Metric> = spec
        .analysis
        .metrics
        .iter()
        .filter(|m| !m.dry_run)
        .collect();
    let fails = |m: &&crate::api::Metric| match of(&m.name) {
        Some(Verdict::Pass) => false,
        Some(Verdict::Fail) => true,
        Some(Verdict::NoData) | None => m.on_no_data == crate::api::NoDataPolicy::Fail,
    };
    if metrics.iter().any(fails) {
        Judgement::Failed
    } else if metrics.iter().all(|m| of(&m.name) == Some(Verdict::Pass)) {
        Judgement::Passed
    } else {
        Judgement::Held
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the metrics do: weights stay in [0, max], a promotion follows only a stage whose every metric
    /// passed, no-data never advances, a rollback leaves 100% primary with the canary at 0, and the release
    /// ends (promoted or rolled back) once the deadline has had time to act. Every judged check moves the
    /// failure count as `judgement` says (`onNoData`, `failureCounting`), rolls back exactly when the count
    /// reaches the threshold, and moves on exactly when every metric passed.
    #[test]
    fn planner_invariants(
        spec in arbitrary_spec(),
        // Each health lasts from part of an interval to a few: checks that disagree follow each other.
        healths in proptest::collection::vec((health(), 1u64..15), 1..24),
        ready in any::<bool>(),
    ) {
        let mut world = initialized(spec.clone());
        world.canary_can_be_ready = ready;
        world.new_revision("r2");
        let ladder = stages(&spec.analysis);
        let cap = stages::max_weight(&ladder);
        for (h, seconds) in &healths {
            world.health = *h;
            world.run(*seconds);
        }
        // Give the deadline room to act, with metrics stuck at no data.
        world.health = Health::NoData;
        world.run(u64::from(spec.progress_deadline_seconds) + 10);

        let consecutive = spec.analysis.failure_counting == crate::api::FailureCounting::Consecutive;
        let threshold = spec.analysis.threshold.max(1);
        for ((plan, checks), (before, now)) in world.log.iter().zip(&world.history) {
            // A check the planner judged (not one a deadline overtook) is stamped with the time it ran.
            if let Checks::Ran(verdicts) = checks
                && plan.status.last_check_time == Some(Time(*now))
            {
                let judged = judgement(&spec, verdicts);
                let expected = match judged {
                    Judgement::Failed => before.failed_checks + 1,
                    Judgement::Passed if consecutive => 0,
                    Judgement::Passed | Judgement::Held => before.failed_checks,
                };
                prop_assert_eq!(plan.status.failed_checks, expected, "{:?} after {} failed checks: {:?}", judged, before.failed_checks, verdicts);
                let rolled_back = plan.transitions.iter().any(|t| t.reason == Reason::RolledBack);
                prop_assert_eq!(rolled_back, judged == Judgement::Failed && expected >= threshold, "{:?} at {}/{}", judged, expected, threshold);
                let moved_on = plan.status.iterations > before.iterations;
                prop_assert_eq!(moved_on, judged == Judgement::Passed, "{:?}: {:?}", judged, verdicts);
            }
            if let Some(d) = plan.desired {
                // Blue-green sends everything to the judged canary while the primary takes its version.
                let switched = plan.status.phase == Some(RolloutPhase::Promoting)
                    && strategy(&spec.analysis) == ReleaseStrategy::BlueGreen
                    && d.canary_weight == Weight::FULL;
                prop_assert!(d.canary_weight <= cap || switched, "weight {} above {}", d.canary_weight, cap);
                prop_assert_eq!(d.canary_weight.get() + d.canary_weight.complement().get(), 100);
            }
            let promoting = plan.transitions.iter().any(|t| t.reason == Reason::Promoting);
            if promoting {
                let all_passed = matches!(checks, Checks::Ran(vs) if spec.analysis.metrics.iter().filter(|m| !m.dry_run).all(|m| vs.iter().any(|v| v.name == m.name && v.verdict == Verdict::Pass)));
                prop_assert!(all_passed, "promoted without every gating metric passing: {:?}", checks);
            }
            if let Checks::Ran(vs) = checks
                && vs.iter().any(|v| !v.dry_run && v.verdict != Verdict::Pass) {
                    prop_assert!(!plan.transitions.iter().any(|t| t.reason == Reason::WeightChanged || t.reason == Reason::Promoting),
                        "advanced on a check that was not a pass");
                }
            // The planner waits for a watch event (a long resync only) exactly when nothing is time-bound; during
            // a release it looks again within an interval.
            let in_release = matches!(plan.status.phase, Some(RolloutPhase::Initializing | RolloutPhase::Progressing | RolloutPhase::Paused | RolloutPhase::Promoting));
            if in_release {
                prop_assert!(plan.requeue_after <= super::plan::interval(&spec).max(Duration::from_secs(5)), "{:?} waits {:?}", plan.status.phase, plan.requeue_after);
            }
            if plan.requeue_after == IDLE_RESYNC {
                prop_assert!(!in_release, "idle in {:?}", plan.status.phase);
                prop_assert!(plan.desired.is_none_or(|d| !d.canary_up && d.canary_weight == Weight::ZERO));
            }
            if plan.transitions.iter().any(|t| t.reason == Reason::RolledBack) {
                prop_assert_eq!(plan.desired, Some(Desired { primary_from_target: false, canary_up: false, canary_weight: Weight::ZERO, experiment: false }));
                prop_assert_eq!(plan.status.phase, Some(RolloutPhase::Failed));
            }
        }
        prop_assert!(
            matches!(world.phase(), Some(RolloutPhase::Succeeded | RolloutPhase::Failed)),
            "the release must end: {:?} {:?}", world.phase(), world.status.message
        );
    }
}

fn reasons(world: &World) -> Vec<&'static str> {
    world
        .log
        .iter()
        .flat_map(|(plan, _)| plan.transitions.iter().map(|t| t.reason.as_str()))
        .collect()
}

#[test]
fn abort_rolls_back_a_release_in_progress_and_is_used_once() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(8);
    assert!(world.status.canary_weight.get() > 0);
    world.observed.command = Some(Command::Abort);
    let plan = world.tick(Duration::from_secs(1));
    assert!(plan.command_used);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert_eq!(
        plan.desired.map(|d| (d.canary_up, d.canary_weight.get())),
        Some((false, 0))
    );
    assert!(
        world
            .status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("aborted by the user")
    );
    assert_eq!(world.observed.command, None);
    // Abort when nothing is in progress is refused, visibly, and used up.
    world.observed.command = Some(Command::Abort);
    let plan = world.tick(Duration::from_secs(1));
    assert!(plan.command_used);
    assert_eq!(
        plan.transitions.last().map(|t| t.reason),
        Some(Reason::CommandIgnored)
    );
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
}

#[test]
fn promote_full_skips_the_remaining_analysis() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(3);
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    let at = world.status.canary_weight.get();
    world.observed.command = Some(Command::PromoteFull);
    world.run(5);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert_eq!(world.status.last_promoted_revision.as_deref(), Some("r2"));
    assert!(
        world.weights().iter().all(|w| *w <= at),
        "{:?}",
        world.weights()
    );
}

#[test]
fn promote_one_step_skips_only_the_current_stage() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(3);
    assert_eq!(world.status.canary_weight.get(), 20);
    world.observed.promote_requested = true;
    world.tick(Duration::from_secs(1));
    assert_eq!(world.status.canary_weight.get(), 40);
    assert!(reasons(&world).contains(&"StepPromoted"));
    assert!(!world.observed.promote_requested, "used once");
    // The next stage is judged as usual: with bad metrics it fails.
    world.health = Health::Bad;
    world.run(15);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
}

#[test]
fn retry_releases_a_failed_revision_again() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.health = Health::Bad;
    world.run(20);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    world.run(10);
    assert_eq!(
        world.phase(),
        Some(RolloutPhase::Failed),
        "a failed revision is not retried by itself"
    );
    world.health = Health::Good;
    world.observed.command = Some(Command::Retry);
    world.run(40);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert!(reasons(&world).contains(&"Retry"));
}

#[test]
fn a_user_pause_holds_the_weight_and_stops_the_clock() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(3);
    assert_eq!(world.status.canary_weight.get(), 20);
    world.observed.paused_by_user = true;
    // Paused far longer than the 60s progress deadline, with failing metrics: nothing moves or fails.
    world.health = Health::Bad;
    for _ in 0..10 {
        world.tick(Duration::from_secs(30));
    }
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    assert_eq!(world.status.canary_weight.get(), 20);
    assert!(world.status.paused_at.is_some());
    assert!(
        world
            .log
            .iter()
            .rev()
            .take(10)
            .all(|(_, checks)| *checks == Checks::NotRun),
        "no checks while paused"
    );
    // Resumed: the deadline counts from where it stopped, so good metrics carry the release through.
    world.health = Health::Good;
    world.observed.paused_by_user = false;
    world.run(40);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert_eq!(world.status.paused_at, None);
    let reasons = reasons(&world);
    assert!(
        reasons.contains(&"PausedByUser") && reasons.contains(&"Resumed"),
        "{reasons:?}"
    );
}

#[test]
fn promote_outside_a_release_is_refused_and_does_not_linger() {
    let mut world = initialized(canary_spec());
    world.observed.promote_requested = true;
    let plan = world.tick(Duration::from_secs(1));
    assert!(plan.command_used);
    assert_eq!(
        plan.transitions.last().map(|t| t.reason),
        Some(Reason::CommandIgnored)
    );
    // The next release is judged normally: a bad canary is not promoted by a stale request.
    world.new_revision("r2");
    world.health = Health::Bad;
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
}

#[test]
fn a_denying_gate_holds_the_step_with_its_reasons_then_allows() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.observed.gate = Some(Gate::Denied {
        by: "policy change-control".into(),
        reasons: vec!["namespace shop is production: annotate the rollout".into()],
        rollback: false,
    });
    world.run(120);
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    assert_eq!(
        world.status.canary_weight.get(),
        20,
        "held at the first step"
    );
    let message = world.status.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("held at 20% by policy change-control"),
        "{message}"
    );
    assert_eq!(
        reasons(&world)
            .iter()
            .filter(|r| **r == "PromotionDenied")
            .count(),
        1,
        "one Event for the denial, not one per check"
    );
    world.observed.gate = Some(Gate::Allowed(vec!["policy change-control".into()]));
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    let allowed = reasons(&world)
        .iter()
        .filter(|r| **r == "PromotionAllowed")
        .count();
    assert_eq!(
        allowed, 3,
        "every move is on the audit trail: 20→40, 40→60, 60→promotion"
    );
}

#[test]
fn a_gate_that_says_rollback_rolls_back() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.observed.gate = Some(Gate::Denied {
        by: "policy freeze".into(),
        reasons: vec!["change freeze".into()],
        rollback: true,
    });
    world.run(20);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    let message = world.status.message.clone().unwrap_or_default();
    assert!(
        message.contains("policy freeze denied the promotion: change freeze"),
        "{message}"
    );
}

fn blue_green_spec() -> RolloutSpec {
    spec(json!({
        "interval": "5s", "threshold": 2, "iterations": 3,
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    }))
}

fn ab_spec() -> RolloutSpec {
    spec(json!({
        "interval": "5s", "threshold": 2, "iterations": 2,
        "match": [{"headers": {"x-canary": {"exact": "insider"}}}],
        "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]
    }))
}

/// (phase, canary weight, experiment) of every plan, consecutive repeats folded.
fn traffic(world: &World) -> Vec<(Option<RolloutPhase>, u8, bool)> {
    let mut seen = Vec::new();
    for (plan, _) in &world.log {
        if let Some(d) = plan.desired {
            let entry = (plan.status.phase, d.canary_weight.get(), d.experiment);
            if seen.last() != Some(&entry) {
                seen.push(entry);
            }
        }
    }
    seen
}

#[test]
fn blue_green_judges_without_traffic_then_switches_everything_at_once() {
    let mut world = initialized(blue_green_spec());
    world.new_revision("r2");
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    use RolloutPhase::*;
    assert_eq!(
        traffic(&world),
        vec![
            (Some(Progressing), 0, false),
            (Some(Promoting), 100, false),
            (Some(Succeeded), 0, false),
        ],
        "0% while judged, 100% on the canary while the primary takes its version, then 100% primary"
    );
    let judged = world
        .log
        .iter()
        .filter(|(_, c)| matches!(c, Checks::Ran(_)))
        .count();
    assert_eq!(judged, 3, "one check per iteration");
    let message = world
        .log
        .iter()
        .find_map(|(p, _)| {
            p.status
                .message
                .clone()
                .filter(|m| m.contains("blue-green"))
        })
        .unwrap_or_default();
    assert_eq!(
        message,
        "analysing the canary without user traffic (blue-green)"
    );
}

#[test]
fn blue_green_rollback_never_gives_the_canary_traffic() {
    let mut world = initialized(blue_green_spec());
    world.new_revision("r2");
    world.health = Health::Bad;
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert!(
        traffic(&world).iter().all(|(_, weight, _)| *weight == 0),
        "{:?}",
        traffic(&world)
    );
}

#[test]
fn mirroring_is_on_only_while_the_canary_is_judged() {
    let mut mirrored = blue_green_spec();
    mirrored.analysis.mirror = true;
    mirrored.analysis.mirror_weight = Weight::new(50);
    let mut world = initialized(mirrored);
    world.new_revision("r2");
    world.run(60);
    use RolloutPhase::*;
    assert_eq!(
        traffic(&world),
        vec![
            (Some(Progressing), 0, false),
            (Some(Progressing), 0, true),
            (Some(Promoting), 100, false),
            (Some(Succeeded), 0, false),
        ],
        "no mirror before the canary is ready, nor once everything is switched to it"
    );
    assert!(reasons(&world).contains(&"Promoted"));
    let message = world
        .log
        .iter()
        .find_map(|(p, _)| p.status.message.clone().filter(|m| m.contains("mirrored")))
        .unwrap_or_default();
    assert_eq!(
        message,
        "analysing the canary on a mirrored copy of 50% of the requests (blue-green)"
    );
}

#[test]
fn ab_test_routes_matching_requests_while_judged_and_until_the_primary_takes_over() {
    let mut world = initialized(ab_spec());
    world.new_revision("r2");
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    use RolloutPhase::*;
    assert_eq!(
        traffic(&world),
        vec![
            (Some(Progressing), 0, false),
            (Some(Progressing), 0, true),
            (Some(Promoting), 0, true),
            (Some(Succeeded), 0, false),
        ]
    );
}

#[test]
fn ab_test_rollback_turns_the_matches_off() {
    let mut world = initialized(ab_spec());
    world.new_revision("r2");
    world.run(7);
    world.health = Health::Bad;
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert_eq!(
        traffic(&world).last(),
        Some(&(Some(RolloutPhase::Failed), 0, false))
    );
}

#[test]
fn sticky_sessions_follow_the_weighted_canary() {
    let mut sticky = canary_spec();
    sticky.analysis.session_affinity = Some(crate::api::SessionAffinity {
        cookie_name: "canary".into(),
        primary_cookie_name: None,
        max_age: 60,
    });
    let mut world = initialized(sticky);
    world.new_revision("r2");
    world.run(60);
    use RolloutPhase::*;
    assert_eq!(
        traffic(&world),
        vec![
            (Some(Progressing), 0, false),
            (Some(Progressing), 20, true),
            (Some(Progressing), 40, true),
            (Some(Progressing), 60, true),
            (Some(Promoting), 60, false),
            (Some(Succeeded), 0, false),
        ]
    );
}

#[test]
fn plain_canaries_never_ask_for_canary_routes() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(60);
    assert!(traffic(&world).iter().all(|(_, _, experiment)| !experiment));
}

#[test]
fn confirm_rollout_keeps_a_new_revision_waiting_until_it_says_yes() {
    let mut world = initialized(canary_spec());
    world.hooks.rollout_unconfirmed = Some(("change-window".into(), "HTTP 403 Forbidden".into()));
    world.new_revision("r2");
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Initialized));
    assert_eq!(
        world.status.message.as_deref(),
        Some("revision r2 waits for webhook change-window (confirm-rollout): HTTP 403 Forbidden")
    );
    assert!(traffic(&world).iter().all(|(_, weight, _)| *weight == 0));
    assert!(
        world
            .log
            .iter()
            .all(|(p, _)| p.desired.is_some_and(|d| !d.canary_up)),
        "the canary is not even started"
    );
    assert_eq!(
        reasons(&world)
            .iter()
            .filter(|r| **r == "WaitingForConfirmation")
            .count(),
        1
    );
    world.hooks.rollout_unconfirmed = None;
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
    assert_eq!(world.status.last_promoted_revision.as_deref(), Some("r2"));
}

#[test]
fn a_failing_pre_rollout_hook_rolls_back_before_any_traffic() {
    let mut world = initialized(canary_spec());
    world.hooks.pre_rollout_failed = Some(("db-migration".into(), "HTTP 500".into()));
    world.new_revision("r2");
    world.run(30);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert_eq!(
        world.status.message.as_deref(),
        Some("rolled back: pre-rollout webhook db-migration failed: HTTP 500")
    );
    assert!(traffic(&world).iter().all(|(_, weight, _)| *weight == 0));
}

#[test]
fn failing_rollout_hooks_count_as_failed_checks() {
    let mut world = initialized(canary_spec());
    world.hooks.rollout_failed = vec![("load-test".into(), "timed out after 10s".into())];
    world.new_revision("r2");
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    let message = world.status.message.clone().unwrap_or_default();
    assert!(
        message.contains("2 failed checks at 20%: webhook load-test: timed out after 10s"),
        "{message}"
    );
}

#[test]
fn a_rollback_hook_saying_yes_rolls_back() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(8);
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    world.hooks.rollback_requested = Some("big-red-button".into());
    world.run(10);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    assert!(
        world
            .status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("webhook big-red-button (rollback) asked for a rollback")
    );
}

#[test]
fn a_confirm_webhook_holds_the_step_outside_the_deadline_then_lets_it_go() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.observed.gate = Some(Gate::Denied {
        by: "webhook approve".into(),
        reasons: vec!["HTTP 403".into()],
        rollback: false,
    });
    // Longer than the 60s progress deadline: a hold waiting for a person is not a stuck release.
    world.run(120);
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    assert_eq!(
        world.status.message.as_deref(),
        Some("held at 20% by webhook approve: HTTP 403")
    );
    world.observed.gate = Some(Gate::Allowed(vec!["webhook approve".into()]));
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Succeeded));
}

#[test]
fn hooks_are_due_at_their_points_only() {
    let mut world = initialized(canary_spec());
    let due = |w: &World| hooks_due(&w.spec, &w.status, &w.observed);
    assert_eq!(due(&world), HooksDue::default(), "nothing new to release");
    world.observed.target_revision = Some("r2".into());
    assert!(due(&world).confirm_rollout, "a new revision would start");
    world.observed.paused_by_user = true;
    assert!(
        due(&world).confirm_rollout,
        "a pause does not skip the confirmation"
    );
    world.observed.paused_by_user = false;
    world.spec.suspend = true;
    assert_eq!(
        due(&world),
        HooksDue::default(),
        "a suspended rollout calls nothing"
    );
    world.spec.suspend = false;
    world.tick(Duration::from_secs(1));
    assert_eq!(world.phase(), Some(RolloutPhase::Progressing));
    assert!(!due(&world).confirm_rollout);
    assert!(
        due(&world).pre_rollout,
        "the canary is ready and has no traffic yet"
    );
    world.tick(Duration::from_secs(1));
    assert_eq!(
        due(&world),
        HooksDue::default(),
        "the canary has traffic now"
    );
}

#[test]
fn next_move_tells_weight_increases_from_promotion() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.run(3);
    assert_eq!(
        next_move(&world.spec, &world.status),
        NextMove::Stage {
            raises_weight: true
        }
    );
    world.status.current_step = 2;
    assert_eq!(next_move(&world.spec, &world.status), NextMove::Promotion);
    let bg = initialized(blue_green_spec());
    assert_eq!(
        next_move(&bg.spec, &bg.status),
        NextMove::Stage {
            raises_weight: false
        }
    );
}

#[test]
fn next_move_looks_through_pauses() {
    let spec_with = |steps: serde_json::Value| spec(json!({"interval": "5s", "steps": steps}));
    let status = RolloutStatus {
        current_step: 0,
        canary_weight: Weight::new(20).expect("weight"),
        ..RolloutStatus::default()
    };
    let paused_increase =
        spec_with(json!([{"setWeight": 20}, {"pause": {"duration": "1m"}}, {"setWeight": 60}]));
    assert_eq!(
        next_move(&paused_increase, &status),
        NextMove::Stage {
            raises_weight: true
        },
        "the increase after the pause is confirmed before it"
    );
    let paused_promotion = spec_with(json!([{"setWeight": 20}, {"pause": {}}]));
    assert_eq!(next_move(&paused_promotion, &status), NextMove::Promotion);
}

#[test]
fn a_gate_hold_restarts_the_deadline_so_only_what_follows_counts() {
    let mut world = initialized(canary_spec());
    world.new_revision("r2");
    world.observed.gate = Some(Gate::Denied {
        by: "webhook approve".into(),
        reasons: vec!["HTTP 403".into()],
        rollback: false,
    });
    world.run(120);
    // The approval comes, but the metrics go quiet: the 60s deadline counts from the last held check.
    world.observed.gate = None;
    world.health = Health::NoData;
    world.run(30);
    assert_eq!(
        world.phase(),
        Some(RolloutPhase::Progressing),
        "{:?}",
        world.status.message
    );
    world.run(60);
    assert_eq!(world.phase(), Some(RolloutPhase::Failed));
    let message = world.status.message.clone().unwrap_or_default();
    assert!(
        message.contains("no progress within 60s (holding at 20%"),
        "{message}"
    );
}

#[test]
fn a_revision_pushed_during_a_blue_green_switch_gets_no_traffic() {
    let mut world = initialized(blue_green_spec());
    world.new_revision("r2");
    while world.phase() != Some(RolloutPhase::Promoting) {
        world.tick(Duration::from_secs(1));
        assert!(world.log.len() < 100, "never promoted");
    }
    assert_eq!(world.status.canary_weight, Weight::FULL, "switched");
    // The primary is still rolling to r2 when r3 lands in the target (the canary).
    world.observed.primary_ready = false;
    world.observed.target_revision = Some("r3".into());
    let plan = world.tick(Duration::from_secs(1));
    assert_eq!(plan.desired.map(|d| d.canary_weight), Some(Weight::ZERO));
    assert_eq!(world.status.canary_weight, Weight::ZERO);
    assert_eq!(world.phase(), Some(RolloutPhase::Promoting));
}
