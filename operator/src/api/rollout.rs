//! `Rollout`: a progressive release of a Deployment, shaped like Flagger's `Canary` so that Flagger users can
//! migrate by changing `apiVersion` and `kind`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, DurationString, Weight};

/// Builtin metric: percentage of non-5xx requests.
pub const REQUEST_SUCCESS_RATE: &str = "request-success-rate";
/// Builtin metric: p99 request duration in milliseconds.
pub const REQUEST_DURATION: &str = "request-duration";

// Size limits of a Rollout's spec. The API server estimates the worst-case cost of every CEL rule from the
// schema's `maxItems`/`maxProperties`/`maxLength` and refuses the CRD when a rule could be too expensive, so
// every list, map and string a rule reads is bounded. Each bound is far above anything a real release needs.

/// Most `analysis.match` entries (A/B conditions, ORed).
pub const MAX_MATCHES: u32 = 16;
/// Most headers in one `analysis.match` entry (ANDed).
pub const MAX_MATCH_HEADERS: u32 = 16;
/// Longest header name in `analysis.match[].headers` (checked by a CEL rule: a CRD schema cannot bound map keys).
pub const MAX_HEADER_NAME_LENGTH: u32 = 256;
/// Longest header value in `exact`, `prefix` or `regex`.
pub const MAX_HEADER_VALUE_LENGTH: u32 = 1024;
/// Most `analysis.stepWeights` entries (one per step; weights go up to 100).
pub const MAX_STEP_WEIGHTS: u32 = 100;
/// Most `analysis.steps` entries.
pub const MAX_STEPS: u32 = 100;
/// Most `analysis.metrics` entries.
pub const MAX_METRICS: u32 = 32;
/// Most `analysis.webhooks` entries.
pub const MAX_WEBHOOKS: u32 = 32;
/// Longest webhook URL.
pub const MAX_URL_LENGTH: u32 = 2048;

/// A progressive release of `targetRef`: each pod-template change is started beside the current version,
/// shifted traffic step by step, judged from metrics, then promoted or rolled back.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    status = "RolloutStatus",
    shortname = "ro",
    category = "sluice",
    category = "all",
    doc = "A progressive release of a workload on a service mesh, judged from Prometheus metrics.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".status.canaryWeight"),
    printcolumn(
        name = "FailedChecks",
        type_ = "integer",
        json_path = ".status.failedChecks"
    ),
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".status.revision",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::api::kubernetes_integer_formats)]
pub struct RolloutSpec {
    /// The workload being released. It runs the canary and is scaled to 0 between releases.
    pub target_ref: TargetRef,
    /// The Service in front of the workload; Sluice generates `<name>`, `<name>-primary` and `<name>-canary`.
    pub service: ServiceSpec,
    /// The mesh whose routes Sluice drives.
    #[serde(default)]
    pub provider: Provider,
    /// How each step is judged and how far traffic moves.
    pub analysis: Analysis,
    /// Seconds a release may make no progress before it is rolled back.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: u32,
    /// Promote without running the analysis.
    #[serde(default)]
    pub skip_analysis: bool,
    /// Stop acting on this Rollout: traffic and workloads stay as they are.
    #[serde(default)]
    pub suspend: bool,
}

fn default_progress_deadline() -> u32 {
    600
}

/// The workload a Rollout releases.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API version of the target.
    #[serde(default = "default_apps_v1")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self == 'apps/v1'").message("targetRef.apiVersion must be apps/v1"))]
    pub api_version: String,
    /// Kind of the target.
    pub kind: TargetKind,
    /// Name of the target in the Rollout's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_apps_v1() -> String {
    "apps/v1".to_owned()
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetKind {
    Deployment,
    /// A StatefulSet: its primary is a clone with its own volumes (see docs/rollouts.md#statefulsets).
    StatefulSet,
}

impl TargetKind {
    /// The `apps/v1` kind, as in `kind:` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Deployment => "Deployment",
            TargetKind::StatefulSet => "StatefulSet",
        }
    }

    /// The resource's plural, as in URLs and RBAC.
    pub fn plural(self) -> &'static str {
        match self {
            TargetKind::Deployment => "deployments",
            TargetKind::StatefulSet => "statefulsets",
        }
    }
}

