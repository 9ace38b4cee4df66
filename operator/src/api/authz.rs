//! `AuthorizationPolicy`: Rego modules and data that Sluice compiles, tests, bundles and pushes to the
//! workloads its selector matches, where `sluice authz` evaluates them per request.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::Condition;

/// Decision queried when the spec names none; the same default as OPA-Envoy.
pub use sluice_authz::DEFAULT_QUERY;

/// Rego policy pushed to the workloads selected by `selector` and enforced by their ext_authz sidecar.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "AuthorizationPolicyStatus",
    shortname = "sap",
    category = "sluice",
    doc = "Rego policy compiled into an OPA bundle and enforced per request by Sluice's Envoy ext_authz server.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.revision"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Workloads",
        type_ = "integer",
        json_path = ".status.matchedWorkloads"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::api::kubernetes_integer_formats)]
pub struct AuthorizationPolicySpec {
    /// Labels of the workloads (pods) that receive the bundle.
    pub selector: LabelSelector,
    /// Rego modules, inline or from ConfigMaps.
    #[schemars(length(min = 1))]
    pub modules: Vec<RegoModule>,
    /// Data documents merged under `data`, as in an OPA bundle's data.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub data: Option<serde_json::Value>,
    /// The decision to evaluate per request.
    #[serde(default = "default_query")]
    #[schemars(regex(pattern = r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$"))]
    pub query: String,
    /// `enforce` denies what the policy denies; `dryRun` evaluates and logs but allows.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Allow requests when the policy cannot be evaluated (default: deny, fail closed).
    #[serde(default)]
    pub fail_open: bool,
    /// OPA's `--strict-builtin-errors`: a builtin error (a malformed token, a bad key) fails the
    /// evaluation, so the request is denied (unless `failOpen`), instead of making the call undefined.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict_builtin_errors: bool,
    /// Have Sluice create the Istio AuthorizationPolicy (`action: CUSTOM`) that sends the selected
    /// workloads' requests to `sluice authz` through a mesh extension provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio: Option<IstioWiring>,
}

/// How the selected workloads' requests reach `sluice authz` on Istio (and Azure Service Mesh).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IstioWiring {
    /// Name of the `meshConfig.extensionProviders` entry that points at the `sluice authz` sidecar.
    #[schemars(length(min = 1, max = 253))]
    pub provider: String,
    /// Only requests to these paths are checked (Istio `to.operation.paths`, `*` wildcards allowed);
    /// empty checks every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

fn default_query() -> String {
    DEFAULT_QUERY.to_owned()
}

fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// One Rego module: inline source, or a key of a ConfigMap in the policy's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.rego) != has(self.configMapRef)").message("a module sets exactly one of rego or configMapRef"))]
pub struct RegoModule {
    /// File name of the module inside the bundle, e.g. `authz.rego`.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_./-]*\.rego$"))]
    pub name: String,
    /// Inline Rego source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego: Option<String>,
    /// A ConfigMap key holding the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Whether denials are enforced.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    DryRun,
}

/// Observed state of an AuthorizationPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::api::kubernetes_integer_formats)]
pub struct AuthorizationPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Revision of the bundle being served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Workloads the selector matches.
    #[serde(default)]
    pub matched_workloads: u32,
    /// Why the latest spec was not accepted, with file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
