//! The notification outbox kept in a Rollout's status: which transitions go to which alerts, and what is
//! still to deliver. Pure functions; the controller does the HTTP and the status writes.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{AlertSeverity, FiringAlert, OutboxEntry, RolloutAlert, RolloutStatus};
use crate::rollout::{Reason, Transition};

/// More undelivered notifications than this and the oldest are dropped (and logged): a sink that is down
/// for days must not grow the Rollout without bound.
pub const MAX_PENDING: usize = 50;

/// How important a transition is.
pub fn severity(transition: &Transition) -> AlertSeverity {
    match transition.reason {
        Reason::RolledBack | Reason::InvalidSpec => AlertSeverity::Error,
        _ if transition.warning => AlertSeverity::Warn,
        _ => AlertSeverity::Info,
    }
}

/// Adds one outbox entry per transition for the alerts that want it; a rollback marks the Alertmanager alert
/// firing and the next promotion resolves it. Returns the ids of entries dropped for lack of room.
pub fn enqueue(
    status: &mut RolloutStatus,
    alerts: &[RolloutAlert],
    key: &str,
    transitions: &[Transition],
    at: Timestamp,
) -> Vec<String> {
    let at_text = at.to_string();
    for transition in transitions {
        let severity = severity(transition);
        let pending: Vec<String> = alerts
            .iter()
            .filter(|a| severity >= a.severity)
            .map(|a| a.name.clone())
            .collect();
        let revision = status.revision.clone();
        if transition.reason == Reason::Promoted
            && let Some(firing) = status.firing_alert.take()
        {
            status.notifications.push(OutboxEntry {
                id: format!("{key}/{}/Resolved/{at_text}", firing.revision),
                reason: "Resolved".into(),
                severity: firing.severity,
                message: format!(
                    "revision {} is promoted; the rollback alert is resolved",
                    revision.clone().unwrap_or_default()
                ),
                revision: Some(firing.revision),
                at: at_text.clone(),
                resolves: true,
                pending: firing.alerts,
                attempts: 0,
                next_attempt: None,
                last_error: None,
            });
        }
        if transition.reason == Reason::RolledBack && !pending.is_empty() {
            status.firing_alert = Some(FiringAlert {
                revision: revision.clone().unwrap_or_default(),
                severity,
                alerts: pending.clone(),
            });
        }
        if pending.is_empty() {
            continue;
        }
        status.notifications.push(OutboxEntry {
            id: format!(
                "{key}/{}/{}/{at_text}",
                revision.clone().unwrap_or_default(),
                transition.reason
            ),
            reason: transition.reason.as_str().to_owned(),
            severity,
            message: transition.message.clone(),
            revision,
            at: at_text.clone(),
            resolves: false,
            pending,
            attempts: 0,
            next_attempt: None,
            last_error: None,
        });
    }
    let excess = status.notifications.len().saturating_sub(MAX_PENDING);
    status.notifications.drain(..excess).map(|e| e.id).collect()
}

