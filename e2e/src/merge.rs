//! Patch and field-ownership logic of the sandbox API server, kept free of I/O.
//!
//! - [`strategic_merge`]: a practical subset of Kubernetes' strategic merge patch
//!   (what `kubectl patch` and client-side `kubectl apply` send for built-in kinds).
//! - [`merge_patch`] (RFC 7396) and [`json_patch`] (RFC 6902): thin wrappers over `json_patch`.
//! - [`server_side_apply`] and [`record_update`]: field ownership (`metadata.managedFields`)
//!   modelled on structured-merge-diff, in the real `FieldsV1` encoding.
//!
//! No OpenAPI schema is consulted: which lists merge by key is decided by the list's field
//! name (see [`list_kind`]), as built-in kinds declare them. Everything else is atomic.
//!
//! Not covered: `$patch` directives inside primitive lists, multi-field merge keys (container
//! ports merge by `containerPort` only, not `containerPort`+`protocol`), `x-kubernetes-*`
//! markers of CRD schemas, `granular`/`separable` map semantics, and the `.`-ownership of
//! maps that real SSA records for some struct fields. Nulls in an applied configuration are
//! ignored (not owned, not written).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// One field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    /// Kubernetes-style path, e.g. `.spec.template.spec.containers[name="app"].image`.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("json patch: {0}")]
    JsonPatch(String),
    #[error("invalid patch: {0}")]
    InvalidPatch(String),
    #[error("{}", conflict_message(.0))]
    Conflict(Vec<Conflict>),
}

fn conflict_message(conflicts: &[Conflict]) -> String {
    let plural = if conflicts.len() == 1 { "" } else { "s" };
    let list: Vec<String> = conflicts
        .iter()
        .map(|c| format!("conflict with \"{}\": {}", c.manager, c.path))
        .collect();
    format!(
        "Apply failed with {} conflict{plural}: {}",
        conflicts.len(),
        list.join("\n")
    )
}

fn invalid(msg: impl Into<String>) -> MergeError {
    MergeError::InvalidPatch(msg.into())
}

/// Result of a server-side apply: the merged object (with `metadata.managedFields` set)
/// and the new managedFields entries.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOutcome {
    pub object: Value,
    pub managed_fields: Vec<Value>,
}

/// How a list merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListKind {
    /// Items are maps identified by this field.
    Keyed(&'static str),
    /// Primitive items merged as a set.
    Set,
    /// Replaced (and owned) as a whole.
    Atomic,
}

/// Merge strategy of a list, by its field name as the built-in kinds declare it.
/// `ports` is ambiguous (containers vs. Services), so the items decide.
fn list_kind(field: &str, a: &[Value], b: &[Value]) -> ListKind {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => ListKind::Keyed("name"),
        "hostAliases" => ListKind::Keyed("ip"),
        "ports" if a.iter().chain(b).any(|i| i.get("containerPort").is_some()) => {
            ListKind::Keyed("containerPort")
        }
        // NetworkPolicy ports may have no `port`: atomic there, as in the real schema.
        "ports" if a.iter().chain(b).all(|i| i.get("port").is_some()) => ListKind::Keyed("port"),
        "volumeMounts" => ListKind::Keyed("mountPath"),
        "conditions" => ListKind::Keyed("type"),
        "ownerReferences" => ListKind::Keyed("uid"),
        "topologySpreadConstraints" => ListKind::Keyed("topologyKey"),
        "finalizers" => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// Like [`list_kind`], but a keyed list whose items lack the key is treated as atomic:
/// ownership must never fail on a custom resource that reuses a field name.
fn ssa_kind(field: &str, a: &[Value], b: &[Value]) -> ListKind {
    match list_kind(field, a, b) {
        ListKind::Keyed(key)
            if !a
                .iter()
                .chain(b)
                .all(|i| i.get(key).is_some_and(|k| !k.is_null())) =>
        {
            ListKind::Atomic
        }
        kind => kind,
    }
}

// ---------------------------------------------------------------------------------------
// RFC 7396 / RFC 6902
// ---------------------------------------------------------------------------------------

/// JSON merge patch (RFC 7396).
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let mut doc = target.clone();
    ::json_patch::merge(&mut doc, patch);
    doc
}

/// JSON patch (RFC 6902), with the API server's leniency: `test` of a missing path against `null` passes
/// (kube-runtime's finalizer helper relies on it).
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, MergeError> {
    let ops = patch.as_array().ok_or_else(|| {
        MergeError::JsonPatch("a JSON patch must be an array of operations".into())
    })?;
    let mut doc = target.clone();
    for op in ops {
        let tests_missing_for_null = op.get("op").and_then(Value::as_str) == Some("test")
            && op.get("value").is_some_and(Value::is_null)
            && op
                .get("path")
                .and_then(Value::as_str)
                .is_some_and(|p| doc.pointer(p).is_none());
        if tests_missing_for_null {
            continue;
        }
        let one: ::json_patch::Patch = serde_json::from_value(Value::Array(vec![op.clone()]))
            .map_err(|e| MergeError::JsonPatch(e.to_string()))?;
        ::json_patch::patch(&mut doc, &one).map_err(|e| MergeError::JsonPatch(e.to_string()))?;
    }
    Ok(doc)
}

