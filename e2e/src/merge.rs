//! TEMPORARY STUB (replaced by the real module).
use serde_json::Value;
#[derive(Debug, thiserror::Error)]
pub enum MergeError { #[error("json patch: {0}")] JsonPatch(String), #[error("invalid patch: {0}")] InvalidPatch(String), #[error("conflict")] Conflict(Vec<Conflict>) }
#[derive(Debug)]
pub struct Conflict { pub manager: String, pub path: String }
pub struct ApplyOutcome { pub object: Value, pub managed_fields: Vec<Value> }
pub fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, MergeError> { Ok(merge_patch(target, patch)) }
pub fn merge_patch(target: &Value, patch: &Value) -> Value { let mut t = target.clone(); json_patch::merge(&mut t, patch); t }
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, MergeError> {
    let p: json_patch::Patch = serde_json::from_value(patch.clone()).map_err(|e| MergeError::JsonPatch(e.to_string()))?;
    let mut t = target.clone(); json_patch::patch(&mut t, &p).map_err(|e| MergeError::JsonPatch(e.to_string()))?; Ok(t) }
pub fn server_side_apply(live: Option<&Value>, applied: &Value, _manager: &str, _force: bool, _now: &str, _sub: Option<&str>) -> Result<ApplyOutcome, MergeError> {
    let object = match live { Some(l) => merge_patch(l, applied), None => applied.clone() };
    Ok(ApplyOutcome { object, managed_fields: vec![] }) }
pub fn record_update(_before: Option<&Value>, _after: &Value, managed: &[Value], _m: &str, _now: &str, _s: Option<&str>) -> Vec<Value> { managed.to_vec() }
