//! SMI router: a `TrafficSplit` (`split.smi-spec.io`, v1alpha2 by default, v1alpha1 selectable) from the apex
//! Service to the `-primary` and `-canary` Services, for linkerd-smi and other SMI meshes.

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::{RouteTarget, Router, Split, confirm, unsupported_canary_routes, weight_of};
use crate::api::{Provider, Weight};

const GROUP: &str = "split.smi-spec.io";
const KIND: &str = "TrafficSplit";
const PLURAL: &str = "trafficsplits";

/// Drives a `TrafficSplit` named after the apex Service.
#[derive(Clone, Copy, Debug)]
pub struct SmiRouter {
    /// v1alpha1 writes weights as quantities (`"90"`), v1alpha2 as integers.
    pub v1alpha1: bool,
}

impl SmiRouter {
    fn version(&self) -> &'static str {
        if self.v1alpha1 {
            "v1alpha1"
        } else {
            "v1alpha2"
        }
    }

    fn weight(&self, weight: Weight) -> Value {
        if self.v1alpha1 {
            json!(weight.get().to_string())
        } else {
            json!(weight)
        }
    }
}

/// A weight written as an integer or, in v1alpha1, as a plain integer quantity.
fn weight_in(value: &Value) -> Option<Weight> {
    match value {
        Value::String(text) => text
            .parse::<u8>()
            .ok()
            .and_then(|raw| weight_of(&json!(raw))),
        other => weight_of(other),
    }
}

impl Router for SmiRouter {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(GROUP, self.version(), KIND),
            PLURAL,
        )
    }

    fn desired(&self, target: &RouteTarget, split: Split) -> Value {
        let spec = json!({
            "service": target.apex,
            // Both backends always, weight 0 included, so the weights total 100.
            "backends": [
                {"service": target.primary, "weight": self.weight(split.primary())},
                {"service": target.canary, "weight": self.weight(split.canary())},
            ],
        });
        target.object(&format!("{GROUP}/{}", self.version()), KIND, spec)
    }

    fn observed_split(&self, live: &Value, target: &RouteTarget) -> Option<Split> {
        if live.get("apiVersion").and_then(Value::as_str)
            != Some(&format!("{GROUP}/{}", self.version()))
        {
            return None;
        }
        let backends = live.pointer("/spec/backends")?.as_array()?;
        let weight_for = |name: &str| {
            backends
                .iter()
                .find(|b| b.get("service").and_then(Value::as_str) == Some(name))
                .and_then(|b| b.get("weight"))
                .and_then(weight_in)
        };
        let primary = weight_for(&target.primary)?;
        let canary = weight_for(&target.canary)?;
        confirm(self, live, target, primary, canary)
    }

    fn unsupported(&self, target: &RouteTarget) -> Option<String> {
        if let Some(why) = unsupported_canary_routes(
            &target.canary_routes,
            "an SMI TrafficSplit",
            false,
            false,
            false,
        ) {
            return Some(why);
        }
        (!target.hosts.is_empty() || !target.gateways.is_empty()).then(|| {
            "an SMI TrafficSplit only splits the Service inside the mesh: spec.service.hosts and spec.service.gateways cannot be honoured; remove them (on Linkerd, provider linkerd supports hosts)".to_owned()
        })
    }

    fn provider(&self) -> Provider {
        if self.v1alpha1 {
            Provider::SmiV1alpha1
        } else {
            Provider::Smi
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::tests::{exposed_target, plain_target, split};

    #[test]
    fn snapshots() {
        for v1alpha1 in [false, true] {
            let router = SmiRouter { v1alpha1 };
            insta::assert_yaml_snapshot!(
                format!("trafficsplit_{}_canary_10", router.version()),
                router.desired(&plain_target(), split(10))
            );
        }
    }

    #[test]
    fn v1alpha1_weights_are_quantities() {
        let router = SmiRouter { v1alpha1: true };
        let object = router.desired(&plain_target(), split(10));
        assert_eq!(object["spec"]["backends"][0]["weight"], "90");
        assert_eq!(object["spec"]["backends"][1]["weight"], "10");
        assert_eq!(
            router.observed_split(&object, &plain_target()),
            Some(split(10))
        );
        // The other version's object is not ours.
        let v2 = SmiRouter { v1alpha1: false }.desired(&plain_target(), split(10));
        assert_eq!(router.observed_split(&v2, &plain_target()), None);
    }

    #[test]
    fn hosts_and_gateways_are_reported_not_dropped() {
        let router = SmiRouter { v1alpha1: false };
        assert_eq!(router.unsupported(&plain_target()), None);
        let message = router.unsupported(&exposed_target()).unwrap_or_default();
        assert!(message.contains("spec.service.hosts"), "{message}");
    }

    #[test]
    fn edited_objects_read_as_drift() {
        let router = SmiRouter { v1alpha1: false };
        let target = plain_target();
        let edits: [crate::traffic::tests::Edit; 4] = [
            ("canary backend removed", |o| {
                o["spec"]["backends"] = json!([o["spec"]["backends"][0]]);
            }),
            ("weights total 110", |o| {
                o["spec"]["backends"][0]["weight"] = json!(100)
            }),
            ("service changed", |o| o["spec"]["service"] = json!("other")),
            ("backend added", |o| {
                let mut backends = o["spec"]["backends"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                backends.push(json!({"service": "elsewhere", "weight": 0}));
                o["spec"]["backends"] = json!(backends);
            }),
        ];
        for (what, edit) in edits {
            let mut live = router.desired(&target, split(10));
            edit(&mut live);
            assert_eq!(router.observed_split(&live, &target), None, "{what}");
        }
    }
}
