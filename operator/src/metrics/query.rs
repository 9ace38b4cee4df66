//! Rendering of PromQL templates: `{{ namespace }}`, `{{ target }}`, `{{ service }}`, `{{ interval }}` and
//! `{{ variables.NAME }}`, the placeholders Flagger's metric templates use, so Flagger users keep their queries.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::api::parse_duration;

/// What a query is about: the values its placeholders stand for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryContext {
    /// The Rollout's namespace.
    pub namespace: String,
    /// The target workload (the canary), `<target>`.
    pub target: String,
    /// The apex Service, `<service>`.
    pub service: String,
    /// The query window as a PromQL duration, e.g. `1m` or `5s`.
    pub interval: String,
    /// Extra values for `{{ variables.NAME }}`.
    pub variables: BTreeMap<String, String>,
    /// The target is a StatefulSet (pods named `<target>-<ordinal>`, Linkerd's `statefulset` label).
    pub statefulset: bool,
    /// How long the current stage has run. The window never reaches back past it (see [`window`]).
    pub stage_age: Option<std::time::Duration>,
    /// Istio ambient mode: L7 telemetry comes from the waypoint (`reporter="waypoint"`), there is no sidecar.
    pub waypoint: bool,
}

impl QueryContext {
    /// The same context about the primary workload, which Sluice names `<target>-primary`.
    pub fn for_primary(&self) -> Self {
        Self {
            target: format!("{}-primary", self.target),
            ..self.clone()
        }
    }
}

/// A template that cannot become a query. Each names what to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueryError {
    #[error(
        "unknown placeholder `{{{{ {placeholder} }}}}` in query template; \
         use one of namespace, target, service, interval or variables.NAME"
    )]
    UnknownPlaceholder { placeholder: String },
    #[error(
        "placeholder `{{{{ variables.{name} }}}}` has no value; define variable {name:?} \
         (known variables: {known})"
    )]
    UnknownVariable { name: String, known: String },
    #[error(
        "query template has an unclosed `{{{{` at byte {offset}; close the placeholder with `}}}}`"
    )]
    Unterminated { offset: usize },
    #[error(
        "metric {metric:?} has no query and is not a builtin of this provider; \
         set `query`, or use request-success-rate or request-duration"
    )]
    UnknownMetric { metric: String },
    #[error("interval {interval:?} is not a duration; write it like 30s, 1m or 1m30s")]
    BadInterval { interval: String },
    #[error(
        "primaryComparison compares the query with {{{{ target }}}} as the canary and as <target>-primary, but \
         this query does not use {{{{ target }}}}, so both sides would be the same series: select the workload \
         with {{{{ target }}}}"
    )]
    PrimaryNotSelected,
}

/// Replaces every `{{ placeholder }}` of `template` (spaces inside the braces are optional).
pub fn render(template: &str, ctx: &QueryContext) -> Result<String, QueryError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let inner = &rest[start + 2..];
        let Some(end) = inner.find("}}") else {
            return Err(QueryError::Unterminated {
                offset: template.len() - rest.len() + start,
            });
        };
        out.push_str(lookup(inner[..end].trim(), ctx)?);
        rest = &inner[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup<'a>(key: &str, ctx: &'a QueryContext) -> Result<&'a str, QueryError> {
    match key {
        "namespace" => Ok(&ctx.namespace),
        "target" => Ok(&ctx.target),
        "service" => Ok(&ctx.service),
        "interval" => Ok(&ctx.interval),
        _ => match key.strip_prefix("variables.") {
            Some(name) => ctx.variables.get(name).map(String::as_str).ok_or_else(|| {
                QueryError::UnknownVariable {
                    name: name.to_owned(),
                    known: known_variables(ctx),
                }
            }),
            None => Err(QueryError::UnknownPlaceholder {
                placeholder: key.to_owned(),
            }),
        },
    }
}

