//! The HTTP face of the sandbox: parses Kubernetes API paths and query parameters, calls the store, and
//! streams watches. Everything stateful lives in [`crate::store`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::discovery;
use crate::registry::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{
    DeleteOptions, EventType, PatchType, Propagation, Store, WatchEvent, WriteOptions,
};
use crate::table::{self, IncludeObject};

/// Tunables of a sandbox instance.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Delay before a Deployment or StatefulSet reports its replicas ready.
    pub ready_delay: Duration,
    /// Watch events kept for replay; older resourceVersions get 410 Gone.
    pub history_limit: usize,
    /// How often an idle watch that allows bookmarks receives one.
    pub bookmark_interval: Duration,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            ready_delay: Duration::from_millis(300),
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// Counts write requests and keeps the latest [`WriteLog::KEEP`] of them.
#[derive(Clone, Debug, Default)]
pub struct WriteLog {
    pub total: u64,
    pub recent: std::collections::VecDeque<String>,
}

impl WriteLog {
    const KEEP: usize = 1000;

    fn record(&mut self, request: String) {
        self.total += 1;
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(request);
    }
}

pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub config: SandboxConfig,
    pub address: String,
    /// Write requests (POST, PUT, PATCH, DELETE) served, for tests that count writes: the total and the
    /// most recent ones.
    pub writes: Mutex<WriteLog>,
    /// Flips to true when the sandbox stops, ending open watches.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// The store; a panic elsewhere must not turn every later request into a 500.
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store(&self) -> Result<MutexGuard<'_, Store>, ApiError> {
        Ok(self.lock())
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(err: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &err.to_status(),
    )
}