/// The Service Sluice generates for the target and the hosts the route answers for.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service name; defaults to the target's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// Port the Service exposes.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Container port traffic is sent to; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<u16>,
    /// Extra hosts the route answers for (Istio `hosts`, Gateway API `hostnames`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Istio gateways or Gateway API parents the route attaches to besides the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

/// The mesh that carries the traffic split.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Istio (and Azure Service Mesh): a `VirtualService`.
    #[default]
    Istio,
    /// Gateway API `HTTPRoute` attached to the Service (GAMMA), on Istio's telemetry.
    GatewayApi,
    /// Linkerd: a Gateway API `HTTPRoute` (1.2.1 fields only), judged from Linkerd's proxy metrics.
    Linkerd,
    /// SMI `TrafficSplit` `split.smi-spec.io/v1alpha2` (linkerd-smi and other SMI meshes).
    Smi,
    /// SMI `TrafficSplit` `split.smi-spec.io/v1alpha1`.
    #[serde(rename = "smi:v1alpha1")]
    SmiV1alpha1,
    /// Consul service mesh: a `ServiceSplitter` between the `-primary` and `-canary` services.
    Consul,
}

/// How a release advances and how each step is judged.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.stepWeight) && has(self.stepWeights))").message("stepWeight and stepWeights are mutually exclusive: set one of them"),
    validation = Rule::new("!has(self.steps) || !(has(self.stepWeight) || has(self.stepWeights))").message("steps replaces stepWeight/stepWeights: set only one way of moving traffic"),
    validation = Rule::new("!has(self.stepWeight) || !has(self.maxWeight) || self.maxWeight >= self.stepWeight").message("maxWeight must be greater than or equal to stepWeight"),
    validation = Rule::new("!has(self.stepWeights) || !has(self.maxWeight) || self.stepWeights.all(w, w <= self.maxWeight)").message("every stepWeights entry must be at most maxWeight"),
    validation = Rule::new("!has(self.match) || size(self.match) == 0 || !(has(self.stepWeight) || has(self.stepWeights) || has(self.steps))").message("match makes this an A/B test, which routes by request and not by weight: remove stepWeight/stepWeights/steps, or remove match for a weighted canary"),
    validation = Rule::new("!has(self.mirror) || !self.mirror || !(has(self.stepWeight) || has(self.stepWeights) || has(self.steps) || (has(self.match) && size(self.match) > 0))").message("mirror is for blue-green (iterations only): remove stepWeight/stepWeights/steps/match, or set mirror: false"),
    validation = Rule::new("!has(self.mirrorWeight) || (has(self.mirror) && self.mirror)").message("mirrorWeight needs mirror: true"),
    validation = Rule::new("!has(self.sessionAffinity) || has(self.stepWeight) || has(self.stepWeights) || has(self.steps)").message("sessionAffinity keeps users on the version a weighted canary sent them to: it needs stepWeight, stepWeights or steps"),
)]
pub struct Analysis {
    /// Time between two checks (at least 1s).
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("interval must be at least 1s"))]
    pub interval: DurationString,
    /// Failed checks tolerated before the release is rolled back.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 1))]
    pub threshold: u32,
    /// Highest canary weight before promotion (with stepWeight / stepWeights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight: Option<Weight>,
    /// Weight added to the canary at each step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("stepWeight must be at least 1"))]
    pub step_weight: Option<Weight>,
    /// Explicit canary weights, one per step, in increasing order (at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_STEP_WEIGHTS))]
    #[x_kube(validation = Rule::new("self.isSorted()").message("stepWeights must be in increasing order"))]
    pub step_weights: Option<Vec<Weight>>,
    /// Explicit steps (Argo Rollouts style) instead of stepWeight / stepWeights (at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_STEPS))]
    pub steps: Option<Vec<Step>>,
    /// Number of checks for releases that do not shift weight (blue-green, A/B).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub iterations: Option<u32>,
    /// How failed checks are counted against `threshold`.
    #[serde(default)]
    pub failure_counting: FailureCounting,
    /// Metrics checked at every interval; every one must pass for the release to advance (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_METRICS))]
    pub metrics: Vec<Metric>,
    /// Where this Rollout's notifications go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<super::RolloutAlert>,
    /// Rego policies that must allow each weight increase and the promotion, after the metrics passed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PromotionPolicy>,
    /// A/B test: requests matching any entry go to the canary for `iterations` checks; the rest stay on
    /// the primary. Entries are tried in order (at most 16).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_MATCHES))]
    pub match_: Vec<HttpMatch>,
    /// Blue-green: copy live requests to the canary while it is analysed (its responses are discarded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror: bool,
    /// Percentage of requests mirrored (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("mirrorWeight must be at least 1"))]
    pub mirror_weight: Option<Weight>,
    /// Weighted canary: a user the canary served keeps being sent to it, through a cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// HTTP hooks called at fixed points of a release (Flagger's webhooks; at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_WEBHOOKS))]
    pub webhooks: Vec<Webhook>,
}

