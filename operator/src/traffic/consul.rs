//! Consul router: a `ServiceSplitter` (`consul.hashicorp.com/v1alpha1`) named after the apex service that
//! splits between the `-primary` and `-canary` services. Consul applies config entries asynchronously, so a
//! split counts as in place only once Consul reports it `Synced`.

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::{RouteTarget, Router, Split, confirm, unsupported_canary_routes, weight_of};
use crate::api::Provider;

const GROUP: &str = "consul.hashicorp.com";
const VERSION: &str = "v1alpha1";
const KIND: &str = "ServiceSplitter";
const PLURAL: &str = "servicesplitters";

/// Drives a `ServiceSplitter`; its weights always total exactly 100, as Consul requires.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsulRouter;

impl Router for ConsulRouter {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
    }

    fn desired(&self, target: &RouteTarget, split: Split) -> Value {
        let spec = json!({
            "splits": [
                {"weight": split.primary(), "service": target.primary},
                {"weight": split.canary(), "service": target.canary},
            ],
        });
        target.object(&format!("{GROUP}/{VERSION}"), KIND, spec)
    }

    fn observed_split(&self, live: &Value, target: &RouteTarget) -> Option<Split> {
        let splits = live.pointer("/spec/splits")?.as_array()?;
        let weight_for = |name: &str| {
            splits
                .iter()
                .find(|s| s.get("service").and_then(Value::as_str) == Some(name))
                .and_then(|s| s.get("weight"))
                // Consul weights are floats; Sluice only ever writes whole percents.
                .and_then(|w| w.as_f64())
                .filter(|w| w.fract() == 0.0)
                .and_then(|w| weight_of(&json!(w as u64)))
        };
        let primary = weight_for(&target.primary)?;
        let canary = weight_for(&target.canary)?;
        confirm(self, live, target, primary, canary)
    }

    fn unsupported(&self, target: &RouteTarget) -> Option<String> {
        if let Some(why) = unsupported_canary_routes(
            &target.canary_routes,
            "a Consul ServiceSplitter",
            false,
            false,
            false,
        ) {
            return Some(why);
        }
        (!target.hosts.is_empty() || !target.gateways.is_empty()).then(|| {
            "a Consul ServiceSplitter splits the service inside the mesh: spec.service.hosts and spec.service.gateways cannot be honoured (expose the service through a Consul ingress or API gateway instead); remove them".to_owned()
        })
    }

    fn waits_for_sync(&self) -> bool {
        true
    }

    fn synced(&self, live: &Value) -> bool {
        live.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|conditions| {
                conditions.iter().any(|c| {
                    c.get("type").and_then(Value::as_str) == Some("Synced")
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            })
    }

    fn unsynced_status(&self) -> Option<Value> {
        // Consul's status has no observedGeneration, so a `Synced` condition left from the previous split
        // would pass for this one. Sluice marks it Unknown when it changes the split; consul-k8s sets it True
        // again once it has written the new split to Consul.
        Some(json!({"status": {"conditions": [{
            "type": "Synced",
            "status": "Unknown",
            "reason": "SplitChanged",
            "message": "Sluice changed the split; waiting for Consul to apply it",
        }]}}))
    }

    fn provider(&self) -> Provider {
        Provider::Consul
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::tests::{exposed_target, plain_target, split};

    #[test]
    fn snapshot() {
        insta::assert_yaml_snapshot!(
            "servicesplitter_canary_10",
            ConsulRouter.desired(&plain_target(), split(10))
        );
    }

    #[test]
    fn only_a_synced_splitter_counts_as_applied() {
        let mut live = ConsulRouter.desired(&plain_target(), split(10));
        assert!(!ConsulRouter.synced(&live), "no status yet");
        live["status"] = json!({"conditions": [{"type": "Synced", "status": "False", "reason": "ConsulAgentError"}]});
        assert!(!ConsulRouter.synced(&live));
        live["status"] = json!({"conditions": [{"type": "Synced", "status": "True"}]});
        assert!(ConsulRouter.synced(&live));
        let reset = ConsulRouter.unsynced_status().unwrap_or_default();
        live["status"] = reset["status"].clone();
        assert!(
            !ConsulRouter.synced(&live),
            "a split Sluice just changed waits for Consul"
        );
        // The status does not change what split the object holds.
        assert_eq!(
            ConsulRouter.observed_split(&live, &plain_target()),
            Some(split(10))
        );
    }

    #[test]
    fn float_weights_read_back_and_fractions_are_drift() {
        let target = plain_target();
        let mut live = ConsulRouter.desired(&target, split(10));
        live["spec"]["splits"][0]["weight"] = json!(90.0);
        live["spec"]["splits"][1]["weight"] = json!(10.0);
        assert_eq!(ConsulRouter.observed_split(&live, &target), Some(split(10)));
        live["spec"]["splits"][0]["weight"] = json!(89.5);
        live["spec"]["splits"][1]["weight"] = json!(10.5);
        assert_eq!(ConsulRouter.observed_split(&live, &target), None);
    }

    #[test]
    fn hosts_and_gateways_are_reported_not_dropped() {
        assert_eq!(ConsulRouter.unsupported(&plain_target()), None);
        assert!(ConsulRouter.unsupported(&exposed_target()).is_some());
    }
}