// ---------------------------------------------------------------------------------------
// Strategic merge patch
// ---------------------------------------------------------------------------------------

/// Strategic merge patch. A top-level `$patch: delete` yields `{}`.
pub fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, MergeError> {
    let Value::Object(patch) = patch else {
        return Err(invalid("a strategic merge patch must be a JSON object"));
    };
    let empty = Map::new();
    let target = target.as_object().unwrap_or(&empty);
    Ok(Value::Object(smp_map(target, patch)?.unwrap_or_default()))
}

/// Merges a patch map into a target map; `None` means the map is deleted.
fn smp_map(
    target: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>, MergeError> {
    let mut retain = None;
    let mut orders = Vec::new();
    let mut deletions = Vec::new();
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((field, string_list_or_array(key, value)?));
        } else if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            deletions.push((field, string_list_or_array(key, value)?));
        } else if key == "$patch" {
            match value.as_str() {
                Some("replace") => {
                    let mut rest = patch.clone();
                    rest.remove("$patch");
                    // Still run through smp_map to process/strip nested directives.
                    return smp_map(&Map::new(), &rest);
                }
                Some("delete") => return Ok(None),
                Some("merge") => {}
                _ => return Err(invalid(format!("unknown value of $patch: {value}"))),
            }
        } else if key == "$retainKeys" {
            let keys = string_list_or_array(key, value)?;
            if !keys.iter().all(Value::is_string) {
                return Err(invalid("$retainKeys must be a list of strings"));
            }
            retain = Some(keys);
        } else if key.starts_with('$') {
            return Err(invalid(format!("unknown patch directive {key}")));
        }
    }

    let mut out = target.clone();
    for (field, values) in deletions {
        if let Some(Value::Array(items)) = out.get_mut(field) {
            items.retain(|item| !values.contains(item));
        }
    }
    for (key, value) in patch.iter().filter(|(k, _)| !k.starts_with('$')) {
        match value {
            Value::Null => {
                out.remove(key);
            }
            Value::Object(child) => {
                let empty = Map::new();
                let base = out.get(key).and_then(Value::as_object).unwrap_or(&empty);
                match smp_map(base, child)? {
                    Some(merged) => out.insert(key.clone(), Value::Object(merged)),
                    None => out.remove(key),
                };
            }
            Value::Array(items) => {
                let base = out
                    .get(key)
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice);
                let merged = smp_list(key, base, items)?;
                out.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                out.insert(key.clone(), scalar.clone());
            }
        }
    }
    for (field, order) in orders {
        if let Some(Value::Array(items)) = out.get_mut(field) {
            reorder(items, order);
        }
    }
    if let Some(keys) = retain {
        out.retain(|k, _| keys.iter().any(|r| r.as_str() == Some(k)));
    }
    Ok(Some(out))
}

fn string_list_or_array<'a>(directive: &str, value: &'a Value) -> Result<&'a [Value], MergeError> {
    value
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| invalid(format!("{directive} must be a list")))
}