/// One A/B match: every condition in it must hold (header and cookie conditions are ANDed).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(has(self.headers) && size(self.headers) > 0) || has(self.cookie)").message("a match needs headers or a cookie"),
    validation = Rule::new("!has(self.cookie) || !has(self.headers) || !self.headers.exists(h, h.lowerAscii() == 'cookie')").message("use either cookie or a headers.cookie condition, not both"),
)]
pub struct HttpMatch {
    /// Request headers (names are case-insensitive, at most 256 characters) and how each value must match
    /// (at most 16 headers).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = MAX_MATCH_HEADERS))]
    #[x_kube(validation = Rule::new("self.all(name, size(name) >= 1 && size(name) <= 256)").message("a header name must be 1 to 256 characters"))]
    pub headers: std::collections::BTreeMap<String, StringMatch>,
    /// A cookie that must be present with this exact value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieMatch>,
}

/// How a header value must match; exactly one of the three.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.exact) ? 1 : 0) + (has(self.prefix) ? 1 : 0) + (has(self.regex) ? 1 : 0) == 1").message("a header match sets exactly one of exact, prefix or regex"))]
pub struct StringMatch {
    /// The whole value (at most 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_HEADER_VALUE_LENGTH))]
    pub exact: Option<String>,
    /// The start of the value (at most 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_HEADER_VALUE_LENGTH))]
    pub prefix: Option<String>,
    /// RE2 syntax, matched against the whole value (1-1024 characters). Sluice checks the syntax and reports an
    /// invalid regex as the `InvalidSpec` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_HEADER_VALUE_LENGTH))]
    pub regex: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CookieMatch {
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    )]
    pub name: String,
    #[schemars(
        length(max = 1024),
        regex(pattern = r"^[!#$%&'()*+\-./0-9:<=>?@A-Z\[\]^_`a-z{|}~]*$")
    )]
    pub value: String,
}

/// Cookie-based stickiness during a weighted canary (Flagger's `sessionAffinity`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinity {
    /// Cookie set on responses from the canary; requests carrying it go to the canary.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    )]
    pub cookie_name: String,
    /// Cookie set on responses from the primary so those users stay on the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    )]
    pub primary_cookie_name: Option<String>,
    /// Cookie lifetime in seconds (default one day).
    #[serde(default = "default_max_age")]
    #[schemars(range(min = 1))]
    pub max_age: u32,
}

fn default_max_age() -> u32 {
    86_400
}

/// An HTTP hook (Flagger-compatible). Sluice POSTs a JSON payload; any 2xx answer means yes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Shown in status, Events and the payload.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// When the hook is called and what its answer does.
    #[serde(default, rename = "type")]
    pub type_: WebhookType,
    /// `http://` or `https://` URL (at most 2048 characters).
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("url must start with http:// or https://"))]
    pub url: String,
    /// Time allowed for one attempt (default 10s, at most 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('5m')").message("timeout must be between 1s and 5m"))]
    pub timeout: Option<DurationString>,
    /// Extra attempts after a failed one (non-2xx, timeout, connection error), one second apart.
    #[serde(default)]
    #[schemars(range(max = 10))]
    pub retries: u32,
    /// Sent as the payload's `metadata`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// When a webhook is called (Flagger's types).
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    Hash,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookType {
    /// Before a new revision starts: until it answers 2xx, the release does not start.
    ConfirmRollout,
    /// Once the canary is ready, before it gets traffic: a failure rolls the release back.
    PreRollout,
    /// With every check: a failure counts as a failed check.
    #[default]
    Rollout,
    /// Before each weight increase: until it answers 2xx, the step holds.
    ConfirmTrafficIncrease,
    /// Before promotion: until it answers 2xx, the release holds at its last step.
    ConfirmPromotion,
    /// After a promotion or a rollback; its answer is only logged.
    PostRollout,
    /// With every check: a 2xx answer rolls the release back (a manual rollback switch).
    Rollback,
    /// On every transition (an Event), with the message in `metadata`; its answer is only logged.
    Event,
}

