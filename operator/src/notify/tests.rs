use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;

const TOKEN: &str = "XyZsEcReTtOkEn42";

fn firing() -> Notification {
    Notification {
        id: "default/podinfo/3f2a9c/RolledBack/2026-11-25T07:00:00Z".into(),
        namespace: "default".into(),
        rollout: "podinfo".into(),
        reason: "RolledBack".into(),
        severity: Severity::Error,
        message: "success rate 91.2% < 99% for 3 checks; traffic back on the stable revision"
            .into(),
        revision: Some("3f2a9c".into()),
        at: "2026-11-25T07:00:00Z".into(),
        resolves: false,
    }
}

fn promoted() -> Notification {
    Notification {
        id: "default/podinfo/7b1d04/Promoted/2026-11-25T09:30:00Z".into(),
        reason: "Promoted".into(),
        severity: Severity::Info,
        message: "7b1d04 promoted after 5 steps; success rate 99.9%, p99 latency 182ms".into(),
        revision: Some("7b1d04".into()),
        at: "2026-11-25T09:30:00Z".into(),
        resolves: true,
        ..firing()
    }
}

fn sinks(base: &str) -> Vec<(&'static str, Sink)> {
    vec![
        (
            "slack",
            Sink::Slack {
                address: format!("{base}/services/T000/B000/{TOKEN}"),
                channel: Some("#deploys".into()),
                username: Some("sluice".into()),
            },
        ),
        (
            "msteams",
            Sink::MsTeams {
                address: format!("{base}/webhookb2/{TOKEN}"),
            },
        ),
        (
            "discord",
            Sink::Discord {
                address: format!("{base}/api/webhooks/123/{TOKEN}"),
                username: Some("sluice".into()),
            },
        ),
        (
            "googlechat",
            Sink::GoogleChat {
                address: format!("{base}/v1/spaces/AAA/messages?key=k&token={TOKEN}"),
            },
        ),
        (
            "webhook",
            Sink::Webhook {
                address: format!("{base}/hooks/{TOKEN}"),
                hmac_key: Some(b"s3cr3t-hmac-key".to_vec()),
            },
        ),
        (
            "alertmanager",
            Sink::Alertmanager {
                address: format!("{base}/"),
            },
        ),
    ]
}

fn view(req: &Request) -> Value {
    json!({"url": req.url, "headers": req.headers, "body": req.body})
}

#[test]
fn payload_snapshots() {
    for (kind, sink) in sinks("https://hooks.example.com") {
        for (case, n) in [("firing", firing()), ("promoted", promoted())] {
            let req = request(&sink, &n);
            assert_eq!(req.body_bytes, serde_json::to_vec(&req.body).unwrap());
            insta::assert_json_snapshot!(format!("{kind}_{case}"), view(&req));
        }
    }
}

#[test]
fn optional_fields_are_omitted() {
    let n = Notification {
        revision: None,
        ..firing()
    };
    let slack = request(
        &Sink::Slack {
            address: "https://hooks.slack.com/services/x".into(),
            channel: None,
            username: None,
        },
        &n,
    );
    assert!(slack.body.get("channel").is_none());
    assert!(slack.body.get("username").is_none());
    assert_eq!(slack.body["attachments"][0]["fields"], json!([]));
    let discord = request(
        &Sink::Discord {
            address: "https://discord.com/api/webhooks/1/x".into(),
            username: None,
        },
        &n,
    );
    assert!(discord.body.get("username").is_none());
    assert!(discord.body["embeds"][0].get("fields").is_none());
    let am = request(
        &Sink::Alertmanager {
            address: "http://127.0.0.1:9093".into(),
        },
        &n,
    );
    assert_eq!(am.url, "http://127.0.0.1:9093/api/v2/alerts");
    assert!(am.body[0]["labels"].get("revision").is_none());
    let webhook = request(
        &Sink::Webhook {
            address: "https://example.com/hook".into(),
            hmac_key: None,
        },
        &n,
    );
    let names: Vec<&str> = webhook.headers.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(names, ["Content-Type", "X-Sluice-Delivery"]);
}

#[test]
fn webhook_body_is_the_notification_plus_source() {
    for n in [
        firing(),
        promoted(),
        Notification {
            revision: None,
            severity: Severity::Warn,
            ..firing()
        },
    ] {
        let body = payload::webhook(&n);
        let mut expected = serde_json::to_value(&n).unwrap();
        expected
            .as_object_mut()
            .unwrap()
            .insert("source".into(), "sluice".into());
        assert_eq!(body, expected);
        let mut back = body.clone();
        back.as_object_mut().unwrap().remove("source");
        assert_eq!(serde_json::from_value::<Notification>(back).unwrap(), n);
    }
}

