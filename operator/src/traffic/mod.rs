//! Traffic routers: one per mesh, each a pure function from (route target, weight split) to the route object
//! Sluice server-side applies, and back from a live route object to the split it sends.

mod consul;
mod gatewayapi;
mod istio;
mod linkerd;
mod smi;

pub use consul::ConsulRouter;
pub use gatewayapi::GatewayApiRouter;
pub use istio::IstioRouter;
pub use linkerd::LinkerdRouter;
pub use smi::SmiRouter;

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::api::{HttpMatch, MANAGED_BY_LABEL, Provider, SessionAffinity, Weight};

/// Names and ports of what a Rollout routes, resolved from its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteTarget {
    /// Name of the route object; always the apex service name.
    pub name: String,
    pub namespace: String,
    /// `<svc>`: the Service clients call.
    pub apex: String,
    /// `<svc>-primary`: the stable version.
    pub primary: String,
    /// `<svc>-canary`: the version being released.
    pub canary: String,
    pub port: u16,
    /// Extra hosts (Istio `hosts` / HTTPRoute `hostnames`).
    pub hosts: Vec<String>,
    /// Istio gateways or Gateway API parent Gateways, as `name` or `namespace/name`.
    pub gateways: Vec<String>,
    /// The Rollout, as controller, so the route is garbage-collected with it.
    pub owner: OwnerReference,
    /// The canary's own routes, written while a [`Split`] says `experiment`.
    pub canary_routes: CanaryRoutes,
}

/// Routes that send particular requests to the canary during a release, besides the weighted split.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CanaryRoutes {
    /// A/B test: requests matching any entry go to the canary.
    pub matches: Vec<HttpMatch>,
    /// Blue-green mirroring: the percentage of requests copied to the canary.
    pub mirror: Option<Weight>,
    /// Sticky sessions for a weighted canary.
    pub affinity: Option<SessionAffinity>,
    /// Value of the sticky cookies: the revision being released, so every release starts afresh.
    pub cookie_value: String,
}

impl CanaryRoutes {
    pub fn is_empty(&self) -> bool {
        self.matches.is_empty() && self.mirror.is_none() && self.affinity.is_none()
    }

    /// `Set-Cookie` value that makes a user sticky to the version that served them.
    fn set_cookie(&self, name: &str, max_age: u32) -> String {
        format!("{name}={}; Max-Age={max_age}; Path=/", self.cookie_value)
    }
}

/// An RE2 regex matching a `Cookie` header that carries `name=value` (in any position).
pub fn cookie_regex(name: &str, value: &str) -> String {
    format!(
        r"^(.*?;\s*)?({}={})(;.*)?$",
        regex::escape(name),
        regex::escape(value)
    )
}

/// What in `analysis.match` no mesh would accept: a header name that is not an HTTP token, or a regex that
/// is not valid RE2 (checked with the `regex` crate, whose syntax is RE2's without lookaround or backreferences).
pub fn invalid_matches(matches: &[HttpMatch]) -> Option<String> {
    let token = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    for (index, m) in matches.iter().enumerate() {
        for (name, condition) in &m.headers {
            if !token(name) {
                return Some(format!(
                    "analysis.match[{index}].headers: {name:?} is not a valid HTTP header name"
                ));
            }
            if let Some(pattern) = &condition.regex
                && let Err(err) = regex::Regex::new(pattern)
            {
                let first_line = err
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                return Some(format!(
                    "analysis.match[{index}].headers.{name}.regex {pattern:?} is not a valid RE2 regex: {first_line}"
                ));
            }
        }
    }
    None
}

/// Names the canary-route features a mesh cannot express, as the message for `InvalidSpec`.
fn unsupported_canary_routes(
    routes: &CanaryRoutes,
    mesh: &str,
    matches: bool,
    mirror: bool,
    affinity: bool,
) -> Option<String> {
    let mut missing = Vec::new();
    if !matches && !routes.matches.is_empty() {
        missing.push("analysis.match (A/B testing)");
    }
    if !mirror && routes.mirror.is_some() {
        missing.push("analysis.mirror");
    }
    if !affinity && routes.affinity.is_some() {
        missing.push("analysis.sessionAffinity");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "{mesh} cannot express {}; remove it or use provider istio or gatewayapi",
            missing.join(", ")
        )
    })
}

impl RouteTarget {
    /// A target for service `<service>` with the Flagger-compatible `-primary`/`-canary` names and no extra
    /// hosts or gateways.
    pub fn new(
        service: impl Into<String>,
        namespace: impl Into<String>,
        port: u16,
        owner: OwnerReference,
    ) -> RouteTarget {
        let apex = service.into();
        RouteTarget {
            name: apex.clone(),
            namespace: namespace.into(),
            primary: format!("{apex}-primary"),
            canary: format!("{apex}-canary"),
            apex,
            port,
            hosts: Vec::new(),
            gateways: Vec::new(),
            owner,
            canary_routes: CanaryRoutes::default(),
        }
    }