fn smp_list(field: &str, target: &[Value], patch: &[Value]) -> Result<Vec<Value>, MergeError> {
    // `{"$patch": "replace"}` alone as an item: the other items are the whole list.
    let is_replace = |i: &Value| {
        i.as_object()
            .is_some_and(|m| m.len() == 1 && m.get("$patch") == Some(&json!("replace")))
    };
    if patch.iter().any(is_replace) {
        let mut out = Vec::new();
        for item in patch.iter().filter(|i| !is_replace(i)) {
            match item {
                Value::Object(m) => out.extend(smp_map(&Map::new(), m)?.map(Value::Object)),
                other => out.push(other.clone()),
            }
        }
        return Ok(out);
    }
    match list_kind(field, target, patch) {
        ListKind::Atomic => Ok(patch.to_vec()),
        ListKind::Set => {
            let mut out = target.to_vec();
            for item in patch {
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            Ok(out)
        }
        ListKind::Keyed(key) => {
            let mut out = target.to_vec();
            for item in patch {
                let (Some(fields), Some(id)) = (item.as_object(), item.get(key)) else {
                    return Err(invalid(format!(
                        "{field}: item does not contain the merge key {key}: {item}"
                    )));
                };
                let pos = out.iter().position(|t| t.get(key) == Some(id));
                if fields.get("$patch") == Some(&json!("delete")) {
                    if let Some(p) = pos {
                        out.remove(p);
                    }
                    continue;
                }
                let base = pos
                    .and_then(|p| out[p].as_object())
                    .cloned()
                    .unwrap_or_default();
                match (smp_map(&base, fields)?, pos) {
                    (Some(merged), Some(p)) => out[p] = Value::Object(merged),
                    (Some(merged), None) => out.push(Value::Object(merged)),
                    (None, Some(p)) => {
                        out.remove(p);
                    }
                    (None, None) => {}
                }
            }
            Ok(out)
        }
    }
}

/// Applies `$setElementOrder`: listed items first, in that order; the rest keep their order.
fn reorder(items: &mut Vec<Value>, order: &[Value]) {
    let matches = |o: &Value, i: &Value| match o {
        Value::Object(keys) => keys.iter().all(|(k, v)| i.get(k) == Some(v)),
        other => other == i,
    };
    let mut rest = std::mem::take(items);
    for o in order {
        if let Some(p) = rest.iter().position(|i| matches(o, i)) {
            items.push(rest.remove(p));
        }
    }
    items.extend(rest);
}

// ---------------------------------------------------------------------------------------
// Field sets (structured-merge-diff style)
// ---------------------------------------------------------------------------------------

/// A path of FieldsV1 elements: `f:<field>`, `k:<key json>` or `v:<value json>`.
type Path = Vec<String>;
type FieldSet = BTreeSet<Path>;

/// Fields nobody owns: identity and server-maintained metadata.
fn unowned(prefix: &[String], key: &str) -> bool {
    match prefix {
        [] => matches!(key, "apiVersion" | "kind"),
        [m] if m == "f:metadata" => matches!(
            key,
            "name"
                | "namespace"
                | "managedFields"
                | "resourceVersion"
                | "uid"
                | "creationTimestamp"
                | "generation"
                | "selfLink"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
        ),
        _ => false,
    }
}

/// The fields of an object: leaves, atomic lists, keyed items (`k:`) and set items (`v:`).
fn field_set(obj: &Map<String, Value>) -> FieldSet {
    let mut out = FieldSet::new();
    collect(obj, &mut Vec::new(), &mut out);
    out
}

fn collect(obj: &Map<String, Value>, prefix: &mut Path, out: &mut FieldSet) {
    for (key, child) in obj {
        if child.is_null() || unowned(prefix, key) {
            continue;
        }
        prefix.push(format!("f:{key}"));
        match child {
            Value::Object(m) if !m.is_empty() => collect(m, prefix, out),
            Value::Array(items) if !items.is_empty() => match ssa_kind(key, items, &[]) {
                ListKind::Atomic => {
                    out.insert(prefix.clone());
                }
                ListKind::Set => {
                    for item in items {
                        prefix.push(format!("v:{item}"));
                        out.insert(prefix.clone());
                        prefix.pop();
                    }
                }
                ListKind::Keyed(k) => {
                    for item in items {
                        prefix.push(key_element(k, item));
                        out.insert(prefix.clone());
                        if let Value::Object(m) = item {
                            collect(m, prefix, out);
                        }
                        prefix.pop();
                    }
                }
            },
            _ => {
                out.insert(prefix.clone());
            }
        }
        prefix.pop();
    }
}

/// `k:{"name":"app"}` — single-field keys, so the JSON is trivially key-sorted.
fn key_element(key: &str, item: &Value) -> String {
    let id = item.get(key).unwrap_or(&Value::Null);
    format!("k:{{{}:{id}}}", Value::String(key.to_owned()))
}

fn find_element(items: &[Value], element: &str) -> Option<usize> {
    if let Some(json) = element.strip_prefix("k:") {
        let Ok(Value::Object(keys)) = serde_json::from_str::<Value>(json) else {
            return None;
        };
        items
            .iter()
            .position(|i| keys.iter().all(|(k, v)| i.get(k) == Some(v)))
    } else {
        let value: Value = serde_json::from_str(element.strip_prefix("v:")?).ok()?;
        items.iter().position(|i| *i == value)
    }
}

fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(value, |cur, el| match el.strip_prefix("f:") {
            Some(field) => cur.as_object()?.get(field),
            None => {
                let items = cur.as_array()?;
                items.get(find_element(items, el)?)
            }
        })
}

fn get_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(value, |cur, el| match el.strip_prefix("f:") {
            Some(field) => cur.as_object_mut()?.get_mut(field),
            None => {
                let items = cur.as_array_mut()?;
                let pos = find_element(items, el)?;
                items.get_mut(pos)
            }
        })
}

fn remove(value: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    match (get_mut(value, parent), last.strip_prefix("f:")) {
        (Some(Value::Object(m)), Some(field)) => {
            m.remove(field);
        }
        (Some(Value::Array(items)), None) => {
            if let Some(pos) = find_element(items, last) {
                items.remove(pos);
            }
        }
        _ => {}
    }
}

/// `.spec.containers[name="app"].image`, as the API server words conflicts.
fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for el in path {
        if let Some(field) = el.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(json) = el.strip_prefix("k:") {
            let keys = serde_json::from_str::<Map<String, Value>>(json).unwrap_or_default();
            let parts: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(json) = el.strip_prefix("v:") {
            out.push_str(&format!("[={json}]"));
        }
    }
    out
}

/// FieldsV1 tree; `member` marks a path owned itself (encoded `{}` or `".": {}`).
#[derive(Default)]
struct Node {
    member: bool,
    children: BTreeMap<String, Node>,
}

fn encode(fields: &FieldSet) -> Value {
    let mut root = Node::default();
    for path in fields {
        let node = path
            .iter()
            .fold(&mut root, |n, el| n.children.entry(el.clone()).or_default());
        node.member = true;
    }
    fn to_value(node: &Node) -> Value {
        let mut m = Map::new();
        if node.member && !node.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, child) in &node.children {
            m.insert(k.clone(), to_value(child));
        }
        Value::Object(m)
    }
    to_value(&root)
}

