//! `AlertProvider`: where Rollout notifications go (Flagger-compatible shape), and the `analysis.alerts[]`
//! entries of a Rollout that reference providers.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A notification target: a chat webhook, a generic (optionally signed) webhook, or an Alertmanager.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "AlertProvider",
    namespaced,
    category = "sluice",
    doc = "Where Sluice sends Rollout notifications: Slack, Microsoft Teams, Discord, Google Chat, a webhook or Alertmanager.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::api::kubernetes_integer_formats)]
#[x_kube(validation = Rule::new("has(self.address) || has(self.secretRef)").message("set address, or secretRef to a Secret holding it"))]
pub struct AlertProviderSpec {
    /// The kind of sink.
    #[serde(rename = "type")]
    pub type_: AlertProviderType,
    /// Chat channel (Slack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Name the messages are posted as (Slack, Discord).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Webhook URL, or Alertmanager base URL. Prefer `secretRef` for URLs that carry tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub address: Option<String>,
    /// A Secret in the provider's namespace with key `address` (overrides `address`) and, for webhooks,
    /// `hmacKey` to sign payloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AlertProviderType {
    Slack,
    Msteams,
    Discord,
    Googlechat,
    Webhook,
    Alertmanager,
}

/// How important a notification is; an alert receives its severity and above.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum AlertSeverity {
    #[default]
    Info,
    Warn,
    Error,
}

/// One `analysis.alerts[]` entry: send this Rollout's notifications of `severity` and above to a provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutAlert {
    /// Name of this alert (used in status to track deliveries).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Lowest severity sent: `info` (every transition), `warn`, or `error` (rollbacks and invalid specs).
    #[serde(default)]
    pub severity: AlertSeverity,
    pub provider_ref: ProviderRef,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ProviderRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Defaults to the Rollout's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}
