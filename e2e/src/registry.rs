//! The resource types the sandbox serves: a fixed table of built-in kinds plus whatever CRDs were applied.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::schema::CompiledSchema;

/// Identifies stored objects of one type across all of its served versions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TypeKey {
    pub group: String,
    pub resource: String,
}

/// A printer column of `kubectl get` (CRD `additionalPrinterColumns`, or built in).
#[derive(Clone, Debug)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub priority: i64,
    pub description: String,
}

/// One served resource type in one version.
#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub scale_subresource: bool,
    /// Set on built-in kinds that use `metadata.generation` (workloads) and on every custom resource.
    pub tracks_generation: bool,
    pub schema: Option<Arc<CompiledSchema>>,
    pub printer_columns: Vec<PrinterColumn>,
    /// The CRD that defines this type, if any.
    pub crd: Option<String>,
}

impl ResourceType {
    pub fn key(&self) -> TypeKey {
        TypeKey {
            group: self.group.clone(),
            resource: self.plural.clone(),
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `rollouts.sluice.dev`, or `deployments.apps`, or `services`: how the API server names a type in errors.
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn is_custom(&self) -> bool {
        self.crd.is_some()
    }
}

/// Built-in kind description: (group, version, plural, kind, short names, namespaced, status, scale, generation, categories).
struct Builtin(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    bool,
    bool,
    bool,
    bool,
    &'static [&'static str],
);

#[rustfmt::skip]
const BUILTINS: &[Builtin] = &[
    Builtin("", "v1", "namespaces", "Namespace", &["ns"], false, true, false, false, &[]),
    Builtin("", "v1", "pods", "Pod", &["po"], true, true, false, false, &["all"]),
    Builtin("", "v1", "services", "Service", &["svc"], true, true, false, false, &["all"]),
    Builtin("", "v1", "endpoints", "Endpoints", &["ep"], true, false, false, false, &[]),
    Builtin("", "v1", "configmaps", "ConfigMap", &["cm"], true, false, false, false, &[]),
    Builtin("", "v1", "secrets", "Secret", &[], true, false, false, false, &[]),
    Builtin("", "v1", "serviceaccounts", "ServiceAccount", &["sa"], true, false, false, false, &[]),
    Builtin("", "v1", "events", "Event", &["ev"], true, false, false, false, &[]),
    Builtin("apps", "v1", "deployments", "Deployment", &["deploy"], true, true, true, true, &["all"]),
    Builtin("apps", "v1", "statefulsets", "StatefulSet", &["sts"], true, true, true, true, &["all"]),
    Builtin("apps", "v1", "replicasets", "ReplicaSet", &["rs"], true, true, true, true, &["all"]),
    Builtin("coordination.k8s.io", "v1", "leases", "Lease", &[], true, false, false, false, &[]),
    Builtin("events.k8s.io", "v1", "events", "Event", &["ev"], true, false, false, false, &[]),
    Builtin("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", &["crd", "crds"], false, true, false, false, &["api-extensions"]),
    Builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", &[], false, false, false, false, &[]),
    Builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", &[], false, false, false, false, &[]),
    Builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", &[], true, false, false, false, &[]),
    Builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", &[], true, false, false, false, &[]),
];

/// All served types, by group then version then plural.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    pub fn with_builtins() -> Registry {
        let mut registry = Registry::default();
        for b in BUILTINS {
            let Builtin(
                group,
                version,
                plural,
                kind,
                short,
                namespaced,
                status,
                scale,
                generation,
                categories,
            ) = *b;
            registry.insert(ResourceType {
                group: group.into(),
                version: version.into(),
                plural: plural.into(),
                singular: kind.to_ascii_lowercase(),
                kind: kind.into(),
                list_kind: format!("{kind}List"),
                short_names: short.iter().map(|s| s.to_string()).collect(),
                categories: categories.iter().map(|s| s.to_string()).collect(),
                namespaced,
                status_subresource: status,
                scale_subresource: scale,
                tracks_generation: generation,
                schema: None,
                printer_columns: builtin_columns(plural),
                crd: None,
            });
        }
        registry
    }

    fn insert(&mut self, ty: ResourceType) {
        self.types.insert(
            (ty.group.clone(), ty.version.clone(), ty.plural.clone()),
            Arc::new(ty),
        );
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_owned(), version.to_owned(), plural.to_owned()))
            .cloned()
    }

    /// Any served version of a type (used when only the stored identity is known).
    pub fn any_version(&self, key: &TypeKey) -> Option<Arc<ResourceType>> {
        self.types
            .values()
            .find(|t| t.group == key.group && t.plural == key.resource)
            .cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// Groups with their versions, preferred version first (core group excluded).
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in self.types.values().filter(|t| !t.group.is_empty()) {
            let versions = groups.entry(t.group.clone()).or_default();
            if !versions.contains(&t.version) {
                versions.push(t.version.clone());
            }
        }
        for versions in groups.values_mut() {
            versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        groups
    }

    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a Arc<ResourceType>> {
        self.types
            .values()
            .filter(move |t| t.group == group && t.version == version)
    }

    /// Removes every version a CRD served.
    pub fn remove_crd(&mut self, crd_name: &str) {
        self.types.retain(|_, t| t.crd.as_deref() != Some(crd_name));
    }

    /// Registers the served versions of a CRD; errors name the field that is wrong.
    pub fn register_crd(&mut self, crd: &Value) -> Result<(), Vec<(String, String)>> {
        let types = crd_types(crd)?;
        let name = crd
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        self.remove_crd(&name);
        for t in types {
            self.insert(t);
        }
        Ok(())
    }
}