/// A Rego gate: its modules are every `*.rego` key of a ConfigMap in the Rollout's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PromotionPolicy {
    /// Shown in status and Events.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// ConfigMap holding the modules (and their `test_*` rules, which are not run here).
    pub config_map_ref: PolicyConfigMapRef,
    /// Decision that must be `true`; the `deny` set beside it (same package) gives the reasons.
    #[serde(default = "default_gate_query")]
    #[schemars(regex(pattern = r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$"))]
    pub query: String,
    /// What a denial does: `hold` the step (default) or `rollback`.
    #[serde(default)]
    pub on_deny: DenyAction,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConfigMapRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_gate_query() -> String {
    "data.sluice.rollout.gate.allow".to_owned()
}

/// What a Rego gate's denial does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum DenyAction {
    #[default]
    Hold,
    Rollback,
}

fn default_threshold() -> u32 {
    5
}

/// How failed checks add up.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum FailureCounting {
    /// Every failed check counts until the release ends (Flagger's behaviour).
    #[default]
    Cumulative,
    /// A passing check resets the count; only an unbroken run of failures rolls back.
    Consecutive,
}

/// One explicit step: set a weight, or pause.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.setWeight) != has(self.pause)").message("a step sets exactly one of setWeight or pause"))]
pub struct Step {
    /// Canary weight for this step; the analysis runs while it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_weight: Option<Weight>,
    /// Wait before the next step; without a duration, wait for a manual promote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    /// How long to wait; absent means until promoted by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<DurationString>,
}

/// A check run at every interval.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.query) || has(self.templateRef) || self.name == 'request-success-rate' || self.name == 'request-duration'").message("a metric needs a query or a templateRef unless its name is a builtin (request-success-rate, request-duration)"),
    validation = Rule::new("!(has(self.query) && has(self.templateRef))").message("set query or templateRef, not both"),
)]
pub struct Metric {
    /// Metric name; `request-success-rate` and `request-duration` are builtins.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Custom PromQL template; may use {{ namespace }}, {{ target }}, {{ service }}, {{ interval }}.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub query: Option<String>,
    /// Accepted range of the measured value.
    pub threshold_range: ThresholdRange,
    /// Query window; defaults to the analysis interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("interval must be at least 1s"))]
    pub interval: Option<DurationString>,
    /// Fewer requests than this in the window counts as no data, never as a pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_requests: Option<u32>,
    /// What a check with no data does: hold the step, or count as a failed check.
    #[serde(default)]
    pub on_no_data: NoDataPolicy,
    /// Values for `{{ variables.NAME }}` in `query` (Flagger's `templateVariables`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub template_variables: std::collections::BTreeMap<String, String>,
    /// Measure and report this metric (status, Events) without letting it decide anything: to try a new
    /// metric on real releases first (Argo Rollouts' `dryRun`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// A `MetricTemplate` whose query (and server, with its credentials) this metric uses instead of `query`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<super::TemplateRef>,
    /// Also judge the canary against the primary: the same query with `{{ target }}` standing for the primary
    /// workload, over the same window. `thresholdRange` still applies to the canary's own value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_comparison: Option<PrimaryComparison>,
}

/// How far the canary's value may stray from the primary's. Each bound set must hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.maxDelta) || has(self.minDelta) || has(self.maxRatio) || has(self.minRatio)").message("primaryComparison needs maxDelta, minDelta, maxRatio or minRatio"),
    validation = Rule::new("(!has(self.maxRatio) || self.maxRatio >= 0.0) && (!has(self.minRatio) || self.minRatio >= 0.0)").message("primaryComparison ratios must not be negative"),
)]
pub struct PrimaryComparison {
    /// `canary - primary` at most this, e.g. 0.5 for an error rate in percent: at most half a point worse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delta: Option<f64>,
    /// `canary - primary` at least this, e.g. -0.5 for a success rate in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_delta: Option<f64>,
    /// `canary` at most this times `primary`, e.g. 1.2 for a p99 at most 20% above the primary's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ratio: Option<f64>,
    /// `canary` at least this times `primary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ratio: Option<f64>,
}

