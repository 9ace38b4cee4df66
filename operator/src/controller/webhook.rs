//! Webhooks (`analysis.webhooks`), Flagger-compatible: Sluice POSTs a JSON payload and any 2xx answer
//! means yes. The planner decides what an answer does; this module only builds payloads and calls.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::ResourceExt;
use serde_json::{Value, json};

use crate::api::{Rollout, RolloutStatus, Webhook, WebhookType};
use crate::notify::error_chain;
use crate::rollout::{Reason, Transition};

/// Time allowed for one attempt when the hook sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two attempts of the same hook.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The client webhooks are called with: no redirects, a connect timeout, proxies only from the standard
/// environment variables. Needs a process-wide rustls crypto provider (Sluice installs ring at startup).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(DEFAULT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// The body POSTed to a hook: Flagger's fields (`name`, `namespace`, `phase`, `checksum`, `metadata`) plus
/// Sluice's own under `sluice`.
pub fn payload(
    rollout: &Rollout,
    status: &RolloutStatus,
    hook: &Webhook,
    extra_metadata: &BTreeMap<String, String>,
) -> Value {
    let mut metadata = hook.metadata.clone();
    metadata.extend(extra_metadata.clone());
    let phase = status
        .phase
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "Initializing".into());
    json!({
        "name": rollout.name_any(),
        "namespace": rollout.namespace().unwrap_or_default(),
        "phase": phase,
        "checksum": status.revision.clone().unwrap_or_default(),
        "type": hook.type_,
        "metadata": metadata,
        "sluice": {
            "webhook": hook.name,
            "revision": status.revision,
            "lastPromotedRevision": status.last_promoted_revision,
            "canaryWeight": status.canary_weight,
            "step": status.current_step,
            "failedChecks": status.failed_checks,
        },
    })
}

/// The metadata an `event` hook gets besides its own: Flagger's `eventMessage` and `eventType`.
pub fn event_metadata(transition: &Transition) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("eventMessage".to_owned(), transition.message.clone()),
        (
            "eventType".to_owned(),
            if transition.warning {
                "Warning"
            } else {
                "Normal"
            }
            .to_owned(),
        ),
        (
            "eventReason".to_owned(),
            transition.reason.as_str().to_owned(),
        ),
    ])
}

/// Calls `hook` until an attempt answers 2xx or `retries` more attempts failed; `Err` says why the last
/// attempt failed. Only what may pass on its own is retried (connection errors, timeouts, 5xx, 429): a
/// deliberate "no" (403, 409, …) is the answer.
pub async fn call(client: &reqwest::Client, hook: &Webhook, body: &Value) -> Result<(), String> {
    let timeout = hook
        .timeout
        .as_ref()
        .and_then(|t| t.to_std())
        .unwrap_or(DEFAULT_TIMEOUT);
    let mut last = String::new();
    let mut tries = hook.retries + 1;
    for attempt in 0..=hook.retries {
        if attempt > 0 {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        match attempt_once(client, &hook.url, timeout, body).await {
            Ok(()) => return Ok(()),
            Err(Failure { why, retryable }) => {
                last = why;
                if !retryable {
                    tries = attempt + 1;
                    break;
                }
            }
        }
    }
    Err(if tries > 1 {
        format!("{last} (after {tries} attempts)")
    } else {
        last
    })
}

/// Why one attempt failed, and whether another attempt could do better.
struct Failure {
    why: String,
    retryable: bool,
}

async fn attempt_once(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    body: &Value,
) -> Result<(), Failure> {
    let response = client
        .post(url)
        .timeout(timeout)
        .json(body)
        .send()
        .await
        .map_err(|e| Failure {
            why: if e.is_connect() {
                format!("cannot connect: {}", error_chain(&e.without_url()))
            } else if e.is_timeout() {
                format!("no answer within {}s", timeout.as_secs())
            } else {
                error_chain(&e.without_url())
            },
            retryable: true,
        })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    // A short reason from the body helps whoever reads the Rollout's status.
    let text = response.text().await.unwrap_or_default();
    let reason: String = text.trim().chars().take(200).collect();
    Err(Failure {
        why: if reason.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {reason}", status.as_u16())
        },
        retryable: status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
    })
}

/// The hooks of one type, in spec order.
pub fn of_type(rollout: &Rollout, type_: WebhookType) -> impl Iterator<Item = &Webhook> {
    rollout
        .spec
        .analysis
        .webhooks
        .iter()
        .filter(move |h| h.type_ == type_)
}

