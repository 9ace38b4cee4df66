//! The builtin metrics `request-success-rate` (percent of non-5xx) and `request-duration` (p99, milliseconds),
//! computed from the mesh's own telemetry so users need no recording rules.

use crate::api::{Provider, REQUEST_DURATION, REQUEST_SUCCESS_RATE};

use super::QueryContext;

/// The PromQL behind one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricQueries {
    /// Evaluates to the single number that is judged.
    pub value: String,
    /// Evaluates to the number of requests in the window, checked against `minRequests`.
    pub requests: Option<String>,
}

/// The queries of builtin metric `name` for the workload in `ctx`, or `None` if `name` is not a builtin.
pub fn builtin(provider: Provider, name: &str, ctx: &QueryContext) -> Option<MetricQueries> {
    match provider {
        // Gateway API routes on Istio (GAMMA) are still served by Istio's proxies, which report Istio's standard
        // metrics.
        Provider::Istio | Provider::GatewayApi => istio(name, ctx),
        // linkerd-smi is the SMI implementation users run; other SMI meshes use custom queries.
        Provider::Linkerd | Provider::Smi | Provider::SmiV1alpha1 => linkerd(name, ctx),
        Provider::Consul => consul(name, ctx),
    }
}

fn linkerd(name: &str, ctx: &QueryContext) -> Option<MetricQueries> {
    // direction="inbound": the canary's own proxy sees each request once; outbound series are the callers'.
    let workload = if ctx.statefulset {
        "statefulset"
    } else {
        "deployment"
    };
    let selector = format!(
        r#"direction="inbound",namespace="{}",{workload}="{}""#,
        label_value(&ctx.namespace),
        label_value(&ctx.target),
    );
    let interval = &ctx.interval;
    let requests = format!("sum(increase(response_total{{{selector}}}[{interval}]))");
    let value = match name {
        REQUEST_SUCCESS_RATE => format!(
            r#"(sum(rate(response_total{{{selector},classification!="failure"}}[{interval}])) or vector(0)) / sum(rate(response_total{{{selector}}}[{interval}])) * 100"#
        ),
        REQUEST_DURATION => format!(
            "histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{{selector}}}[{interval}])) by (le))"
        ),
        _ => return None,
    };
    Some(MetricQueries {
        value,
        requests: Some(requests),
    })
}

fn consul(name: &str, ctx: &QueryContext) -> Option<MetricQueries> {
    // The canary's Envoy sidecar reports requests to its own app as the `local_app` cluster. Pods are matched
    // by name (`<target>-<hash>-<id>`), which does not depend on how the pods are registered in Consul.
    // A StatefulSet's pods are `<target>-<ordinal>`; the primary's (`<target>-primary-<ordinal>`) must not match.
    let pods = if ctx.statefulset {
        "[0-9]+"
    } else {
        "[0-9a-zA-Z]+(-[0-9a-zA-Z]+)"
    };
    let selector = format!(
        r#"envoy_cluster_name="local_app",namespace="{}",pod=~"{}-{pods}""#,
        label_value(&ctx.namespace),
        label_value(&ctx.target),
    );
    let interval = &ctx.interval;
    let requests = format!("sum(increase(envoy_cluster_upstream_rq_xx{{{selector}}}[{interval}]))");
    let value = match name {
        REQUEST_SUCCESS_RATE => format!(
            r#"(sum(rate(envoy_cluster_upstream_rq_xx{{{selector},envoy_response_code_class!="5"}}[{interval}])) or vector(0)) / sum(rate(envoy_cluster_upstream_rq_xx{{{selector}}}[{interval}])) * 100"#
        ),
        REQUEST_DURATION => format!(
            "histogram_quantile(0.99, sum(rate(envoy_cluster_upstream_rq_time_bucket{{{selector}}}[{interval}])) by (le))"
        ),
        _ => return None,
    };
    Some(MetricQueries {
        value,
        requests: Some(requests),
    })
}

fn istio(name: &str, ctx: &QueryContext) -> Option<MetricQueries> {
    // reporter="destination": the server-side proxy sees every request to the workload exactly once, whereas
    // source-side reports miss callers outside the mesh and would double the count if both were summed. In
    // ambient mode there is no server-side proxy: the waypoint reports each request once instead.
    let reporter = if ctx.waypoint {
        "waypoint"
    } else {
        "destination"
    };
    let selector = format!(
        r#"reporter="{reporter}",destination_workload_namespace="{}",destination_workload="{}""#,
        label_value(&ctx.namespace),
        label_value(&ctx.target),
    );
    let interval = &ctx.interval;
    let requests = format!("sum(increase(istio_requests_total{{{selector}}}[{interval}]))");
    let value = match name {
        // `or vector(0)`: when every request failed there is no non-5xx series at all, and an empty numerator
        // would turn a 0% success rate into "no data" instead of a failure.
        REQUEST_SUCCESS_RATE => format!(
            r#"(sum(rate(istio_requests_total{{{selector},response_code!~"5.*"}}[{interval}])) or vector(0)) / sum(rate(istio_requests_total{{{selector}}}[{interval}])) * 100"#
        ),
        REQUEST_DURATION => format!(
            "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{{{selector}}}[{interval}])) by (le))"
        ),
        _ => return None,
    };
    Some(MetricQueries {
        value,
        requests: Some(requests),
    })
}

