//! Sending requests: one shared HTTP client, outcomes mapped to [`DeliveryError`].

use std::time::Duration;

use super::{Notification, Sink, request};

/// Why a notification did not reach its sink. `sink` is always [`Sink::name`]: kind and `host[:port]`, never the
/// URL path (which holds Slack and Discord tokens).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The sink answered with a non-2xx status (redirects included; they are not followed).
    #[error(
        "{sink} rejected the notification with HTTP {status}: {body:?}; check the sink's address (a revoked or \
         mistyped webhook URL answers 403/404) and, for 4xx, the payload format it expects"
    )]
    Rejected {
        sink: String,
        status: u16,
        /// The first 200 characters of the response body.
        body: String,
    },
    /// No HTTP answer: DNS, connection or TLS failure, or the timeout passed.
    #[error(
        "{sink} is unreachable: {reason}; check the address, DNS, egress NetworkPolicies and the proxy setting, \
         and raise the notification timeout if the sink is just slow"
    )]
    Unreachable { sink: String, reason: String },
    /// The sink's address is not an absolute http(s) URL.
    #[error(
        "{sink} has an invalid address ({reason}); it must be an absolute http:// or https:// URL"
    )]
    InvalidAddress { sink: String, reason: String },
    /// The request could not be built, e.g. a header value holding a newline.
    #[error("could not build the request for {sink}: {reason}")]
    InvalidRequest { sink: String, reason: String },
    /// The HTTP client could not be created (e.g. an unusable proxy URL).
    #[error(
        "could not create the notification HTTP client: {reason}; check the notification proxy URL"
    )]
    Client { reason: String },
}

/// The most response body kept in [`DeliveryError::Rejected`], in characters.
const REJECTED_BODY_CHARS: usize = 200;
/// Stop reading a rejected response after this many bytes (enough for 200 characters of UTF-8).
const REJECTED_BODY_READ: usize = 4 * REJECTED_BODY_CHARS;

/// Delivers notifications over one pooled HTTP client. Cloning is cheap: clones share the connection pool.
#[derive(Clone, Debug)]
pub struct Deliverer {
    client: reqwest::Client,
}

impl Deliverer {
    /// A deliverer whose every request, connection included, gives up after `timeout`. With `proxy`
    /// (e.g. `http://proxy.corp:3128`) all requests go through it; without, reqwest's defaults apply
    /// (the `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` environment variables).
    ///
    /// Needs a process-wide rustls crypto provider (Sluice installs ring at startup).
    pub fn new(timeout: Duration, proxy: Option<&str>) -> Result<Self, DeliveryError> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")));
        if let Some(proxy) = proxy {
            // The proxy URL may hold credentials: report the reason, never the URL.
            let proxy = reqwest::Proxy::all(proxy).map_err(|e| DeliveryError::Client {
                reason: format!("invalid proxy URL: {}", error_chain(&e.without_url())),
            })?;
            builder = builder.proxy(proxy);
        }
        let client = builder.build().map_err(|e| DeliveryError::Client {
            reason: error_chain(&e.without_url()),
        })?;
        Ok(Self { client })
    }

    /// POSTs `n` to `sink` once. Any 2xx is success.
    pub async fn deliver(&self, sink: &Sink, n: &Notification) -> Result<(), DeliveryError> {
        let name = sink.name();
        let req = request(sink, n);
        let url = reqwest::Url::parse(&req.url).map_err(|e| DeliveryError::InvalidAddress {
            sink: name.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(DeliveryError::InvalidAddress {
                sink: name,
                reason: format!("scheme {:?} is not http or https", url.scheme()),
            });
        }
        let mut builder = self.client.post(url);
        for (header, value) in &req.headers {
            builder = builder.header(header.as_str(), value.as_str());
        }
        let response = builder.body(req.body_bytes).send().await.map_err(|e| {
            let builder_error = e.is_builder();
            let reason = error_chain(&e.without_url());
            if builder_error {
                DeliveryError::InvalidRequest {
                    sink: name.clone(),
                    reason,
                }
            } else {
                DeliveryError::Unreachable {
                    sink: name.clone(),
                    reason,
                }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            tracing::debug!(sink = %name, id = %n.id, status = status.as_u16(), "notification delivered");
            return Ok(());
        }
        let body = body_prefix(response).await;
        tracing::debug!(sink = %name, id = %n.id, status = status.as_u16(), "notification rejected");
        Err(DeliveryError::Rejected {
            sink: name,
            status: status.as_u16(),
            body,
        })
    }
}

/// The first [`REJECTED_BODY_CHARS`] characters of a response body, read no further than needed; a body that
/// fails mid-way yields what arrived.
async fn body_prefix(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < REJECTED_BODY_READ {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&bytes)
        .chars()
        .take(REJECTED_BODY_CHARS)
        .collect()
}

/// An error and all its causes, e.g. "error sending request: client error (Connect): Connection refused".
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
