//! Server-side `Table` rendering, what `kubectl get` asks for to print columns (CRD printer columns included).

use jsonpath_rust::JsonPath;
use serde_json::{Value, json};

use crate::registry::ResourceType;

/// How much of each object a Table row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> IncludeObject {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

pub fn column_definitions(ty: &ResourceType) -> Vec<Value> {
    let mut columns = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace.",
    })];
    for c in &ty.printer_columns {
        let type_ = match c.type_.as_str() {
            "ready" | "ports" | "date" => "string",
            other => other,
        };
        columns.push(json!({"name": c.name, "type": type_, "format": "", "priority": c.priority, "description": c.description}));
    }
    columns
}

pub fn row(ty: &ResourceType, obj: &Value, include: IncludeObject, now: jiff::Timestamp) -> Value {
    let mut cells = vec![
        obj.pointer("/metadata/name")
            .cloned()
            .unwrap_or(Value::Null),
    ];
    for c in &ty.printer_columns {
        cells.push(match c.type_.as_str() {
            "ready" => {
                let ready = obj
                    .pointer("/status/readyReplicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                let want = obj
                    .pointer("/spec/replicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                json!(format!("{ready}/{want}"))
            }
            "ports" => {
                let ports: Vec<String> = obj
                    .pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .map(|ps| {
                        ps.iter()
                            .map(|p| {
                                format!(
                                    "{}/{}",
                                    p.get("port").map(Value::to_string).unwrap_or_default(),
                                    p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!(if ports.is_empty() {
                    "<none>".to_owned()
                } else {
                    ports.join(",")
                })
            }
            "date" => match first_match(obj, &c.json_path)
                .as_ref()
                .and_then(Value::as_str)
            {
                Some(stamp) => stamp
                    .parse::<jiff::Timestamp>()
                    .map(|t| json!(human_age(now.duration_since(t).as_secs())))
                    .unwrap_or(Value::Null),
                None => Value::Null,
            },
            _ => first_match(obj, &c.json_path).unwrap_or(Value::Null),
        });
    }
    let object = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => obj.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
        }),
    };
    json!({"cells": cells, "object": object})
}

pub fn table(
    ty: &ResourceType,
    objects: &[Value],
    resource_version: u64,
    include: IncludeObject,
) -> Value {
    let now = jiff::Timestamp::now();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": column_definitions(ty),
        "rows": objects.iter().map(|o| row(ty, o, include, now)).collect::<Vec<_>>(),
    })
}

/// Evaluates a kubectl-style JSONPath (`.status.phase`, `.status.conditions[?(@.type=="Ready")].status`).
fn first_match(obj: &Value, path: &str) -> Option<Value> {
    let path = path.trim();
    if path.is_empty() {
        return None;
    }
    let query = if path.starts_with('$') {
        path.to_owned()
    } else {
        format!("${path}")
    };
    obj.query(&query)
        .ok()
        .and_then(|found| found.first().map(|v| (*v).clone()))
}

/// Ages as kubectl prints them: `45s`, `3m20s`, `12m`, `5h10m`, `3d`.
pub fn human_age(seconds: i64) -> String {
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 730 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(200), "3m20s");
        assert_eq!(human_age(1800), "30m");
        assert_eq!(human_age(4 * 3600 + 600), "4h10m");
        assert_eq!(human_age(20 * 3600), "20h");
        assert_eq!(human_age(3 * 86400), "3d");
    }

    #[test]
    fn crd_columns_evaluate_filters() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                        {"name": "Missing", "type": "integer", "jsonPath": ".status.nothing"}
                    ]}]}
        });
        let mut registry = Registry::default();
        registry.register_crd(&crd).expect("valid CRD");
        let ty = registry
            .get("example.com", "v1", "widgets")
            .expect("registered");
        let obj = json!({"metadata": {"name": "w"}, "status": {"phase": "Progressing",
            "conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        let r = row(&ty, &obj, IncludeObject::None, jiff::Timestamp::now());
        assert_eq!(r["cells"], json!(["w", "Progressing", "True", null]));
    }
}
