//! The sandbox's object store: every write goes through here, so resourceVersion, generation, finalizers,
//! validation, garbage collection and the watch history behave the same whichever endpoint was used.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::merge::{self, MergeError};
use crate::registry::{Registry, ResourceType, TypeKey, crd_status};
use crate::status::ApiError;

/// Kind of change a watch event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change, kept in the history that watches replay from.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub key: TypeKey,
    pub namespace: String,
    pub type_: EventType,
    pub object: Value,
    /// The object before the change, so selector-filtered watches can turn moves into ADDED/DELETED.
    pub prev: Option<Value>,
}

/// Options common to writes.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_manager: Option<String>,
    /// `fieldValidation=Strict`: unknown fields are errors instead of being dropped.
    pub strict: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply { force: bool },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub propagation: Propagation,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

type ObjectMap = BTreeMap<(String, String), Value>;

pub struct Store {
    registry: Registry,
    objects: HashMap<TypeKey, ObjectMap>,
    /// uid → where the object lives, for ownerReference garbage collection.
    uids: HashMap<String, (TypeKey, String, String)>,
    rv: u64,
    history: VecDeque<Arc<WatchEvent>>,
    history_limit: usize,
    /// Events at or below this resourceVersion are no longer replayable (410 Gone).
    compacted_rv: u64,
    events: broadcast::Sender<Arc<WatchEvent>>,
    next_uid: u64,
    uid_salt: u64,
    next_cluster_ip: u32,
    /// uids whose removal is in progress, so ownerReference cycles cannot recurse forever.
    removing: std::collections::HashSet<String>,
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

const NAME_RULE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

/// RBAC objects only need a valid path segment (`system:controller:x` is a valid ClusterRole name).
fn valid_path_segment(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%'])
}

fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata").and_then(Value::as_object_mut) {
        Some(m) => m,
        None => unreachable!("metadata was just made an object"),
    }
}

/// The part of an object whose change bumps `metadata.generation`.
fn generation_relevant(ty: &ResourceType, obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
        if ty.status_subresource {
            map.remove("status");
        }
    }
    copy
}