    /// Common envelope of every route object: identity, the managed-by label and the controller owner.
    fn object(&self, api_version: &str, kind: &str, spec: Value) -> Value {
        let (label, value) = MANAGED_BY_LABEL;
        json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {label: value},
                "ownerReferences": [self.owner],
            },
            "spec": spec,
        })
    }
}

/// A two-way traffic split; always totals 100. With `experiment`, the target's [`CanaryRoutes`] apply too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    primary: Weight,
    canary: Weight,
    experiment: bool,
}

impl Split {
    /// Everything on the primary: the state between releases and after a rollback.
    pub fn all_primary() -> Split {
        Split::with_canary(Weight::ZERO)
    }

    /// `canary` on the canary, the rest on the primary.
    pub fn with_canary(canary: Weight) -> Split {
        Split {
            primary: canary.complement(),
            canary,
            experiment: false,
        }
    }

    /// The same split with the canary's own routes on or off.
    pub fn with_experiment(self, experiment: bool) -> Split {
        Split { experiment, ..self }
    }

    /// Whether the canary's own routes (matches, mirror, sticky sessions) are on.
    pub fn experiment(&self) -> bool {
        self.experiment
    }

    pub fn primary(&self) -> Weight {
        self.primary
    }

    pub fn canary(&self) -> Weight {
        self.canary
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "primary {} / canary {}", self.primary, self.canary)?;
        if self.experiment {
            write!(f, " + canary routes")?;
        }
        Ok(())
    }
}

/// Writes and reads the route object of one mesh.
pub trait Router: Send + Sync {
    /// Group/version/kind/plural of the route object (for a kube DynamicObject Api).
    fn api_resource(&self) -> kube::core::ApiResource;

    /// The complete route object to server-side apply for this split: apiVersion, kind, metadata (name,
    /// namespace, managed-by label, the owner) and spec.
    fn desired(&self, target: &RouteTarget, split: Split) -> Value;

    /// The split a live route object currently sends, if it is one Sluice wrote.
    ///
    /// `Some(split)` only when the live `spec` still holds everything `desired(target, split)` puts there;
    /// an object someone else edited (a destination removed, weights not totalling 100, other hosts or
    /// parents, an extra rule) reads as `None`, which tells the caller to apply again. Extra keys inside maps
    /// (API-server defaults, fields other managers own) are ignored: re-applying would not remove them, so
    /// counting them as drift would only cause useless writes.
    fn observed_split(&self, live: &Value, target: &RouteTarget) -> Option<Split>;

    /// Why this mesh cannot route `target` as asked (a field it has no equivalent for), so the Rollout
    /// reports it instead of silently dropping it.
    fn unsupported(&self, _target: &RouteTarget) -> Option<String> {
        None
    }

    /// Whether [`Router::synced`] can be false, so the controller must read the live object before checks.
    fn waits_for_sync(&self) -> bool {
        false
    }

    /// Whether the mesh has taken the live route object into effect. Most meshes apply routes
    /// synchronously; Consul reports a `Synced` condition, and checks wait for it.
    fn synced(&self, _live: &Value) -> bool {
        true
    }

    /// Status merge patch that marks a route Sluice just changed as not yet applied by the mesh, for meshes
    /// whose status cannot tell which version of the object it describes.
    fn unsynced_status(&self) -> Option<Value> {
        None
    }

    /// Which provider this is (for messages).
    fn provider(&self) -> Provider;
}

/// The router for a mesh.
pub fn router_for(provider: Provider) -> Box<dyn Router> {
    match provider {
        Provider::Istio => Box::new(IstioRouter),
        Provider::GatewayApi => Box::new(GatewayApiRouter),
        Provider::Linkerd => Box::new(LinkerdRouter),
        Provider::Smi => Box::new(SmiRouter { v1alpha1: false }),
        Provider::SmiV1alpha1 => Box::new(SmiRouter { v1alpha1: true }),
        Provider::Consul => Box::new(ConsulRouter),
    }
}

/// Istio ambient mode's label naming the waypoint that a Service's (or every Service of a namespace's) traffic
/// goes through; `none` opts a Service out.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The waypoint's namespace, when it is not the Service's.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";

/// A waypoint proxy: a Gateway API `Gateway` of class `istio-waypoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    /// Where the label was found, for messages: `Service shop/web` or `namespace shop`.
    pub labelled: String,
}

