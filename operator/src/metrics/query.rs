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
}