/// Asks every hook of `type_` in order; the first that does not answer 2xx is returned with why.
pub async fn first_refusal(
    client: &reqwest::Client,
    rollout: &Rollout,
    status: &RolloutStatus,
    type_: WebhookType,
) -> Option<(String, String)> {
    for hook in of_type(rollout, type_) {
        let body = payload(rollout, status, hook, &BTreeMap::new());
        if let Err(why) = call(client, hook, &body).await {
            tracing::info!(rollout = %rollout.name_any(), webhook = %hook.name, r#type = ?type_, %why, "webhook said no");
            return Some((hook.name.clone(), why));
        }
    }
    None
}

/// Calls every hook of `type_`; returns those that failed, with why.
pub async fn failures(
    client: &reqwest::Client,
    rollout: &Rollout,
    status: &RolloutStatus,
    type_: WebhookType,
) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    for hook in of_type(rollout, type_) {
        let body = payload(rollout, status, hook, &BTreeMap::new());
        if let Err(why) = call(client, hook, &body).await {
            tracing::warn!(rollout = %rollout.name_any(), webhook = %hook.name, %why, "rollout webhook failed");
            failed.push((hook.name.clone(), why));
        }
    }
    failed
}

/// The first `rollback` hook that answers 2xx: its name. Errors and refusals mean "do not roll back".
pub async fn rollback_requested(
    client: &reqwest::Client,
    rollout: &Rollout,
    status: &RolloutStatus,
) -> Option<String> {
    for hook in of_type(rollout, WebhookType::Rollback) {
        let body = payload(rollout, status, hook, &BTreeMap::new());
        if call(client, hook, &body).await.is_ok() {
            return Some(hook.name.clone());
        }
    }
    None
}