/// The waypoint the Service `service` in `namespace` uses, as Istio resolves it: the Service's own
/// `istio.io/use-waypoint` label, else its namespace's; `none` on the Service opts it out.
pub fn waypoint_of(
    namespace: &str,
    service: &str,
    namespace_labels: &std::collections::BTreeMap<String, String>,
    service_labels: &std::collections::BTreeMap<String, String>,
) -> Option<Waypoint> {
    let (labels, labelled) = if service_labels.contains_key(USE_WAYPOINT) {
        (service_labels, format!("Service {namespace}/{service}"))
    } else {
        (namespace_labels, format!("namespace {namespace}"))
    };
    let name = labels
        .get(USE_WAYPOINT)
        .filter(|n| !n.is_empty() && *n != "none")?;
    Some(Waypoint {
        name: name.clone(),
        namespace: labels
            .get(USE_WAYPOINT_NAMESPACE)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| namespace.to_owned()),
        labelled,
    })
}

/// The router for a mesh, in Istio ambient mode when `ambient`: there a VirtualService means nothing to the
/// waypoint, so Istio's traffic split is an HTTPRoute on the Service (GAMMA), which the waypoint enforces.
pub fn router_for_mode(provider: Provider, ambient: bool) -> Box<dyn Router> {
    match provider {
        Provider::Istio if ambient => Box::new(GatewayApiRouter),
        other => router_for(other),
    }
}

/// What to tell a user whose Rollout's traffic goes through a waypoint that does not exist.
pub fn missing_waypoint(waypoint: &Waypoint) -> String {
    format!(
        "{} is in Istio ambient mode with waypoint {name} ({USE_WAYPOINT}), but there is no Gateway {ns}/{name}: \
         create it (`istioctl waypoint apply -n {ns} --name {name}`), or remove the label; Sluice splits ambient \
         traffic with an HTTPRoute that only a waypoint enforces, and retries within a minute once it exists",
        waypoint.labelled,
        name = waypoint.name,
        ns = waypoint.namespace,
    )
}

/// What to tell a user whose cluster does not serve the route resource `provider` needs (its CRD is not
/// installed): which resource, which field chose it, and what to install.
pub fn missing_route_api(provider: Provider, ambient: bool) -> String {
    let resource = router_for_mode(provider, ambient).api_resource();
    let (name, install) = match provider {
        Provider::Istio if ambient => (
            "istio (ambient mode, with a waypoint)",
            "install the Gateway API CRDs (Istio ambient splits traffic with an HTTPRoute)",
        ),
        Provider::Istio => (
            "istio",
            "install Istio (`istioctl install`, or the istio/base Helm chart for the CRDs alone)",
        ),
        Provider::GatewayApi => (
            "gatewayapi",
            "install the Gateway API CRDs (the standard channel's standard-install.yaml, v1.1 or later)",
        ),
        Provider::Linkerd => (
            "linkerd",
            "install the Gateway API CRDs Linkerd routes with (`linkerd install --crds`, or the Gateway API \
             standard channel)",
        ),
        Provider::Smi | Provider::SmiV1alpha1 => (
            if provider == Provider::Smi {
                "smi"
            } else {
                "smi:v1alpha1"
            },
            "install the SMI TrafficSplit CRD (for Linkerd: `linkerd smi install`)",
        ),
        Provider::Consul => (
            "consul",
            "install Consul on Kubernetes with service mesh enabled (its Helm chart installs the \
             ServiceSplitter CRD)",
        ),
    };
    let group_version = if resource.group.is_empty() {
        resource.version.clone()
    } else {
        format!("{}/{}", resource.group, resource.version)
    };
    format!(
        "this cluster does not serve {kind} ({plural} in {group_version}), which spec.provider {name} routes \
         traffic with: {install}, or set spec.provider to the mesh this cluster runs; Sluice retries within a \
         minute once it is served",
        kind = resource.kind,
        plural = resource.plural,
    )
}

/// Reads a JSON number as a weight; `None` for anything that is not an integer in 0..=100.
fn weight_of(value: &Value) -> Option<Weight> {
    value
        .as_u64()
        .and_then(|raw| u8::try_from(raw).ok())
        .and_then(Weight::new)
}

/// Shared tail of `observed_split`: the candidate split read from the live object counts only if the live
/// object still carries what Sluice would write for it.
fn confirm(
    router: &dyn Router,
    live: &Value,
    target: &RouteTarget,
    primary: Weight,
    canary: Weight,
) -> Option<Split> {
    let split = Split::with_canary(canary);
    if split.primary() != primary {
        return None;
    }
    // With the canary routes first: the plain object is contained in one that also has them.
    let experiments: &[bool] = if target.canary_routes.is_empty() {
        &[false]
    } else {
        &[true, false]
    };
    experiments.iter().find_map(|&experiment| {
        let split = split.with_experiment(experiment);
        let desired = router.desired(target, split);
        let same_kind = live.get("kind") == desired.get("kind");
        let holds_spec = match (desired.get("spec"), live.get("spec")) {
            (Some(want), Some(have)) => contains(have, want),
            _ => false,
        };
        (same_kind && holds_spec).then_some(split)
    })
}