/// Kubernetes version ordering: GA before beta before alpha, higher numbers first (v2 > v1 > v1beta2 > v1alpha1).
pub fn version_priority(version: &str) -> (u8, u64, u64) {
    let Some(rest) = version.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let Ok(major) = rest[..digits].parse::<u64>() else {
        return (0, 0, 0);
    };
    let suffix = &rest[digits..];
    let minor = |tail: &str| tail.parse::<u64>().unwrap_or(0);
    if suffix.is_empty() {
        (3, major, 0)
    } else if let Some(tail) = suffix.strip_prefix("beta") {
        (2, major, minor(tail))
    } else if let Some(tail) = suffix.strip_prefix("alpha") {
        (1, major, minor(tail))
    } else {
        (0, major, 0)
    }
}

/// Builds the served types of a CRD object, or the field errors that make it unacceptable.
pub fn crd_types(crd: &Value) -> Result<Vec<ResourceType>, Vec<(String, String)>> {
    let mut errors = Vec::new();
    let text = |path: &str| {
        crd.pointer(path)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let name = text("/metadata/name");
    let group = text("/spec/group");
    let plural = text("/spec/names/plural");
    let kind = text("/spec/names/kind");
    if group.is_empty() {
        errors.push(("spec.group".into(), "Required value".into()));
    }
    if plural.is_empty() {
        errors.push(("spec.names.plural".into(), "Required value".into()));
    }
    if kind.is_empty() {
        errors.push(("spec.names.kind".into(), "Required value".into()));
    }
    if !name.is_empty() && name != format!("{plural}.{group}") {
        errors.push((
            "metadata.name".into(),
            format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    let scope = text("/spec/scope");
    if scope != "Namespaced" && scope != "Cluster" {
        errors.push((
            "spec.scope".into(),
            format!(
                "Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""
            ),
        ));
    }
    let strings = |path: &str| -> Vec<String> {
        crd.pointer(path)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errors.push((
            "spec.versions".into(),
            "Required value: must have exactly one version marked as storage version".into(),
        ));
    }
    let storage_versions = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if !versions.is_empty() && storage_versions != 1 {
        errors.push((
            "spec.versions".into(),
            "Invalid value: must have exactly one version marked as storage version".into(),
        ));
    }
    let mut types = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let version = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let schema = match v.pointer("/schema/openAPIV3Schema") {
            Some(s) => match CompiledSchema::new(s) {
                Ok(compiled) => Some(Arc::new(compiled)),
                Err(message) => {
                    errors.push((
                        format!("spec.versions[{i}].schema.openAPIV3Schema"),
                        format!("Invalid value: {message}"),
                    ));
                    None
                }
            },
            None => {
                errors.push((
                    format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    "Required value: schemas are required".into(),
                ));
                None
            }
        };
        let printer_columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: c
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        type_: c
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("string")
                            .to_owned(),
                        json_path: c
                            .get("jsonPath")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        description: c
                            .get("description")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_else(|| vec![age_column()]);
        types.push(ResourceType {
            group: group.clone(),
            version,
            plural: plural.clone(),
            singular: crd
                .pointer("/spec/names/singular")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| kind.to_ascii_lowercase()),
            kind: kind.clone(),
            list_kind: crd
                .pointer("/spec/names/listKind")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{kind}List")),
            short_names: strings("/spec/names/shortNames"),
            categories: strings("/spec/names/categories"),
            namespaced: scope == "Namespaced",
            status_subresource: v.pointer("/subresources/status").is_some(),
            scale_subresource: v.pointer("/subresources/scale").is_some(),
            tracks_generation: true,
            schema,
            printer_columns,
            crd: Some(name.clone()),
        });
    }
    if errors.is_empty() {
        Ok(types)
    } else {
        Err(errors)
    }
}

/// The accepted-names status a real API server reports for a CRD.
pub fn crd_status(crd: &Value, now: &str) -> Value {
    let condition = |type_: &str, reason: &str, message: &str| json!({"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now});
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(Value::Null),
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}

fn age_column() -> PrinterColumn {
    column("Age", "date", ".metadata.creationTimestamp")
}

fn column(name: &str, type_: &str, path: &str) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        json_path: path.into(),
        priority: 0,
        description: String::new(),
    }
}

/// Columns for built-in kinds, close to what kubectl users see from a real cluster.
fn builtin_columns(plural: &str) -> Vec<PrinterColumn> {
    match plural {
        "deployments" | "statefulsets" => vec![
            column("Ready", "ready", ""),
            column("Up-to-date", "integer", ".status.updatedReplicas"),
            column("Available", "integer", ".status.availableReplicas"),
            age_column(),
        ],
        "services" => vec![
            column("Type", "string", ".spec.type"),
            column("Cluster-IP", "string", ".spec.clusterIP"),
            column("Port(s)", "ports", ""),
            age_column(),
        ],
        "namespaces" => vec![column("Status", "string", ".status.phase"), age_column()],
        "customresourcedefinitions" => vec![column(
            "Created At",
            "string",
            ".metadata.creationTimestamp",
        )],
        "events" => vec![
            column("Type", "string", ".type"),
            column("Reason", "string", ".reason"),
            column("Message", "string", ".message"),
        ],
        "leases" => vec![
            column("Holder", "string", ".spec.holderIdentity"),
            age_column(),
        ],
        _ => vec![age_column()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_kubernetes() {
        let mut versions = vec![
            "v1alpha1", "v1", "v2beta1", "v1beta2", "v2", "v1beta1", "foo",
        ];
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(
            versions,
            vec![
                "v2", "v1", "v2beta1", "v1beta2", "v1beta1", "v1alpha1", "foo"
            ]
        );
    }
}
