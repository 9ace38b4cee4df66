//! Kubernetes `Status` errors, with the reasons, codes and wording kubectl and kube-rs expect.

use serde_json::{Value, json};

use crate::registry::ResourceType;

/// An API error as the API server reports it (`kind: Status`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn not_found(ty: &ResourceType, name: &str) -> ApiError {
        ApiError {
            details: json!({"name": name, "group": ty.group, "kind": ty.plural}),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", ty.qualified_name()),
            )
        }
    }

    pub fn already_exists(ty: &ResourceType, name: &str) -> ApiError {
        ApiError {
            details: json!({"name": name, "group": ty.group, "kind": ty.plural}),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", ty.qualified_name()),
            )
        }
    }

    pub fn conflict(ty: &ResourceType, name: &str, why: &str) -> ApiError {
        ApiError {
            details: json!({"name": name, "group": ty.group, "kind": ty.plural}),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    ty.qualified_name()
                ),
            )
        }
    }

    /// 422 with one cause per field, worded like the API server: `Kind.group "name" is invalid: field: message`.
    pub fn invalid(
        ty: &ResourceType,
        name: &str,
        causes: Vec<(String, &'static str, String)>,
    ) -> ApiError {
        let listed: Vec<String> = causes
            .iter()
            .map(|(field, _, message)| format!("{field}: {message}"))
            .collect();
        let summary = if listed.len() == 1 {
            listed[0].clone()
        } else {
            format!("[{}]", listed.join(", "))
        };
        let group_kind = if ty.group.is_empty() {
            ty.kind.clone()
        } else {
            format!("{}.{}", ty.kind, ty.group)
        };
        ApiError {
            details: json!({
                "name": name,
                "group": ty.group,
                "kind": ty.kind,
                "causes": causes.iter().map(|(field, reason, message)| json!({
                    "reason": reason, "message": message, "field": field,
                })).collect::<Vec<_>>(),
            }),
            ..ApiError::new(
                422,
                "Invalid",
                format!("{group_kind} \"{name}\" is invalid: {summary}"),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }
}