fn decode(value: &Value, prefix: &mut Path, out: &mut FieldSet) {
    let Some(m) = value.as_object().filter(|m| !m.is_empty()) else {
        if !prefix.is_empty() {
            out.insert(prefix.clone());
        }
        return;
    };
    for (key, child) in m {
        if key == "." {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
            continue;
        }
        prefix.push(key.clone());
        decode(child, prefix, out);
        prefix.pop();
    }
}

/// One managedFields entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: Value,
    time: Value,
    fields: FieldSet,
}

impl Entry {
    fn parse(value: &Value) -> Entry {
        let text = |k: &str| {
            value
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let mut fields = FieldSet::new();
        if let Some(f) = value.get("fieldsV1") {
            decode(f, &mut Vec::new(), &mut fields);
        }
        Entry {
            manager: text("manager"),
            operation: text("operation"),
            subresource: value
                .get("subresource")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            api_version: value.get("apiVersion").cloned().unwrap_or(Value::Null),
            time: value.get("time").cloned().unwrap_or(Value::Null),
            fields,
        }
    }

    fn is(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }

    fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("manager".into(), json!(self.manager));
        m.insert("operation".into(), json!(self.operation));
        if !self.api_version.is_null() {
            m.insert("apiVersion".into(), self.api_version.clone());
        }
        m.insert("time".into(), self.time.clone());
        m.insert("fieldsType".into(), json!("FieldsV1"));
        m.insert("fieldsV1".into(), encode(&self.fields));
        if let Some(sub) = &self.subresource {
            m.insert("subresource".into(), json!(sub));
        }
        Value::Object(m)
    }

    /// Owns `path` or anything below it.
    fn owns_within(&self, path: &Path) -> bool {
        self.fields
            .range(path.clone()..)
            .next()
            .is_some_and(|p| p.starts_with(path))
    }
}

fn parse_entries(values: &[Value]) -> Vec<Entry> {
    values.iter().map(Entry::parse).collect()
}

/// Forgets fields that no longer exist and entries left with nothing.
fn finish(mut entries: Vec<Entry>, obj: &Value) -> Vec<Value> {
    for e in &mut entries {
        e.fields.retain(|p| get(obj, p).is_some());
    }
    entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_value)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Server-side apply
// ---------------------------------------------------------------------------------------