/// Equality that ignores bookkeeping the server rewrites on every write.
fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            // Ownership changes are real changes; only their timestamps are not.
            if let Some(entries) = m.get_mut("managedFields").and_then(Value::as_array_mut) {
                for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
                    entry.remove("time");
                }
            }
        }
        v
    };
    strip(a) == strip(b)
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        let (events, _) = broadcast::channel(4096);
        let uid_salt = jiff::Timestamp::now().as_nanosecond() as u64 & 0xffff_ffff;
        let mut store = Store {
            registry: Registry::with_builtins(),
            objects: HashMap::new(),
            uids: HashMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted_rv: 0,
            events,
            next_uid: 0,
            uid_salt,
            next_cluster_ip: 1,
            removing: Default::default(),
        };
        if let Some(ns_type) = store.registry.get("", "v1", "namespaces") {
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                if let Err(err) = store.create(&ns_type, "", obj, &WriteOptions::default()) {
                    tracing::error!(namespace = ns, %err, "could not create a default namespace");
                }
            }
        }
        store
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.events.subscribe()
    }

    /// Events after `rv` for a watch, or 410 Gone if they were compacted away.
    pub fn events_since(&self, rv: u64) -> Result<Vec<Arc<WatchEvent>>, ApiError> {
        if rv < self.compacted_rv {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.compacted_rv + 1
            )));
        }
        Ok(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    fn path_for(ty: &ResourceType, namespace: &str) -> String {
        if ty.namespaced {
            namespace.to_owned()
        } else {
            String::new()
        }
    }

    pub fn get(&self, ty: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&ty.key())
            .and_then(|m| m.get(&(Self::path_for(ty, namespace), name.to_owned())))
            .map(|obj| self.served_as(ty, obj))
            .ok_or_else(|| ApiError::not_found(ty, name))
    }

    /// Objects of a type, in one namespace or all, in name order.
    pub fn list(&self, ty: &ResourceType, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .get(&ty.key())
            .map(|m| {
                m.iter()
                    .filter(|((ns, _), _)| {
                        namespace.is_none_or(|want| !ty.namespaced || ns == want)
                    })
                    .map(|(_, obj)| self.served_as(ty, obj))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Custom resources are stored once and served in every version (no conversion webhooks here).
    pub fn served_as(&self, ty: &ResourceType, obj: &Value) -> Value {
        let mut obj = obj.clone();
        obj["apiVersion"] = Value::String(ty.api_version());
        obj["kind"] = Value::String(ty.kind.clone());
        obj
    }

    fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        format!(
            "{:08x}-5a1c-4e00-8000-{:012x}",
            self.uid_salt, self.next_uid
        )
    }

    fn namespace_state(&self, namespace: &str) -> Option<&Value> {
        self.objects
            .get(&TypeKey {
                group: String::new(),
                resource: "namespaces".into(),
            })
            .and_then(|m| m.get(&(String::new(), namespace.to_owned())))
    }

    pub fn create(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        self.create_inner(ty, namespace, obj, opts, None)
    }

    fn create_inner(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        mut obj: Value,
        opts: &WriteOptions,
        managed_fields: Option<Vec<Value>>,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        self.check_kind(ty, &obj)?;
        let namespace = Self::path_for(ty, namespace);
        if ty.namespaced {
            match self.namespace_state(&namespace) {
                None => {
                    return Err(ApiError {
                        details: json!({"name": namespace, "kind": "namespaces"}),
                        ..ApiError::new(
                            404,
                            "NotFound",
                            format!("namespaces \"{namespace}\" not found"),
                        )
                    });
                }
                Some(ns) if ns.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "unable to create new content in namespace {namespace} because it is being terminated"
                        ),
                    ));
                }
                Some(_) => {}
            }
            if let Some(given) =
                meta_str(&obj, "namespace").filter(|n| !n.is_empty() && *n != namespace)
            {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({given}) does not match the namespace sent on the request ({namespace})"
                )));
            }
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(name), _) if !name.is_empty() => name.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{}", self.name_suffix()),
            _ => {
                return Err(ApiError::invalid(
                    ty,
                    "",
                    vec![(
                        "metadata.name".into(),
                        "FieldValueRequired",
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
        };
        let name_ok = if ty.group == "rbac.authorization.k8s.io" {
            valid_path_segment(&name)
        } else {
            valid_name(&name)
        };
        if !name_ok {
            return Err(ApiError::invalid(
                ty,
                &name,
                vec![(
                    "metadata.name".into(),
                    "FieldValueInvalid",
                    format!("Invalid value: \"{name}\": {NAME_RULE}"),
                )],
            ));
        }
        if self
            .objects
            .get(&ty.key())
            .is_some_and(|m| m.contains_key(&(namespace.clone(), name.clone())))
        {
            return Err(ApiError::already_exists(ty, &name));
        }
        let now = now_rfc3339();
        {
            let meta = metadata_mut(&mut obj);
            meta.insert("name".into(), Value::String(name.clone()));
            if ty.namespaced {
                meta.insert("namespace".into(), Value::String(namespace.clone()));
            } else {
                meta.remove("namespace");
            }
            for server_owned in [
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "resourceVersion",
                "selfLink",
            ] {
                meta.remove(server_owned);
            }
            meta.insert("creationTimestamp".into(), Value::String(now.clone()));
            if ty.tracks_generation {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        let uid = self.new_uid();
        metadata_mut(&mut obj).insert("uid".into(), Value::String(uid.clone()));
        if ty.status_subresource
            && ty.plural != "namespaces"
            && let Some(map) = obj.as_object_mut()
        {
            map.remove("status");
        }
        self.apply_builtin_defaults(ty, &mut obj, None);
        let mut obj = self.admit(ty, obj, None, opts.strict)?;
        let managed = match managed_fields {
            Some(fields) => fields,
            None => merge::record_update(None, &obj, &[], Self::manager(opts), &now, None),
        };
        set_managed_fields(&mut obj, managed);
        if ty.plural == "customresourcedefinitions" && ty.group == "apiextensions.k8s.io" {
            self.check_crd(ty, &obj)?;
            obj["status"] = crd_status(&obj, &now);
        }
        if opts.dry_run {
            return Ok(self.served_as(ty, &obj));
        }
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        self.uids
            .insert(uid, (ty.key(), namespace.clone(), name.clone()));
        self.objects
            .entry(ty.key())
            .or_default()
            .insert((namespace.clone(), name), obj.clone());
        self.record(ty, &namespace, EventType::Added, obj.clone(), None);
        if ty.plural == "customresourcedefinitions" && ty.group == "apiextensions.k8s.io" {
            self.register_crd(ty, &obj)?;
        }
        Ok(self.served_as(ty, &obj))
    }

    fn manager(opts: &WriteOptions) -> &str {
        opts.field_manager.as_deref().unwrap_or("unknown")
    }

    fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        self.next_uid += 1;
        let mut n = self.next_uid.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.uid_salt;
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn check_kind(&self, ty: &ResourceType, obj: &Value) -> Result<(), ApiError> {
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or(&ty.kind);
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");
        if kind != ty.kind || (!api_version.is_empty() && group != ty.group) {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({}) or the kind ({kind}) does not match {}",
                ty.api_version(),
                ty.kind
            )));
        }
        Ok(())
    }

    /// Schema validation for custom resources, basic field rules for the built-in kinds kubectl users meet.
    fn admit(
        &self,
        ty: &ResourceType,
        obj: Value,
        old: Option<&Value>,
        strict: bool,
    ) -> Result<Value, ApiError> {
        let name = meta_str(&obj, "name").unwrap_or_default().to_owned();
        let admitted = match &ty.schema {
            Some(schema) => schema.admit(obj, old, strict).map_err(|errors| {
                ApiError::invalid(
                    ty,
                    &name,
                    errors
                        .iter()
                        .map(|e| (e.field.clone(), e.reason(), e.body()))
                        .collect(),
                )
            })?,
            None => obj,
        };
        let causes = builtin_validation(ty, &admitted);
        if causes.is_empty() {
            Ok(admitted)
        } else {
            Err(ApiError::invalid(ty, &name, causes))
        }
    }

    fn check_crd(&self, ty: &ResourceType, crd: &Value) -> Result<(), ApiError> {
        crate::registry::crd_types(crd)
            .map(|_| ())
            .map_err(|errors| {
                let name = meta_str(crd, "name").unwrap_or_default();
                ApiError::invalid(
                    ty,
                    name,
                    errors
                        .into_iter()
                        .map(|(f, m)| (f, "FieldValueInvalid", m))
                        .collect(),
                )
            })
    }

    fn register_crd(&mut self, ty: &ResourceType, crd: &Value) -> Result<(), ApiError> {
        self.registry.register_crd(crd).map_err(|errors| {
            let name = meta_str(crd, "name").unwrap_or_default();
            ApiError::invalid(
                ty,
                name,
                errors
                    .into_iter()
                    .map(|(f, m)| (f, "FieldValueInvalid", m))
                    .collect(),
            )
        })
    }

    /// Defaults the API server fills in for built-in kinds, on create and on every update (`old`).
    fn apply_builtin_defaults(&mut self, ty: &ResourceType, obj: &mut Value, old: Option<&Value>) {
        match (ty.group.as_str(), ty.plural.as_str()) {
            ("apps", "deployments" | "statefulsets" | "replicasets") => {
                let spec = ensure_object(obj, "spec");
                spec.entry("replicas").or_insert(json!(1));
                if ty.plural != "replicasets" {
                    spec.entry("revisionHistoryLimit").or_insert(json!(10));
                }
                if ty.plural == "statefulsets" {
                    spec.entry("podManagementPolicy")
                        .or_insert(json!("OrderedReady"));
                    spec.entry("updateStrategy").or_insert(json!({
                        "type": "RollingUpdate",
                        "rollingUpdate": {"partition": 0},
                    }));
                }
                if ty.plural == "deployments" {
                    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                    spec.entry("strategy").or_insert(json!({
                        "type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
                    }));
                }
            }
            ("", "services") => {
                let cluster_ip = format!(
                    "10.96.{}.{}",
                    self.next_cluster_ip / 250,
                    self.next_cluster_ip % 250 + 1
                );
                let spec = ensure_object(obj, "spec");
                // An update keeps the address the Service was given.
                for field in ["clusterIP", "clusterIPs"] {
                    if let Some(previous) = old.and_then(|o| o.pointer(&format!("/spec/{field}"))) {
                        spec.entry(field).or_insert(previous.clone());
                    }
                }
                spec.entry("type").or_insert(json!("ClusterIP"));
                spec.entry("sessionAffinity").or_insert(json!("None"));
                if spec
                    .get("clusterIP")
                    .is_none_or(|ip| ip.as_str() == Some(""))
                {
                    spec.insert("clusterIP".into(), json!(cluster_ip));
                    spec.insert("clusterIPs".into(), json!([cluster_ip]));
                    self.next_cluster_ip += 1;
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                        port.entry("protocol").or_insert(json!("TCP"));
                        if let Some(p) = port.get("port").cloned() {
                            port.entry("targetPort").or_insert(p);
                        }
                    }
                }
            }
            ("", "secrets") => {
                // stringData is write-only: it is folded into data, base64-encoded.
                use base64::Engine;
                let string_data = obj.as_object_mut().and_then(|m| m.remove("stringData"));
                if let Some(Value::Object(entries)) = string_data {
                    let data = ensure_object(obj, "data");
                    for (key, value) in entries {
                        let text = value
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| value.to_string());
                        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
                        data.insert(key, Value::String(encoded));
                    }
                }
            }
            ("", "namespaces") if old.is_none() => {
                let name = meta_str(obj, "name").unwrap_or_default().to_owned();
                let meta = metadata_mut(obj);
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if let Some(labels) = labels.as_object_mut() {
                    labels.insert("kubernetes.io/metadata.name".into(), Value::String(name));
                }
                obj["status"] = json!({"phase": "Active"});
            }
            _ => {}
        }
    }

    /// Replaces an object (PUT), or its status with `subresource = Some("status")`.
    pub fn update(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        name: &str,
        obj: Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        self.update_inner(ty, namespace, name, obj, subresource, opts, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn update_inner(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        name: &str,
        mut obj: Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
        managed_fields: Option<Vec<Value>>,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        self.check_kind(ty, &obj)?;
        let namespace = Self::path_for(ty, namespace);
        let key = (namespace.clone(), name.to_owned());
        let old = self
            .objects
            .get(&ty.key())
            .and_then(|m| m.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(ty, name))?;
        if let Some(given) = meta_str(&obj, "name").filter(|n| *n != name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({given}) does not match the name on the URL ({name})"
            )));
        }
        let current_rv = meta_str(&old, "resourceVersion")
            .unwrap_or_default()
            .to_owned();
        if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|rv| !rv.is_empty())
            && rv != current_rv
        {
            return Err(ApiError::conflict(
                ty,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        if let Some(uid) = meta_str(&obj, "uid").filter(|u| !u.is_empty())
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                ty,
                name,
                "Precondition failed: UID in precondition does not match the object",
            ));
        }
        match subresource {
            Some("status") => {
                // A status write changes status only.
                let status = obj.get("status").cloned();
                obj = old.clone();
                match status {
                    Some(s) => obj["status"] = s,
                    None => {
                        if let Some(m) = obj.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            _ => {
                // Server-owned metadata survives whatever the client sent.
                for field in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "namespace",
                ] {
                    match old.get("metadata").and_then(|m| m.get(field)) {
                        Some(v) => {
                            metadata_mut(&mut obj).insert(field.into(), v.clone());
                        }
                        None => {
                            metadata_mut(&mut obj).remove(field);
                        }
                    }
                }
                metadata_mut(&mut obj).insert("name".into(), Value::String(name.to_owned()));
                if ty.status_subresource {
                    match old.get("status") {
                        Some(s) => obj["status"] = s.clone(),
                        None => {
                            if let Some(m) = obj.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
            }
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            let old_finalizers = old
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let new_finalizers = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if new_finalizers.iter().any(|f| !old_finalizers.contains(f)) {
                return Err(ApiError::invalid(
                    ty,
                    name,
                    vec![(
                        "metadata.finalizers".into(),
                        "FieldValueForbidden",
                        "Forbidden: no new finalizers can be added if the object is being deleted"
                            .into(),
                    )],
                ));
            }
        }
        if subresource.is_none() {
            self.apply_builtin_defaults(ty, &mut obj, Some(&old));
        }
        let mut obj = self.admit(ty, obj, Some(&old), opts.strict)?;
        if ty.tracks_generation && generation_relevant(ty, &obj) != generation_relevant(ty, &old) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            metadata_mut(&mut obj).insert("generation".into(), json!(generation));
        }
        let now = now_rfc3339();
        let managed = match managed_fields {
            Some(fields) => fields,
            None => {
                let previous = old
                    .pointer("/metadata/managedFields")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                merge::record_update(
                    Some(&old),
                    &obj,
                    &previous,
                    Self::manager(opts),
                    &now,
                    subresource,
                )
            }
        };
        set_managed_fields(&mut obj, managed);
        let is_crd = ty.plural == "customresourcedefinitions" && ty.group == "apiextensions.k8s.io";
        if is_crd && subresource.is_none() {
            self.check_crd(ty, &obj)?;
            obj["status"] = crd_status(
                &obj,
                old.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or(&now),
            );
        }
        metadata_mut(&mut obj).insert("resourceVersion".into(), Value::String(current_rv));
        if same_content(&obj, &old) {
            // Nothing changed: no new resourceVersion, no event (as a real API server).
            return Ok(self.served_as(ty, &old));
        }
        if opts.dry_run {
            return Ok(self.served_as(ty, &obj));
        }
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        let is_namespace = ty.group.is_empty() && ty.plural == "namespaces";
        let finalized = !is_namespace
            && obj.pointer("/metadata/deletionTimestamp").is_some()
            && obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        if finalized {
            self.remove(ty, &namespace, name, Propagation::Background);
            return Ok(self.served_as(ty, &obj));
        }
        self.objects
            .entry(ty.key())
            .or_default()
            .insert(key, obj.clone());
        self.record(ty, &namespace, EventType::Modified, obj.clone(), Some(old));
        if is_crd {
            self.register_crd(ty, &obj)?;
        }
        if is_namespace {
            self.finish_namespace_if_empty(name);
        }
        Ok(self.served_as(ty, &obj))
    }

    /// Applies a patch; returns the object and whether server-side apply created it.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        name: &str,
        patch_type: &PatchType,
        patch: &Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> Result<(Value, bool), ApiError> {
        let current = self.get(ty, namespace, name);
        let now = now_rfc3339();
        let invalid_patch = |e: MergeError| match e {
            MergeError::Conflict(conflicts) => {
                let listed: Vec<String> = conflicts
                    .iter()
                    .map(|c| format!("conflict with \"{}\": {}", c.manager, c.path))
                    .collect();
                ApiError {
                    details: json!({
                        "name": name, "group": ty.group, "kind": ty.plural,
                        "causes": conflicts.iter().map(|c| json!({
                            "reason": "FieldManagerConflict",
                            "message": format!("conflict with \"{}\"", c.manager),
                            "field": c.path,
                        })).collect::<Vec<_>>(),
                    }),
                    ..ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Apply failed with {} conflict{}: {}",
                            conflicts.len(),
                            if conflicts.len() == 1 { "" } else { "s" },
                            listed.join("\n")
                        ),
                    )
                }
            }
            other => ApiError::new(422, "Invalid", other.to_string()),
        };
        match patch_type {
            PatchType::Apply { force } => {
                let manager = opts.field_manager.clone().ok_or_else(|| {
                    ApiError::bad_request(
                        "PATCH with apply requires the fieldManager query parameter",
                    )
                })?;
                if patch
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                    || patch
                        .get("kind")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    return Err(ApiError::bad_request(
                        "apiVersion and kind must be set in an applied configuration",
                    ));
                }
                if let Some(given) = meta_str(patch, "name").filter(|n| *n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({given}) does not match the name on the URL ({name})"
                    )));
                }
                match current {
                    Ok(live) => {
                        // A resourceVersion in the applied configuration is a precondition, as on a cluster.
                        let wanted = meta_str(patch, "resourceVersion").filter(|rv| !rv.is_empty());
                        if wanted.is_some_and(|rv| Some(rv) != meta_str(&live, "resourceVersion")) {
                            return Err(ApiError::conflict(
                                ty,
                                name,
                                "the object has been modified; please apply your changes to the latest version and try again",
                            ));
                        }
                        let outcome = merge::server_side_apply(
                            Some(&live),
                            patch,
                            &manager,
                            *force,
                            &now,
                            subresource,
                        )
                        .map_err(invalid_patch)?;
                        let mut object = outcome.object;
                        metadata_mut(&mut object).remove("resourceVersion");
                        let updated = self.update_inner(
                            ty,
                            namespace,
                            name,
                            object,
                            subresource,
                            opts,
                            Some(outcome.managed_fields),
                        )?;
                        Ok((updated, false))
                    }
                    Err(not_found) if subresource.is_some() => Err(not_found),
                    Err(_) => {
                        let outcome =
                            merge::server_side_apply(None, patch, &manager, *force, &now, None)
                                .map_err(invalid_patch)?;
                        let mut object = outcome.object;
                        metadata_mut(&mut object)
                            .insert("name".into(), Value::String(name.to_owned()));
                        let created = self.create_inner(
                            ty,
                            namespace,
                            object,
                            opts,
                            Some(outcome.managed_fields),
                        )?;
                        Ok((created, true))
                    }
                }
            }
            other => {
                let live = current?;
                let patched = match other {
                    PatchType::Json => merge::json_patch(&live, patch).map_err(invalid_patch)?,
                    PatchType::Merge => merge::merge_patch(&live, patch),
                    PatchType::Strategic if ty.is_custom() => {
                        return Err(ApiError::new(
                            415,
                            "UnsupportedMediaType",
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                        ));
                    }
                    PatchType::Strategic => {
                        merge::strategic_merge(&live, patch).map_err(invalid_patch)?
                    }
                    PatchType::Apply { .. } => unreachable!("handled above"),
                };
                let updated =
                    self.update_inner(ty, namespace, name, patched, subresource, opts, None)?;
                Ok((updated, false))
            }
        }
    }

    /// Deletes an object: at once without finalizers, else marks it with `deletionTimestamp`.
    pub fn delete(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let namespace = Self::path_for(ty, namespace);
        let current = self
            .objects
            .get(&ty.key())
            .and_then(|m| m.get(&(namespace.clone(), name.to_owned())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(ty, name))?;
        if let Some(uid) = &opts.precondition_uid
            && Some(uid.as_str()) != meta_str(&current, "uid")
        {
            return Err(ApiError::conflict(
                ty,
                name,
                "Precondition failed: UID in precondition does not match the object",
            ));
        }
        if let Some(rv) = &opts.precondition_rv
            && Some(rv.as_str()) != meta_str(&current, "resourceVersion")
        {
            return Err(ApiError::conflict(
                ty,
                name,
                "Precondition failed: the object has been modified",
            ));
        }
        if opts.dry_run {
            return Ok(self.served_as(ty, &current));
        }
        let has_finalizers = current
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let is_namespace = ty.group.is_empty() && ty.plural == "namespaces";
        if has_finalizers || is_namespace {
            if current.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(self.served_as(ty, &current));
            }
            let mut marked = current.clone();
            let meta = metadata_mut(&mut marked);
            meta.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            if ty.tracks_generation {
                let generation = meta.get("generation").and_then(Value::as_i64).unwrap_or(0) + 1;
                meta.insert("generation".into(), json!(generation));
            }
            if is_namespace {
                marked["status"] = json!({"phase": "Terminating"});
            }
            self.rv += 1;
            metadata_mut(&mut marked)
                .insert("resourceVersion".into(), Value::String(self.rv.to_string()));
            self.objects
                .entry(ty.key())
                .or_default()
                .insert((namespace.clone(), name.to_owned()), marked.clone());
            self.record(
                ty,
                &namespace,
                EventType::Modified,
                marked.clone(),
                Some(current),
            );
            if is_namespace {
                self.empty_namespace(name);
                if !has_finalizers {
                    self.finish_namespace_if_empty(name);
                }
            }
            return Ok(self.served_as(ty, &marked));
        }
        let removed = self.remove(ty, &namespace, name, opts.propagation);
        Ok(self.served_as(ty, &removed.unwrap_or(current)))
    }

    /// Removes an object for good, then collects what it owned.
    fn remove(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        name: &str,
        propagation: Propagation,
    ) -> Option<Value> {
        let uid = {
            let current = self
                .objects
                .get(&ty.key())?
                .get(&(namespace.to_owned(), name.to_owned()))?;
            meta_str(current, "uid").unwrap_or_default().to_owned()
        };
        if !self.removing.insert(uid.clone()) {
            return None;
        }
        if propagation == Propagation::Foreground {
            self.collect_dependents(&uid, Propagation::Foreground);
        }
        let removed = self
            .objects
            .get_mut(&ty.key())
            .and_then(|m| m.remove(&(namespace.to_owned(), name.to_owned())));
        let Some(mut removed) = removed else {
            self.removing.remove(&uid);
            return None;
        };
        self.uids.remove(&uid);
        self.rv += 1;
        metadata_mut(&mut removed)
            .insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        self.record(ty, namespace, EventType::Deleted, removed.clone(), None);
        if ty.group == "apiextensions.k8s.io" && ty.plural == "customresourcedefinitions" {
            self.drop_crd_objects(name);
        }
        if propagation != Propagation::Foreground {
            self.collect_dependents(&uid, propagation);
        }
        if ty.namespaced {
            self.finish_namespace_if_empty(namespace);
        }
        self.removing.remove(&uid);
        Some(removed)
    }

    /// ownerReference garbage collection: dependents whose owners are all gone are deleted (or orphaned).
    fn collect_dependents(&mut self, owner_uid: &str, propagation: Propagation) {
        let mut dependents = Vec::new();
        for (key, objects) in &self.objects {
            for ((ns, name), obj) in objects {
                let refs = obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array);
                if refs.is_some_and(|refs| {
                    refs.iter()
                        .any(|r| r.get("uid").and_then(Value::as_str) == Some(owner_uid))
                }) {
                    dependents.push((key.clone(), ns.clone(), name.clone()));
                }
            }
        }
        for (key, ns, name) in dependents {
            let Some(ty) = self.registry.any_version(&key) else {
                continue;
            };
            let Some(obj) = self
                .objects
                .get(&key)
                .and_then(|m| m.get(&(ns.clone(), name.clone())))
                .cloned()
            else {
                continue;
            };
            let refs = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if propagation == Propagation::Orphan {
                let kept: Vec<Value> = refs
                    .into_iter()
                    .filter(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid))
                    .collect();
                let mut orphaned = obj.clone();
                if kept.is_empty() {
                    metadata_mut(&mut orphaned).remove("ownerReferences");
                } else {
                    metadata_mut(&mut orphaned)
                        .insert("ownerReferences".into(), Value::Array(kept));
                }
                self.rv += 1;
                metadata_mut(&mut orphaned)
                    .insert("resourceVersion".into(), Value::String(self.rv.to_string()));
                self.objects
                    .entry(key.clone())
                    .or_default()
                    .insert((ns.clone(), name.clone()), orphaned.clone());
                self.record(&ty, &ns, EventType::Modified, orphaned, Some(obj));
                continue;
            }
            let owners_left = refs
                .iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .any(|uid| uid != owner_uid && self.uids.contains_key(uid));
            if !owners_left {
                let opts = DeleteOptions {
                    propagation,
                    ..DeleteOptions::default()
                };
                if let Err(err) = self.delete(&ty, &ns, &name, &opts) {
                    tracing::warn!(%err, name, namespace = ns, "garbage collection could not delete a dependent");
                }
            }
        }
    }

    fn drop_crd_objects(&mut self, crd_name: &str) {
        let types: Vec<Arc<ResourceType>> = self
            .registry
            .all()
            .filter(|t| t.crd.as_deref() == Some(crd_name))
            .cloned()
            .collect();
        if let Some(ty) = types.first() {
            let names: Vec<(String, String)> = self
                .objects
                .get(&ty.key())
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for (ns, name) in names {
                self.remove(ty, &ns, &name, Propagation::Background);
            }
        }
        self.registry.remove_crd(crd_name);
    }

    fn empty_namespace(&mut self, namespace: &str) {
        let mut victims = Vec::new();
        for (key, objects) in &self.objects {
            for (ns, name) in objects.keys() {
                if ns == namespace {
                    victims.push((key.clone(), name.clone()));
                }
            }
        }
        for (key, name) in victims {
            if let Some(ty) = self.registry.any_version(&key)
                && let Err(err) = self.delete(&ty, namespace, &name, &DeleteOptions::default())
            {
                tracing::debug!(%err, name, "namespace cleanup");
            }
        }
    }

    fn finish_namespace_if_empty(&mut self, namespace: &str) {
        let terminating = self.namespace_state(namespace).is_some_and(|ns| {
            ns.pointer("/metadata/deletionTimestamp").is_some()
                && ns
                    .pointer("/metadata/finalizers")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty)
        });
        let empty = self
            .objects
            .values()
            .all(|m| m.keys().all(|(ns, _)| ns != namespace));
        if terminating
            && empty
            && let Some(ty) = self.registry.get("", "v1", "namespaces")
        {
            self.remove(&ty, "", namespace, Propagation::Background);
        }
    }

    fn record(
        &mut self,
        ty: &ResourceType,
        namespace: &str,
        type_: EventType,
        object: Value,
        prev: Option<Value>,
    ) {
        let event = Arc::new(WatchEvent {
            rv: self.rv,
            key: ty.key(),
            namespace: namespace.to_owned(),
            type_,
            object,
            prev,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }
}

fn ensure_object<'a>(obj: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    if !obj.get(field).is_some_and(Value::is_object) {
        obj[field] = json!({});
    }
    match obj.get_mut(field).and_then(Value::as_object_mut) {
        Some(m) => m,
        None => unreachable!("field was just made an object"),
    }
}

