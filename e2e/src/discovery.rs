//! Discovery documents (`/version`, `/api`, `/apis`, resource lists) and the OpenAPI v3 documents kubectl
//! reads to learn that the server validates fields itself (`fieldValidation`).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde_json::{Value, json};

use crate::registry::{Registry, ResourceType};

/// The Kubernetes version the sandbox reports; matches the k8s-openapi feature Sluice builds with.
pub const KUBERNETES_MINOR: &str = "33";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBERNETES_MINOR,
        "gitVersion": format!("v1.{KUBERNETES_MINOR}.0-sluice-sandbox"),
        "gitCommit": "sandbox",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "none (sluice-sandbox is written in Rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_doc(name: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": versions, "preferredVersion": versions.first().cloned().unwrap_or(Value::Null)})
}

pub fn group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .groups()
        .iter()
        .map(|(name, versions)| group_doc(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(registry: &Registry, name: &str) -> Option<Value> {
    let groups = registry.groups();
    let versions = groups.get(name)?;
    let mut doc = group_doc(name, versions);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

const ALL_VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn storage_hash(ty: &ResourceType) -> String {
    let mut hasher = DefaultHasher::new();
    (&ty.group, &ty.version, &ty.plural).hash(&mut hasher);
    format!("{:x}", hasher.finish())
}

pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for ty in registry.in_group_version(group, version) {
        let mut main = json!({
            "name": ty.plural,
            "singularName": ty.singular,
            "namespaced": ty.namespaced,
            "kind": ty.kind,
            "verbs": ALL_VERBS,
            "storageVersionHash": storage_hash(ty),
        });
        if !ty.short_names.is_empty() {
            main["shortNames"] = json!(ty.short_names);
        }
        if !ty.categories.is_empty() {
            main["categories"] = json!(ty.categories);
        }
        resources.push(main);
        if ty.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", ty.plural), "singularName": "", "namespaced": ty.namespaced,
                "kind": ty.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if ty.scale_subresource {
            resources.push(json!({
                "name": format!("{}/scale", ty.plural), "singularName": "", "namespaced": ty.namespaced,
                "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// One OpenAPI v3 document per group-version, listing item paths with their PATCH operation and the query
/// parameters the server honours. kubectl looks for `fieldValidation` there before relying on the server to
/// reject unknown fields; schemas are left out (kubectl then uses its built-in patch strategies).
pub fn openapi_v3_group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let query_param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    for ty in registry.in_group_version(group, version) {
        let base = gv_path(group, version);
        let item_path = if ty.namespaced {
            format!("/{base}/namespaces/{{namespace}}/{}/{{name}}", ty.plural)
        } else {
            format!("/{base}/{}/{{name}}", ty.plural)
        };
        let gvk = json!({"group": group, "version": version, "kind": ty.kind});
        let operation = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", ty.kind),
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
                "responses": {"200": {"description": "OK"}},
            })
        };
        let params = json!([
            query_param("dryRun"),
            query_param("fieldManager"),
            query_param("fieldValidation"),
            query_param("force")
        ]);
        let mut patch = operation("patch");
        patch["parameters"] = params.clone();
        patch["requestBody"] = json!({"content": {
            "application/json-patch+json": {}, "application/merge-patch+json": {}, "application/apply-patch+yaml": {}
        }});
        paths.insert(
            item_path,
            json!({
                "parameters": params,
                "get": operation("get"),
                "put": operation("put"),
                "patch": patch,
                "delete": operation("delete"),
            }),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (sluice-sandbox)", "version": format!("v1.{KUBERNETES_MINOR}.0")},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

pub fn openapi_v3_index(registry: &Registry) -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs: Vec<(String, String)> = registry
        .all()
        .map(|t| (t.group.clone(), t.version.clone()))
        .collect();
    gvs.dedup();
    for (group, version) in gvs {
        let Some(doc) = openapi_v3_group_version(registry, &group, &version) else {
            continue;
        };
        let mut hasher = DefaultHasher::new();
        doc.to_string().hash(&mut hasher);
        let path = gv_path(&group, &version);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={:016X}", hasher.finish())}),
        );
    }
    json!({"paths": paths})
}