/// Server-side apply of `applied` by `manager` onto `live` (None: the object is created).
pub fn server_side_apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now_rfc3339: &str,
    subresource: Option<&str>,
) -> Result<ApplyOutcome, MergeError> {
    let Value::Object(applied_map) = applied else {
        return Err(invalid("an applied configuration must be a JSON object"));
    };
    let mut obj = live
        .filter(|l| l.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    let previous = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let mut entries = parse_entries(previous);
    let new_set = field_set(applied_map);
    let mine = |e: &Entry| e.is(manager, "Apply", subresource);

    // Conflicts: fields whose value would change and that some other manager owns.
    let mut conflicts = Vec::new();
    for path in &new_set {
        if path.last().is_some_and(|el| !el.starts_with("f:")) {
            continue; // a list item's presence never conflicts, only its fields
        }
        let Some(current) = get(&obj, path) else {
            continue;
        };
        if get(applied, path) == Some(current) {
            continue; // equal values: shared ownership
        }
        for e in entries
            .iter_mut()
            .filter(|e| e.manager != manager && e.fields.contains(path))
        {
            if force {
                e.fields.remove(path);
            } else {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    path: display_path(path),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(MergeError::Conflict(conflicts));
    }

    // Fields this manager applied before but no longer does go, unless someone else holds them.
    let dropped: Vec<Path> = entries
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.difference(&new_set).cloned())
        .collect();
    let before = obj.clone();
    for path in &dropped {
        if !is_item_key(path) && !entries.iter().any(|e| !mine(e) && e.owns_within(path)) {
            remove_with_empty_parents(&mut obj, path, &entries);
        }
    }

    let mut clean = applied_map.clone();
    if let Some(Value::Object(meta)) = clean.get_mut("metadata") {
        meta.remove("managedFields");
    }
    if let Value::Object(target) = &mut obj {
        ssa_merge(target, &clean);
    }

    let api_version = applied.get("apiVersion").cloned().unwrap_or(Value::Null);
    match entries.iter_mut().find(|e| mine(e)) {
        // A no-op apply keeps the old time, so it does not count as a write.
        Some(e) if e.fields == new_set && obj == before => {}
        Some(e) => {
            e.fields = new_set;
            e.time = json!(now_rfc3339);
            e.api_version = api_version;
        }
        None => entries.push(Entry {
            manager: manager.to_owned(),
            operation: "Apply".into(),
            subresource: subresource.map(str::to_owned),
            api_version,
            time: json!(now_rfc3339),
            fields: new_set,
        }),
    }
    let managed_fields = finish(entries, &obj);
    set_managed_fields(&mut obj, &managed_fields);
    Ok(ApplyOutcome {
        object: obj,
        managed_fields,
    })
}

/// A key field of a list item (`…k:{"name":"a"}, f:name`): it goes only with its item.
fn is_item_key(path: &[String]) -> bool {
    match path {
        [.., item, field] => match (item.strip_prefix("k:"), field.strip_prefix("f:")) {
            (Some(json), Some(field)) => serde_json::from_str::<Map<String, Value>>(json)
                .is_ok_and(|keys| keys.contains_key(field)),
            _ => false,
        },
        _ => false,
    }
}

/// Removes a field, then maps it leaves empty that nobody owns (below the top level).
fn remove_with_empty_parents(obj: &mut Value, path: &[String], entries: &[Entry]) {
    remove(obj, path);
    let mut parent = &path[..path.len().saturating_sub(1)];
    while parent.len() >= 2
        && parent.last().is_some_and(|el| el.starts_with("f:"))
        && get(obj, parent).is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
        && !entries.iter().any(|e| e.fields.contains(parent))
    {
        remove(obj, parent);
        parent = &parent[..parent.len() - 1];
    }
}

/// Merges an applied configuration into the live object: maps recursively, keyed lists
/// by key (live order kept, new items appended), set lists as a union, others replaced.
fn ssa_merge(dst: &mut Map<String, Value>, src: &Map<String, Value>) {
    for (key, value) in src {
        match value {
            Value::Null => {}
            Value::Object(child) => {
                let slot = dst.entry(key.clone()).or_insert_with(|| json!({}));
                if !slot.is_object() {
                    *slot = json!({});
                }
                if let Value::Object(target) = slot {
                    ssa_merge(target, child);
                }
            }
            Value::Array(items) => {
                let slot = dst.entry(key.clone()).or_insert_with(|| json!([]));
                match slot {
                    Value::Array(live) => merge_items(key, live, items),
                    other => *other = Value::Array(items.clone()),
                }
            }
            scalar => {
                dst.insert(key.clone(), scalar.clone());
            }
        }
    }
}

fn merge_items(field: &str, live: &mut Vec<Value>, applied: &[Value]) {
    match ssa_kind(field, live, applied) {
        ListKind::Atomic => *live = applied.to_vec(),
        ListKind::Set => {
            for item in applied {
                if !live.contains(item) {
                    live.push(item.clone());
                }
            }
        }
        ListKind::Keyed(key) => {
            for item in applied {
                let Value::Object(fields) = item else {
                    continue;
                }; // ssa_kind guarantees maps
                let id = item.get(key);
                match live.iter_mut().find(|l| l.get(key) == id) {
                    Some(Value::Object(target)) => ssa_merge(target, fields),
                    _ => {
                        let mut fresh = Map::new();
                        ssa_merge(&mut fresh, fields);
                        live.push(Value::Object(fresh));
                    }
                }
            }
        }
    }
}

fn set_managed_fields(obj: &mut Value, entries: &[Value]) {
    let Value::Object(root) = obj else { return };
    let meta = root.entry("metadata").or_insert_with(|| json!({}));
    if let Value::Object(meta) = meta {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries.to_vec()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Non-apply writes
// ---------------------------------------------------------------------------------------

/// New managedFields after a create/update/patch by `manager` (operation `Update`): it takes
/// every field whose value changed from `before` (all of them on create), other entries lose
/// those fields, and fields gone from `after` are forgotten.
pub fn record_update(
    before: Option<&Value>,
    after: &Value,
    managed_fields: &[Value],
    manager: &str,
    now_rfc3339: &str,
    subresource: Option<&str>,
) -> Vec<Value> {
    let mut entries = parse_entries(managed_fields);
    let after_set = after.as_object().map(field_set).unwrap_or_default();
    let changed: FieldSet = after_set
        .into_iter()
        .filter(|p| match before {
            None => true,
            Some(b) if p.last().is_some_and(|el| el.starts_with("f:")) => {
                get(b, p) != get(after, p)
            }
            Some(b) => get(b, p).is_none(), // a list item: changed only if new
        })
        .collect();
    let mine = |e: &Entry| e.is(manager, "Update", subresource);
    for e in entries.iter_mut().filter(|e| !mine(e)) {
        e.fields.retain(|p| !changed.contains(p));
    }
    if !changed.is_empty() {
        let api_version = after.get("apiVersion").cloned().unwrap_or(Value::Null);
        match entries.iter_mut().find(|e| mine(e)) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = json!(now_rfc3339);
                e.api_version = api_version;
            }
            None => entries.push(Entry {
                manager: manager.to_owned(),
                operation: "Update".into(),
                subresource: subresource.map(str::to_owned),
                api_version,
                time: json!(now_rfc3339),
                fields: changed,
            }),
        }
    }
    finish(entries, after)
}

#[cfg(test)]
mod json_patch_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_of_a_missing_path_against_null_passes_like_the_api_server() {
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["a/b"]}
        ]);
        let patched = json_patch(&json!({"metadata": {}}), &patch).expect("patch applies");
        assert_eq!(patched, json!({"metadata": {"finalizers": ["a/b"]}}));
        let failing = json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]);
        assert!(json_patch(&json!({"metadata": {"finalizers": []}}), &failing).is_err());
        assert!(json_patch(&json!({}), &json!({"op": "add"})).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2024-01-01T00:00:00Z";

    fn smp(target: Value, patch: Value) -> Value {
        strategic_merge(&target, &patch).unwrap()
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "app", "image": image}]}}}
        })
    }

    fn apply(
        live: Option<&Value>,
        applied: &Value,
        manager: &str,
        force: bool,
    ) -> Result<ApplyOutcome, MergeError> {
        server_side_apply(live, applied, manager, force, NOW, None)
    }

    fn entry<'a>(fields: &'a [Value], manager: &str) -> Option<&'a Value> {
        fields.iter().find(|e| e["manager"] == manager)
    }

    // --- strategic merge patch ---

    #[test]
    fn smp_container_image_by_name_keeps_others() {
        let target = json!({"spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}});
        let out = smp(
            target,
            json!({"spec": {"containers": [{"name": "b", "image": "b:2"}, {"name": "c", "image": "c:1"}]}}),
        );
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:2"}, {"name": "c", "image": "c:1"}])
        );
    }

    #[test]
    fn smp_delete_env_item() {
        let target = json!({"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]});
        let out = smp(target, json!({"env": [{"name": "A", "$patch": "delete"}]}));
        assert_eq!(out["env"], json!([{"name": "B", "value": "2"}]));
    }

    #[test]
    fn smp_set_element_order() {
        let target = json!({"containers": [{"name": "a"}, {"name": "b"}, {"name": "x"}]});
        let out = smp(
            target,
            json!({"$setElementOrder/containers": [{"name": "c"}, {"name": "b"}, {"name": "a"}],
                   "containers": [{"name": "c", "image": "c"}]}),
        );
        assert_eq!(
            out["containers"],
            json!([{"name": "c", "image": "c"}, {"name": "b"}, {"name": "a"}, {"name": "x"}])
        );
        assert!(out.get("$setElementOrder/containers").is_none());
    }

    #[test]
    fn smp_finalizers_merge_as_set() {
        let target = json!({"metadata": {"finalizers": ["a", "b"]}});
        let out = smp(
            target.clone(),
            json!({"metadata": {"finalizers": ["b", "c"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b", "c"]));
        let out = smp(
            target,
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn smp_null_deletes_key_and_maps_merge() {
        let out = smp(
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}}),
            json!({"metadata": {"labels": {"a": null, "c": "3"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"b": "2", "c": "3"}));
    }

    #[test]
    fn smp_unknown_directive_is_an_error() {
        let err = strategic_merge(&json!({}), &json!({"spec": {"$frobnicate": 1}})).unwrap_err();
        assert!(
            matches!(&err, MergeError::InvalidPatch(m) if m.contains("$frobnicate")),
            "{err}"
        );
    }

    #[test]
    fn smp_service_ports_merge_by_port() {
        let target = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}});
        let out = smp(
            target,
            json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}]}}),
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "name": "http"}, {"port": 443, "name": "https", "targetPort": 8443}])
        );
    }

    #[test]
    fn smp_container_ports_merge_by_container_port_and_args_replace() {
        let target = json!({"ports": [{"containerPort": 80}], "args": ["a", "b"]});
        let out = smp(
            target,
            json!({"ports": [{"containerPort": 81}], "args": ["c"]}),
        );
        assert_eq!(
            out,
            json!({"ports": [{"containerPort": 80}, {"containerPort": 81}], "args": ["c"]})
        );
    }

    #[test]
    fn smp_replace_and_delete_directives() {
        let target = json!({"spec": {"selector": {"a": "1", "b": "2"}, "extra": {"x": 1}}, "list": [{"name": "a"}]});
        let out = smp(
            target,
            json!({"spec": {"selector": {"$patch": "replace", "c": "3"}, "extra": {"$patch": "delete"}},
                   "containers": [{"$patch": "replace"}, {"name": "z"}]}),
        );
        assert_eq!(out["spec"], json!({"selector": {"c": "3"}}));
        assert_eq!(out["containers"], json!([{"name": "z"}]));
    }

    #[test]
    fn smp_retain_keys() {
        let target =
            json!({"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}});
        let out = smp(
            target,
            json!({"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}),
        );
        assert_eq!(out["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn smp_keyed_item_without_key_is_an_error() {
        assert!(strategic_merge(&json!({}), &json!({"containers": [{"image": "x"}]})).is_err());
    }

    #[test]
    fn json_and_merge_patch_wrappers() {
        let doc = json!({"a": 1, "b": {"c": 2}});
        assert_eq!(
            merge_patch(&doc, &json!({"b": {"c": null}})),
            json!({"a": 1, "b": {}})
        );
        let out = json_patch(&doc, &json!([{"op": "replace", "path": "/a", "value": 5}])).unwrap();
        assert_eq!(out["a"], 5);
        let err = json_patch(&doc, &json!([{"op": "remove", "path": "/zz"}])).unwrap_err();
        assert!(matches!(err, MergeError::JsonPatch(_)));
    }

    // --- server-side apply ---

    #[test]
    fn ssa_create_records_apply_entry() {
        let out = apply(None, &deployment(2, "nginx:1"), "mgr", false).unwrap();
        assert_eq!(out.object["spec"]["replicas"], 2);
        assert_eq!(
            out.object["metadata"]["managedFields"],
            json!(out.managed_fields)
        );
        assert_eq!(out.managed_fields.len(), 1);
        let e = &out.managed_fields[0];
        assert_eq!(e["manager"], "mgr");
        assert_eq!(e["operation"], "Apply");
        assert_eq!(e["apiVersion"], "apps/v1");
        assert_eq!(e["time"], NOW);
        assert_eq!(e["fieldsType"], "FieldsV1");
        assert!(e.get("subresource").is_none());
        assert_eq!(
            e["fieldsV1"],
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {}}
                }}}}
            })
        );
    }

    #[test]
    fn ssa_fields_v1_round_trips() {
        let obj = json!({"metadata": {"finalizers": ["x"]}, "spec": {"args": ["a"], "ports": [{"port": 80}]}});
        let set = field_set(obj.as_object().unwrap());
        let mut decoded = FieldSet::new();
        decode(&encode(&set), &mut Vec::new(), &mut decoded);
        assert_eq!(decoded, set);
        assert_eq!(
            encode(&set),
            json!({"f:metadata": {"f:finalizers": {"v:\"x\"": {}}},
                   "f:spec": {"f:args": {}, "f:ports": {"k:{\"port\":80}": {".": {}, "f:port": {}}}}})
        );
    }

    #[test]
    fn ssa_reapply_without_field_removes_it() {
        let mut first = deployment(2, "nginx:1");
        first["metadata"]["labels"]["tier"] = json!("front");
        let live = apply(None, &first, "mgr", false).unwrap().object;
        let out = apply(Some(&live), &deployment(2, "nginx:1"), "mgr", false).unwrap();
        assert_eq!(out.object["metadata"]["labels"], json!({"app": "web"}));
        let fields = &out.managed_fields[0]["fieldsV1"]["f:metadata"]["f:labels"];
        assert!(fields.get("f:tier").is_none());
    }

    #[test]
    fn ssa_two_managers_disjoint_fields_both_survive() {
        let live = apply(None, &deployment(2, "nginx:1"), "a", false)
            .unwrap()
            .object;
        let b_config = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "annotations": {"b": "yes"}},
            "spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "envoy"}]}}}});
        let live = apply(Some(&live), &b_config, "b", false).unwrap().object;
        // a re-applies its own config: b's annotation and container must stay.
        let out = apply(Some(&live), &deployment(3, "nginx:1"), "a", false).unwrap();
        assert_eq!(out.object["metadata"]["annotations"]["b"], "yes");
        assert_eq!(out.object["spec"]["replicas"], 3);
        let names: Vec<&Value> = out.object["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["name"])
            .collect();
        assert_eq!(names, [&json!("app"), &json!("sidecar")]);
        assert!(
            entry(&out.managed_fields, "a").is_some() && entry(&out.managed_fields, "b").is_some()
        );
        // b drops its config entirely (only identity left): its fields go, a's stay.
        let empty_b =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}});
        let out = apply(Some(&out.object), &empty_b, "b", false).unwrap();
        assert!(out.object["metadata"].get("annotations").is_none());
        assert_eq!(
            out.object["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(entry(&out.managed_fields, "b").is_none());
    }

    #[test]
    fn ssa_conflict_then_force() {
        let live = apply(None, &deployment(2, "nginx:1"), "a", false)
            .unwrap()
            .object;
        let err = apply(Some(&live), &deployment(5, "nginx:2"), "b", false).unwrap_err();
        let MergeError::Conflict(conflicts) = &err else {
            panic!("{err}")
        };
        assert_eq!(
            conflicts,
            &vec![
                Conflict {
                    manager: "a".into(),
                    path: ".spec.replicas".into()
                },
                Conflict {
                    manager: "a".into(),
                    path: ".spec.template.spec.containers[name=\"app\"].image".into()
                },
            ]
        );
        assert!(err.to_string().contains("Apply failed with 2 conflicts"));

        let out = apply(Some(&live), &deployment(5, "nginx:2"), "b", true).unwrap();
        assert_eq!(out.object["spec"]["replicas"], 5);
        let a = entry(&out.managed_fields, "a").unwrap();
        assert!(a["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        let b = entry(&out.managed_fields, "b").unwrap();
        assert_eq!(b["fieldsV1"]["f:spec"]["f:replicas"], json!({}));
        // a now conflicts with b on the field it lost.
        let err = apply(Some(&out.object), &deployment(2, "nginx:2"), "a", false).unwrap_err();
        assert!(
            matches!(err, MergeError::Conflict(c) if c == vec![Conflict { manager: "b".into(), path: ".spec.replicas".into() }])
        );
    }

    #[test]
    fn ssa_equal_values_share_ownership() {
        let live = apply(None, &deployment(2, "nginx:1"), "a", false)
            .unwrap()
            .object;
        let out = apply(Some(&live), &deployment(2, "nginx:1"), "b", false).unwrap();
        for m in ["a", "b"] {
            assert_eq!(
                entry(&out.managed_fields, m).unwrap()["fieldsV1"]["f:spec"]["f:replicas"],
                json!({})
            );
        }
        // a stops applying replicas: b still owns it, so it stays.
        let mut without = deployment(2, "nginx:1");
        without["spec"].as_object_mut().unwrap().remove("replicas");
        let out = apply(Some(&out.object), &without, "a", false).unwrap();
        assert_eq!(out.object["spec"]["replicas"], 2);
    }

    #[test]
    fn ssa_subresource_entry_and_idempotence() {
        let live = apply(None, &deployment(2, "nginx:1"), "a", false)
            .unwrap()
            .object;
        let status = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "status": {"conditions": [{"type": "Available", "status": "True"}]}});
        let once =
            server_side_apply(Some(&live), &status, "a", false, NOW, Some("status")).unwrap();
        let e = once
            .managed_fields
            .iter()
            .find(|e| e["subresource"] == "status")
            .unwrap();
        assert_eq!(
            e["fieldsV1"]["f:status"]["f:conditions"]["k:{\"type\":\"Available\"}"]["f:status"],
            json!({})
        );
        assert_eq!(once.managed_fields.len(), 2);
        let twice = server_side_apply(Some(&once.object), &status, "a", false, NOW, Some("status"))
            .unwrap();
        assert_eq!(twice, once);
    }

    #[test]
    fn ssa_apply_is_idempotent() {
        let configs = [
            deployment(1, "a"),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "finalizers": ["f"]},
                   "spec": {"ports": [{"port": 80}, {"port": 81, "name": "x"}], "selector": {"app": "s"}}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}),
        ];
        for config in configs {
            let once = apply(None, &config, "m", false).unwrap();
            let twice = apply(Some(&once.object), &config, "m", false).unwrap();
            assert_eq!(once, twice, "{config}");
        }
    }

    #[test]
    fn record_update_takes_changed_fields() {
        let applied = apply(None, &deployment(2, "nginx:1"), "applier", false)
            .unwrap()
            .object;
        let mut edited = applied.clone();
        edited["spec"]["replicas"] = json!(7);
        let mf = applied["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .clone();
        let fields = record_update(Some(&applied), &edited, &mf, "kubectl-edit", NOW, None);
        let editor = entry(&fields, "kubectl-edit").unwrap();
        assert_eq!(editor["operation"], "Update");
        assert_eq!(editor["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));
        let applier = entry(&fields, "applier").unwrap();
        assert!(applier["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        assert!(applier["fieldsV1"]["f:spec"].get("f:template").is_some());

        edited["metadata"]["managedFields"] = json!(fields);
        let err = apply(Some(&edited), &deployment(2, "nginx:1"), "applier", false).unwrap_err();
        assert!(
            matches!(err, MergeError::Conflict(c) if c == vec![Conflict { manager: "kubectl-edit".into(), path: ".spec.replicas".into() }])
        );
    }

    #[test]
    fn ssa_dropped_item_stays_whole_while_another_manager_holds_part_of_it() {
        let live = apply(None, &deployment(2, "nginx:1"), "a", false)
            .unwrap()
            .object;
        let mut edited = live.clone();
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        let mf = live["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .clone();
        edited["metadata"]["managedFields"] = json!(record_update(
            Some(&live),
            &edited,
            &mf,
            "editor",
            NOW,
            None
        ));
        let mut no_containers = deployment(2, "x");
        no_containers["spec"]["template"] = json!({"metadata": {"labels": {"app": "web"}}});
        let out = apply(Some(&edited), &no_containers, "a", false).unwrap();
        assert_eq!(
            out.object["spec"]["template"]["spec"]["containers"],
            json!([{"name": "app", "image": "nginx:2"}])
        );
    }

    #[test]
    fn ssa_noop_apply_keeps_time() {
        let once = apply(None, &deployment(2, "a"), "m", false).unwrap();
        let again = server_side_apply(
            Some(&once.object),
            &deployment(2, "a"),
            "m",
            false,
            "2030-01-01T00:00:00Z",
            None,
        )
        .unwrap();
        assert_eq!(again.managed_fields[0]["time"], NOW);
        let changed = server_side_apply(
            Some(&once.object),
            &deployment(3, "a"),
            "m",
            false,
            "2030-01-01T00:00:00Z",
            None,
        )
        .unwrap();
        assert_eq!(changed.managed_fields[0]["time"], "2030-01-01T00:00:00Z");
    }

    #[test]
    fn smp_network_policy_ports_without_port_are_atomic() {
        let out = smp(
            json!({"ports": [{"protocol": "TCP"}]}),
            json!({"ports": [{"protocol": "UDP"}]}),
        );
        assert_eq!(out["ports"], json!([{"protocol": "UDP"}]));
    }

    #[test]
    fn record_update_on_create_owns_everything_but_identity() {
        let obj = deployment(1, "x");
        let fields = record_update(None, &obj, &[], "kubectl-create", NOW, None);
        assert_eq!(fields.len(), 1);
        let f = &fields[0]["fieldsV1"];
        assert!(f.get("f:apiVersion").is_none() && f["f:metadata"].get("f:name").is_none());
        assert_eq!(f["f:metadata"]["f:labels"]["f:app"], json!({}));
        // No change: nothing recorded, nothing lost.
        assert_eq!(
            record_update(Some(&obj), &obj, &fields, "other", NOW, None),
            fields
        );
    }
}
