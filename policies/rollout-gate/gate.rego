# A promotion gate for Sluice Rollouts: may this rollout be promoted now?
#
# Input:
#   {"rollout": {"name", "namespace", "revision", "step", "weight", "labels", "annotations"},
#    "namespace": {"labels": {...}},
#    "metrics": [{"name", "value", "verdict"}],      verdict: "pass", "fail" or "noData"
#    "now": "2026-11-25T10:00:00Z"}                  optional; the clock (time.now_ns) when absent
# Decisions:
#   data.sluice.rollout.gate.deny   set of reasons (strings); empty when the promotion may go ahead
#   data.sluice.rollout.gate.allow  true exactly when deny is empty
package sluice.rollout.gate

# Change freezes: no promotion in [start, end). Times are RFC 3339.
freeze_windows := [
	{"name": "black-friday", "start": "2026-11-26T00:00:00Z", "end": "2026-12-01T06:00:00Z"},
	{"name": "year-end", "start": "2026-12-21T00:00:00Z", "end": "2027-01-04T08:00:00Z"},
]

# Namespaces with this label value need an approval annotation on the rollout.
production if input.namespace.labels.environment == "production"

approved_by_annotation := "sluice.dev/approved-by"

# Optional: the revision the approval was given for. When set, it must be the rollout's revision.
approved_revision_annotation := "sluice.dev/approved-revision"

default allow := false

allow if count(deny) == 0

now_ns := time.parse_rfc3339_ns(input.now) if input.now

now_ns := time.now_ns() if not input.now

deny contains msg if {
	some window in freeze_windows
	time.parse_rfc3339_ns(window.start) <= now_ns
	now_ns < time.parse_rfc3339_ns(window.end)
	msg := sprintf("change freeze %q is in effect until %s", [window.name, window.end])
}

deny contains msg if {
	production
	not approver
	msg := sprintf("namespace %s is production: annotate the rollout with %s", [
		input.rollout.namespace,
		approved_by_annotation,
	])
}

deny contains msg if {
	production
	approver
	approved_revision := input.rollout.annotations[approved_revision_annotation]
	approved_revision != input.rollout.revision
	msg := sprintf("the approval by %s is for revision %s, not %s", [
		approver,
		approved_revision,
		input.rollout.revision,
	])
}

deny contains msg if {
	some metric in input.metrics
	metric.verdict != "pass"
	msg := sprintf("metric %s is %s", [metric.name, metric.verdict])
}

# Who approved, when the annotation is set and not blank.
approver := name if {
	name := trim_space(input.rollout.annotations[approved_by_annotation])
	name != ""
}