fn known_variables(ctx: &QueryContext) -> String {
    if ctx.variables.is_empty() {
        "none".to_owned()
    } else {
        ctx.variables.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// A Kubernetes-style duration as PromQL accepts it. PromQL has no fractions (`1.5m`), which the CRD allows,
/// so those become whole milliseconds; anything else is kept as written, so users see their own text in queries.
pub fn promql_duration(interval: &str) -> Result<String, QueryError> {
    let bad = || QueryError::BadInterval {
        interval: interval.to_owned(),
    };
    let duration = parse_duration(interval).ok_or_else(bad)?;
    if !interval.contains('.') {
        return Ok(interval.to_owned());
    }
    let millis = duration.as_millis();
    match millis {
        0 => Err(bad()),
        m if m % 1000 == 0 => Ok(format!("{}s", m / 1000)),
        m => Ok(format!("{m}ms")),
    }
}

/// The query window for a metric written as `written`: the written length, cut to the time the current stage
/// has run. A check must judge only the revision on trial at its current weight: a longer window would count
/// a previous revision's errors against a fixed release pushed right after a rollback, or healthy traffic from
/// before a bad release started in its favour. The cut window is whole seconds, rounded down (never reaching
/// before the stage); the planner runs no check before one analysis interval has passed, so that is the
/// shortest window.
pub fn window(written: &str, stage_age: Option<std::time::Duration>) -> Result<String, QueryError> {
    let full = promql_duration(written)?;
    let length = parse_duration(written).ok_or_else(|| QueryError::BadInterval {
        interval: written.to_owned(),
    })?;
    match stage_age {
        Some(age) if age < length => Ok(format!("{}s", age.as_secs().max(1))),
        _ => Ok(full),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> QueryContext {
        QueryContext {
            namespace: "test".into(),
            target: "podinfo".into(),
            service: "podinfo-svc".into(),
            interval: "1m".into(),
            variables: BTreeMap::from([("code".into(), "5..".into())]),
            statefulset: false,
            stage_age: None,
            waypoint: false,
        }
    }

    #[test]
    fn replaces_every_placeholder_with_or_without_spaces() {
        let template = r#"sum(rate(x{ns="{{ namespace }}",w="{{target}}",s="{{  service}}",c=~"{{ variables.code }}"}[{{interval }}]))"#;
        assert_eq!(
            render(template, &ctx()),
            Ok(r#"sum(rate(x{ns="test",w="podinfo",s="podinfo-svc",c=~"5.."}[1m]))"#.to_owned())
        );
    }

    #[test]
    fn text_without_placeholders_is_kept_verbatim() {
        let query = r#"sum(rate(x{a="b"}[1m])) / on() group_left vector(1)"#;
        assert_eq!(render(query, &ctx()).as_deref(), Ok(query));
        assert_eq!(render("", &ctx()).as_deref(), Ok(""));
    }

    #[test]
    fn unknown_placeholders_are_named() {
        let err = render("x{a=\"{{ pod }}\"}", &ctx());
        assert_eq!(
            err,
            Err(QueryError::UnknownPlaceholder {
                placeholder: "pod".into()
            })
        );
        let message = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("{{ pod }}"), "{message}");
    }

    #[test]
    fn unknown_variables_list_the_known_ones() {
        let err = render("{{ variables.missing }}", &ctx()).err();
        let message = err.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(
            matches!(err, Some(QueryError::UnknownVariable { ref name, .. }) if name == "missing")
        );
        assert!(message.contains("known variables: code"), "{message}");
    }

    #[test]
    fn an_unclosed_placeholder_is_an_error() {
        assert_eq!(
            render("abc {{ namespace", &ctx()),
            Err(QueryError::Unterminated { offset: 4 })
        );
    }

    #[test]
    fn fractional_intervals_become_promql_durations() {
        assert_eq!(promql_duration("1m").as_deref(), Ok("1m"));
        assert_eq!(promql_duration("1m30s").as_deref(), Ok("1m30s"));
        assert_eq!(promql_duration("1.5m").as_deref(), Ok("90s"));
        assert_eq!(promql_duration("0.25s").as_deref(), Ok("250ms"));
        assert!(promql_duration("soon").is_err());
        assert!(promql_duration("0.0001s").is_err());
    }

    #[test]
    fn the_window_is_cut_to_the_time_the_stage_has_run() {
        let secs = |s: u64| Some(std::time::Duration::from_secs(s));
        // A young stage: only its own seconds, rounded down.
        assert_eq!(window("1m", secs(12)).as_deref(), Ok("12s"));
        assert_eq!(
            window("10s", Some(std::time::Duration::from_millis(2_900))).as_deref(),
            Ok("2s")
        );
        // Never an empty window.
        assert_eq!(window("1m", secs(0)).as_deref(), Ok("1s"));
        // An old enough stage keeps the window as written (fractions made PromQL).
        assert_eq!(window("1m", secs(60)).as_deref(), Ok("1m"));
        assert_eq!(window("1.5m", secs(3600)).as_deref(), Ok("90s"));
        assert_eq!(window("1m30s", None).as_deref(), Ok("1m30s"));
        assert!(window("soon", secs(5)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn a_window_never_reaches_before_the_stage_nor_past_its_length(
            length in 1u64..7_200,
            age_ms in 0u64..10_000_000,
        ) {
            let age = std::time::Duration::from_millis(age_ms);
            let text = window(&format!("{length}s"), Some(age)).unwrap_or_default();
            let seconds = parse_duration(&text).map(|d| d.as_secs()).unwrap_or(u64::MAX);
            proptest::prop_assert!(seconds <= length, "{text} longer than {length}s");
            proptest::prop_assert!(seconds <= age.as_secs().max(1), "{text} older than the stage ({age:?})");
            proptest::prop_assert!(seconds >= 1);
        }
    }
}