#[test]
fn alertmanager_resolve_uses_the_firing_labels() {
    let sink = Sink::Alertmanager {
        address: "http://127.0.0.1:9093".into(),
    };
    let fire = request(&sink, &firing());
    let resolve = request(
        &sink,
        &Notification {
            revision: firing().revision,
            severity: firing().severity,
            ..promoted()
        },
    );
    assert_eq!(fire.body[0]["labels"], resolve.body[0]["labels"]);
    assert_eq!(
        fire.body[0]["labels"]["alertname"],
        "SluiceRolloutRolledBack"
    );
    assert!(fire.body[0].get("endsAt").is_none());
    assert_eq!(resolve.body[0]["endsAt"], resolve.body[0]["startsAt"]);
    assert_eq!(resolve.body[0]["endsAt"], "2026-11-25T09:30:00Z");
    assert!(resolve.body[0].get("generatorURL").is_none());
}

#[test]
fn hmac_and_hex() {
    assert_eq!(sign::to_hex(&[0x00, 0xff, 0x0a, 0xb7]), "00ff0ab7");
    // RFC 4231 test case 2.
    assert_eq!(
        sign::hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn debug_and_name_hide_secrets() {
    for (_, sink) in sinks("https://user:pw@hooks.example.com:8443") {
        let debug = format!("{sink:?}");
        let name = sink.name();
        for text in [&debug, &name] {
            assert!(!text.contains(TOKEN), "{text}");
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(!text.contains("pw"), "{text}");
        }
        assert_eq!(name, format!("{} (hooks.example.com:8443)", sink.kind()));
        let req = request(&sink, &firing());
        assert!(!format!("{req:?}").contains(TOKEN));
    }
    assert_eq!(
        Sink::GoogleChat {
            address: "not a url".into()
        }
        .name(),
        "googlechat (<invalid address>)"
    );
}

// ---- delivery against a local receiver ----

#[derive(Debug)]
struct Captured {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// An HTTP server on 127.0.0.1:0 answering every request with `status` and `reply` after `delay`, sending what it
/// received on the channel.
async fn receiver(
    status: StatusCode,
    reply: String,
    delay: Duration,
) -> (SocketAddr, mpsc::UnboundedReceiver<Captured>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let tx = tx.clone();
        let reply = reply.clone();
        async move {
            let _ = tx.send(Captured { uri, headers, body });
            tokio::time::sleep(delay).await;
            (status, reply)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx)
}

fn deliverer(timeout: Duration) -> Deliverer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Deliverer::new(timeout, None).unwrap()
}

#[tokio::test]
async fn deliver_sends_the_exact_request() {
    let (addr, mut rx) = receiver(StatusCode::OK, "ok".into(), Duration::ZERO).await;
    let d = deliverer(Duration::from_secs(5));
    for (kind, sink) in sinks(&format!("http://{addr}")) {
        for n in [firing(), promoted()] {
            d.deliver(&sink, &n).await.unwrap();
            let got = rx.recv().await.unwrap();
            let want = request(&sink, &n);
            assert_eq!(got.body.as_ref(), want.body_bytes.as_slice(), "{kind}");
            assert_eq!(format!("http://{addr}{}", got.uri), want.url, "{kind}");
            for (header, value) in &want.headers {
                assert_eq!(
                    got.headers[header.as_str()],
                    value.as_str(),
                    "{kind} {header}"
                );
            }
        }
    }
}

#[tokio::test]
async fn webhook_signature_verifies_over_the_received_bytes() {
    let (addr, mut rx) = receiver(StatusCode::NO_CONTENT, String::new(), Duration::ZERO).await;
    let key = b"another key".to_vec();
    let sink = Sink::Webhook {
        address: format!("http://{addr}/hooks/{TOKEN}?x=1"),
        hmac_key: Some(key.clone()),
    };
    deliverer(Duration::from_secs(5))
        .deliver(&sink, &firing())
        .await
        .unwrap();
    let got = rx.recv().await.unwrap();
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.headers["x-sluice-delivery"], firing().id.as_str());
    let signature = got.headers["x-sluice-signature"].to_str().unwrap();
    let hex = signature.strip_prefix("sha256=").unwrap();
    assert_eq!(hex.len(), 64);
    assert!(
        hex.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    );
    let mac: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let verify_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    ring::hmac::verify(&verify_key, &got.body, &mac).unwrap();
    assert!(ring::hmac::verify(&verify_key, b"{}", &mac).is_err());
    let received: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(received["source"], "sluice");
    assert_eq!(received["rollout"], "podinfo");
}

#[tokio::test]
async fn non_2xx_is_rejected_without_leaking_the_token() {
    let (addr, _rx) = receiver(
        StatusCode::INTERNAL_SERVER_ERROR,
        "é".repeat(500),
        Duration::ZERO,
    )
    .await;
    let sink = Sink::Slack {
        address: format!("http://{addr}/services/T000/B000/{TOKEN}"),
        channel: None,
        username: None,
    };
    let err = deliverer(Duration::from_secs(5))
        .deliver(&sink, &firing())
        .await
        .unwrap_err();
    let DeliveryError::Rejected {
        sink: name,
        status,
        body,
    } = &err
    else {
        panic!("expected Rejected, got {err:?}");
    };
    assert_eq!(name, &format!("slack ({addr})"));
    assert_eq!(*status, 500);
    assert_eq!(body.chars().count(), 200);
    assert!(!err.to_string().contains(TOKEN), "{err}");
    assert!(!format!("{err:?}").contains(TOKEN));
}

#[tokio::test]
async fn redirect_is_rejected_not_followed() {
    let (addr, mut rx) = receiver(
        StatusCode::TEMPORARY_REDIRECT,
        String::new(),
        Duration::ZERO,
    )
    .await;
    let sink = Sink::GoogleChat {
        address: format!("http://{addr}/v1/spaces/AAA/messages?token={TOKEN}"),
    };
    let err = deliverer(Duration::from_secs(5))
        .deliver(&sink, &firing())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeliveryError::Rejected { status: 307, .. }),
        "{err:?}"
    );
    rx.recv().await.unwrap();
    assert!(rx.try_recv().is_err(), "the redirect was followed");
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let d = deliverer(Duration::from_secs(5));
    for (_, sink) in sinks(&format!("http://{addr}")) {
        let err = d.deliver(&sink, &firing()).await.unwrap_err();
        assert!(
            matches!(&err, DeliveryError::Unreachable { sink: name, .. } if name == &sink.name()),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(!text.contains(TOKEN), "{text}");
        assert!(
            !text.contains("/services/") && !text.contains("/hooks/"),
            "{text}"
        );
        assert!(!format!("{err:?}").contains(TOKEN));
    }
}

