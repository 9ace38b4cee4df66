//! Alert sinks: telling people (Slack, Microsoft Teams, Discord, Google Chat), machines (a signed generic webhook)
//! and Alertmanager about what a `Rollout` did.
//!
//! The module has two halves:
//!
//! - [`request`] is pure: it turns a [`Notification`] into the exact HTTP request (URL, headers, body bytes) a
//!   [`Sink`] receives. Snapshot tests pin every payload.
//! - [`Deliverer`] POSTs that request with one shared `reqwest` client (timeout and optional proxy) and maps the
//!   outcome to `Ok(())` (any 2xx), [`DeliveryError::Rejected`] (any other status, redirects included: a
//!   webhook that moved must be reconfigured, not followed with a body-less GET) or
//!   [`DeliveryError::Unreachable`] (connection failure or timeout). Retrying is the caller's business;
//!   [`Notification::id`] is a stable idempotency key for that.
//!
//! # Payloads
//!
//! | sink | request |
//! | --- | --- |
//! | Slack | incoming-webhook JSON: `text` plus one attachment coloured `good`/`warning`/`danger` by severity |
//! | Microsoft Teams | a legacy `MessageCard` with facts (namespace, rollout, reason, severity, revision, time) |
//! | Discord | `content` plus one embed coloured by severity |
//! | Google Chat | `{"text": ...}` |
//! | Webhook | the [`Notification`] as camelCase JSON plus `"source": "sluice"` |
//! | Alertmanager | `POST <address>/api/v2/alerts` with a one-alert array |
//!
//! Every request carries `Content-Type: application/json`.
//!
//! # Generic webhook signature
//!
//! A webhook request always carries `X-Sluice-Delivery: <notification id>`. With an HMAC key it also carries
//! `X-Sluice-Signature: sha256=<lowercase hex HMAC-SHA256(key, body)>`, computed over [`Request::body_bytes`],
//! the exact bytes sent. A receiver verifies by recomputing the HMAC over the raw request body (before any JSON
//! parsing) and comparing in constant time; it deduplicates retries on `X-Sluice-Delivery`.
//!
//! # Alertmanager
//!
//! Only rollbacks fire: the caller sends Alertmanager a `RolledBack` notification with `resolves: false`, and
//! later (when a release of the same Rollout succeeds) a notification with `resolves: true` carrying the **same
//! revision and severity** as the firing one. Other notifications should not be sent to an Alertmanager sink:
//! whatever their reason, they are posted as the same `SluiceRolloutRolledBack` alert.
//!
//! Alertmanager identifies an alert by its label set, so both directions use identical labels:
//! `alertname="SluiceRolloutRolledBack"`, `namespace`, `rollout`, `severity` and `revision` (omitted when the
//! notification has none). The reason and message go into annotations, which do not affect identity.
//!
//! - A firing alert has `startsAt = at` and no `endsAt`. Alertmanager then sets `endsAt` to now plus its
//!   `resolve_timeout` (5 minutes by default): Sluice posts a rollback once, as an event, so the alert is routed
//!   and notified once and expires on its own afterwards if no resolve comes first. Sluice does not re-send it.
//! - A resolving alert has `startsAt = endsAt = at`; an `endsAt` in the past marks the alert resolved at once
//!   (and `startsAt` is set so that it is never after `endsAt`, which Alertmanager would reject).
//!
//! # Secrets
//!
//! Slack and Discord webhook URLs carry their token in the path, and webhook sinks may hold an HMAC key. Nothing
//! here logs or returns either: errors and `Debug` name a sink by kind and `host[:port]` only (see
//! [`Sink::name`]), and transport errors are reported without their URL.

mod deliver;
mod payload;
mod sign;
#[cfg(test)]
mod tests;

use std::fmt;

pub(crate) use deliver::error_chain;
pub use deliver::{Deliverer, DeliveryError};

/// How bad a notification is; sets colours and the Alertmanager `severity` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warn,
    Error,
}

impl Severity {
    /// The lowercase name used on the wire (`info`, `warn`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// One thing to tell people about a Rollout.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// Stable delivery id (idempotency key), e.g. `default/podinfo/3f2a9c/RolledBack/2026-11-25T07:00:00Z`.
    pub id: String,
    pub namespace: String,
    pub rollout: String,
    /// CamelCase transition reason, e.g. `RolledBack`, `Promoted`, `ReleaseStarted`.
    pub reason: String,
    pub severity: Severity,
    /// Human text, measured values included.
    pub message: String,
    pub revision: Option<String>,
    /// When it happened, RFC 3339.
    pub at: String,
    /// For Alertmanager: this notification resolves an earlier firing alert (a later success).
    pub resolves: bool,
}