fn not_found_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Query parameters as a map (last value wins, which is what the API server does for these).
fn parse_query(raw: Option<&str>) -> HashMap<String, String> {
    raw.map(|q| {
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    })
    .unwrap_or_default()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request for a resource, resolved from its path.
struct Target {
    ty: Arc<ResourceType>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    body: Bytes,
) -> Response {
    let query = parse_query(raw_query.as_deref());
    let path = uri.path().trim_end_matches('/').to_owned();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("");
    let body = if !body.is_empty() && content_type.contains("protobuf") {
        match crate::protobuf::decode(&body) {
            Ok(obj) => Bytes::from(obj.to_string()),
            Err(why) => return error_response(&ApiError::new(415, "UnsupportedMediaType", why)),
        }
    } else {
        body
    };
    tracing::debug!(%method, path, ?raw_query, "request");
    if method != Method::GET && !path.starts_with("/sandbox") {
        shared
            .writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(format!("{method} {path}"));
    }
    match serve(&shared, &method, &path, &headers, &query, &body).await {
        Ok(response) => response,
        Err(err) => {
            tracing::debug!(%method, path, %err, "request failed");
            error_response(&err)
        }
    }
}

async fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let segments: Vec<&str> = path
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let store = || shared.store();
    match segments.as_slice() {
        ["healthz"] | ["livez"] | ["readyz"] => return Ok((StatusCode::OK, "ok").into_response()),
        ["sandbox", "writes"] => {
            let writes = shared
                .writes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            return Ok(json_response(
                StatusCode::OK,
                &json!({"count": writes.total, "recent": writes.recent}),
            ));
        }
        ["version"] => return Ok(json_response(StatusCode::OK, &discovery::version())),
        ["api"] => {
            return Ok(json_response(
                StatusCode::OK,
                &discovery::core_versions(&shared.address),
            ));
        }
        ["apis"] => {
            return Ok(json_response(
                StatusCode::OK,
                &discovery::group_list(store()?.registry()),
            ));
        }
        ["apis", group] => {
            let doc = discovery::group(store()?.registry(), group).ok_or_else(not_found_path)?;
            return Ok(json_response(StatusCode::OK, &doc));
        }
        ["openapi", "v3"] => {
            return Ok(json_response(
                StatusCode::OK,
                &discovery::openapi_v3_index(store()?.registry()),
            ));
        }
        ["openapi", "v3", rest @ ..] => {
            let (group, version) = match rest {
                ["api", version] => ("", *version),
                ["apis", group, version] => (*group, *version),
                _ => return Err(not_found_path()),
            };
            let doc = discovery::openapi_v3_group_version(store()?.registry(), group, version)
                .ok_or_else(not_found_path)?;
            return Ok(json_response(StatusCode::OK, &doc));
        }
        _ => {}
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found_path()),
    };
    if rest.is_empty() {
        let doc = discovery::resource_list(store()?.registry(), group, version)
            .ok_or_else(not_found_path)?;
        return Ok(json_response(StatusCode::OK, &doc));
    }
    let target = {
        let store = store()?;
        let registry = store.registry();
        let lookup = |plural: &str| registry.get(group, version, plural);
        let namespaced = match rest {
            ["namespaces", ns, plural, tail @ ..] => lookup(plural)
                .filter(|t| t.namespaced)
                .map(|ty| (ty, Some(*ns), tail)),
            _ => None,
        };
        let (ty, namespace, tail) = match namespaced {
            Some(found) => found,
            None => {
                let ty = lookup(rest[0]).ok_or_else(not_found_path)?;
                (ty, None, &rest[1..])
            }
        };
        if tail.len() > 2 {
            return Err(not_found_path());
        }
        let subresource = tail.get(1).map(|s| s.to_string());
        match subresource.as_deref() {
            None => {}
            Some("status") if ty.status_subresource => {}
            Some("scale") if ty.scale_subresource => {}
            Some(_) => return Err(not_found_path()),
        }
        Target {
            ty,
            namespace: namespace.map(str::to_owned),
            name: tail.first().map(|s| s.to_string()),
            subresource,
        }
    };
    let opts = WriteOptions {
        dry_run: query.get("dryRun").is_some_and(|v| v == "All"),
        field_manager: query.get("fieldManager").cloned(),
        strict: query.get("fieldValidation").is_some_and(|v| v == "Strict"),
    };
    let ns = target.namespace.clone().unwrap_or_default();
    let ty = target.ty.clone();
    let wants_table = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let include = IncludeObject::parse(query.get("includeObject").map(String::as_str));
    match (method, target.name.as_deref()) {
        (&Method::GET, None) => {
            let selection = Selection::from_query(query, target.namespace.clone())?;
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(
                    shared.clone(),
                    ty,
                    selection,
                    query,
                    wants_table.then_some(include),
                );
            }
            let store = store()?;
            let items: Vec<Value> = store
                .list(&ty, target.namespace.as_deref())
                .into_iter()
                .filter(|o| selection.matches(o))
                .collect();
            let rv = store.resource_version();
            if wants_table {
                return Ok(json_response(
                    StatusCode::OK,
                    &table::table(&ty, &items, rv, include),
                ));
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "kind": ty.list_kind, "apiVersion": ty.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}, "items": items,
                }),
            ))
        }
        (&Method::GET, Some(name)) => {
            let store = store()?;
            let obj = store.get(&ty, &ns, name)?;
            if target.subresource.as_deref() == Some("scale") {
                return Ok(json_response(StatusCode::OK, &scale_of(&obj)));
            }
            if wants_table {
                let rv = store.resource_version();
                return Ok(json_response(
                    StatusCode::OK,
                    &table::table(&ty, &[obj], rv, include),
                ));
            }
            Ok(json_response(StatusCode::OK, &obj))
        }
        (&Method::POST, None) => {
            let obj = parse_json(body)?;
            let created = store()?.create(&ty, &ns, obj, &opts)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (&Method::PUT, Some(name)) => {
            let obj = parse_json(body)?;
            let mut store = store()?;
            if target.subresource.as_deref() == Some("scale") {
                let replicas = obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
                let mut current = store.get(&ty, &ns, name)?;
                set_replicas(&mut current, replicas)?;
                let updated = store.update(&ty, &ns, name, current, None, &opts)?;
                return Ok(json_response(StatusCode::OK, &scale_of(&updated)));
            }
            let updated =
                store.update(&ty, &ns, name, obj, target.subresource.as_deref(), &opts)?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        (&Method::PATCH, Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or("");
            let patch_type = match content_type.split(';').next().unwrap_or("").trim() {
                "application/json-patch+json" => PatchType::Json,
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    PatchType::Apply {
                        force: query.get("force").is_some_and(|f| f == "true"),
                    }
                }
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format ({other:?}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
                        ),
                    ));
                }
            };
            let patch = match patch_type {
                PatchType::Apply { .. } => parse_yaml(body)?,
                _ => parse_json(body)?,
            };
            let mut store = store()?;
            if target.subresource.as_deref() == Some("scale") {
                let current = store.get(&ty, &ns, name)?;
                let scaled = match patch_type {
                    PatchType::Json => crate::merge::json_patch(&scale_of(&current), &patch)
                        .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?,
                    _ => crate::merge::merge_patch(&scale_of(&current), &patch),
                };
                let mut updated = current.clone();
                let replicas = scaled
                    .pointer("/spec/replicas")
                    .cloned()
                    .unwrap_or(json!(0));
                set_replicas(&mut updated, replicas)?;
                let updated = store.update(&ty, &ns, name, updated, None, &opts)?;
                return Ok(json_response(StatusCode::OK, &scale_of(&updated)));
            }
            let (obj, created) = store.patch(
                &ty,
                &ns,
                name,
                &patch_type,
                &patch,
                target.subresource.as_deref(),
                &opts,
            )?;
            Ok(json_response(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &obj,
            ))
        }
        (&Method::DELETE, Some(name)) => {
            let delete_opts = delete_options(query, body)?;
            let deleted = store()?.delete(&ty, &ns, name, &delete_opts)?;
            Ok(json_response(StatusCode::OK, &deleted))
        }
        (&Method::DELETE, None) => {
            let delete_opts = delete_options(query, body)?;
            let selection = Selection::from_query(query, target.namespace.clone())?;
            let mut store = store()?;
            let victims: Vec<Value> = store
                .list(&ty, target.namespace.as_deref())
                .into_iter()
                .filter(|o| selection.matches(o))
                .collect();
            let mut deleted = Vec::new();
            for victim in victims {
                let victim_ns = victim
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let victim_name = victim
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                deleted.push(store.delete(&ty, &victim_ns, &victim_name, &delete_opts)?);
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": ty.list_kind, "apiVersion": ty.api_version(),
                        "metadata": {"resourceVersion": store.resource_version().to_string()}, "items": deleted}),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn parse_yaml(body: &Bytes) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8"))?;
    serde_saphyr::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}")))
}