/// Delivery retries: 1s, 2s, 4s … up to 5 minutes.
pub fn retry_after(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// Records one delivery outcome for `alert` on the entry at `index`.
pub fn record(entry: &mut OutboxEntry, alert: &str, outcome: Result<(), String>, now: Timestamp) {
    match outcome {
        Ok(()) => {
            entry.pending.retain(|a| a != alert);
            if entry.pending.is_empty() {
                entry.last_error = None;
            }
        }
        Err(error) => {
            entry.attempts += 1;
            let wait =
                jiff::SignedDuration::try_from(retry_after(entry.attempts)).unwrap_or_default();
            entry.next_attempt = Some(Time(now + wait));
            entry.last_error = Some(format!("{alert}: {error}"));
        }
    }
}

/// Carries the outcome of one delivery round (`before` → `after`) over to `current`, a newer status read after
/// the round's own write was refused: entries that left the outbox leave it, attempted ones take their new state,
/// and whatever else changed meanwhile (new entries, other fields) stays.
pub fn merge_delivery(current: &mut RolloutStatus, before: &RolloutStatus, after: &RolloutStatus) {
    for old in &before.notifications {
        let outcome = after.notifications.iter().find(|e| e.id == old.id);
        if outcome == Some(old) {
            continue;
        }
        match outcome {
            None => current.notifications.retain(|e| e.id != old.id),
            Some(outcome) => {
                if let Some(entry) = current.notifications.iter_mut().find(|e| e.id == old.id) {
                    *entry = outcome.clone();
                }
            }
        }
    }
}

/// Entries whose next attempt is due.
pub fn due(entry: &OutboxEntry, now: Timestamp) -> bool {
    !entry.pending.is_empty() && entry.next_attempt.as_ref().is_none_or(|t| t.0 <= now)
}

/// When the earliest pending entry is due, if any.
pub fn next_due(status: &RolloutStatus, now: Timestamp) -> Option<Duration> {
    status
        .notifications
        .iter()
        .filter(|e| !e.pending.is_empty())
        .map(|e| {
            e.next_attempt
                .as_ref()
                .map(|t| t.0.duration_since(now).unsigned_abs())
                .filter(|_| e.next_attempt.as_ref().is_some_and(|t| t.0 > now))
                .unwrap_or(Duration::ZERO)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ProviderRef;

    fn alert(name: &str, severity: AlertSeverity) -> RolloutAlert {
        RolloutAlert {
            name: name.into(),
            severity,
            provider_ref: ProviderRef {
                name: name.into(),
                namespace: None,
            },
        }
    }

    fn transition(reason: Reason, warning: bool) -> Transition {
        Transition {
            warning,
            reason,
            message: format!("{reason} happened"),
        }
    }

    fn at() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().expect("timestamp")
    }

    #[test]
    fn each_transition_goes_to_the_alerts_that_want_its_severity() {
        let mut status = RolloutStatus {
            revision: Some("r2".into()),
            ..RolloutStatus::default()
        };
        let alerts = [
            alert("chat", AlertSeverity::Info),
            alert("pager", AlertSeverity::Error),
        ];
        let transitions = [
            transition(Reason::ReleaseStarted, false),
            transition(Reason::Frozen, true),
            transition(Reason::RolledBack, true),
        ];
        let dropped = enqueue(&mut status, &alerts, "default/web", &transitions, at());
        assert!(dropped.is_empty());
        let routed: Vec<(String, Vec<String>)> = status
            .notifications
            .iter()
            .map(|e| (e.reason.clone(), e.pending.clone()))
            .collect();
        assert_eq!(
            routed,
            vec![
                ("ReleaseStarted".into(), vec!["chat".into()]),
                ("Frozen".into(), vec!["chat".into()]),
                ("RolledBack".into(), vec!["chat".into(), "pager".into()]),
            ]
        );
        assert_eq!(
            status.firing_alert.as_ref().map(|f| f.revision.as_str()),
            Some("r2")
        );
        let ids: std::collections::BTreeSet<&str> =
            status.notifications.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), 3, "ids are unique");
    }

    #[test]
    fn a_promotion_resolves_the_firing_alert_once() {
        let mut status = RolloutStatus {
            revision: Some("r2".into()),
            ..RolloutStatus::default()
        };
        let alerts = [alert("am", AlertSeverity::Error)];
        enqueue(
            &mut status,
            &alerts,
            "default/web",
            &[transition(Reason::RolledBack, true)],
            at(),
        );
        status.notifications.clear();
        status.revision = Some("r3".into());
        enqueue(
            &mut status,
            &alerts,
            "default/web",
            &[transition(Reason::Promoted, false)],
            at(),
        );
        assert_eq!(
            status.notifications.len(),
            1,
            "Promoted is info: only the resolve goes to an error-level alert"
        );
        let resolve = &status.notifications[0];
        assert!(resolve.resolves);
        assert_eq!(
            resolve.revision.as_deref(),
            Some("r2"),
            "resolves the alert of the failed revision"
        );
        assert!(status.firing_alert.is_none());
        enqueue(
            &mut status,
            &alerts,
            "default/web",
            &[transition(Reason::Promoted, false)],
            at(),
        );
        assert_eq!(status.notifications.len(), 1, "nothing left to resolve");
    }

    #[test]
    fn a_delivery_round_merges_onto_a_newer_status() {
        let mut before = RolloutStatus::default();
        let alerts = [alert("chat", AlertSeverity::Info)];
        enqueue(
            &mut before,
            &alerts,
            "ns/app",
            &[
                transition(Reason::RolledBack, true),
                transition(Reason::Frozen, true),
            ],
            at(),
        );
        assert_eq!(before.notifications.len(), 2);
        // The round delivered the first entry and failed the second.
        let mut after = before.clone();
        after.notifications.remove(0);
        record(
            &mut after.notifications[0],
            "chat",
            Err("HTTP 500".into()),
            at(),
        );
        // Meanwhile someone else's write added a transition and changed the message.
        let mut current = before.clone();
        current.message = Some("newer".into());
        enqueue(
            &mut current,
            &alerts,
            "ns/app",
            &[transition(Reason::Retry, false)],
            at(),
        );
        merge_delivery(&mut current, &before, &after);
        assert_eq!(current.message.as_deref(), Some("newer"));
        let reasons: Vec<&str> = current
            .notifications
            .iter()
            .map(|e| e.reason.as_str())
            .collect();
        assert_eq!(
            reasons,
            vec!["Frozen", "Retry"],
            "the delivered entry is gone, the new one stays"
        );
        assert_eq!(current.notifications[0].attempts, 1);
        assert_eq!(current.notifications[1].attempts, 0);
    }

    #[test]
    fn failures_back_off_and_success_clears_the_alert() {
        let mut status = RolloutStatus::default();
        enqueue(
            &mut status,
            &[alert("hook", AlertSeverity::Info)],
            "ns/r",
            &[transition(Reason::Promoted, false)],
            at(),
        );
        let entry = &mut status.notifications[0];
        assert!(due(entry, at()));
        record(entry, "hook", Err("503".into()), at());
        record(entry, "hook", Err("503".into()), at());
        assert_eq!(entry.attempts, 2);
        assert!(!due(entry, at()), "waits before retrying");
        assert!(due(entry, at() + jiff::SignedDuration::from_secs(2)));
        record(entry, "hook", Ok(()), at());
        assert!(entry.pending.is_empty() && entry.last_error.is_none());
        assert_eq!((1..=12).map(|n| retry_after(n).as_secs()).max(), Some(300));
    }

    #[test]
    fn the_outbox_is_bounded() {
        let mut status = RolloutStatus::default();
        let alerts = [alert("hook", AlertSeverity::Info)];
        let mut dropped = Vec::new();
        for i in 0..(MAX_PENDING + 5) {
            let t = at() + jiff::SignedDuration::from_secs(i as i64);
            dropped.extend(enqueue(
                &mut status,
                &alerts,
                "ns/r",
                &[transition(Reason::WeightChanged, false)],
                t,
            ));
        }
        assert_eq!(status.notifications.len(), MAX_PENDING);
        assert_eq!(dropped.len(), 5);
    }
}