/// Where notifications go. `address` is the full webhook URL, except for Alertmanager where it is the base URL
/// (e.g. `http://127.0.0.1:9093`).
///
/// `Debug` is written by hand so that logging a sink never shows the URL path (a token for Slack and Discord)
/// nor the HMAC key.
#[derive(Clone, PartialEq)]
pub enum Sink {
    Slack {
        address: String,
        channel: Option<String>,
        username: Option<String>,
    },
    MsTeams {
        address: String,
    },
    Discord {
        address: String,
        username: Option<String>,
    },
    GoogleChat {
        address: String,
    },
    Webhook {
        address: String,
        hmac_key: Option<Vec<u8>>,
    },
    Alertmanager {
        address: String,
    },
}

impl Sink {
    /// The sink kind: `slack`, `msteams`, `discord`, `googlechat`, `webhook` or `alertmanager`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Slack { .. } => "slack",
            Self::MsTeams { .. } => "msteams",
            Self::Discord { .. } => "discord",
            Self::GoogleChat { .. } => "googlechat",
            Self::Webhook { .. } => "webhook",
            Self::Alertmanager { .. } => "alertmanager",
        }
    }

    /// The configured address (may hold a token: never log it).
    pub fn address(&self) -> &str {
        match self {
            Self::Slack { address, .. }
            | Self::MsTeams { address }
            | Self::Discord { address, .. }
            | Self::GoogleChat { address }
            | Self::Webhook { address, .. }
            | Self::Alertmanager { address } => address,
        }
    }

    /// A name safe to log: the kind and the address' `host[:port]`, e.g. `slack (hooks.slack.com)`. Path, query
    /// and credentials are left out; an unparsable address shows as `<invalid address>`.
    pub fn name(&self) -> String {
        format!("{} ({})", self.kind(), redacted_host(self.address()))
    }
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Sink");
        s.field("kind", &self.kind())
            .field("host", &redacted_host(self.address()));
        match self {
            Self::Slack {
                channel, username, ..
            } => {
                s.field("channel", channel).field("username", username);
            }
            Self::Discord { username, .. } => {
                s.field("username", username);
            }
            Self::Webhook { hmac_key, .. } => {
                s.field("hmac_key", &hmac_key.as_ref().map(|_| "<redacted>"));
            }
            Self::MsTeams { .. } | Self::GoogleChat { .. } | Self::Alertmanager { .. } => {}
        }
        s.finish_non_exhaustive()
    }
}

/// `host[:port]` of `address`, or `<invalid address>`.
fn redacted_host(address: &str) -> String {
    match reqwest::Url::parse(address) {
        Ok(url) => match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => "<invalid address>".to_owned(),
        },
        Err(_) => "<invalid address>".to_owned(),
    }
}

/// The HTTP request (always a POST) a sink receives for a notification.
#[derive(Clone, PartialEq)]
pub struct Request {
    /// Full target URL (may hold a token: never log it).
    pub url: String,
    /// The JSON body, for inspection and tests.
    pub body: serde_json::Value,
    /// `body` serialized once: exactly what is sent, and what the webhook signature covers.
    pub body_bytes: Vec<u8>,
    /// Headers to send, `Content-Type` included.
    pub headers: Vec<(String, String)>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("host", &redacted_host(&self.url))
            .field("body", &self.body)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// Pure: the HTTP request a sink receives for a notification.
pub fn request(sink: &Sink, n: &Notification) -> Request {
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    let (url, body) = match sink {
        Sink::Slack {
            address,
            channel,
            username,
        } => (
            address.clone(),
            payload::slack(n, channel.as_deref(), username.as_deref()),
        ),
        Sink::MsTeams { address } => (address.clone(), payload::msteams(n)),
        Sink::Discord { address, username } => {
            (address.clone(), payload::discord(n, username.as_deref()))
        }
        Sink::GoogleChat { address } => (address.clone(), payload::google_chat(n)),
        Sink::Webhook { address, .. } => (address.clone(), payload::webhook(n)),
        Sink::Alertmanager { address } => (
            format!("{}/api/v2/alerts", address.trim_end_matches('/')),
            payload::alertmanager(n),
        ),
    };
    // `Value`'s Display is compact JSON and cannot fail, unlike `to_vec`'s signature suggests.
    let body_bytes = body.to_string().into_bytes();
    if let Sink::Webhook { hmac_key, .. } = sink {
        headers.push(("X-Sluice-Delivery".to_owned(), n.id.clone()));
        if let Some(key) = hmac_key {
            headers.push((
                "X-Sluice-Signature".to_owned(),
                format!("sha256={}", sign::hmac_sha256_hex(key, &body_bytes)),
            ));
        }
    }
    Request {
        url,
        body,
        body_bytes,
        headers,
    }
}
