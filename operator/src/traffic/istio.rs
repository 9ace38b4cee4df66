//! Istio (and Azure Service Mesh) router: a `networking.istio.io/v1` `VirtualService` that splits the apex
//! host between the primary and canary Services.

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::{RouteTarget, Router, Split, confirm, cookie_regex, weight_of};
use crate::api::{HttpMatch, Provider, Weight};

const GROUP: &str = "networking.istio.io";
const VERSION: &str = "v1";
const KIND: &str = "VirtualService";
const PLURAL: &str = "virtualservices";
/// Name of the weighted rule; `observed_split` finds it by this name, so match rules can go first.
const RULE: &str = "canary";
/// A/B rule: matching requests go to the canary.
const MATCH_RULE: &str = "canary-match";
/// Sticky rules: users holding the canary's (primary's) cookie go back to it.
const STICKY_CANARY_RULE: &str = "canary-sticky";
const STICKY_PRIMARY_RULE: &str = "primary-sticky";
/// Istio's reserved gateway name for the sidecars; it must be listed once any gateway is.
const MESH_GATEWAY: &str = "mesh";

/// Drives a `VirtualService` named after the apex Service.
#[derive(Clone, Copy, Debug, Default)]
pub struct IstioRouter;

impl Router for IstioRouter {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
    }

    fn desired(&self, target: &RouteTarget, split: Split) -> Value {
        // Short names: the VirtualService lives in the Services' namespace, where Istio resolves them
        // (as Flagger writes them). Gateways in other namespaces are matched on `hosts`, which the user
        // gives fully qualified when they need to.
        let mut hosts = vec![target.apex.clone()];
        hosts.extend(target.hosts.iter().cloned());
        let routes = &target.canary_routes;
        let experiment = split.experiment() && !routes.is_empty();
        // Istio takes the first rule that matches: the canary's own rules go before the weighted one.
        let mut http = Vec::new();
        let all_canary = |name: &str, matches: Vec<Value>| {
            json!({
                "name": name,
                "match": matches,
                "route": [
                    destination(&target.primary, target.port, Weight::ZERO),
                    destination(&target.canary, target.port, Weight::FULL),
                ],
            })
        };
        if experiment && !routes.matches.is_empty() {
            http.push(all_canary(
                MATCH_RULE,
                routes.matches.iter().map(match_request).collect(),
            ));
        }
        let mut primary = destination(&target.primary, target.port, split.primary());
        let mut canary = destination(&target.canary, target.port, split.canary());
        if let (true, Some(affinity)) = (experiment, &routes.affinity) {
            let sticky = |cookie: &str| {
                vec![
                    json!({"headers": {"cookie": {"regex": cookie_regex(cookie, &routes.cookie_value)}}}),
                ]
            };
            http.push(all_canary(
                STICKY_CANARY_RULE,
                sticky(&affinity.cookie_name),
            ));
            canary["headers"] =
                set_cookie(&routes.set_cookie(&affinity.cookie_name, affinity.max_age));
            if let Some(primary_cookie) = &affinity.primary_cookie_name {
                http.push(json!({
                    "name": STICKY_PRIMARY_RULE,
                    "match": sticky(primary_cookie),
                    "route": [
                        destination(&target.primary, target.port, Weight::FULL),
                        destination(&target.canary, target.port, Weight::ZERO),
                    ],
                }));
                primary["headers"] =
                    set_cookie(&routes.set_cookie(primary_cookie, affinity.max_age));
            }
        }
        // Both destinations always, weight 0 included, so the weights total 100.
        let mut weighted = json!({"name": RULE, "route": [primary, canary]});
        if let (true, Some(percent)) = (experiment, routes.mirror) {
            weighted["mirror"] = json!({"host": target.canary, "port": {"number": target.port}});
            weighted["mirrorPercentage"] = json!({"value": f64::from(percent.get())});
        }
        http.push(weighted);
        let mut spec = json!({"hosts": hosts, "http": http});
        // Without `gateways` Istio applies the route to the mesh only; once any gateway is named, "mesh"
        // must be named too or sidecars stop using the route.
        if !target.gateways.is_empty() {
            let mut gateways = target.gateways.clone();
            if !gateways.iter().any(|g| g == MESH_GATEWAY) {
                gateways.push(MESH_GATEWAY.to_owned());
            }
            spec["gateways"] = json!(gateways);
        }
        target.object(&format!("{GROUP}/{VERSION}"), KIND, spec)
    }

    fn observed_split(&self, live: &Value, target: &RouteTarget) -> Option<Split> {
        let rule = live
            .pointer("/spec/http")?
            .as_array()?
            .iter()
            .find(|rule| rule.get("name").and_then(Value::as_str) == Some(RULE))?;
        let route = rule.get("route")?.as_array()?;
        let weight_for = |host: &str| {
            route
                .iter()
                .find(|r| r.pointer("/destination/host").and_then(Value::as_str) == Some(host))
                .and_then(|r| r.get("weight"))
                .and_then(weight_of)
        };
        let split = confirm(
            self,
            live,
            target,
            weight_for(&target.primary)?,
            weight_for(&target.canary)?,
        )?;
        // A mirror or Set-Cookie left on a plain split (say `mirror` was removed from the spec) is drift: the
        // containment check would tolerate the extra keys, and the mirror would go on copying requests.
        let leftover = rule.get("mirror").is_some()
            || rule.get("mirrorPercentage").is_some()
            || route.iter().any(|r| r.get("headers").is_some());
        (split.experiment() || !leftover).then_some(split)
    }

    fn provider(&self) -> Provider {
        Provider::Istio
    }
}

