//! Small value types shared by the Sluice resources: bounded weights and duration strings.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// A traffic weight in percent. It cannot exceed 100, so a route never receives an impossible split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Weight(u8);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(100);

    /// `None` when `percent` is above 100.
    pub const fn new(percent: u8) -> Option<Weight> {
        if percent <= 100 {
            Some(Weight(percent))
        } else {
            None
        }
    }

    pub const fn get(self) -> u8 {
        self.0
    }

    /// The weight left for the other side of a two-way split.
    pub const fn complement(self) -> Weight {
        Weight(100 - self.0)
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = u64::deserialize(deserializer)?;
        u8::try_from(raw)
            .ok()
            .and_then(Weight::new)
            .ok_or_else(|| serde::de::Error::custom(format!("weight {raw} is outside 0..=100")))
    }
}

impl JsonSchema for Weight {
    fn schema_name() -> Cow<'static, str> {
        "Weight".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "integer",
            "format": "int32",
            "minimum": 0,
            "maximum": 100,
            "description": "Traffic weight in percent (0-100)."
        })
    }
}

/// Rewrites schemars' unsigned integer formats into ones the Kubernetes API server knows.
///
/// schemars describes `u8`/`u16`/`u32`/`u64` as `format: uint8` ... `uint64`, which the API server does not
/// recognize (`kubectl apply` prints `Warning: unrecognized format "uint32"` and the format is ignored). This
/// turns each into `int32` (`u8`, `u16`) or `int64` (`u32`, `u64`) and keeps the type's range as
/// `minimum`/`maximum` (a bound the field already declares stays), so the API server still refuses a value the
/// Rust type could not hold. Applied with `#[schemars(transform = crate::api::kubernetes_integer_formats)]` on
/// each resource's spec and status; kube generates CRD schemas with every subschema inlined, so one transform at
/// the top reaches every field.
pub fn kubernetes_integer_formats(schema: &mut Schema) {
    schemars::transform::transform_subschemas(&mut kubernetes_integer_formats, schema);
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let (format, max) = match object.get("format").and_then(serde_json::Value::as_str) {
        Some("uint8") => ("int32", u64::from(u8::MAX)),
        Some("uint16") => ("int32", u64::from(u16::MAX)),
        Some("uint32") => ("int64", u64::from(u32::MAX)),
        Some("uint64" | "uint") => ("int64", i64::MAX.unsigned_abs()),
        _ => return,
    };
    object.insert("format".into(), format.into());
    object.entry("minimum").or_insert_with(|| 0.into());
    object.entry("maximum").or_insert_with(|| max.into());
}

/// Pattern of a Go-style duration as Kubernetes and Flagger users write it: `30s`, `1m`, `1m30s`, `500ms`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Longest duration string accepted (`1h30m` is 5 characters). The bound keeps the cost the API server estimates
/// for the `duration(...)` CEL rules small.
pub const DURATION_MAX_LENGTH: u64 = 64;

/// A duration written the way Flagger and Kubernetes users write it (`1m`, `30s`, `1h30m`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DurationString(pub String);

impl DurationString {
    /// Parses the duration; `None` if it does not match [`DURATION_PATTERN`].
    pub fn to_std(&self) -> Option<std::time::Duration> {
        parse_duration(&self.0)
    }
}

impl JsonSchema for DurationString {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": DURATION_MAX_LENGTH,
            "pattern": DURATION_PATTERN,
            "description": "A duration such as 30s, 1m or 1m30s."
        })
    }
}

/// Parses a Go-style duration made of `<number><unit>` groups (`ms`, `s`, `m`, `h`).
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    if text.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (seconds_per_unit, unit_len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return None;
        };
        total += number * seconds_per_unit;
        rest = &rest[unit_len..];
    }
    std::time::Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn weight_is_bounded() {
        assert_eq!(Weight::new(100), Some(Weight::FULL));
        assert_eq!(Weight::new(101), None);
        assert_eq!(Weight::new(30).map(Weight::complement), Weight::new(70));
        assert!(serde_json::from_str::<Weight>("101").is_err());
        assert_eq!(serde_json::from_str::<Weight>("42").ok(), Weight::new(42));
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        for bad in ["", "10", "s", "1x", "1m 30s", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