/// Escapes a PromQL label value. Kubernetes names never need it; this keeps a stray quote from changing the query.
fn label_value(raw: &str) -> String {
    raw.replace('\\', r"\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> QueryContext {
        QueryContext {
            namespace: "test".into(),
            target: "podinfo".into(),
            service: "podinfo".into(),
            interval: "1m".into(),
            variables: Default::default(),
            statefulset: false,
            stage_age: None,
            waypoint: false,
        }
    }

    const SELECTOR: &str = r#"reporter="destination",destination_workload_namespace="test",destination_workload="podinfo""#;

    #[test]
    fn success_rate_is_the_percentage_of_non_5xx_requests() {
        let queries = builtin(Provider::Istio, REQUEST_SUCCESS_RATE, &ctx());
        let expected = MetricQueries {
            value: format!(
                r#"(sum(rate(istio_requests_total{{{SELECTOR},response_code!~"5.*"}}[1m])) or vector(0)) / sum(rate(istio_requests_total{{{SELECTOR}}}[1m])) * 100"#
            ),
            requests: Some(format!(
                "sum(increase(istio_requests_total{{{SELECTOR}}}[1m]))"
            )),
        };
        assert_eq!(queries, Some(expected));
    }

    #[test]
    fn duration_is_the_p99_in_milliseconds() {
        let queries = builtin(Provider::Istio, REQUEST_DURATION, &ctx());
        assert_eq!(
            queries.map(|q| q.value),
            Some(format!(
                "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{{{SELECTOR}}}[1m])) by (le))"
            ))
        );
    }

    #[test]
    fn ambient_mode_reads_the_waypoints_reports() {
        let ambient = QueryContext {
            waypoint: true,
            ..ctx()
        };
        for provider in [Provider::Istio, Provider::GatewayApi] {
            for name in [REQUEST_SUCCESS_RATE, REQUEST_DURATION] {
                let queries = builtin(provider, name, &ambient).expect("a builtin");
                for query in [&queries.value, queries.requests.as_ref().expect("a count")] {
                    assert!(query.contains(r#"reporter="waypoint""#), "{query}");
                    assert!(!query.contains("destination\""), "{query}");
                }
            }
        }
    }

    #[test]
    fn gateway_api_uses_istio_telemetry() {
        for name in [REQUEST_SUCCESS_RATE, REQUEST_DURATION] {
            assert_eq!(
                builtin(Provider::GatewayApi, name, &ctx()),
                builtin(Provider::Istio, name, &ctx())
            );
        }
    }

    #[test]
    fn linkerd_and_smi_use_linkerd_inbound_series() {
        let selector = r#"direction="inbound",namespace="test",deployment="podinfo""#;
        for provider in [Provider::Linkerd, Provider::Smi, Provider::SmiV1alpha1] {
            assert_eq!(
                builtin(provider, REQUEST_SUCCESS_RATE, &ctx()),
                Some(MetricQueries {
                    value: format!(
                        r#"(sum(rate(response_total{{{selector},classification!="failure"}}[1m])) or vector(0)) / sum(rate(response_total{{{selector}}}[1m])) * 100"#
                    ),
                    requests: Some(format!("sum(increase(response_total{{{selector}}}[1m]))")),
                })
            );
            assert_eq!(
                builtin(provider, REQUEST_DURATION, &ctx()).map(|q| q.value),
                Some(format!(
                    "histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{{selector}}}[1m])) by (le))"
                ))
            );
        }
    }

    #[test]
    fn consul_uses_the_sidecars_local_app_cluster() {
        let selector = r#"envoy_cluster_name="local_app",namespace="test",pod=~"podinfo-[0-9a-zA-Z]+(-[0-9a-zA-Z]+)""#;
        assert_eq!(
            builtin(Provider::Consul, REQUEST_SUCCESS_RATE, &ctx()),
            Some(MetricQueries {
                value: format!(
                    r#"(sum(rate(envoy_cluster_upstream_rq_xx{{{selector},envoy_response_code_class!="5"}}[1m])) or vector(0)) / sum(rate(envoy_cluster_upstream_rq_xx{{{selector}}}[1m])) * 100"#
                ),
                requests: Some(format!(
                    "sum(increase(envoy_cluster_upstream_rq_xx{{{selector}}}[1m]))"
                )),
            })
        );
        assert_eq!(
            builtin(Provider::Consul, REQUEST_DURATION, &ctx()).map(|q| q.value),
            Some(format!(
                "histogram_quantile(0.99, sum(rate(envoy_cluster_upstream_rq_time_bucket{{{selector}}}[1m])) by (le))"
            ))
        );
    }

    #[test]
    fn other_names_are_not_builtins() {
        assert_eq!(builtin(Provider::Istio, "error-rate", &ctx()), None);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut ctx = ctx();
        ctx.target = r#"a"b\c"#.into();
        let queries = builtin(Provider::Istio, REQUEST_DURATION, &ctx);
        assert!(queries.is_some_and(|q| q.value.contains(r#"destination_workload="a\"b\\c""#)));
    }
}