/// An Istio `HTTPMatchRequest` from an A/B match (header names are lower-cased, as Istio requires).
fn match_request(m: &HttpMatch) -> Value {
    let mut headers = serde_json::Map::new();
    for (name, value) in &m.headers {
        let condition = match (&value.exact, &value.prefix, &value.regex) {
            (Some(exact), _, _) => json!({"exact": exact}),
            (_, Some(prefix), _) => json!({"prefix": prefix}),
            (_, _, Some(regex)) => json!({"regex": regex}),
            _ => continue,
        };
        headers.insert(name.to_ascii_lowercase(), condition);
    }
    if let Some(cookie) = &m.cookie {
        headers.insert(
            "cookie".into(),
            json!({"regex": cookie_regex(&cookie.name, &cookie.value)}),
        );
    }
    json!({"headers": headers})
}

fn set_cookie(value: &str) -> Value {
    json!({"response": {"add": {"Set-Cookie": value}}})
}

fn destination(host: &str, port: u16, weight: Weight) -> Value {
    json!({
        "destination": {"host": host, "port": {"number": port}},
        "weight": weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::tests::{Edit, experiment_targets, exposed_target, plain_target, split};

    #[test]
    fn a_mirror_left_on_a_plain_split_is_drift() {
        let (_, mirrored) = experiment_targets()
            .into_iter()
            .find(|(name, _)| *name == "mirror")
            .expect("mirror target");
        let live = IstioRouter.desired(&mirrored, split(0).with_experiment(true));
        // The spec no longer asks for mirroring: the live mirror must be applied away.
        assert_eq!(IstioRouter.observed_split(&live, &plain_target()), None);
        let (_, sticky) = experiment_targets()
            .into_iter()
            .find(|(name, _)| *name == "sticky")
            .expect("sticky target");
        let mut live = IstioRouter.desired(&sticky, split(20).with_experiment(true));
        // Only the weighted rule left, Set-Cookie still on it.
        live["spec"]["http"] = json!([live["spec"]["http"][2].clone()]);
        assert_eq!(IstioRouter.observed_split(&live, &plain_target()), None);
    }

    #[test]
    fn canary_route_snapshots() {
        for (name, target) in experiment_targets() {
            insta::assert_yaml_snapshot!(
                format!("virtualservice_{name}"),
                Router::desired(
                    &IstioRouter,
                    &target,
                    split(if name == "sticky" { 20 } else { 0 }).with_experiment(true)
                )["spec"]
            );
        }
    }

    #[test]
    fn snapshots() {
        for canary in [0, 10, 100] {
            insta::assert_yaml_snapshot!(
                format!("virtualservice_canary_{canary}"),
                IstioRouter.desired(&plain_target(), split(canary))
            );
            insta::assert_yaml_snapshot!(
                format!("virtualservice_canary_{canary}_with_hosts_and_gateways"),
                IstioRouter.desired(&exposed_target(), split(canary))
            );
        }
    }

    #[test]
    fn mesh_is_added_once_and_only_with_gateways() {
        let plain = IstioRouter.desired(&plain_target(), split(0));
        assert_eq!(plain["spec"].get("gateways"), None);
        let exposed = IstioRouter.desired(&exposed_target(), split(0));
        assert_eq!(
            exposed["spec"]["gateways"],
            json!(["public-gateway", "istio-system/shared-gateway", "mesh"])
        );
        let with_mesh = RouteTarget {
            gateways: vec!["mesh".into(), "public-gateway".into()],
            ..plain_target()
        };
        let object = IstioRouter.desired(&with_mesh, split(0));
        assert_eq!(
            object["spec"]["gateways"],
            json!(["mesh", "public-gateway"])
        );
    }

    /// Edits another tool (or a person) might make to the live object, and what Sluice reads from each.
    #[test]
    fn edited_objects_read_as_drift() {
        let target = exposed_target();
        let edits: [Edit; 8] = [
            ("canary destination removed", |o| {
                o["spec"]["http"][0]["route"] = json!([o["spec"]["http"][0]["route"][0]]);
            }),
            ("weights total 110", |o| {
                o["spec"]["http"][0]["route"][0]["weight"] = json!(100);
            }),
            ("weight removed", |o| {
                if let Some(route) = o["spec"]["http"][0]["route"][1].as_object_mut() {
                    route.remove("weight");
                }
            }),
            ("weight above 100", |o| {
                o["spec"]["http"][0]["route"][1]["weight"] = json!(300);
            }),
            ("host removed", |o| {
                o["spec"]["hosts"] = json!(["podinfo"]);
            }),
            ("port changed", |o| {
                o["spec"]["http"][0]["route"][1]["destination"]["port"]["number"] = json!(80);
            }),
            ("rule added in front", |o| {
                let ours = o["spec"]["http"][0].clone();
                o["spec"]["http"] =
                    json!([{"route": [{"destination": {"host": "elsewhere"}}]}, ours]);
            }),
            ("mesh gateway dropped", |o| {
                o["spec"]["gateways"] = json!(["public-gateway", "istio-system/shared-gateway"]);
            }),
        ];
        for (what, edit) in edits {
            let mut live = IstioRouter.desired(&target, split(10));
            edit(&mut live);
            assert_eq!(IstioRouter.observed_split(&live, &target), None, "{what}");
        }
    }

    #[test]
    fn weights_moved_by_hand_read_as_the_actual_split() {
        // A consistent split someone else set is still a split Sluice would write: report it as it is.
        let target = plain_target();
        let mut live = IstioRouter.desired(&target, split(10));
        live["spec"]["http"][0]["route"][0]["weight"] = json!(50);
        live["spec"]["http"][0]["route"][1]["weight"] = json!(50);
        assert_eq!(IstioRouter.observed_split(&live, &target), Some(split(50)));
    }

    #[test]
    fn swapped_destinations_read_as_drift() {
        let target = plain_target();
        let mut live = IstioRouter.desired(&target, split(25));
        let route = live["spec"]["http"][0]["route"].clone();
        live["spec"]["http"][0]["route"] = json!([route[1], route[0]]);
        // Order is part of what Sluice writes (and of the atomic list it owns): re-apply rather than guess.
        assert_eq!(IstioRouter.observed_split(&live, &target), None);
    }
}
