//! The OPA-compatible bundle server of `sluice operator` (`--bundle-addr`): `GET /bundles/<namespace>/<name>`
//! with ETag, `If-None-Match` → 304 and long polling (`Prefer: wait=N`), so stock OPA sidecars and
//! `sluice authz` pick up a new revision the moment the controller publishes it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

/// Content type OPA expects from a server that supports long polling.
pub const LONG_POLL_CONTENT_TYPE: &str = "application/vnd.openpolicyagent.bundles";
/// Longest a request may wait for a new revision, whatever the client asks.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// One published revision of a policy's bundle.
#[derive(Debug, PartialEq, Eq)]
pub struct ServedBundle {
    pub revision: String,
    pub bytes: Bytes,
}

impl ServedBundle {
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.revision)
    }
}

type Slot = watch::Sender<Option<Arc<ServedBundle>>>;

/// The bundles the controller publishes, keyed by `namespace/name`; each key has a watch channel that
/// wakes long-polling requests.
#[derive(Clone, Default)]
pub struct BundleStore {
    slots: Arc<RwLock<HashMap<String, Slot>>>,
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl BundleStore {
    /// Makes `bundle` the served revision of `namespace/name`. Returns false when that revision was
    /// already served (nothing changes and no waiter is woken).
    pub fn publish(&self, namespace: &str, name: &str, bundle: ServedBundle) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .entry(key(namespace, name))
            .or_insert_with(|| watch::Sender::new(None));
        slot.send_if_modified(|current| {
            if current.as_ref().map(|c| &c.revision) == Some(&bundle.revision) {
                return false;
            }
            *current = Some(Arc::new(bundle));
            true
        })
    }

    /// The revision served for `namespace/name`, if any.
    pub fn current(&self, namespace: &str, name: &str) -> Option<Arc<ServedBundle>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .get(&key(namespace, name))
            .and_then(|s| s.borrow().clone())
    }

    /// Stops serving `namespace/name`; waiting requests get 404.
    pub fn remove(&self, namespace: &str, name: &str) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.remove(&key(namespace, name)) {
            slot.send_replace(None);
        }
    }

    fn subscribe(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<watch::Receiver<Option<Arc<ServedBundle>>>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .get(&key(namespace, name))
            .map(watch::Sender::subscribe)
    }

    /// Number of bundles served (for metrics and tests).
    pub fn len(&self) -> usize {
        self.slots.read().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `wait=N` preference of a `Prefer` header (`modes=snapshot,delta;wait=300`), capped at [`MAX_WAIT`].
pub fn requested_wait(prefer: Option<&str>) -> Option<Duration> {
    let prefer = prefer?;
    let seconds = prefer
        .split([';', ','])
        .filter_map(|part| part.trim().strip_prefix("wait="))
        .find_map(|value| value.trim().parse::<u64>().ok())?;
    Some(Duration::from_secs(seconds).min(MAX_WAIT))
}

/// Whether an `If-None-Match` header names `etag` (weak validators and lists included).
pub fn etag_matches(if_none_match: Option<&str>, etag: &str) -> bool {
    let Some(header) = if_none_match else {
        return false;
    };
    let bare = etag.trim_matches('"');
    header.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.trim_start_matches("W/").trim_matches('"') == bare
    })
}

/// Routes of the bundle server.
pub fn router(store: BundleStore) -> Router {
    Router::new()
        .route("/bundles/{namespace}/{name}", get(get_bundle))
        .with_state(store)
}

/// Serves the bundle store on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, store: BundleStore) {
    if let Err(err) = axum::serve(listener, router(store)).await {
        tracing::error!(error = %err, "bundle server stopped");
    }
}

async fn get_bundle(
    State(store): State<BundleStore>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    let wait = requested_wait(headers.get("prefer").and_then(|v| v.to_str().ok()));
    let Some(mut updates) = store.subscribe(&namespace, &name) else {
        return not_found(&namespace, &name);
    };
    let mut current = updates.borrow_and_update().clone();
    if let (Some(bundle), Some(wait)) = (&current, wait)
        && etag_matches(if_none_match, &bundle.etag())
    {
        // Long poll: answer as soon as the revision changes, or 304 when the wait is over.
        let changed = tokio::time::timeout(wait, updates.changed()).await;
        if let Ok(Ok(())) = changed {
            current = updates.borrow_and_update().clone();
        }
    }
    let Some(bundle) = current else {
        return not_found(&namespace, &name);
    };
    let content_type = if wait.is_some() {
        LONG_POLL_CONTENT_TYPE
    } else {
        "application/gzip"
    };
    let etag = bundle.etag();
    let mut response = if etag_matches(if_none_match, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, bundle.bytes.clone()).into_response()
    };
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response_headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&bundle.revision) {
        response_headers.insert("x-sluice-revision", value);
    }
    response
}