impl PrimaryComparison {
    /// Whether `canary` is close enough to `primary`. Written as "inside" so a NaN fails.
    pub fn holds(&self, canary: f64, primary: f64) -> bool {
        let delta = canary - primary;
        self.max_delta.is_none_or(|max| delta <= max)
            && self.min_delta.is_none_or(|min| delta >= min)
            && self.max_ratio.is_none_or(|ratio| canary <= ratio * primary)
            && self.min_ratio.is_none_or(|ratio| canary >= ratio * primary)
    }
}

/// Bounds a metric's value must stay within to pass.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.min) || has(self.max)").message("thresholdRange needs min, max or both"),
    validation = Rule::new("!has(self.min) || !has(self.max) || self.min <= self.max").message("thresholdRange.min must not exceed thresholdRange.max"),
)]
pub struct ThresholdRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// What a check that found no data does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum NoDataPolicy {
    /// Keep the current weight and check again; the progress deadline still applies.
    #[default]
    Hold,
    /// Count the check as failed.
    Fail,
}

/// Observed state of a Rollout. Everything a restarted operator needs to continue lives here.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::api::kubernetes_integer_formats)]
pub struct RolloutStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current canary weight.
    #[serde(default)]
    pub canary_weight: Weight,
    /// Index of the current step (explicit steps or stepWeights).
    #[serde(default)]
    pub current_step: u32,
    /// Checks run at the current step (blue-green and A/B count iterations).
    #[serde(default)]
    pub iterations: u32,
    /// Failed checks counted against the threshold.
    #[serde(default)]
    pub failed_checks: u32,
    /// Hash of the pod template being released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Hash of the pod template the primary runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promoted_revision: Option<String>,
    /// When the phase last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// When the release last made progress (started, moved a step); the progress deadline counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
    /// When the current stage took effect (unset while waiting for the canary to become ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_started_time: Option<Time>,
    /// When the metrics were last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<Time>,
    /// When a user paused the release (`sluice rollout pause`); its timers stop until it resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<Time>,
    /// Why the rollout is where it is, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Latest verdict of each metric with the value measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<MetricVerdict>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Notifications not yet accepted by every alert they go to (the outbox). An entry leaves only once each
    /// sink accepted it, so a restarted operator still delivers it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<OutboxEntry>,
    /// The rollback alert firing on Alertmanager; the next promotion resolves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firing_alert: Option<FiringAlert>,
}

/// One notification waiting for delivery.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEntry {
    /// Stable delivery id, sent to sinks as an idempotency key.
    pub id: String,
    pub reason: String,
    pub severity: super::AlertSeverity,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// When the transition happened (RFC 3339).
    pub at: String,
    /// Resolves the firing Alertmanager alert (sent to Alertmanager providers only).
    #[serde(default)]
    pub resolves: bool,
    /// Names of the `analysis.alerts` that have not accepted it yet.
    pub pending: Vec<String>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FiringAlert {
    pub revision: String,
    pub severity: super::AlertSeverity,
    /// The alerts (names) it was sent to.
    pub alerts: Vec<String>,
}

/// Short phase shown by `kubectl get rollouts`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutPhase {
    Initializing,
    Initialized,
    Progressing,
    Promoting,
    Succeeded,
    Failed,
    Paused,
}

/// The latest result of one metric.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricVerdict {
    pub name: String,
    pub verdict: Verdict,
    /// The measured value, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub checked_at: Time,
    /// A dry-run metric: reported, never gating.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The primary's value, for a metric judged against it (`primaryComparison`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_value: Option<f64>,
}

#[cfg(test)]
impl MetricVerdict {
    /// A gating verdict checked at the Unix epoch, for fixtures.
    pub fn at_epoch(name: &str, verdict: Verdict, value: Option<f64>) -> Self {
        Self {
            name: name.to_owned(),
            verdict,
            value,
            checked_at: Time(jiff::Timestamp::UNIX_EPOCH),
            dry_run: false,
            primary_value: None,
        }
    }
}

/// Outcome of one check. No data is never a pass.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    Pass,
    Fail,
    NoData,
}