/// Whether `have` holds `want`: equal scalars, arrays of the same length whose elements hold each other,
/// and objects with every key of `want` (extra keys in `have` allowed).
fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(have), Value::Object(want)) => want
            .iter()
            .all(|(key, w)| have.get(key).is_some_and(|h| contains(h, w))),
        (Value::Array(have), Value::Array(want)) => {
            have.len() == want.len() && have.iter().zip(want).all(|(h, w)| contains(h, w))
        }
        // Compare numbers by value so 10 and 10.0 (or i64 and u64) agree.
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        _ => have == want,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A named edit someone else might make to a live route object.
    pub(crate) type Edit = (&'static str, fn(&mut Value));

    pub(crate) fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "sluice.dev/v1alpha1".into(),
            kind: "Rollout".into(),
            name: "podinfo".into(),
            uid: "6c1f3a52-1e0b-4c3e-9a57-2f1d5f9a0b11".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn a_missing_route_api_names_the_resource_the_field_and_what_to_install() {
        let cases = [
            (
                Provider::Istio,
                "VirtualService (virtualservices in networking.istio.io/v1)",
                "provider istio",
                "istioctl install",
            ),
            (
                Provider::GatewayApi,
                "HTTPRoute (httproutes in gateway.networking.k8s.io/v1)",
                "provider gatewayapi",
                "Gateway API CRDs",
            ),
            (
                Provider::Linkerd,
                "HTTPRoute (httproutes in gateway.networking.k8s.io/v1)",
                "provider linkerd",
                "linkerd install --crds",
            ),
            (
                Provider::Smi,
                "TrafficSplit (trafficsplits in split.smi-spec.io/v1alpha2)",
                "provider smi ",
                "linkerd smi install",
            ),
            (
                Provider::SmiV1alpha1,
                "TrafficSplit (trafficsplits in split.smi-spec.io/v1alpha1)",
                "provider smi:v1alpha1",
                "TrafficSplit CRD",
            ),
            (
                Provider::Consul,
                "ServiceSplitter (servicesplitters in consul.hashicorp.com/v1alpha1)",
                "provider consul",
                "Consul on Kubernetes",
            ),
        ];
        for (provider, resource, field, install) in cases {
            let message = missing_route_api(provider, false);
            for wanted in [resource, field, install, "spec.provider"] {
                assert!(
                    message.contains(wanted),
                    "{provider:?}: {wanted:?} missing from {message}"
                );
            }
        }
    }

    #[test]
    fn the_waypoint_comes_from_the_service_else_its_namespace() {
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let enrolled = labels(&[(USE_WAYPOINT, "waypoint")]);
        let none = labels(&[]);
        assert_eq!(
            waypoint_of("shop", "web", &enrolled, &none),
            Some(Waypoint {
                name: "waypoint".into(),
                namespace: "shop".into(),
                labelled: "namespace shop".into()
            })
        );
        let own = labels(&[(USE_WAYPOINT, "web-wp"), (USE_WAYPOINT_NAMESPACE, "mesh")]);
        assert_eq!(
            waypoint_of("shop", "web", &enrolled, &own),
            Some(Waypoint {
                name: "web-wp".into(),
                namespace: "mesh".into(),
                labelled: "Service shop/web".into()
            })
        );
        let opted_out = labels(&[(USE_WAYPOINT, "none")]);
        assert_eq!(waypoint_of("shop", "web", &enrolled, &opted_out), None);
        assert_eq!(waypoint_of("shop", "web", &none, &none), None);
        assert_eq!(
            router_for_mode(Provider::Istio, true).api_resource().kind,
            "HTTPRoute"
        );
        assert_eq!(
            router_for_mode(Provider::Istio, false).api_resource().kind,
            "VirtualService"
        );
        assert_eq!(
            router_for_mode(Provider::Consul, true).api_resource().kind,
            "ServiceSplitter"
        );
        let ambient = missing_route_api(Provider::Istio, true);
        assert!(
            ambient.contains("HTTPRoute") && ambient.contains("ambient"),
            "{ambient}"
        );
        let message = missing_waypoint(&Waypoint {
            name: "waypoint".into(),
            namespace: "shop".into(),
            labelled: "namespace shop".into(),
        });
        for wanted in [
            "namespace shop",
            "Gateway shop/waypoint",
            "istioctl waypoint apply -n shop --name waypoint",
        ] {
            assert!(message.contains(wanted), "{wanted:?} not in {message}");
        }
    }

    pub(crate) fn plain_target() -> RouteTarget {
        RouteTarget::new("podinfo", "test", 9898, owner())
    }

    pub(crate) fn exposed_target() -> RouteTarget {
        RouteTarget {
            hosts: vec!["app.example.com".into(), "podinfo.example.org".into()],
            gateways: vec![
                "public-gateway".into(),
                "istio-system/shared-gateway".into(),
            ],
            ..plain_target()
        }
    }

    /// Targets with each kind of canary route: A/B matches, blue-green mirroring, sticky sessions.
    pub(crate) fn experiment_targets() -> Vec<(&'static str, RouteTarget)> {
        let header = |exact: Option<&str>, prefix: Option<&str>, regex: Option<&str>| {
            crate::api::StringMatch {
                exact: exact.map(str::to_owned),
                prefix: prefix.map(str::to_owned),
                regex: regex.map(str::to_owned),
            }
        };
        let ab = CanaryRoutes {
            matches: vec![
                HttpMatch {
                    headers: [
                        ("X-Canary".to_owned(), header(Some("insider"), None, None)),
                        (
                            "user-agent".to_owned(),
                            header(None, Some("Mozilla/5.0 (iPhone"), None),
                        ),
                    ]
                    .into(),
                    cookie: None,
                },
                HttpMatch {
                    headers: [(
                        "x-tenant".to_owned(),
                        header(None, None, Some("beta-[0-9]+")),
                    )]
                    .into(),
                    cookie: None,
                },
                HttpMatch {
                    headers: Default::default(),
                    cookie: Some(crate::api::CookieMatch {
                        name: "canary".into(),
                        value: "always".into(),
                    }),
                },
            ],
            cookie_value: "5d8f9c".into(),
            ..CanaryRoutes::default()
        };
        let mirror = CanaryRoutes {
            mirror: Weight::new(30),
            cookie_value: "5d8f9c".into(),
            ..CanaryRoutes::default()
        };
        let sticky = CanaryRoutes {
            affinity: Some(SessionAffinity {
                cookie_name: "sluice-canary".into(),
                primary_cookie_name: Some("sluice-primary".into()),
                max_age: 3600,
            }),
            cookie_value: "5d8f9c".into(),
            ..CanaryRoutes::default()
        };
        [("ab", ab), ("mirror", mirror), ("sticky", sticky)]
            .into_iter()
            .map(|(name, canary_routes)| {
                (
                    name,
                    RouteTarget {
                        canary_routes,
                        ..plain_target()
                    },
                )
            })
            .collect()
    }

    /// Every rule's (or splitter's) weights total 100, the canary's own rules included.
    fn rules_total_100(object: &Value) -> bool {
        let rules = object
            .pointer("/spec/http")
            .or_else(|| object.pointer("/spec/rules"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_else(|| vec![object.clone()]);
        rules
            .iter()
            .all(|rule| weights(rule).iter().sum::<u64>() == 100)
    }

    #[test]
    fn canary_routes_apply_only_with_experiment_and_read_back() {
        for router in routers() {
            for (name, target) in experiment_targets() {
                let provider = router.provider();
                if let Some(why) = router.unsupported(&target) {
                    // Meshes that cannot express the feature say which field and what to do.
                    assert!(why.contains("analysis."), "{provider:?} {name}: {why}");
                    continue;
                }
                for canary in [0, 10, 100] {
                    let off = split(canary);
                    let on = off.with_experiment(true);
                    let plain = router.desired(&plain_target(), off);
                    let without = router.desired(&target, off);
                    let with = router.desired(&target, on);
                    assert_eq!(
                        plain, without,
                        "{provider:?} {name}: off means no extra route"
                    );
                    assert_ne!(with, without, "{provider:?} {name}: on adds routes");
                    assert!(rules_total_100(&with), "{provider:?} {name}: {with}");
                    assert_eq!(
                        router.observed_split(&with, &target),
                        Some(on),
                        "{provider:?} {name}"
                    );
                    assert_eq!(
                        router.observed_split(&without, &target),
                        Some(off),
                        "{provider:?} {name}"
                    );
                }
            }
        }
    }

    #[test]
    fn canary_route_support_per_mesh() {
        let support: Vec<(String, Vec<&str>)> = PROVIDERS
            .into_iter()
            .map(|provider| {
                let router = router_for(provider);
                let supported = experiment_targets()
                    .into_iter()
                    .filter(|(_, target)| router.unsupported(target).is_none())
                    .map(|(name, _)| name)
                    .collect();
                (format!("{provider:?}"), supported)
            })
            .collect();
        assert_eq!(
            support,
            vec![
                ("Istio".to_owned(), vec!["ab", "mirror", "sticky"]),
                ("GatewayApi".to_owned(), vec!["ab", "mirror", "sticky"]),
                ("Linkerd".to_owned(), vec!["ab"]),
                ("Smi".to_owned(), vec![]),
                ("SmiV1alpha1".to_owned(), vec![]),
                ("Consul".to_owned(), vec![]),
            ]
        );
        let linkerd = router_for(Provider::Linkerd);
        let why = linkerd
            .unsupported(&experiment_targets()[1].1)
            .unwrap_or_default();
        assert!(
            why.contains("Linkerd rejects HTTPRoute RequestMirror"),
            "{why}"
        );
    }

    #[test]
    fn invalid_matches_name_the_field() {
        let with = |name: &str, regex: &str| {
            vec![HttpMatch {
                headers: [(
                    name.to_owned(),
                    crate::api::StringMatch {
                        exact: None,
                        prefix: None,
                        regex: Some(regex.to_owned()),
                    },
                )]
                .into(),
                cookie: None,
            }]
        };
        assert_eq!(invalid_matches(&with("x-tenant", "beta-[0-9]+")), None);
        let bad_name = invalid_matches(&with("x tenant", "a")).unwrap_or_default();
        assert_eq!(
            bad_name,
            "analysis.match[0].headers: \"x tenant\" is not a valid HTTP header name"
        );
        let bad_regex = invalid_matches(&with("x-tenant", "beta-[0-9")).unwrap_or_default();
        assert!(
            bad_regex.starts_with(
                "analysis.match[0].headers.x-tenant.regex \"beta-[0-9\" is not a valid RE2 regex"
            ),
            "{bad_regex}"
        );
        assert!(
            invalid_matches(&with("x", "(?=lookahead)")).is_some(),
            "RE2 has no lookahead"
        );
    }

    #[test]
    fn cookie_regex_matches_the_cookie_anywhere_and_only_it() {
        let re = regex::Regex::new(&cookie_regex("sluice-canary", "5d8f9c")).expect("valid regex");
        for yes in [
            "sluice-canary=5d8f9c",
            "a=1; sluice-canary=5d8f9c",
            "a=1;sluice-canary=5d8f9c; b=2",
        ] {
            assert!(re.is_match(yes), "{yes}");
        }
        for no in [
            "sluice-canary=5d8f9c0",
            "xsluice-canary=5d8f9c",
            "sluice-canary=old",
            "a=sluice-canary=5d8f9c",
        ] {
            assert!(!re.is_match(no), "{no}");
        }
    }

    pub(crate) fn split(canary: u8) -> Split {
        match Weight::new(canary) {
            Some(weight) => Split::with_canary(weight),
            None => panic!("{canary} is not a weight"),
        }
    }

    pub(crate) const PROVIDERS: [Provider; 6] = [
        Provider::Istio,
        Provider::GatewayApi,
        Provider::Linkerd,
        Provider::Smi,
        Provider::SmiV1alpha1,
        Provider::Consul,
    ];

    fn routers() -> Vec<Box<dyn Router>> {
        PROVIDERS.into_iter().map(router_for).collect()
    }

    /// Every integer weight (or integer quantity, as SMI v1alpha1 writes) under a key named `weight`.
    fn weights(value: &Value) -> Vec<u64> {
        match value {
            Value::Object(map) => map
                .iter()
                .flat_map(|(key, v)| {
                    let weight = v
                        .as_u64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()));
                    match (key.as_str(), weight) {
                        ("weight", Some(w)) => vec![w],
                        _ => weights(v),
                    }
                })
                .collect(),
            Value::Array(items) => items.iter().flat_map(weights).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn split_always_totals_100() {
        for canary in 0..=100 {
            let s = split(canary);
            assert_eq!(
                u16::from(s.primary().get()) + u16::from(s.canary().get()),
                100
            );
        }
        assert_eq!(Split::all_primary().primary(), Weight::FULL);
        assert_eq!(split(10).to_string(), "primary 90% / canary 10%");
    }

    #[test]
    fn router_for_returns_the_requested_provider() {
        for provider in PROVIDERS {
            assert_eq!(router_for(provider).provider(), provider);
        }
        let istio = router_for(Provider::Istio).api_resource();
        assert_eq!(
            (
                istio.api_version.as_str(),
                istio.kind.as_str(),
                istio.plural.as_str()
            ),
            (
                "networking.istio.io/v1",
                "VirtualService",
                "virtualservices"
            )
        );
        let gateway = router_for(Provider::GatewayApi).api_resource();
        assert_eq!(
            (
                gateway.api_version.as_str(),
                gateway.kind.as_str(),
                gateway.plural.as_str()
            ),
            ("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes")
        );
    }

    #[test]
    fn every_split_reads_back_and_totals_100() {
        for router in routers() {
            for target in [plain_target(), exposed_target()] {
                for canary in 0..=100 {
                    let s = split(canary);
                    let object = router.desired(&target, s);
                    assert_eq!(weights(&object).iter().sum::<u64>(), 100, "{object}");
                    assert_eq!(weights(&object).len(), 2, "both destinations, even at 0");
                    assert_eq!(router.observed_split(&object, &target), Some(s));
                }
            }
        }
    }

    /// What deleting the Rollout does to this mesh's routing, from the controller's own cleanup plan: the
    /// route object the release wrote is deleted, with the Services it sent traffic to, and the apex Service
    /// selects the user's workload again.
    fn finalize(router: &dyn Router, target: &RouteTarget) -> Value {
        use crate::controller::workload::{Names, cleanup};
        let provider = router.provider();
        // The workload is named apart from the service, so a cleanup that confused the two shows.
        let rollout: crate::api::Rollout = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": "podinfo", "namespace": target.namespace},
            "spec": {
                "provider": provider,
                "targetRef": {"kind": "Deployment", "name": "podinfo-app"},
                "service": {"name": target.apex, "port": target.port},
                "analysis": {"interval": "1m", "stepWeight": 10},
            },
        }))
        .expect("rollout");
        let selector = json!({"app": "podinfo-app", "tier": "web"});
        let workload = json!({"spec": {"replicas": 0, "selector": {"matchLabels": selector}}});
        let primary = json!({"spec": {"replicas": 3}});
        let names = Names::of(&rollout);
        let plan = cleanup(
            &rollout,
            &names,
            router.api_resource(),
            Some(&workload),
            Some(&primary),
        );
        // The route deleted is the object the release wrote.
        let written = router.desired(target, split(10));
        let (resource, name) = &plan.route;
        assert_eq!(
            (
                resource.api_version.as_str(),
                resource.kind.as_str(),
                names.namespace.as_str(),
                name.as_str()
            ),
            (
                written["apiVersion"].as_str().unwrap_or_default(),
                written["kind"].as_str().unwrap_or_default(),
                written["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default(),
                written["metadata"]["name"].as_str().unwrap_or_default()
            ),
            "{provider:?}: finalize deletes another object than the route"
        );
        // So are the Services it sent traffic to; the apex stays, selecting the user's pods.
        for service in [&target.primary, &target.canary] {
            assert!(
                written.to_string().contains(&format!("\"{service}")),
                "{provider:?}: the route does not name {service}"
            );
            assert!(
                plan.services.contains(service),
                "{provider:?}: {service} is left behind"
            );
        }
        assert!(!plan.services.contains(&target.apex));
        let apex = plan.apex_service.clone().unwrap_or_default();
        assert_eq!(apex["metadata"]["name"], target.apex.as_str());
        assert_eq!(
            apex["spec"]["selector"], selector,
            "{provider:?}: the apex must select the user's workload again"
        );
        assert_eq!(
            plan.scale_target_to,
            Some(3),
            "{provider:?}: the workload takes the primary's replicas back"
        );
        let mut deleted = vec![format!(
            "{}/{} {}/{name}",
            resource.api_version, resource.kind, names.namespace
        )];
        deleted.extend(plan.services.iter().map(|s| format!("v1/Service {s}")));
        let kind = rollout.spec.target_ref.kind.name();
        deleted.extend(plan.workloads.iter().map(|w| format!("apps/v1/{kind} {w}")));
        json!({
            "delete": deleted,
            "apply": {"apexService": apex["metadata"]["name"], "selector": apex["spec"]["selector"]},
            "scaleTargetTo": plan.scale_target_to,
        })
    }

    /// Router conformance: every router goes through the same release (initialize, 10%, 50%, promote,
    /// rollback, finalize) and its objects are snapshotted side by side; each step must read back as the
    /// split it was written for, and a finalized route is deleted.
    #[test]
    fn conformance_every_router_through_one_release() {
        let steps: [(&str, u8); 5] = [
            ("initialize", 0),
            ("step 10%", 10),
            ("step 50%", 50),
            ("promote (primary now runs the new version)", 0),
            ("rollback", 0),
        ];
        for provider in PROVIDERS {
            let router = router_for(provider);
            let target = plain_target();
            let mut release = serde_json::Map::new();
            let mut previous: Option<Value> = None;
            for (step, canary) in steps {
                let object = router.desired(&target, split(canary));
                assert_eq!(
                    router.observed_split(&object, &target),
                    Some(split(canary)),
                    "{provider:?} {step}"
                );
                // Re-applying the object for the split already live is a no-op write.
                if let Some(previous) = &previous
                    && router.observed_split(previous, &target) == Some(split(canary))
                {
                    assert_eq!(
                        previous, &object,
                        "{provider:?} {step}: same split, same object"
                    );
                }
                release.insert(step.to_owned(), object["spec"].clone());
                previous = Some(object);
            }
            release.insert("finalize".to_owned(), finalize(router.as_ref(), &target));
            let resource = router.api_resource();
            insta::assert_yaml_snapshot!(
                format!(
                    "conformance_{}",
                    serde_json::to_value(provider)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .replace(':', "_")
                ),
                json!({
                    "apiVersion": resource.api_version,
                    "kind": resource.kind,
                    "release": release,
                    "hostsAndGateways": router.unsupported(&exposed_target()).unwrap_or_else(|| "supported".into()),
                    "waitsForSync": !router.synced(&router.desired(&target, split(10))),
                })
            );
        }
    }

    #[test]
    fn envelope_is_owned_and_labelled() {
        for router in routers() {
            let object = router.desired(&plain_target(), split(10));
            let resource = router.api_resource();
            assert_eq!(object["apiVersion"], resource.api_version.as_str());
            assert_eq!(object["kind"], resource.kind.as_str());
            assert_eq!(object["metadata"]["name"], "podinfo");
            assert_eq!(object["metadata"]["namespace"], "test");
            assert_eq!(
                object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                "sluice"
            );
            assert_eq!(object["metadata"]["ownerReferences"][0]["controller"], true);
            assert_eq!(
                object["metadata"]["ownerReferences"][0]["uid"],
                owner().uid.as_str()
            );
        }
    }

    #[test]
    fn server_additions_do_not_count_as_drift() {
        for router in routers() {
            let target = exposed_target();
            let mut live = router.desired(&target, split(30));
            // What the API server adds on its own.
            live["metadata"]["resourceVersion"] = json!("42");
            live["metadata"]["managedFields"] = json!([{"manager": "sluice.dev/operator"}]);
            live["status"] = json!({"parents": []});
            live["spec"]["someDefaultedField"] = json!(true);
            assert_eq!(router.observed_split(&live, &target), Some(split(30)));
        }
    }

    #[test]
    fn unreadable_objects_read_as_none() {
        for router in routers() {
            let target = plain_target();
            for live in [
                json!(null),
                json!({}),
                json!({"spec": {}}),
                json!({"spec": []}),
            ] {
                assert_eq!(router.observed_split(&live, &target), None, "{live}");
            }
            // Another mesh's route object is not ours to read.
            let other = routers()
                .into_iter()
                .find(|r| r.provider() != router.provider())
                .map(|r| r.desired(&target, split(10)));
            if let Some(other) = other {
                assert_eq!(router.observed_split(&other, &target), None);
            }
            // The same object for a different service is drift too.
            let elsewhere = RouteTarget::new("other", "test", 9898, owner());
            let live = router.desired(&elsewhere, split(10));
            assert_eq!(router.observed_split(&live, &target), None);
        }
    }

    #[test]
    fn containment_rules() {
        assert!(contains(&json!({"a": 1, "b": 2}), &json!({"a": 1})));
        assert!(!contains(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(contains(&json!([{"a": 1, "x": 0}]), &json!([{"a": 1}])));
        assert!(!contains(&json!([{"a": 1}, {"a": 2}]), &json!([{"a": 1}])));
        assert!(contains(&json!(10.0), &json!(10)));
        assert!(!contains(&json!("10"), &json!(10)));
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,20}"
    }

    proptest! {
        #[test]
        fn any_target_and_split_round_trip(
            service in name(),
            namespace in name(),
            port in 1u16..,
            hosts in proptest::collection::vec("[a-z]{1,8}\\.example\\.com", 0..3),
            gateways in proptest::collection::vec(
                (proptest::option::of(name()), name()).prop_map(|(ns, n)| match ns {
                    Some(ns) => format!("{ns}/{n}"),
                    None => n,
                }),
                0..3,
            ),
            canary in 0u8..=100,
        ) {
            let target = RouteTarget { hosts, gateways, ..RouteTarget::new(service, namespace, port, owner()) };
            for router in routers() {
                let s = split(canary);
                let object = router.desired(&target, s);
                prop_assert_eq!(weights(&object).iter().sum::<u64>(), 100);
                prop_assert_eq!(router.observed_split(&object, &target), Some(s));
            }
        }
    }
}
