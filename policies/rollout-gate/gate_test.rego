package sluice.rollout.gate

# A gate input: rollout checkout of namespace shop at revision 7c9f4d2, step 4 (50%).
gate_input(annotations, environment, metrics, now) := {
	"rollout": {
		"name": "checkout",
		"namespace": "shop",
		"revision": "7c9f4d2",
		"step": 4,
		"weight": 50,
		"labels": {"app": "checkout"},
		"annotations": annotations,
	},
	"namespace": {"labels": {"environment": environment}},
	"metrics": metrics,
	"now": now,
}

approved := {"sluice.dev/approved-by": "alice@example.com"}

passing := [
	{"name": "request-success-rate", "value": 99.7, "verdict": "pass"},
	{"name": "request-duration-p99", "value": 212, "verdict": "pass"},
]

# A day outside every freeze window.
quiet_day := "2026-11-25T10:00:00Z"

# An approved production rollout with passing metrics on a quiet day.
base := gate_input(approved, "production", passing, quiet_day)

with_now(now) := gate_input(approved, "production", passing, now)

with_annotations(annotations) := gate_input(annotations, "production", passing, quiet_day)

test_approved_production_rollout_outside_freeze_is_allowed if {
	allow with input as base
	count(deny) == 0 with input as base
}

test_freeze_window_denies if {
	not allow with input as with_now("2026-11-27T15:30:00Z")
	deny == {`change freeze "black-friday" is in effect until 2026-12-01T06:00:00Z`} with input as with_now("2026-11-27T15:30:00Z")
}

test_freeze_start_is_inclusive_and_end_exclusive if {
	not allow with input as with_now("2026-11-26T00:00:00Z")
	allow with input as with_now("2026-12-01T06:00:00Z")
}

test_freeze_with_offset_timestamps if {
	# 2026-12-21T00:30:00+01:00 is 2026-12-20T23:30:00Z: before the year-end freeze.
	allow with input as with_now("2026-12-21T00:30:00+01:00")
	not allow with input as with_now("2026-12-21T01:30:00+01:00")
}

test_production_needs_approval if {
	not allow with input as with_annotations({})
	deny == {"namespace shop is production: annotate the rollout with sluice.dev/approved-by"} with input as with_annotations({})
}

test_blank_approval_does_not_count if {
	not allow with input as with_annotations({"sluice.dev/approved-by": "  "})
}

test_approval_for_another_revision_is_denied if {
	stale := {"sluice.dev/approved-by": "alice@example.com", "sluice.dev/approved-revision": "5b1e0aa"}
	not allow with input as with_annotations(stale)
	current := {"sluice.dev/approved-by": "alice@example.com", "sluice.dev/approved-revision": "7c9f4d2"}
	allow with input as with_annotations(current)
}

test_non_production_needs_no_approval if {
	allow with input as gate_input({}, "staging", passing, quiet_day)
}

test_failing_or_missing_metrics_deny if {
	metrics := [
		{"name": "request-success-rate", "value": 91.2, "verdict": "fail"},
		{"name": "request-duration-p99", "verdict": "noData"},
	]
	deny == {"metric request-success-rate is fail", "metric request-duration-p99 is noData"} with input as gate_input(approved, "production", metrics, quiet_day)
}

test_now_defaults_to_the_clock if {
	# Without input.now the gate reads the clock (time.now_ns): the same input is denied while the clock is
	# inside a freeze window and allowed outside it.
	i := object.remove(base, ["now"])
	in_freeze := time.parse_rfc3339_ns("2026-11-27T15:30:00Z")
	deny == {`change freeze "black-friday" is in effect until 2026-12-01T06:00:00Z`} with input as i with time.now_ns as in_freeze
	not allow with input as i with time.now_ns as in_freeze
	quiet := time.parse_rfc3339_ns(quiet_day)
	allow with input as i with time.now_ns as quiet
}

test_every_reason_is_reported if {
	i := gate_input({}, "production", passing, "2026-12-24T12:00:00Z")
	count(deny) == 2 with input as i
}
