//! Gateway API router: an `HTTPRoute` attached to the apex Service (GAMMA), which Istio and Linkerd both
//! read as the mesh route, optionally also attached to Gateways.

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Map, Value, json};

use super::{RouteTarget, Router, Split, confirm, cookie_regex, weight_of};
use crate::api::{HttpMatch, Provider, Weight};

const GROUP: &str = "gateway.networking.k8s.io";
const VERSION: &str = "v1";
const KIND: &str = "HTTPRoute";
const PLURAL: &str = "httproutes";

/// Drives an `HTTPRoute` named after the apex Service.
///
/// Only fields from Gateway API 1.2.1 and earlier are written: Linkerd ignores routes that use newer ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatewayApiRouter;

impl Router for GatewayApiRouter {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
    }

    fn desired(&self, target: &RouteTarget, split: Split) -> Value {
        // The Service parent makes this the mesh (GAMMA) route; Gateways add north-south entry points.
        // Group and kind are written out although they have defaults, so the live object reads back the same.
        let mut parents = vec![json!({
            "group": "",
            "kind": "Service",
            "name": target.apex,
            "port": target.port,
        })];
        parents.extend(
            target
                .gateways
                .iter()
                .map(|gateway| gateway_parent(gateway)),
        );
        let routes = &target.canary_routes;
        let experiment = split.experiment() && !routes.is_empty();
        // HTTPRoute picks the most specific match, not the first rule: a match with header conditions
        // beats the catch-all on the same path whatever the order. They go first anyway, for readers.
        let mut rules = Vec::new();
        let pinned = |matches: Vec<Value>, to_canary: bool| {
            let (primary, canary) = if to_canary {
                (Weight::ZERO, Weight::FULL)
            } else {
                (Weight::FULL, Weight::ZERO)
            };
            json!({
                "matches": matches,
                "backendRefs": [
                    backend(&target.primary, target.port, primary),
                    backend(&target.canary, target.port, canary),
                ],
            })
        };
        if experiment && !routes.matches.is_empty() {
            rules.push(pinned(
                routes.matches.iter().map(route_match).collect(),
                true,
            ));
        }
        let mut primary = backend(&target.primary, target.port, split.primary());
        let mut canary = backend(&target.canary, target.port, split.canary());
        if let (true, Some(affinity)) = (experiment, &routes.affinity) {
            let sticky = |cookie: &str| {
                vec![json!({
                    "path": {"type": "PathPrefix", "value": "/"},
                    "headers": [{"type": "RegularExpression", "name": "Cookie", "value": cookie_regex(cookie, &routes.cookie_value)}],
                })]
            };
            rules.push(pinned(sticky(&affinity.cookie_name), true));
            canary["filters"] =
                set_cookie(&routes.set_cookie(&affinity.cookie_name, affinity.max_age));
            if let Some(primary_cookie) = &affinity.primary_cookie_name {
                rules.push(pinned(sticky(primary_cookie), false));
                primary["filters"] =
                    set_cookie(&routes.set_cookie(primary_cookie, affinity.max_age));
            }
        }
        // One catch-all rule: GAMMA implementations (Linkerd) expect a route that matches everything.
        // Both backends always, weight 0 included, so the weights total 100.
        let mut weighted = json!({
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [primary, canary],
        });
        if let (true, Some(percent)) = (experiment, routes.mirror) {
            let mut mirror = json!({"backendRef": {"group": "", "kind": "Service", "name": target.canary, "port": target.port}});
            // `percent` is newer than the RequestMirror filter itself: written only when needed.
            if percent < Weight::FULL {
                mirror["percent"] = json!(percent.get());
            }
            weighted["filters"] = json!([{"type": "RequestMirror", "requestMirror": mirror}]);
        }
        rules.push(weighted);
        let mut spec = json!({"parentRefs": parents, "rules": rules});
        if !target.hosts.is_empty() {
            spec["hostnames"] = json!(target.hosts);
        }
        target.object(&format!("{GROUP}/{VERSION}"), KIND, spec)
    }

    fn observed_split(&self, live: &Value, target: &RouteTarget) -> Option<Split> {
        let rules = live.pointer("/spec/rules")?.as_array()?;
        let weight_for = |backends: &[Value], name: &str| {
            backends
                .iter()
                .find(|b| {
                    b.get("name").and_then(Value::as_str) == Some(name)
                        && b.get("kind").and_then(Value::as_str) == Some("Service")
                })
                .and_then(|b| b.get("weight"))
                .and_then(weight_of)
        };
        // The weighted rule is the last one holding both of our backends (match and sticky rules come
        // first); `confirm` then checks the whole object.
        let split = rules.iter().rev().find_map(|rule| {
            let backends = rule.get("backendRefs")?.as_array()?;
            let primary = weight_for(backends, &target.primary)?;
            let canary = weight_for(backends, &target.canary)?;
            confirm(self, live, target, primary, canary)
        })?;
        // Filters are only ever canary routes: one left on a plain split (say a mirror whose `percent` the
        // CRD dropped, so the object never read back as the experiment) is drift to apply away.
        let filtered = rules.iter().any(|rule| {
            rule.get("filters").is_some()
                || rule
                    .get("backendRefs")
                    .and_then(Value::as_array)
                    .is_some_and(|b| b.iter().any(|b| b.get("filters").is_some()))
        });
        (split.experiment() || !filtered).then_some(split)
    }

    fn provider(&self) -> Provider {
        Provider::GatewayApi
    }
}

