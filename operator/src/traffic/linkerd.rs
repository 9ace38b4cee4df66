//! Linkerd router: the Gateway API `HTTPRoute` of [`GatewayApiRouter`] (only Gateway API 1.2.1 fields, which
//! Linkerd accepts), reported as provider `linkerd` so the builtin metrics come from Linkerd's proxies.

use kube::core::ApiResource;
use serde_json::Value;

use super::{GatewayApiRouter, RouteTarget, Router, Split, unsupported_canary_routes};
use crate::api::Provider;

#[derive(Clone, Copy, Debug, Default)]
pub struct LinkerdRouter;

impl Router for LinkerdRouter {
    fn api_resource(&self) -> ApiResource {
        GatewayApiRouter.api_resource()
    }

    fn desired(&self, target: &RouteTarget, split: Split) -> Value {
        GatewayApiRouter.desired(target, split)
    }

    fn observed_split(&self, live: &Value, target: &RouteTarget) -> Option<Split> {
        GatewayApiRouter.observed_split(live, target)
    }

    fn unsupported(&self, target: &RouteTarget) -> Option<String> {
        if target.canary_routes.mirror.is_some() {
            return Some("Linkerd rejects HTTPRoute RequestMirror filters, so analysis.mirror cannot be honoured; remove it (blue-green still works without mirroring) or use provider istio or gatewayapi".to_owned());
        }
        // Sticky sessions need per-backend response filters, which Linkerd's proxies do not apply.
        if let Some(why) =
            unsupported_canary_routes(&target.canary_routes, "Linkerd", true, false, false)
        {
            return Some(why);
        }
        // Linkerd's proxies only read Service parents; a Gateway parent needs a Gateway controller.
        (!target.gateways.is_empty()).then(|| {
            "Linkerd routes mesh traffic through Service parents only: spec.service.gateways needs a separate Gateway API controller and is not applied with provider linkerd; remove it and attach the Gateway's own route".to_owned()
        })
    }

    fn provider(&self) -> Provider {
        Provider::Linkerd
    }
}
