//! The verdict of one check: pass, fail or no data. No data (nothing measured, NaN, too few requests) is never a
//! pass: Flagger once promoted on NaN (fluxcd/flagger#1095) and neither Flagger nor Argo checks request volume.

use crate::api::{Metric, PrimaryComparison, ThresholdRange, Verdict};

/// Judges a measured `value` (and the number of `requests` it is based on) against `metric`'s bounds.
///
/// - no value, NaN or ±Inf → `NoData`;
/// - `minRequests` set (and above 0) but the request count unknown or below it → `NoData`;
/// - otherwise `Pass` iff `min <= value <= max` for the bounds present, else `Fail`.
pub fn judge(metric: &Metric, value: Option<f64>, requests: Option<f64>) -> Verdict {
    judge_parts(
        &metric.threshold_range,
        metric.min_requests,
        value,
        requests,
    )
}

pub(crate) fn judge_parts(
    range: &ThresholdRange,
    min_requests: Option<u32>,
    value: Option<f64>,
    requests: Option<f64>,
) -> Verdict {
    let Some(value) = value.filter(|v| v.is_finite()) else {
        return Verdict::NoData;
    };
    if let Some(minimum) = min_requests.filter(|&m| m > 0) {
        // An unknown count (empty result, NaN) cannot prove the minimum was reached.
        match requests.filter(|r| !r.is_nan()) {
            Some(count) if count >= f64::from(minimum) => {}
            _ => return Verdict::NoData,
        }
    }
    // Written as "inside" rather than "not outside" so a NaN bound fails instead of passing.
    let above_min = range.min.is_none_or(|min| value >= min);
    let below_max = range.max.is_none_or(|max| value <= max);
    if above_min && below_max {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
}

/// A metric with `primaryComparison`: the canary judged on its own (`canary`, from [`judge_parts`]) and,
/// when that passes, against the primary's measurement. The canary failing its own bounds fails whatever the
/// primary shows; otherwise no data on either side (the same rules, `minRequests` included) is no data.
pub(crate) fn judge_against_primary(
    comparison: &PrimaryComparison,
    min_requests: Option<u32>,
    canary: (Verdict, Option<f64>),
    primary: (Option<f64>, Option<f64>),
) -> Verdict {
    let (own, canary_value) = canary;
    let (primary_value, primary_requests) = primary;
    let primary_measured = judge_parts(
        &ThresholdRange::default(),
        min_requests,
        primary_value,
        primary_requests,
    ) == Verdict::Pass;
    match (own, canary_value, primary_value) {
        (Verdict::NoData | Verdict::Fail, _, _) => own,
        (Verdict::Pass, Some(c), Some(p)) if primary_measured => {
            if comparison.holds(c, p) {
                Verdict::Pass
            } else {
                Verdict::Fail
            }
        }
        _ => Verdict::NoData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NoDataPolicy;
    use proptest::prelude::*;

    fn metric(min: Option<f64>, max: Option<f64>, min_requests: Option<u32>) -> Metric {
        Metric {
            name: "request-success-rate".into(),
            query: None,
            threshold_range: ThresholdRange { min, max },
            interval: None,
            min_requests,
            on_no_data: NoDataPolicy::Hold,
            dry_run: false,
            primary_comparison: None,
            template_ref: None,
            template_variables: Default::default(),
        }
    }

    #[test]
    fn missing_or_non_finite_values_are_no_data() {
        let m = metric(Some(99.0), None, None);
        for value in [
            None,
            Some(f64::NAN),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
        ] {
            assert_eq!(judge(&m, value, Some(1000.0)), Verdict::NoData, "{value:?}");
        }
        // An upper bound alone must not let -Inf through either.
        let m = metric(None, Some(500.0), None);
        assert_eq!(judge(&m, Some(f64::NEG_INFINITY), None), Verdict::NoData);
    }

    #[test]
    fn bounds_are_inclusive() {
        let m = metric(Some(99.0), Some(100.0), None);
        assert_eq!(judge(&m, Some(99.0), None), Verdict::Pass);
        assert_eq!(judge(&m, Some(100.0), None), Verdict::Pass);
        assert_eq!(judge(&m, Some(98.999), None), Verdict::Fail);
        assert_eq!(judge(&m, Some(100.001), None), Verdict::Fail);
    }

    #[test]
    fn one_sided_bounds() {
        let at_least = metric(Some(99.0), None, None);
        assert_eq!(judge(&at_least, Some(1e12), None), Verdict::Pass);
        assert_eq!(judge(&at_least, Some(80.0), None), Verdict::Fail);
        let at_most = metric(None, Some(500.0), None);
        assert_eq!(judge(&at_most, Some(-3.0), None), Verdict::Pass);
        assert_eq!(judge(&at_most, Some(501.0), None), Verdict::Fail);
    }

    #[test]
    fn too_few_or_unknown_requests_are_no_data() {
        let m = metric(Some(99.0), None, Some(100));
        assert_eq!(judge(&m, Some(100.0), Some(99.9)), Verdict::NoData);
        assert_eq!(judge(&m, Some(100.0), None), Verdict::NoData);
        assert_eq!(judge(&m, Some(100.0), Some(f64::NAN)), Verdict::NoData);
        assert_eq!(judge(&m, Some(100.0), Some(100.0)), Verdict::Pass);
        assert_eq!(judge(&m, Some(100.0), Some(f64::INFINITY)), Verdict::Pass);
        // Too little traffic hides a failure too: it is no data, not a fail.
        assert_eq!(judge(&m, Some(10.0), Some(5.0)), Verdict::NoData);
    }

    #[test]
    fn zero_or_absent_min_requests_needs_no_count() {
        assert_eq!(
            judge(&metric(Some(1.0), None, Some(0)), Some(2.0), None),
            Verdict::Pass
        );
        assert_eq!(
            judge(&metric(Some(1.0), None, None), Some(2.0), None),
            Verdict::Pass
        );
        assert_eq!(
            judge(&metric(Some(1.0), None, None), Some(2.0), Some(0.0)),
            Verdict::Pass
        );
    }

    #[test]
    fn a_nan_bound_never_passes() {
        let m = metric(Some(f64::NAN), None, None);
        assert_eq!(judge(&m, Some(1.0), None), Verdict::Fail);
    }

    fn any_value() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            Just(None),
            Just(Some(f64::NAN)),
            Just(Some(f64::INFINITY)),
            Just(Some(f64::NEG_INFINITY)),
            any::<f64>().prop_map(Some),
            (-1e6..1e6f64).prop_map(Some),
        ]
    }

    fn any_bounds() -> impl Strategy<Value = (Option<f64>, Option<f64>)> {
        (
            proptest::option::of(-1e6..1e6f64),
            proptest::option::of(-1e6..1e6f64),
        )
    }

    #[test]
    fn a_canary_is_judged_against_the_primary() {
        let success = PrimaryComparison {
            min_delta: Some(-0.5),
            ..Default::default()
        };
        let latency = PrimaryComparison {
            max_ratio: Some(1.2),
            ..Default::default()
        };
        let pass = |v: f64| (Verdict::Pass, Some(v));
        let judged = |c: &PrimaryComparison, canary, primary: Option<f64>| {
            judge_against_primary(c, Some(10), canary, (primary, Some(100.0)))
        };
        assert_eq!(judged(&success, pass(99.0), Some(99.4)), Verdict::Pass);
        assert_eq!(
            judged(&success, pass(98.9), Some(99.4)),
            Verdict::Pass,
            "exactly half a point"
        );
        assert_eq!(judged(&success, pass(98.8), Some(99.4)), Verdict::Fail);
        assert_eq!(judged(&latency, pass(120.0), Some(100.0)), Verdict::Pass);
        assert_eq!(judged(&latency, pass(121.0), Some(100.0)), Verdict::Fail);
        // No data on either side is no data; the canary's own failure stands whatever the primary shows.
        assert_eq!(judged(&success, pass(99.0), None), Verdict::NoData);
        assert_eq!(
            judged(&success, pass(99.0), Some(f64::NAN)),
            Verdict::NoData
        );
        assert_eq!(
            judge_against_primary(&success, Some(10), pass(99.0), (Some(99.0), Some(3.0))),
            Verdict::NoData,
            "too few primary requests"
        );
        assert_eq!(
            judged(&success, (Verdict::NoData, None), Some(99.0)),
            Verdict::NoData
        );
        assert_eq!(
            judged(&success, (Verdict::Fail, Some(50.0)), None),
            Verdict::Fail
        );
        // A NaN bound fails rather than passes.
        let broken = PrimaryComparison {
            max_delta: Some(f64::NAN),
            ..Default::default()
        };
        assert_eq!(judged(&broken, pass(1.0), Some(1.0)), Verdict::Fail);
    }

    proptest! {
        #[test]
        fn a_primary_comparison_never_passes_what_the_canary_alone_does_not(
            own in prop_oneof![Just(Verdict::Pass), Just(Verdict::Fail), Just(Verdict::NoData)],
            canary in any_value(),
            primary in any_value(),
            primary_requests in any_value(),
            min_delta in proptest::option::of(-10.0..10.0f64),
            max_ratio in proptest::option::of(0.0..3.0f64),
        ) {
            let comparison = PrimaryComparison { min_delta, max_ratio, ..Default::default() };
            let verdict = judge_against_primary(&comparison, Some(5), (own, canary), (primary, primary_requests));
            if verdict == Verdict::Pass {
                prop_assert_eq!(own, Verdict::Pass);
                prop_assert!(primary.is_some_and(f64::is_finite));
                prop_assert!(primary_requests.is_some_and(|r| r >= 5.0));
            }
            if own != Verdict::Pass {
                prop_assert_eq!(verdict, own);
            }
        }

        #[test]
        fn nan_never_passes(
            (min, max) in any_bounds(),
            min_requests in proptest::option::of(any::<u32>()),
            requests in any_value(),
        ) {
            let m = metric(min, max, min_requests);
            prop_assert_eq!(judge(&m, Some(f64::NAN), requests), Verdict::NoData);
        }

        #[test]
        fn no_data_never_turns_into_pass(
            (min, max) in any_bounds(),
            min_requests in proptest::option::of(1..u32::MAX),
            value in any_value(),
            requests in any_value(),
        ) {
            let m = metric(min, max, min_requests);
            let verdict = judge(&m, value, requests);
            let no_value = !value.is_some_and(f64::is_finite);
            let too_few = min_requests.is_some_and(|min| !requests.is_some_and(|r| r >= f64::from(min)));
            if no_value || too_few {
                prop_assert_eq!(verdict, Verdict::NoData);
            }
            // Whatever the inputs, passing needs a real value and enough requests.
            if verdict == Verdict::Pass {
                prop_assert!(!no_value && !too_few);
            }
        }

        #[test]
        fn a_value_inside_bounds_with_enough_requests_passes(
            a in -1e6..1e6f64,
            b in -1e6..1e6f64,
            t in 0.0..=1.0f64,
            has_min in any::<bool>(),
            has_max in any::<bool>(),
            min_requests in proptest::option::of(0..100_000u32),
            extra in 0.0..1e6f64,
        ) {
            let (low, high) = if a <= b { (a, b) } else { (b, a) };
            let value = (low + (high - low) * t).clamp(low, high);
            let m = metric(has_min.then_some(low), has_max.then_some(high), min_requests);
            let requests = min_requests.map(|r| f64::from(r) + extra);
            prop_assert_eq!(judge(&m, Some(value), requests), Verdict::Pass);
        }

        #[test]
        fn a_finite_value_outside_bounds_with_enough_requests_fails(
            low in -1e6..1e6f64,
            width in 0.0..1e6f64,
            gap in 1e-3..1e6f64,
            below in any::<bool>(),
        ) {
            let high = low + width;
            let value = if below { low - gap } else { high + gap };
            let m = metric(Some(low), Some(high), Some(1));
            prop_assert_eq!(judge(&m, Some(value), Some(1.0)), Verdict::Fail);
        }
    }
}