/// A Gateway parentRef from `name` or `namespace/name` (without a namespace, the route's own).
fn gateway_parent(gateway: &str) -> Value {
    let (namespace, name) = match gateway.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() => (Some(namespace), name),
        Some((_, name)) => (None, name),
        None => (None, gateway),
    };
    let mut parent = Map::new();
    parent.insert("group".into(), json!(GROUP));
    parent.insert("kind".into(), json!("Gateway"));
    parent.insert("name".into(), json!(name));
    if let Some(namespace) = namespace {
        parent.insert("namespace".into(), json!(namespace));
    }
    Value::Object(parent)
}

/// An `HTTPRouteMatch` from an A/B match. Header matches are Exact or RegularExpression only, so a
/// prefix becomes an anchored regex.
fn route_match(m: &HttpMatch) -> Value {
    let mut headers: Vec<Value> = m
        .headers
        .iter()
        .filter_map(|(name, value)| {
            let (kind, text) = match (&value.exact, &value.prefix, &value.regex) {
                (Some(exact), _, _) => ("Exact", exact.clone()),
                (_, Some(prefix), _) => {
                    ("RegularExpression", format!("^{}.*", regex::escape(prefix)))
                }
                (_, _, Some(regex)) => ("RegularExpression", regex.clone()),
                _ => return None,
            };
            Some(json!({"type": kind, "name": name, "value": text}))
        })
        .collect();
    if let Some(cookie) = &m.cookie {
        headers.push(json!({"type": "RegularExpression", "name": "Cookie", "value": cookie_regex(&cookie.name, &cookie.value)}));
    }
    json!({"path": {"type": "PathPrefix", "value": "/"}, "headers": headers})
}

fn set_cookie(value: &str) -> Value {
    json!([{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "Set-Cookie", "value": value}]}}])
}

