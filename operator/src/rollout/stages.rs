//! The ladder a release climbs: the weights that are judged one after the other, and pauses.

use std::time::Duration;

use crate::api::{Analysis, Weight};

/// How a release exposes the canary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseStrategy {
    /// Weights move step by step (`stepWeight`, `stepWeights`, `steps`).
    Canary,
    /// The canary gets no user traffic (only mirrored copies, with `mirror`) while it is judged, then all
    /// traffic switches to it at once for the promotion.
    BlueGreen,
    /// Requests matching `match` go to the canary while it is judged; the rest stay on the primary.
    AbTest,
}

/// Which strategy an analysis describes.
pub fn strategy(analysis: &Analysis) -> ReleaseStrategy {
    if analysis.step_weight.is_some() || analysis.step_weights.is_some() || analysis.steps.is_some()
    {
        ReleaseStrategy::Canary
    } else if !analysis.match_.is_empty() {
        ReleaseStrategy::AbTest
    } else {
        ReleaseStrategy::BlueGreen
    }
}

/// One stage of a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Hold this canary weight until the metrics pass at it.
    Judge(Weight),
    /// Wait (keeping the weight); `None` waits for a manual promote.
    Pause(Option<Duration>),
}

/// The stages of a release, in order. After the last one passes, the canary is promoted.
///
/// - `stepWeight`: `step, 2·step, …` capped at `maxWeight` (default 100);
/// - `stepWeights`: the listed weights;
/// - `steps`: `setWeight` stages are judged, `pause` stages wait;
/// - only `iterations` (blue-green): the canary gets no weight and is judged `iterations` times.
pub fn stages(analysis: &Analysis) -> Vec<Stage> {
    if let Some(weights) = &analysis.step_weights {
        return weights.iter().copied().map(Stage::Judge).collect();
    }
    if let Some(steps) = &analysis.steps {
        return steps
            .iter()
            .filter_map(|step| match (&step.set_weight, &step.pause) {
                (Some(w), _) => Some(Stage::Judge(*w)),
                (None, Some(pause)) => Some(Stage::Pause(
                    pause.duration.as_ref().and_then(|d| d.to_std()),
                )),
                (None, None) => None,
            })
            .collect();
    }
    if let Some(step) = analysis.step_weight.filter(|s| s.get() > 0) {
        let max = analysis
            .max_weight
            .unwrap_or(Weight::FULL)
            .get()
            .max(step.get());
        let mut ladder = Vec::new();
        let mut w = step.get();
        loop {
            let capped = w.min(max);
            ladder.push(Stage::Judge(Weight::new(capped).unwrap_or(Weight::FULL)));
            if capped >= max {
                break;
            }
            w = w.saturating_add(step.get());
        }
        return ladder;
    }
    let iterations = analysis.iterations.unwrap_or(1).max(1);
    (0..iterations)
        .map(|_| Stage::Judge(Weight::ZERO))
        .collect()
}

/// The canary weight in force at `index`: a pause keeps the weight of the stage before it.
pub fn weight_at(stages: &[Stage], index: usize) -> Weight {
    stages[..=index.min(stages.len().saturating_sub(1))]
        .iter()
        .rev()
        .find_map(|s| match s {
            Stage::Judge(w) => Some(*w),
            Stage::Pause(_) => None,
        })
        .unwrap_or(Weight::ZERO)
}

/// The highest weight any stage sets: the canary never gets more.
pub fn max_weight(stages: &[Stage]) -> Weight {
    stages
        .iter()
        .filter_map(|s| match s {
            Stage::Judge(w) => Some(*w),
            Stage::Pause(_) => None,
        })
        .max()
        .unwrap_or(Weight::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DurationString, Pause, Step};

    fn analysis(json: serde_json::Value) -> Analysis {
        let mut base = serde_json::json!({"interval": "1m"});
        if let (Some(b), Some(extra)) = (base.as_object_mut(), json.as_object()) {
            b.extend(extra.clone());
        }
        serde_json::from_value(base).expect("valid analysis")
    }

    fn w(n: u8) -> Stage {
        Stage::Judge(Weight::new(n).expect("weight"))
    }

    #[test]
    fn step_weight_climbs_to_max_weight() {
        let ladder = stages(&analysis(
            serde_json::json!({"stepWeight": 10, "maxWeight": 50}),
        ));
        assert_eq!(ladder, vec![w(10), w(20), w(30), w(40), w(50)]);
        let ladder = stages(&analysis(
            serde_json::json!({"stepWeight": 30, "maxWeight": 50}),
        ));
        assert_eq!(
            ladder,
            vec![w(30), w(50)],
            "the last step is capped at maxWeight"
        );
        let ladder = stages(&analysis(serde_json::json!({"stepWeight": 40})));
        assert_eq!(
            ladder,
            vec![w(40), w(80), w(100)],
            "maxWeight defaults to 100"
        );
    }

    #[test]
    fn explicit_weights_steps_and_iterations() {
        assert_eq!(
            stages(&analysis(serde_json::json!({"stepWeights": [5, 25, 60]}))),
            vec![w(5), w(25), w(60)]
        );
        let a = Analysis {
            steps: Some(vec![
                Step {
                    set_weight: Weight::new(20),
                    pause: None,
                },
                Step {
                    set_weight: None,
                    pause: Some(Pause {
                        duration: Some(DurationString("30s".into())),
                    }),
                },
                Step {
                    set_weight: None,
                    pause: Some(Pause::default()),
                },
                Step {
                    set_weight: Weight::new(60),
                    pause: None,
                },
            ]),
            ..analysis(serde_json::json!({}))
        };
        let ladder = stages(&a);
        assert_eq!(
            ladder,
            vec![
                w(20),
                Stage::Pause(Some(Duration::from_secs(30))),
                Stage::Pause(None),
                w(60)
            ]
        );
        assert_eq!(weight_at(&ladder, 2), Weight::new(20).expect("weight"));
        assert_eq!(max_weight(&ladder), Weight::new(60).expect("weight"));
        assert_eq!(
            stages(&analysis(serde_json::json!({"iterations": 3}))),
            vec![w(0), w(0), w(0)]
        );
    }
}