fn set_managed_fields(obj: &mut Value, managed: Vec<Value>) {
    let meta = metadata_mut(obj);
    if managed.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(managed));
    }
}

/// The checks of the real API server that users hit most often on workloads and Services.
fn builtin_validation(ty: &ResourceType, obj: &Value) -> Vec<(String, &'static str, String)> {
    let mut causes = Vec::new();
    match (ty.group.as_str(), ty.plural.as_str()) {
        ("apps", "deployments" | "statefulsets" | "replicasets") => {
            let selector = obj
                .pointer("/spec/selector/matchLabels")
                .and_then(Value::as_object);
            let labels = obj
                .pointer("/spec/template/metadata/labels")
                .and_then(Value::as_object);
            match selector {
                None if obj.pointer("/spec/selector").is_none() => {
                    causes.push((
                        "spec.selector".into(),
                        "FieldValueRequired",
                        "Required value".into(),
                    ));
                }
                Some(selector) => {
                    let matches = selector
                        .iter()
                        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
                    if !matches {
                        causes.push((
                            "spec.template.metadata.labels".into(),
                            "FieldValueInvalid",
                            format!(
                                "Invalid value: {}: `selector` does not match template `labels`",
                                serde_json::to_string(&labels).unwrap_or_default()
                            ),
                        ));
                    }
                }
                None => {}
            }
            if obj
                .pointer("/spec/template/spec/containers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                causes.push((
                    "spec.template.spec.containers".into(),
                    "FieldValueRequired",
                    "Required value".into(),
                ));
            }
            if let Some(replicas) = obj.pointer("/spec/replicas").and_then(Value::as_i64)
                && replicas < 0
            {
                causes.push((
                    "spec.replicas".into(),
                    "FieldValueInvalid",
                    format!("Invalid value: {replicas}: must be greater than or equal to 0"),
                ));
            }
        }
        ("", "services") => {
            let is_headless_or_external =
                obj.pointer("/spec/type").and_then(Value::as_str) == Some("ExternalName");
            if !is_headless_or_external
                && obj
                    .pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty)
            {
                causes.push((
                    "spec.ports".into(),
                    "FieldValueRequired",
                    "Required value".into(),
                ));
            }
        }
        _ => {}
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Create(usize, u8),
        Scale(usize, u8),
        Status(usize, u8),
        AddFinalizer(usize),
        RemoveFinalizers(usize),
        Delete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let name = 0usize..4;
        prop_oneof![
            (name.clone(), 0u8..5).prop_map(|(n, v)| Op::Create(n, v)),
            (name.clone(), 0u8..5).prop_map(|(n, v)| Op::Scale(n, v)),
            (name.clone(), 0u8..5).prop_map(|(n, v)| Op::Status(n, v)),
            name.clone().prop_map(Op::AddFinalizer),
            name.clone().prop_map(Op::RemoveFinalizers),
            name.prop_map(Op::Delete),
        ]
    }

    fn deployment(name: &str, replicas: u8) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "app", "image": "x"}]}}}
        })
    }

    fn apply(store: &mut Store, ty: &ResourceType, op: &Op) {
        let opts = WriteOptions {
            field_manager: Some("test".into()),
            ..WriteOptions::default()
        };
        let name = |n: usize| format!("d{n}");
        // Errors (not found, already exists, ...) are part of the sequence: they must leave no trace.
        let _ = match op {
            Op::Create(n, v) => store
                .create(ty, "default", deployment(&name(*n), *v), &opts)
                .map(|_| ()),
            Op::Scale(n, v) => store
                .patch(
                    ty,
                    "default",
                    &name(*n),
                    &PatchType::Merge,
                    &json!({"spec": {"replicas": v}}),
                    None,
                    &opts,
                )
                .map(|_| ()),
            Op::Status(n, v) => store
                .patch(
                    ty,
                    "default",
                    &name(*n),
                    &PatchType::Merge,
                    &json!({"status": {"readyReplicas": v}}),
                    Some("status"),
                    &opts,
                )
                .map(|_| ()),
            Op::AddFinalizer(n) => store
                .patch(
                    ty,
                    "default",
                    &name(*n),
                    &PatchType::Merge,
                    &json!({"metadata": {"finalizers": ["x/y"]}}),
                    None,
                    &opts,
                )
                .map(|_| ()),
            Op::RemoveFinalizers(n) => store
                .patch(
                    ty,
                    "default",
                    &name(*n),
                    &PatchType::Merge,
                    &json!({"metadata": {"finalizers": null}}),
                    None,
                    &opts,
                )
                .map(|_| ()),
            Op::Delete(n) => store
                .delete(ty, "default", &name(*n), &DeleteOptions::default())
                .map(|_| ()),
        };
    }

    proptest! {
        /// Whatever happens, a watcher replaying the history from the start ends with exactly the stored
        /// objects; resourceVersions strictly increase; generation moves only with spec (or deletion).
        #[test]
        fn watch_history_replays_to_the_stored_state(ops in proptest::collection::vec(op(), 1..40)) {
            let mut store = Store::new(100_000);
            let ty = store.registry().get("apps", "v1", "deployments").expect("built-in type");
            let start = store.resource_version();
            for op in &ops {
                apply(&mut store, &ty, op);
            }
            let events = store.events_since(start).expect("nothing compacted");
            let mut replayed: BTreeMap<String, Value> = BTreeMap::new();
            let mut last_rv = start;
            for event in events.iter().filter(|e| e.key == ty.key()) {
                prop_assert!(event.rv > last_rv, "resourceVersions must increase");
                last_rv = event.rv;
                let name = meta_str(&event.object, "name").unwrap_or_default().to_owned();
                let rv_text = event.rv.to_string();
                prop_assert_eq!(meta_str(&event.object, "resourceVersion"), Some(rv_text.as_str()));
                if let Some(prev) = &event.prev {
                    let generation = |o: &Value| o.pointer("/metadata/generation").and_then(Value::as_i64);
                    let spec_changed = prev.get("spec") != event.object.get("spec");
                    let deleting = prev.pointer("/metadata/deletionTimestamp").is_none()
                        && event.object.pointer("/metadata/deletionTimestamp").is_some();
                    prop_assert_eq!(
                        generation(&event.object) != generation(prev),
                        spec_changed || deleting,
                        "generation must move with spec only: {:?} -> {:?}", prev, event.object
                    );
                }
                match event.type_ {
                    EventType::Added | EventType::Modified => { replayed.insert(name, event.object.clone()); }
                    EventType::Deleted => { replayed.remove(&name); }
                }
            }
            let stored: BTreeMap<String, Value> = store
                .list(&ty, Some("default"))
                .into_iter()
                .map(|o| (meta_str(&o, "name").unwrap_or_default().to_owned(), o))
                .collect();
            prop_assert_eq!(replayed, stored);
        }
    }

    #[test]
    fn compacted_history_is_gone() {
        let mut store = Store::new(3);
        let ty = store
            .registry()
            .get("apps", "v1", "deployments")
            .expect("built-in type");
        let opts = WriteOptions::default();
        for i in 0..6 {
            store
                .create(&ty, "default", deployment(&format!("d{i}"), 1), &opts)
                .expect("create");
        }
        let err = store
            .events_since(1)
            .expect_err("early versions are compacted");
        assert_eq!(err.code, 410);
        let recent = store
            .events_since(store.resource_version() - 2)
            .expect("recent versions replay");
        assert_eq!(recent.len(), 2);
    }

    fn with_owner(mut obj: Value, owner_uid: &str) -> Value {
        obj["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "x", "uid": owner_uid}]);
        obj
    }

    #[test]
    fn foreground_deletion_survives_ownership_cycles() {
        let mut store = Store::new(1000);
        let ty = store
            .registry()
            .get("apps", "v1", "deployments")
            .expect("built-in type");
        let opts = WriteOptions::default();
        let a = store
            .create(&ty, "default", deployment("a", 1), &opts)
            .expect("a");
        let a_uid = meta_str(&a, "uid").unwrap_or_default().to_owned();
        let b = store
            .create(
                &ty,
                "default",
                with_owner(deployment("b", 1), &a_uid),
                &opts,
            )
            .expect("b");
        let b_uid = meta_str(&b, "uid").unwrap_or_default().to_owned();
        store
            .update(&ty, "default", "a", with_owner(a, &b_uid), None, &opts)
            .expect("a now owned by b");
        let foreground = DeleteOptions {
            propagation: Propagation::Foreground,
            ..DeleteOptions::default()
        };
        store
            .delete(&ty, "default", "a", &foreground)
            .expect("delete");
        assert!(
            store.list(&ty, Some("default")).is_empty(),
            "both ends of the cycle are collected"
        );
    }

    #[test]
    fn server_side_apply_honours_a_resource_version_precondition() {
        let mut store = Store::new(1000);
        let ty = store
            .registry()
            .get("apps", "v1", "deployments")
            .expect("built-in type");
        let opts = WriteOptions {
            field_manager: Some("candidate".into()),
            ..WriteOptions::default()
        };
        let apply = PatchType::Apply { force: true };
        store
            .patch(
                &ty,
                "default",
                "d",
                &apply,
                &deployment("d", 1),
                None,
                &opts,
            )
            .expect("create");
        let mut stale = deployment("d", 2);
        stale["metadata"]["resourceVersion"] = json!("1");
        let err = store
            .patch(&ty, "default", "d", &apply, &stale, None, &opts)
            .expect_err("stale rv");
        assert_eq!(err.code, 409);
    }

    #[test]
    fn a_terminating_namespace_waits_for_its_finalizers_and_content() {
        let mut store = Store::new(1000);
        let ns = store
            .registry()
            .get("", "v1", "namespaces")
            .expect("built-in type");
        let maps = store
            .registry()
            .get("", "v1", "configmaps")
            .expect("built-in type");
        let opts = WriteOptions::default();
        store
            .create(&ns, "", json!({"metadata": {"name": "team"}}), &opts)
            .expect("namespace");
        let held = json!({"metadata": {"name": "held", "finalizers": ["x/y"]}});
        store.create(&maps, "team", held, &opts).expect("configmap");
        store
            .delete(&ns, "", "team", &DeleteOptions::default())
            .expect("delete namespace");
        // A label change on the terminating namespace must not finish it early.
        let mut current = store.get(&ns, "", "team").expect("still there");
        current["metadata"]["labels"]["touched"] = json!("yes");
        store
            .update(&ns, "", "team", current, None, &opts)
            .expect("update");
        assert!(
            store.get(&ns, "", "team").is_ok(),
            "content is still held by a finalizer"
        );
        let mut map = store.get(&maps, "team", "held").expect("held configmap");
        map["metadata"]["finalizers"] = json!([]);
        store
            .update(&maps, "team", "held", map, None, &opts)
            .expect("release");
        assert!(
            store.get(&ns, "", "team").is_err(),
            "an empty terminating namespace goes away"
        );
    }

    #[test]
    fn built_in_defaults_follow_updates_and_rbac_names_may_contain_colons() {
        let mut store = Store::new(1000);
        let services = store
            .registry()
            .get("", "v1", "services")
            .expect("built-in type");
        let opts = WriteOptions::default();
        let svc = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}});
        let created = store
            .create(&services, "default", svc.clone(), &opts)
            .expect("service");
        let updated = store
            .update(&services, "default", "web", svc, None, &opts)
            .expect("PUT without clusterIP");
        assert_eq!(updated["spec"]["clusterIP"], created["spec"]["clusterIP"]);

        let secrets = store
            .registry()
            .get("", "v1", "secrets")
            .expect("built-in type");
        let secret = json!({"metadata": {"name": "token"}, "stringData": {"token": "hi"}});
        let stored = store
            .create(&secrets, "default", secret, &opts)
            .expect("secret");
        assert_eq!(stored["data"]["token"], "aGk=");
        assert!(stored.get("stringData").is_none());

        let roles = store
            .registry()
            .get("rbac.authorization.k8s.io", "v1", "clusterroles")
            .expect("built-in type");
        store
            .create(
                &roles,
                "",
                json!({"metadata": {"name": "sluice:manager"}}),
                &opts,
            )
            .expect("RBAC names are path segments");
    }
}