fn delete_options(
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        parse_json(body)?
    };
    let propagation = query
        .get("propagationPolicy")
        .map(String::as_str)
        .or_else(|| body.get("propagationPolicy").and_then(Value::as_str));
    let orphan = body.get("orphanDependents").and_then(Value::as_bool) == Some(true);
    let propagation = match propagation {
        Some("Foreground") => Propagation::Foreground,
        Some("Orphan") => Propagation::Orphan,
        _ if orphan => Propagation::Orphan,
        _ => Propagation::Background,
    };
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All")
        || body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    Ok(DeleteOptions {
        propagation,
        precondition_uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned),
        precondition_rv: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned),
        dry_run,
    })
}

/// Writes `spec.replicas` for a scale request, refusing objects whose spec is not an object.
fn set_replicas(obj: &mut Value, replicas: Value) -> Result<(), ApiError> {
    if !replicas.is_u64() {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!("spec.replicas: Invalid value: {replicas}: must be a non-negative integer"),
        ));
    }
    let spec = obj
        .as_object_mut()
        .map(|o| o.entry("spec").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| {
            ApiError::new(
                422,
                "Invalid",
                "spec: Invalid value: the object has no spec to scale",
            )
        })?;
    spec.insert("replicas".into(), replicas);
    Ok(())
}

/// The `autoscaling/v1` Scale view of a workload.
fn scale_of(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"), "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": selector},
    })
}

/// Which objects a list or watch covers.
struct Selection {
    labels: LabelSelector,
    fields: FieldSelector,
    namespace: Option<String>,
}