/// Sends `event` hooks for each transition and `post-rollout` hooks after a promotion or a rollback, in the
/// background: their answers are only logged.
pub fn notify(
    client: &reqwest::Client,
    rollout: &Rollout,
    status: &RolloutStatus,
    transitions: &[Transition],
) {
    let mut calls = Vec::new();
    for transition in transitions {
        for hook in of_type(rollout, WebhookType::Event) {
            calls.push((
                hook.clone(),
                payload(rollout, status, hook, &event_metadata(transition)),
            ));
        }
        if matches!(transition.reason, Reason::Promoted | Reason::RolledBack) {
            for hook in of_type(rollout, WebhookType::PostRollout) {
                calls.push((
                    hook.clone(),
                    payload(rollout, status, hook, &BTreeMap::new()),
                ));
            }
        }
    }
    if calls.is_empty() {
        return;
    }
    let client = client.clone();
    let name = rollout.name_any();
    tokio::spawn(async move {
        for (hook, body) in calls {
            if let Err(why) = call(&client, &hook, &body).await {
                tracing::warn!(rollout = %name, webhook = %hook.name, r#type = ?hook.type_, %why, "webhook not delivered");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RolloutPhase;

    fn rollout() -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "podinfo", "namespace": "test"},
            "spec": {
                "targetRef": {"kind": "Deployment", "name": "podinfo"},
                "service": {"port": 9898},
                "analysis": {"interval": "1m", "stepWeight": 10, "webhooks": [
                    {"name": "gate", "type": "confirm-promotion", "url": "http://gate.test/", "metadata": {"team": "shop"}},
                    {"name": "load", "url": "http://load.test/", "timeout": "5s", "retries": 2},
                ]},
            },
        }))
        .expect("valid rollout")
    }

    #[test]
    fn payload_is_flagger_compatible_with_sluice_extras() {
        let rollout = rollout();
        let status = RolloutStatus {
            phase: Some(RolloutPhase::Progressing),
            revision: Some("7f9c2b".into()),
            canary_weight: crate::api::Weight::new(30).expect("weight"),
            current_step: 2,
            ..RolloutStatus::default()
        };
        let hook = &rollout.spec.analysis.webhooks[0];
        let body = payload(&rollout, &status, hook, &BTreeMap::new());
        insta::assert_json_snapshot!("webhook_payload", body);
        assert_eq!(
            rollout.spec.analysis.webhooks[1].type_,
            WebhookType::Rollout,
            "rollout is the default type"
        );
        assert_eq!(rollout.spec.analysis.webhooks[1].retries, 2);
    }

    #[test]
    fn event_payloads_carry_the_transition() {
        let rollout = rollout();
        let transition = Transition {
            warning: true,
            reason: Reason::RolledBack,
            message: "rolled back: 2 failed checks".into(),
        };
        let hook = Webhook {
            type_: WebhookType::Event,
            ..rollout.spec.analysis.webhooks[0].clone()
        };
        let body = payload(
            &rollout,
            &RolloutStatus::default(),
            &hook,
            &event_metadata(&transition),
        );
        assert_eq!(
            body["metadata"]["eventMessage"],
            "rolled back: 2 failed checks"
        );
        assert_eq!(body["metadata"]["eventType"], "Warning");
        assert_eq!(body["metadata"]["eventReason"], "RolledBack");
        assert_eq!(
            body["metadata"]["team"], "shop",
            "the hook's own metadata stays"
        );
        assert_eq!(body["type"], "event");
        assert_eq!(body["phase"], "Initializing");
    }

    /// A loopback hook that answers the first `refuse` calls with `refusal` (and a reason), then 200, each
    /// after `delay`; returns its URL and the number of calls made so far.
    async fn hook_server(
        refuse: usize,
        refusal: axum::http::StatusCode,
        delay: Duration,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |body: axum::Json<Value>| {
                let counter = counter.clone();
                async move {
                    assert_eq!(body.0["name"], "podinfo");
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    if n < refuse {
                        (refusal, "not yet: waiting for QA")
                    } else {
                        (axum::http::StatusCode::OK, "ok")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/"), calls)
    }

    /// The client the controller calls hooks with (`Context::webhooks`), not a default one.
    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        super::client()
    }

    fn hook(url: &str, retries: u32, timeout: &str) -> Webhook {
        Webhook {
            url: url.to_owned(),
            retries,
            timeout: Some(crate::api::DurationString(timeout.into())),
            ..rollout().spec.analysis.webhooks[0].clone()
        }
    }

    #[tokio::test]
    async fn failures_are_retried_until_yes_but_a_refusal_is_the_answer() {
        use std::sync::atomic::Ordering;
        let body = payload(
            &rollout(),
            &RolloutStatus::default(),
            &rollout().spec.analysis.webhooks[0],
            &BTreeMap::new(),
        );
        use axum::http::StatusCode;
        let (url, calls) = hook_server(2, StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
        let refused = call(&client(), &hook(&url, 0, "5s"), &body).await;
        assert_eq!(refused, Err("HTTP 503: not yet: waiting for QA".to_owned()));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no retries: one attempt");
        // One failure left: a second attempt gets the yes.
        assert_eq!(call(&client(), &hook(&url, 2, "5s"), &body).await, Ok(()));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let (url, calls) = hook_server(10, StatusCode::TOO_MANY_REQUESTS, Duration::ZERO).await;
        assert_eq!(
            call(&client(), &hook(&url, 1, "5s"), &body).await,
            Err("HTTP 429: not yet: waiting for QA (after 2 attempts)".to_owned())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // A deliberate no is the answer: not retried.
        let (url, calls) = hook_server(10, StatusCode::FORBIDDEN, Duration::ZERO).await;
        assert_eq!(
            call(&client(), &hook(&url, 3, "5s"), &body).await,
            Err("HTTP 403: not yet: waiting for QA".to_owned())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_slow_hook_times_out_and_an_absent_one_is_an_error() {
        let body = json!({"name": "podinfo"});
        let (url, _) = hook_server(0, axum::http::StatusCode::OK, Duration::from_secs(3)).await;
        assert_eq!(
            call(&client(), &hook(&url, 0, "1s"), &body).await,
            Err("no answer within 1s".to_owned())
        );
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let refused = call(
            &client(),
            &hook(&format!("http://{closed}/"), 0, "1s"),
            &body,
        )
        .await;
        assert!(refused.is_err_and(|why| !why.is_empty()));
    }

    /// A hook that answers with a redirect is saying no: the production client must not follow it to a
    /// URL nobody configured (where a 2xx would count as a yes), and it says who is calling.
    #[tokio::test]
    async fn a_redirect_is_the_answer_and_never_followed() {
        use axum::http::{HeaderMap, StatusCode, header};
        use std::sync::{Arc, Mutex};
        let agents = Arc::new(Mutex::new(Vec::<String>::new()));
        let elsewhere_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (seen, reached) = (agents.clone(), elsewhere_calls.clone());
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::post(move |headers: HeaderMap| {
                    let seen = seen.clone();
                    async move {
                        let agent = headers
                            .get(header::USER_AGENT)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        seen.lock().expect("lock").push(agent);
                        // 307 keeps the method and body: a client that follows it POSTs the payload on.
                        (
                            StatusCode::TEMPORARY_REDIRECT,
                            [(header::LOCATION, "/elsewhere")],
                        )
                    }
                }),
            )
            .route(
                "/elsewhere",
                axum::routing::any(move || {
                    let reached = reached.clone();
                    async move {
                        reached.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        StatusCode::OK
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        let answer = call(
            &client(),
            &hook(&format!("http://{addr}/"), 0, "5s"),
            &json!({"name": "podinfo"}),
        )
        .await;
        assert_eq!(answer, Err("HTTP 307".to_owned()));
        assert_eq!(
            elsewhere_calls.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the redirect was followed"
        );
        assert_eq!(
            *agents.lock().expect("lock"),
            vec![format!("sluice/{}", env!("CARGO_PKG_VERSION"))]
        );
    }

    #[test]
    fn every_type_has_its_flagger_name() {
        let names: Vec<String> = [
            WebhookType::ConfirmRollout,
            WebhookType::PreRollout,
            WebhookType::Rollout,
            WebhookType::ConfirmTrafficIncrease,
            WebhookType::ConfirmPromotion,
            WebhookType::PostRollout,
            WebhookType::Rollback,
            WebhookType::Event,
        ]
        .iter()
        .map(|t| {
            serde_json::to_value(t)
                .expect("serializes")
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
        assert_eq!(
            names,
            [
                "confirm-rollout",
                "pre-rollout",
                "rollout",
                "confirm-traffic-increase",
                "confirm-promotion",
                "post-rollout",
                "rollback",
                "event"
            ]
        );
    }
}