fn not_found(namespace: &str, name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "no bundle for AuthorizationPolicy {namespace}/{name}: it does not exist or has no revision that compiled and passed its tests\n"
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_read_from_opa_prefer_headers() {
        assert_eq!(
            requested_wait(Some("modes=snapshot,delta;wait=30")),
            Some(Duration::from_secs(30))
        );
        assert_eq!(requested_wait(Some("wait=5")), Some(Duration::from_secs(5)));
        assert_eq!(requested_wait(Some("modes=snapshot")), None);
        assert_eq!(requested_wait(Some("wait=soon")), None);
        assert_eq!(requested_wait(None), None);
        assert_eq!(requested_wait(Some("wait=86400")), Some(MAX_WAIT));
    }

    #[test]
    fn etags_match_quoted_weak_and_listed_forms() {
        assert!(etag_matches(Some("\"abc\""), "\"abc\""));
        assert!(etag_matches(Some("abc"), "\"abc\""));
        assert!(etag_matches(Some("W/\"abc\""), "\"abc\""));
        assert!(etag_matches(Some("\"x\", \"abc\""), "\"abc\""));
        assert!(etag_matches(Some("*"), "\"abc\""));
        assert!(!etag_matches(Some("\"abd\""), "\"abc\""));
        assert!(!etag_matches(None, "\"abc\""));
    }

    fn bundle(revision: &str) -> ServedBundle {
        ServedBundle {
            revision: revision.into(),
            bytes: Bytes::from(revision.as_bytes().to_vec()),
        }
    }

    #[test]
    fn publishing_the_same_revision_changes_nothing() {
        let store = BundleStore::default();
        assert!(store.publish("ns", "p", bundle("r1")));
        assert!(!store.publish("ns", "p", bundle("r1")));
        assert!(store.publish("ns", "p", bundle("r2")));
        assert_eq!(
            store.current("ns", "p").map(|b| b.revision.clone()),
            Some("r2".into())
        );
        store.remove("ns", "p");
        assert!(store.current("ns", "p").is_none());
        assert!(store.is_empty());
    }

    async fn start(store: BundleStore) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, store));
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn serves_etag_304_and_wakes_long_polls() {
        let store = BundleStore::default();
        store.publish("shop", "authz", bundle("r1"));
        let base = start(store.clone()).await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let url = format!("{base}/bundles/shop/authz");

        let first = client.get(&url).send().await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(first.headers()["etag"], "\"r1\"");
        assert_eq!(first.headers()["content-type"], "application/gzip");
        assert_eq!(first.bytes().await.unwrap().as_ref(), b"r1");

        let unchanged = client
            .get(&url)
            .header("if-none-match", "\"r1\"")
            .send()
            .await
            .unwrap();
        assert_eq!(unchanged.status(), 304);

        // A long poll with a short wait and no change ends in 304 with the long-poll content type.
        let waited = client
            .get(&url)
            .header("if-none-match", "\"r1\"")
            .header("prefer", "modes=snapshot;wait=1")
            .send()
            .await
            .unwrap();
        assert_eq!(waited.status(), 304);
        assert_eq!(waited.headers()["content-type"], LONG_POLL_CONTENT_TYPE);

        // A long poll is answered as soon as a new revision is published.
        let poll = tokio::spawn({
            let client = client.clone();
            let url = url.clone();
            async move {
                let started = std::time::Instant::now();
                let response = client
                    .get(&url)
                    .header("if-none-match", "\"r1\"")
                    .header("prefer", "modes=snapshot;wait=30")
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let etag = response.headers()["etag"].to_str().unwrap().to_owned();
                (
                    status,
                    etag,
                    response.bytes().await.unwrap(),
                    started.elapsed(),
                )
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        store.publish("shop", "authz", bundle("r2"));
        let (status, etag, body, elapsed) = poll.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(etag, "\"r2\"");
        assert_eq!(body.as_ref(), b"r2");
        assert!(
            elapsed < Duration::from_secs(10),
            "long poll took {elapsed:?}"
        );

        let missing = client
            .get(format!("{base}/bundles/shop/other"))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
    }
}