#[tokio::test]
async fn slow_sink_times_out_as_unreachable() {
    let (addr, _rx) = receiver(StatusCode::OK, String::new(), Duration::from_secs(10)).await;
    let sink = Sink::Discord {
        address: format!("http://{addr}/api/webhooks/1/{TOKEN}"),
        username: None,
    };
    let err = deliverer(Duration::from_millis(300))
        .deliver(&sink, &firing())
        .await
        .unwrap_err();
    let DeliveryError::Unreachable { reason, .. } = &err else {
        panic!("expected Unreachable, got {err:?}");
    };
    assert!(
        reason.contains("timed out") || reason.contains("timeout"),
        "{reason}"
    );
    assert!(!err.to_string().contains(TOKEN));
}

#[tokio::test]
async fn bad_addresses_and_proxies_are_reported() {
    let d = deliverer(Duration::from_secs(1));
    for address in ["not a url", "ftp://example.com/x"] {
        let err = d
            .deliver(
                &Sink::MsTeams {
                    address: address.into(),
                },
                &firing(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, DeliveryError::InvalidAddress { .. }),
            "{err:?}"
        );
    }
    let err = d
        .deliver(
            &Sink::Webhook {
                address: "http://127.0.0.1:9/hook".into(),
                hmac_key: None,
            },
            &Notification {
                id: "bad\nid".into(),
                ..firing()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeliveryError::InvalidRequest { .. }),
        "{err:?}"
    );
    let err = Deliverer::new(Duration::from_secs(1), Some("http://user:hunter2@[::1")).unwrap_err();
    assert!(matches!(err, DeliveryError::Client { .. }), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(Deliverer::new(Duration::from_secs(1), Some("http://proxy.corp:3128")).is_ok());
}