fn backend(name: &str, port: u16, weight: Weight) -> Value {
    json!({
        "group": "",
        "kind": "Service",
        "name": name,
        "port": port,
        "weight": weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::tests::{Edit, experiment_targets, exposed_target, plain_target, split};

    #[test]
    fn canary_route_snapshots() {
        for (name, target) in experiment_targets() {
            insta::assert_yaml_snapshot!(
                format!("httproute_{name}"),
                Router::desired(
                    &GatewayApiRouter,
                    &target,
                    split(if name == "sticky" { 20 } else { 0 }).with_experiment(true)
                )["spec"]
            );
        }
    }

    #[test]
    fn a_leftover_filter_on_a_plain_split_is_drift() {
        let (_, target) = experiment_targets()
            .into_iter()
            .find(|(name, _)| *name == "mirror")
            .expect("mirror target");
        let mut live = GatewayApiRouter.desired(&target, split(0).with_experiment(true));
        // A CRD without RequestMirror `percent` drops it: the object no longer reads as the experiment.
        if let Some(mirror) =
            live["spec"]["rules"][0]["filters"][0]["requestMirror"].as_object_mut()
        {
            mirror.remove("percent");
        }
        assert_eq!(GatewayApiRouter.observed_split(&live, &target), None);
        let plain = GatewayApiRouter.desired(&target, split(0));
        assert_eq!(
            GatewayApiRouter.observed_split(&plain, &target),
            Some(split(0))
        );
    }

    #[test]
    fn snapshots() {
        for canary in [0, 10, 100] {
            insta::assert_yaml_snapshot!(
                format!("httproute_canary_{canary}"),
                GatewayApiRouter.desired(&plain_target(), split(canary))
            );
            insta::assert_yaml_snapshot!(
                format!("httproute_canary_{canary}_with_hosts_and_gateways"),
                GatewayApiRouter.desired(&exposed_target(), split(canary))
            );
        }
    }

    #[test]
    fn gateway_parents_split_namespace_and_name() {
        assert_eq!(
            gateway_parent("istio-system/shared"),
            json!({"group": GROUP, "kind": "Gateway", "name": "shared", "namespace": "istio-system"})
        );
        assert_eq!(
            gateway_parent("public"),
            json!({"group": GROUP, "kind": "Gateway", "name": "public"})
        );
        assert_eq!(
            gateway_parent("/public"),
            json!({"group": GROUP, "kind": "Gateway", "name": "public"})
        );
    }

    #[test]
    fn hostnames_only_when_given() {
        let plain = GatewayApiRouter.desired(&plain_target(), split(0));
        assert_eq!(plain["spec"].get("hostnames"), None);
        assert_eq!(
            plain["spec"]["parentRefs"].as_array().map(Vec::len),
            Some(1)
        );
        let exposed = GatewayApiRouter.desired(&exposed_target(), split(0));
        assert_eq!(
            exposed["spec"]["hostnames"],
            json!(["app.example.com", "podinfo.example.org"])
        );
        assert_eq!(
            exposed["spec"]["parentRefs"].as_array().map(Vec::len),
            Some(3)
        );
    }

    /// Edits another tool (or a person) might make to the live object, and what Sluice reads from each.
    #[test]
    fn edited_objects_read_as_drift() {
        let target = exposed_target();
        let edits: [Edit; 8] = [
            ("canary backend removed", |o| {
                o["spec"]["rules"][0]["backendRefs"] =
                    json!([o["spec"]["rules"][0]["backendRefs"][0]]);
            }),
            ("weights total 110", |o| {
                o["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(100);
            }),
            ("weight removed (defaults to 1)", |o| {
                if let Some(backend) = o["spec"]["rules"][0]["backendRefs"][1].as_object_mut() {
                    backend.remove("weight");
                }
            }),
            ("negative weight", |o| {
                o["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(-10);
            }),
            ("hostnames changed", |o| {
                o["spec"]["hostnames"] = json!(["evil.example.com"]);
            }),
            ("service parent removed", |o| {
                let rest: Vec<Value> = o["spec"]["parentRefs"]
                    .as_array()
                    .map(|p| p[1..].to_vec())
                    .unwrap_or_default();
                o["spec"]["parentRefs"] = json!(rest);
            }),
            ("rule added", |o| {
                let ours = o["spec"]["rules"][0].clone();
                o["spec"]["rules"] =
                    json!([ours, {"backendRefs": [{"name": "elsewhere", "port": 80}]}]);
            }),
            ("match narrowed", |o| {
                o["spec"]["rules"][0]["matches"][0]["path"]["value"] = json!("/api");
            }),
        ];
        for (what, edit) in edits {
            let mut live = GatewayApiRouter.desired(&target, split(10));
            edit(&mut live);
            assert_eq!(
                GatewayApiRouter.observed_split(&live, &target),
                None,
                "{what}"
            );
        }
    }

    #[test]
    fn weights_moved_by_hand_read_as_the_actual_split() {
        let target = plain_target();
        let mut live = GatewayApiRouter.desired(&target, split(10));
        live["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(20);
        live["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(80);
        assert_eq!(
            GatewayApiRouter.observed_split(&live, &target),
            Some(split(80))
        );
    }
}