impl Selection {
    fn from_query(
        query: &HashMap<String, String>,
        namespace: Option<String>,
    ) -> Result<Selection, ApiError> {
        let param = |name: &str| query.get(name).map(String::as_str).unwrap_or("");
        Ok(Selection {
            labels: LabelSelector::parse(param("labelSelector"))?,
            fields: FieldSelector::parse(param("fieldSelector"))?,
            namespace,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let in_namespace = self.namespace.as_deref().is_none_or(|ns| {
            obj.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .is_none_or(|o| o == ns)
        });
        in_namespace
            && self.labels.matches(obj.pointer("/metadata/labels"))
            && self.fields.matches(obj)
    }

    /// What a watcher of this selection sees for a change: moves across the selector become ADDED/DELETED.
    fn view(&self, ty: &ResourceType, event: &WatchEvent) -> Option<(EventType, Value)> {
        if event.key != ty.key()
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| ty.namespaced && ns != event.namespace)
        {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.prev.as_ref().is_some_and(|p| self.matches(p));
        let type_ = match (event.type_, before, now) {
            (EventType::Modified, true, true) => EventType::Modified,
            (EventType::Modified, false, true) => EventType::Added,
            (EventType::Modified, true, false) => EventType::Deleted,
            (other, _, true) => other,
            _ => return None,
        };
        let mut object = event.object.clone();
        object["apiVersion"] = json!(ty.api_version());
        object["kind"] = json!(ty.kind);
        Some((type_, object))
    }
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch(
    shared: Arc<Shared>,
    ty: Arc<ResourceType>,
    selection: Selection,
    query: &HashMap<String, String>,
    table_mode: Option<IncludeObject>,
) -> Result<Response, ApiError> {
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let send_initial = query.get("sendInitialEvents").is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let requested_rv = query.get("resourceVersion").cloned().unwrap_or_default();
    // Subscribing and reading the starting point under one lock means no event is missed or repeated.
    let (initial, mut events, mut last_rv) = {
        let store = shared.store()?;
        let events = store.subscribe();
        let current_rv = store.resource_version();
        let initial: Vec<(EventType, Value)> = if requested_rv.is_empty()
            || requested_rv == "0"
            || send_initial
        {
            store
                .list(&ty, selection.namespace.as_deref())
                .into_iter()
                .filter(|o| selection.matches(o))
                .map(|o| (EventType::Added, o))
                .collect()
        } else {
            let rv = requested_rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {requested_rv:?}"))
            })?;
            if rv > current_rv {
                return Err(ApiError {
                    details: json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
                    ..ApiError::new(
                        504,
                        "Timeout",
                        format!("Too large resource version: {rv}, current: {current_rv}"),
                    )
                });
            }
            match store.events_since(rv) {
                Ok(events) => events
                    .iter()
                    .filter_map(|e| selection.view(&ty, e))
                    .collect(),
                Err(gone) => {
                    // A real API server answers 200 and reports the expiry as the only event.
                    let line = event_line("ERROR", &gone.to_status());
                    return Ok(stream_response(futures::stream::once(
                        async move { Ok(line) },
                    )));
                }
            }
        };
        (initial, events, current_rv)
    };
    let bookmark_interval = shared
        .config
        .bookmark_interval
        .max(Duration::from_millis(10));
    let mut stopping = shared.stopping.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let render = |type_: EventType, object: Value, rv: u64| match table_mode {
            Some(include) => event_line(type_.as_str(), &table::table(&ty, &[object], rv, include)),
            None => event_line(type_.as_str(), &object),
        };
        let bookmark = |rv: u64, initial_end: bool| {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            event_line(
                "BOOKMARK",
                &json!({"kind": ty.kind, "apiVersion": ty.api_version(), "metadata": metadata}),
            )
        };
        for (type_, object) in initial {
            if tx.send(render(type_, object, last_rv)).await.is_err() {
                return;
            }
        }
        if send_initial && bookmarks && tx.send(bookmark(last_rv, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = stopping.changed() => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
                event = events.recv() => match event {
                    Ok(event) => {
                        last_rv = event.rv;
                        if let Some((type_, object)) = selection.view(&ty, &event)
                            && tx.send(render(type_, object, last_rv)).await.is_err() {
                                return;
                            }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let gone = ApiError::gone("the watch fell behind; list again and restart the watch");
                        let _ = tx.send(event_line("ERROR", &gone.to_status())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok(line), rx))
    });
    Ok(stream_response(stream))
}

fn stream_response<S>(stream: S) -> Response
where
    S: futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Starts serving on `listener` until `shutdown` resolves.
pub(crate) async fn serve_until(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let kubelet = tokio::spawn(crate::kubelet::run(shared.clone()));
    // Not a graceful shutdown: open watches would hold it for their whole timeout.
    let result = tokio::select! {
        result = axum::serve(listener, router(shared)) => result,
        () = shutdown => Ok(()),
    };
    kubelet.abort();
    result
}
