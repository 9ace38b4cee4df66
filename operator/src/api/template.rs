//! `MetricTemplate`: a query and the metrics server that answers it (Flagger's shape), referenced by
//! `analysis.metrics[].templateRef`, so one Prometheus-compatible server per team or tenant, with its own
//! credentials, serves many Rollouts.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SecretRef;

/// A query template and the server it runs on.
// Two print columns of type "string" read to clippy as one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "MetricTemplate",
    namespaced,
    category = "sluice",
    doc = "A metric query and the Prometheus-compatible server (with its credentials) that answers it, for analysis.metrics[].templateRef.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider.type"),
    printcolumn(
        name = "Address",
        type_ = "string",
        json_path = ".spec.provider.address"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MetricTemplateSpec {
    pub provider: MetricProvider,
    /// The query, with the placeholders of a metric's `query`: {{ namespace }}, {{ target }}, {{ service }},
    /// {{ interval }} and {{ variables.NAME }} (from the metric's `templateVariables`).
    #[schemars(length(min = 1))]
    pub query: String,
}

/// Where a template's query runs, and how Sluice authenticates there.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(self.type in ['graphite', 'influxdb', 'azuremonitor']) || has(self.address)").message("graphite, influxdb and azuremonitor providers need an address (the server's base URL)"),
    validation = Rule::new("self.type != 'cloudwatch' || has(self.region)").message("a cloudwatch provider needs a region"),
)]
pub struct MetricProvider {
    /// The server's API.
    #[serde(rename = "type")]
    pub type_: MetricProviderType,
    /// Base URL of the API, e.g. `http://thanos-query.monitoring:9090` or `https://mimir.example.com/prometheus`;
    /// defaults to the operator's `--prometheus-url` (Prometheus), `https://api.datadoghq.com` (Datadog) or
    /// New Relic's US endpoint for the Secret's key (NerdGraph, or Insights for a query key);
    /// required for Graphite, InfluxDB and Azure Monitor (the workspace's query endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub address: Option<String>,
    /// A Secret in the template's namespace. Prometheus: `username` and `password` (basic auth) or `token`
    /// (bearer), and optionally `ca.crt` (PEM) to trust for TLS. Graphite: the same. InfluxDB: `token` (sent as
    /// `Token ...`) and `org` for Flux, or `username` and `password` (1.x). New Relic: `newrelic_account_id` and
    /// `newrelic_api_key` (NerdGraph) or `newrelic_query_key` (Insights). Azure Monitor: `clientId`, `tenantId`
    /// and `clientSecret`, or none for the operator's workload identity. Datadog: `datadog_api_key` and
    /// `datadog_application_key` (and optionally `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Headers sent with every query, e.g. `X-Scope-OrgID` for a Mimir, Cortex or Thanos tenant. Not for
    /// credentials: those belong in `secretRef`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The database InfluxQL queries read (`db`; influxdb only). InfluxDB 2 and 3's `/query` need it; 1.x also
    /// takes fully qualified names (`FROM "mesh".."requests"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub database: Option<String>,
    /// The AWS region of CloudWatch, e.g. `eu-west-1` (cloudwatch only; required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
    /// Accept any TLS certificate (for tests; prefer `ca.crt` in the Secret).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// Metrics APIs Sluice queries.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricProviderType {
    /// The Prometheus HTTP API: Prometheus, Thanos, Mimir, Cortex, VictoriaMetrics, and Azure Monitor's and
    /// Amazon's managed Prometheus behind a proxy that signs requests.
    Prometheus,
    /// Datadog's metrics query API; the Secret holds `datadog_api_key` and `datadog_application_key`.
    Datadog,
    /// Graphite's render API (graphite-web, or anything that serves `/render?format=json`): the query is the
    /// render parameters, e.g. `target=asPercent(sumSeries(...), sumSeries(...))`; Sluice sets `from` and `until`.
    Graphite,
    /// InfluxDB: a Flux query (Flagger's, `org` in the Secret) through `/api/v2/query`, or an InfluxQL one
    /// (starting with `SELECT`) through `/query`. Select the range with `{{ interval }}`.
    Influxdb,
    /// New Relic: NRQL through NerdGraph (or the Insights query API for a query key); Sluice appends
    /// `SINCE <window> SECONDS AGO`.
    Newrelic,
    /// Azure Monitor managed Prometheus: PromQL against a workspace's query endpoint (the address, required),
    /// with an Entra ID token from the operator's workload identity or the Secret's `clientId`, `tenantId` and
    /// `clientSecret`.
    Azuremonitor,
    /// Amazon CloudWatch `GetMetricData`: the query is a JSON array of MetricDataQuery; `region` is required;
    /// credentials from the Secret (`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`), the
    /// operator's environment, or EKS Pod Identity.
    Cloudwatch,
}

/// `analysis.metrics[].templateRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Defaults to the Rollout's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}
