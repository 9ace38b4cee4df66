//! Admission of custom resources against a CRD version's `openAPIV3Schema`,
//! mimicking kube-apiserver: structural pruning (or strict unknown-field
//! rejection), defaulting, structural validation and CEL
//! (`x-kubernetes-validations`) rules, reported as Kubernetes-style field errors.
//!
//! Order follows the apiserver: prune → drop non-nullable nulls → default →
//! validate schema → (only if that passed) evaluate CEL rules.
//!
//! Not covered: `x-kubernetes-list-type`/`list-map-keys` duplicate checks,
//! `x-kubernetes-map-type`, metadata validation (root and embedded resources),
//! formats other than `int32`/`int64`/`date-time`/`date`, CEL cost limits,
//! regex features the `regex` crate lacks (look-around, back-references: such
//! patterns are skipped), and ratcheting of unchanged invalid fields.

use std::collections::HashMap;
use std::fmt;

use kube::core::cel::{
    CompiledSchema as CelSchema, ValidationError as CelError, compile_schema, validate_compiled,
};
use regex::Regex;
use serde_json::{Map, Value};

/// Deeper schemas are rejected up front so every recursive walk is bounded
/// (kube-cel refuses nesting beyond 64 as well).
const MAX_SCHEMA_DEPTH: usize = 64;

/// Keys the apiserver always keeps at the root (and in embedded resources).
const META_KEYS: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// The kind of a field error, mirroring `field.ErrorType` in apimachinery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    Required,
    Invalid,
    NotSupported,
    TooLong,
    TooMany,
    TypeInvalid,
    /// Also used for unknown fields in strict mode.
    Forbidden,
}

/// One validation failure, shaped like apimachinery's `field.Error`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Dotted path with `[i]` list indexes, e.g. `spec.analysis.metrics[0].name`.
    /// Empty for the object root (rendered as `<nil>`, like the apiserver).
    pub field: String,
    pub kind: FieldErrorKind,
    /// The detail text, e.g. `spec.x in body should be less than or equal to 100`.
    pub message: String,
    /// The offending value as shown after `Invalid value:`; `None` omits it.
    pub value: Option<Value>,
}

impl FieldError {
    /// An error without a bad value.
    pub fn new(field: impl Into<String>, kind: FieldErrorKind, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind,
            message: message.into(),
            value: None,
        }
    }

    fn with_value(
        field: &str,
        kind: FieldErrorKind,
        value: Value,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.to_string(),
            kind,
            message: message.into(),
            value: Some(value),
        }
    }

    /// The `StatusCause.reason` for this error.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::TooMany => "FieldValueTooMany",
            FieldErrorKind::TypeInvalid => "FieldValueTypeInvalid",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
        }
    }

    /// Everything after `field: `, i.e. what the apiserver puts in
    /// `StatusCause.message` (`field.Error.ErrorBody()`).
    pub fn body(&self) -> String {
        let type_str = match self.kind {
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::Invalid | FieldErrorKind::TypeInvalid => "Invalid value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::TooLong => "Too long",
            FieldErrorKind::TooMany => "Too many",
            FieldErrorKind::Forbidden => "Forbidden",
        };
        // apimachinery never prints the value for these kinds.
        let omit = matches!(
            self.kind,
            FieldErrorKind::Required | FieldErrorKind::Forbidden | FieldErrorKind::TooLong
        );
        let mut s = match (&self.value, omit) {
            (Some(v), false) => format!("{type_str}: {}", go_value(v)),
            _ => type_str.to_string(),
        };
        if !self.message.is_empty() {
            s.push_str(": ");
            s.push_str(&self.message);
        }
        s
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() {
            "<nil>"
        } else {
            &self.field
        };
        write!(f, "{field}: {}", self.body())
    }
}

impl std::error::Error for FieldError {}

/// A compiled schema for one CRD version (CEL rules and patterns compiled once).
pub struct CompiledSchema {
    schema: Value,
    patterns: HashMap<String, Regex>,
    cel: CelSchema,
    has_cel: bool,
}

impl fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledSchema")
            .field("has_cel", &self.has_cel)
            .finish_non_exhaustive()
    }
}

impl CompiledSchema {
    /// Compiles `openAPIV3Schema`. Fails if it is not an object, nests deeper
    /// than 64 levels, or any CEL rule (or messageExpression) fails to compile.
    /// Patterns the `regex` crate cannot compile are ignored (not enforced).
    pub fn new(open_api_v3_schema: &Value) -> Result<Self, String> {
        if !open_api_v3_schema.is_object() {
            return Err("openAPIV3Schema must be an object".to_string());
        }
        let mut patterns = HashMap::new();
        let mut has_cel = false;
        scan_schema(open_api_v3_schema, 0, &mut patterns, &mut has_cel)?;
        let cel = compile_schema(open_api_v3_schema);
        let mut cel_errors = Vec::new();
        collect_cel_errors(&cel, &mut cel_errors);
        if !cel_errors.is_empty() {
            return Err(cel_errors.join("; "));
        }
        Ok(Self {
            schema: open_api_v3_schema.clone(),
            patterns,
            cel,
            has_cel,
        })
    }

    /// Prune unknown fields (unless `x-kubernetes-preserve-unknown-fields`),
    /// apply defaults, validate structure and then CEL rules.
    ///
    /// `old` is the stored object on update; transition rules (`oldSelf`) only
    /// run when it is given. With `strict` (fieldValidation=Strict) unknown
    /// fields are returned as `Forbidden: field not declared in schema` errors
    /// (and nothing else, as the apiserver fails decoding before validation).
    pub fn admit(
        &self,
        object: Value,
        old: Option<&Value>,
        strict: bool,
    ) -> Result<Value, Vec<FieldError>> {
        let mut object = object;
        if !object.is_object() {
            let got = json_type(&object);
            return Err(vec![FieldError::with_value(
                "",
                FieldErrorKind::TypeInvalid,
                Value::String(got.to_string()),
                format!("object in body must be of type object: {}", go_quote(got)),
            )]);
        }

        let mut unknown = Vec::new();
        prune(&self.schema, &mut object, "", true, strict, &mut unknown);
        if !unknown.is_empty() {
            return Err(unknown);
        }

        apply_defaults(&self.schema, &mut object, true);

        let mut errors = Vec::new();
        self.validate(&self.schema, &object, "", true, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }

        if self.has_cel
            && let Err(cel_errors) = validate_compiled(&self.cel, &object, old)
        {
            return Err(cel_errors
                .into_iter()
                .map(|e| self.cel_to_field_error(e))
                .collect());
        }
        Ok(object)
    }

    fn cel_to_field_error(&self, e: CelError) -> FieldError {
        // kube-cel joins a rule fieldPath starting with '.' verbatim onto the root.
        let field = e
            .field_path
            .strip_prefix('.')
            .unwrap_or(&e.field_path)
            .to_string();
        let kind = match e.reason.as_deref() {
            Some("FieldValueForbidden") => FieldErrorKind::Forbidden,
            Some("FieldValueRequired") => FieldErrorKind::Required,
            _ => FieldErrorKind::Invalid,
        };
        // The apiserver shows the schema type of the node as the bad value.
        let type_name = schema_at(&self.schema, &field)
            .and_then(|s| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("object")
            .to_string();
        FieldError {
            field,
            kind,
            message: e.message,
            value: Some(Value::String(type_name)),
        }
    }

    fn validate(
        &self,
        schema: &Value,
        value: &Value,
        path: &str,
        root: bool,
        errs: &mut Vec<FieldError>,
    ) {
        let declared_type = schema.get("type").and_then(Value::as_str);
        let int_or_string = flag(schema, "x-kubernetes-int-or-string");

        if value.is_null() {
            // Untyped nodes (e.g. preserve-unknown-fields) accept anything.
            if !flag(schema, "nullable") && (declared_type.is_some() || int_or_string) {
                let expected = declared_type.unwrap_or("integer,string");
                errs.push(type_error(path, expected, "null"));
            }
            return;
        }

        let actual = json_type(value);
        if int_or_string {
            if actual != "integer" && actual != "string" {
                errs.push(type_error(path, "integer,string", actual));
                return;
            }
        } else if let Some(t) = declared_type
            && !type_matches(t, actual)
        {
            errs.push(type_error(path, t, actual));
            return;
        }

        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.iter().any(|a| json_eq(a, value))
        {
            let list: Vec<String> = allowed
                .iter()
                .map(|a| match a {
                    Value::String(s) => go_quote(s),
                    other => go_quote(&other.to_string()),
                })
                .collect();
            errs.push(FieldError::with_value(
                path,
                FieldErrorKind::NotSupported,
                value.clone(),
                format!("supported values: {}", list.join(", ")),
            ));
        }

        match value {
            Value::String(s) => self.validate_string(schema, s, value, path, errs),
            Value::Number(_) => validate_number(schema, value, path, errs),
            Value::Array(items) => self.validate_array(schema, items, value, path, errs),
            Value::Object(obj) => self.validate_object(schema, obj, value, path, root, errs),
            _ => {}
        }

        self.validate_combinators(schema, value, path, root, errs);
    }

    fn validate_string(
        &self,
        schema: &Value,
        s: &str,
        value: &Value,
        path: &str,
        errs: &mut Vec<FieldError>,
    ) {
        let len = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            let unit = if max == 1 { "byte" } else { "bytes" };
            errs.push(FieldError::with_value(
                path,
                FieldErrorKind::TooLong,
                value.clone(),
                format!("may not be more than {max} {unit}"),
            ));
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            errs.push(invalid(
                path,
                value,
                format!("{path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str)
            && let Some(re) = self.patterns.get(p)
            && !re.is_match(s)
        {
            errs.push(invalid(
                path,
                value,
                format!("{path} in body should match '{p}'"),
            ));
        }
        if let Some(format) = schema.get("format").and_then(Value::as_str) {
            let ok = match format {
                "date-time" => is_date_time(s),
                "date" => is_date(s),
                _ => true, // the apiserver ignores unknown formats too
            };
            if !ok {
                errs.push(FieldError::with_value(
                    path,
                    FieldErrorKind::TypeInvalid,
                    value.clone(),
                    format!("{path} in body must be of type {format}: {}", go_quote(s)),
                ));
            }
        }
    }

    fn validate_array(
        &self,
        schema: &Value,
        items: &[Value],
        value: &Value,
        path: &str,
        errs: &mut Vec<FieldError>,
    ) {
        let len = items.len() as u64;
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && len > max
        {
            let unit = if max == 1 { "item" } else { "items" };
            errs.push(FieldError::with_value(
                path,
                FieldErrorKind::TooMany,
                Value::from(len),
                format!("must have at most {max} {unit}"),
            ));
        }
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && len < min
        {
            errs.push(invalid(
                path,
                value,
                format!("{path} in body should have at least {min} items"),
            ));
        }
        if flag(schema, "uniqueItems") {
            let dup = items
                .iter()
                .enumerate()
                .any(|(i, a)| items[..i].iter().any(|b| json_eq(a, b)));
            if dup {
                errs.push(invalid(
                    path,
                    value,
                    format!("{path} in body shouldn't contain duplicates"),
                ));
            }
        }
        if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
            for (i, item) in items.iter().enumerate() {
                self.validate(item_schema, item, &join_index(path, i), false, errs);
            }
        }
    }

    fn validate_object(
        &self,
        schema: &Value,
        obj: &Map<String, Value>,
        value: &Value,
        path: &str,
        root: bool,
        errs: &mut Vec<FieldError>,
    ) {
        // Root/embedded metadata is the caller's business, and not counted.
        let skip_meta = root || flag(schema, "x-kubernetes-embedded-resource");
        let is_skipped = |k: &str| skip_meta && META_KEYS.contains(&k);

        let count = obj.keys().filter(|k| !is_skipped(k)).count() as u64;
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
            && count > max
        {
            let unit = if max == 1 { "item" } else { "items" };
            errs.push(FieldError::with_value(
                path,
                FieldErrorKind::TooMany,
                Value::from(count),
                format!("must have at most {max} {unit}"),
            ));
        }
        if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
            && count < min
        {
            errs.push(invalid(
                path,
                value,
                format!("{path} in body should have at least {min} properties"),
            ));
        }

        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for key in required.iter().filter_map(Value::as_str) {
                if !is_skipped(key) && !obj.contains_key(key) {
                    errs.push(FieldError::new(
                        join(path, key),
                        FieldErrorKind::Required,
                        "",
                    ));
                }
            }
        }

        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties").filter(|a| a.is_object());
        for (key, child) in obj {
            if is_skipped(key) {
                continue;
            }
            let child_schema = props.and_then(|p| p.get(key)).or(additional);
            if let Some(cs) = child_schema {
                self.validate(cs, child, &join(path, key), false, errs);
            }
        }
    }

    /// allOf/anyOf/oneOf/not are value validations only (structural schemas
    /// forbid them from declaring new fields), reported like go-openapi.
    fn validate_combinators(
        &self,
        schema: &Value,
        value: &Value,
        path: &str,
        root: bool,
        errs: &mut Vec<FieldError>,
    ) {
        let run = |branch: &Value| {
            let mut e = Vec::new();
            self.validate(branch, value, path, root, &mut e);
            e
        };
        // go-openapi carries no value for these, which the apiserver shows as "".
        let summary = |msg: String| {
            FieldError::with_value(
                path,
                FieldErrorKind::Invalid,
                Value::String(String::new()),
                msg,
            )
        };

        if let Some(branches) = schema.get("allOf").and_then(Value::as_array) {
            for b in branches {
                for e in run(b) {
                    if !errs.contains(&e) {
                        errs.push(e);
                    }
                }
            }
        }
        if let Some(branches) = schema.get("anyOf").and_then(Value::as_array)
            && !branches.is_empty()
        {
            let results: Vec<Vec<FieldError>> = branches.iter().map(run).collect();
            if results.iter().all(|r| !r.is_empty()) {
                errs.push(summary(format!(
                    "{path} must validate at least one schema (anyOf)"
                )));
                if let Some(first) = results.into_iter().next() {
                    errs.extend(first);
                }
            }
        }
        if let Some(branches) = schema.get("oneOf").and_then(Value::as_array)
            && !branches.is_empty()
        {
            let results: Vec<Vec<FieldError>> = branches.iter().map(run).collect();
            let valid = results.iter().filter(|r| r.is_empty()).count();
            if valid == 0 {
                errs.push(summary(format!(
                    "{path} must validate one and only one schema (oneOf)"
                )));
                if let Some(first) = results.into_iter().next() {
                    errs.extend(first);
                }
            } else if valid > 1 {
                errs.push(summary(format!(
                    "{path} must validate one and only one schema (oneOf). Found {valid} valid alternatives"
                )));
            }
        }
        if let Some(not) = schema.get("not").filter(|n| n.is_object())
            && run(not).is_empty()
        {
            errs.push(summary(format!(
                "{path} must not validate the schema (not)"
            )));
        }
    }
}

/// Checks depth, compiles patterns and notes whether any CEL rule exists.
fn scan_schema(
    schema: &Value,
    depth: usize,
    patterns: &mut HashMap<String, Regex>,
    has_cel: &mut bool,
) -> Result<(), String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(format!(
            "schema nesting exceeds the maximum depth of {MAX_SCHEMA_DEPTH}"
        ));
    }
    let Some(obj) = schema.as_object() else {
        return Ok(());
    };
    if let Some(p) = obj.get("pattern").and_then(Value::as_str)
        && !patterns.contains_key(p)
        && let Ok(re) = Regex::new(p)
    {
        patterns.insert(p.to_string(), re);
    }
    if obj
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .is_some_and(|v| !v.is_empty())
    {
        *has_cel = true;
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for child in props.values() {
            scan_schema(child, depth + 1, patterns, has_cel)?;
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(child) = obj.get(key) {
            scan_schema(child, depth + 1, patterns, has_cel)?;
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(branches) = obj.get(key).and_then(Value::as_array) {
            for child in branches {
                scan_schema(child, depth + 1, patterns, has_cel)?;
            }
        }
    }
    Ok(())
}

fn collect_cel_errors(node: &CelSchema, out: &mut Vec<String>) {
    out.extend(node.compilation_errors().iter().map(|e| e.to_string()));
    for child in node.properties.values() {
        collect_cel_errors(child, out);
    }
    for child in node.items.iter().chain(node.additional_properties.iter()) {
        collect_cel_errors(child, out);
    }
    for child in node.all_of.iter().chain(&node.one_of).chain(&node.any_of) {
        collect_cel_errors(child, out);
    }
}

/// Structural pruning: drop (or, in strict mode, report) fields the schema
/// does not declare. Root and embedded-resource meta keys are never touched.
fn prune(
    schema: &Value,
    value: &mut Value,
    path: &str,
    root: bool,
    strict: bool,
    unknown: &mut Vec<FieldError>,
) {
    match value {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let additional_schema = additional.filter(|a| a.is_object());
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields")
                || additional == Some(&Value::Bool(true));
            let skip_meta = root || flag(schema, "x-kubernetes-embedded-resource");

            let keys: Vec<String> = obj.keys().cloned().collect();
            for key in keys {
                if skip_meta && META_KEYS.contains(&key.as_str()) {
                    continue;
                }
                let child_path = join(path, &key);
                match props.and_then(|p| p.get(&key)).or(additional_schema) {
                    Some(child_schema) => {
                        if let Some(child) = obj.get_mut(&key) {
                            prune(child_schema, child, &child_path, false, strict, unknown);
                        }
                    }
                    None if preserve => {}
                    None if strict => unknown.push(FieldError::new(
                        child_path,
                        FieldErrorKind::Forbidden,
                        "field not declared in schema",
                    )),
                    None => {
                        obj.remove(&key);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(
                        item_schema,
                        item,
                        &join_index(path, i),
                        false,
                        strict,
                        unknown,
                    );
                }
            }
        }
        _ => {}
    }
}

/// Drops nulls of non-nullable fields, then fills missing fields from
/// `default`, recursing into the result (so nested defaults apply too).
fn apply_defaults(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(props) = props {
                for (key, child_schema) in props {
                    if root && META_KEYS.contains(&key.as_str()) {
                        continue;
                    }
                    default_entry(obj, key, child_schema);
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let keys: Vec<String> = obj
                    .keys()
                    .filter(|k| props.is_none_or(|p| !p.contains_key(*k)))
                    .filter(|k| !(root && META_KEYS.contains(&k.as_str())))
                    .cloned()
                    .collect();
                for key in keys {
                    default_entry(obj, &key, additional);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
                for item in items {
                    apply_defaults(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

fn default_entry(obj: &mut Map<String, Value>, key: &str, child_schema: &Value) {
    if obj.get(key).is_some_and(Value::is_null) && !flag(child_schema, "nullable") {
        obj.remove(key);
    }
    if !obj.contains_key(key)
        && let Some(d) = child_schema.get("default")
    {
        obj.insert(key.to_string(), d.clone());
    }
    if let Some(child) = obj.get_mut(key) {
        apply_defaults(child_schema, child, false);
    }
}

fn validate_number(schema: &Value, value: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let Some(n) = value.as_f64() else { return };
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);

    if let Some(max) = bound("maximum") {
        if flag(schema, "exclusiveMaximum") {
            if n >= max {
                errs.push(invalid(
                    path,
                    value,
                    format!("{path} in body should be less than {}", go_float(max)),
                ));
            }
        } else if n > max {
            errs.push(invalid(
                path,
                value,
                format!(
                    "{path} in body should be less than or equal to {}",
                    go_float(max)
                ),
            ));
        }
    }
    if let Some(min) = bound("minimum") {
        if flag(schema, "exclusiveMinimum") {
            if n <= min {
                errs.push(invalid(
                    path,
                    value,
                    format!("{path} in body should be greater than {}", go_float(min)),
                ));
            }
        } else if n < min {
            errs.push(invalid(
                path,
                value,
                format!(
                    "{path} in body should be greater than or equal to {}",
                    go_float(min)
                ),
            ));
        }
    }
    if let Some(m) = bound("multipleOf").filter(|m| *m > 0.0) {
        let ok = match (
            value.as_i64(),
            schema.get("multipleOf").and_then(Value::as_i64),
        ) {
            (Some(v), Some(mi)) if mi != 0 => v % mi == 0,
            _ => {
                let q = n / m;
                q.is_finite() && (q - q.round()).abs() < 1e-9
            }
        };
        if !ok {
            errs.push(invalid(
                path,
                value,
                format!("{path} in body should be a multiple of {}", go_float(m)),
            ));
        }
    }
    if let Some(format) = schema.get("format").and_then(Value::as_str) {
        let ok = match format {
            "int32" => {
                value.as_i64().is_some_and(|v| i32::try_from(v).is_ok()) || !is_integer(value)
            }
            "int64" => value.as_i64().is_some() || !is_integer(value),
            _ => true,
        };
        if !ok {
            errs.push(FieldError::with_value(
                path,
                FieldErrorKind::TypeInvalid,
                value.clone(),
                format!(
                    "{path} in body must be of type {format}: {}",
                    go_quote(&value.to_string())
                ),
            ));
        }
    }
}

fn invalid(path: &str, value: &Value, message: String) -> FieldError {
    FieldError::with_value(path, FieldErrorKind::Invalid, value.clone(), message)
}

/// go-openapi reports the *type name* of the offending value, quoted.
fn type_error(path: &str, expected: &str, actual: &str) -> FieldError {
    FieldError::with_value(
        path,
        FieldErrorKind::TypeInvalid,
        Value::String(actual.to_string()),
        format!(
            "{path} in body must be of type {expected}: {}",
            go_quote(actual)
        ),
    )
}

fn type_matches(declared: &str, actual: &str) -> bool {
    match declared {
        "number" => actual == "number" || actual == "integer",
        other => other == actual,
    }
}

fn is_integer(v: &Value) -> bool {
    matches!(v, Value::Number(n) if n.is_i64() || n.is_u64())
}

/// OpenAPI type name of a JSON value; `1.0` is a number, not an integer.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(v) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// JSON equality where `1` and `1.0` are equal (as in enum/uniqueItems checks).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool) == Some(true)
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

fn join_index(base: &str, i: usize) -> String {
    format!("{base}[{i}]")
}

/// Finds the schema node for a dotted/indexed path (best effort: keys that
/// contain dots or brackets are not resolvable).
fn schema_at<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    let mut node = schema;
    if path.is_empty() {
        return Some(node);
    }
    for part in path.split('.') {
        let (name, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            node = node
                .get("properties")
                .and_then(|p| p.get(name))
                .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))?;
        }
        for _ in rest.matches('[') {
            node = node.get("items")?;
        }
    }
    Some(node)
}

/// Renders a bad value like apimachinery's `ErrorBody` (Go `%q` for strings,
/// `%v` for numbers; a nil value prints as the string "null").
fn go_value(v: &Value) -> String {
    match v {
        Value::Null => go_quote("null"),
        Value::String(s) => go_quote(s),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.to_string(),
            (_, Some(u)) => u.to_string(),
            _ => n.as_f64().map(go_float).unwrap_or_else(|| n.to_string()),
        },
        other => other.to_string(),
    }
}

fn go_quote(s: &str) -> String {
    // JSON string escaping is close enough to Go's %q for realistic input.
    Value::String(s.to_string()).to_string()
}

/// Go's `%v` for float64 (`strconv.FormatFloat(f, 'g', -1, 64)`), which is how
/// go-openapi prints schema bounds: `100`, `1.5`, `1e+06`.
fn go_float(f: f64) -> String {
    if !f.is_finite() {
        return f.to_string();
    }
    if f == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{f:e}"); // e.g. "1.234567e6", "-5e-7"
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return f.to_string();
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return f.to_string();
    };
    let digits = mantissa.trim_start_matches('-').replace('.', "").len() as i32;
    let mut eprec = 6;
    // Go: `digs.nd >= digs.dp`, where dp = exp + 1.
    if eprec > digits && digits > exp {
        eprec = digits;
    }
    if exp < -4 || exp >= eprec {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        f.to_string()
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
        && matches!(s.get(5..7).and_then(|m| m.parse::<u8>().ok()), Some(1..=12))
        && matches!(
            s.get(8..10).and_then(|d| d.parse::<u8>().ok()),
            Some(1..=31)
        )
}

/// Loose RFC 3339 check: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn is_date_time(s: &str) -> bool {
    let (Some(date), Some(sep), Some(rest)) = (s.get(..10), s.get(10..11), s.get(11..)) else {
        return false;
    };
    if !is_date(date) || !matches!(sep, "T" | "t" | " ") {
        return false;
    }
    let Some(time) = rest.get(..8) else {
        return false;
    };
    let tb = time.as_bytes();
    let time_ok = tb.iter().enumerate().all(|(i, c)| {
        if i == 2 || i == 5 {
            *c == b':'
        } else {
            c.is_ascii_digit()
        }
    }) && time
        .get(..2)
        .and_then(|h| h.parse::<u8>().ok())
        .is_some_and(|h| h < 24)
        && time
            .get(3..5)
            .and_then(|m| m.parse::<u8>().ok())
            .is_some_and(|m| m < 60)
        && time
            .get(6..8)
            .and_then(|x| x.parse::<u8>().ok())
            .is_some_and(|x| x <= 60);
    if !time_ok {
        return false;
    }
    let mut tail = rest.get(8..).unwrap_or("");
    if let Some(frac) = tail.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        tail = frac.get(n..).unwrap_or("");
    }
    match tail {
        "Z" | "z" => true,
        _ => {
            let tb = tail.as_bytes();
            tb.len() == 6
                && matches!(tb[0], b'+' | b'-')
                && tb[3] == b':'
                && [1, 2, 4, 5].iter().all(|i| tb[*i].is_ascii_digit())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A Flagger-like Canary CRD schema fragment.
    fn canary_schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["targetRef", "service"],
                    "properties": {
                        "provider": {"type": "string", "enum": ["istio", "gatewayapi"], "default": "istio"},
                        "targetRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1, "maxLength": 10, "pattern": "^[a-z][a-z0-9-]*$"},
                                "kind": {"type": "string", "default": "Deployment"}
                            }
                        },
                        "service": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
                                "targetPort": {
                                    "x-kubernetes-int-or-string": true,
                                    "anyOf": [{"type": "integer"}, {"type": "string"}]
                                },
                                "gateways": {"type": "array", "items": {"type": "string"}, "maxItems": 2, "uniqueItems": true}
                            }
                        },
                        "analysis": {
                            "type": "object",
                            "properties": {
                                "interval": {"type": "string", "default": "1m"},
                                "stepWeight": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
                                "maxWeight": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
                                "metrics": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["name"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "interval": {"type": "string", "default": "1m"},
                                            "thresholdRange": {
                                                "type": "object",
                                                "minProperties": 1,
                                                "properties": {
                                                    "min": {"type": "number"},
                                                    "max": {"type": "number", "maximum": 100, "exclusiveMaximum": true}
                                                }
                                            },
                                            "templateVariables": {"type": "object", "additionalProperties": {"type": "string"}}
                                        }
                                    }
                                }
                            },
                            "x-kubernetes-validations": [{
                                "rule": "self.maxWeight >= self.stepWeight",
                                "message": "maxWeight must be greater than or equal to stepWeight"
                            }]
                        },
                        "skipAnalysis": {"type": "boolean", "nullable": true},
                        "startedAt": {"type": "string", "format": "date-time"},
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "clusterName": {
                            "type": "string",
                            "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "immutable"}]
                        }
                    }
                },
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }
        })
    }

    fn compiled() -> CompiledSchema {
        CompiledSchema::new(&canary_schema()).expect("schema compiles")
    }

    fn canary() -> Value {
        json!({
            "apiVersion": "flagger.app/v1beta1",
            "kind": "Canary",
            "metadata": {"name": "podinfo", "namespace": "test", "labels": {"a": "b"}},
            "spec": {
                "targetRef": {"name": "podinfo"},
                "service": {"port": 9898, "targetPort": "http"},
                "analysis": {"metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}}]}
            }
        })
    }

    /// Applies `mutate` to a valid canary and returns the rendered errors.
    fn errors_for(mutate: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut obj = canary();
        mutate(&mut obj);
        match compiled().admit(obj, None, false) {
            Ok(v) => panic!("expected errors, admitted {v}"),
            Err(errs) => errs.iter().map(ToString::to_string).collect(),
        }
    }

    fn one_error(mutate: impl FnOnce(&mut Value)) -> String {
        let errs = errors_for(mutate);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs[0].clone()
    }

    #[test]
    fn compiled_schema_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CompiledSchema>();
    }

    #[test]
    fn valid_object_is_admitted_with_defaults() {
        let out = compiled().admit(canary(), None, false).expect("valid");
        assert_eq!(out["apiVersion"], "flagger.app/v1beta1");
        assert_eq!(out["kind"], "Canary");
        assert_eq!(out["metadata"]["labels"]["a"], "b");
        assert_eq!(out["spec"]["provider"], "istio");
        assert_eq!(out["spec"]["targetRef"]["kind"], "Deployment");
        assert_eq!(out["spec"]["analysis"]["stepWeight"], 10);
        assert_eq!(out["spec"]["analysis"]["maxWeight"], 50);
        assert_eq!(out["spec"]["analysis"]["interval"], "1m");
        assert_eq!(out["spec"]["analysis"]["metrics"][0]["interval"], "1m");
        assert_eq!(out["spec"]["service"]["targetPort"], "http");
        // Absent optional objects without defaults are not invented.
        assert!(out["spec"].get("extra").is_none());
    }

    #[test]
    fn defaults_do_not_override_given_values() {
        let mut obj = canary();
        obj["spec"]["provider"] = json!("gatewayapi");
        obj["spec"]["analysis"]["stepWeight"] = json!(5);
        let out = compiled().admit(obj, None, false).expect("valid");
        assert_eq!(out["spec"]["provider"], "gatewayapi");
        assert_eq!(out["spec"]["analysis"]["stepWeight"], 5);
    }

    #[test]
    fn unknown_fields_are_pruned_but_preserved_where_declared() {
        let mut obj = canary();
        obj["spec"]["foo"] = json!("bar");
        obj["spec"]["analysis"]["metrics"][0]["bogus"] = json!(1);
        obj["spec"]["extra"] = json!({"anything": {"deep": [1, 2]}});
        obj["status"] = json!({"phase": "Succeeded", "conditions": []});
        obj["topLevel"] = json!(true);
        let out = compiled().admit(obj, None, false).expect("valid");
        assert!(out["spec"].get("foo").is_none());
        assert!(out["spec"]["analysis"]["metrics"][0].get("bogus").is_none());
        assert!(out.get("topLevel").is_none());
        assert_eq!(out["spec"]["extra"]["anything"]["deep"], json!([1, 2]));
        assert_eq!(out["status"]["phase"], "Succeeded");
        assert_eq!(out["metadata"]["name"], "podinfo");
    }

    #[test]
    fn unknown_fields_are_rejected_in_strict_mode() {
        let mut obj = canary();
        obj["spec"]["foo"] = json!("bar");
        obj["spec"]["analysis"]["metrics"][0]["bogus"] = json!(1);
        obj["spec"]["extra"] = json!({"anything": 1});
        let errs = compiled().admit(obj, None, true).expect_err("strict");
        let mut rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
        rendered.sort();
        assert_eq!(
            rendered,
            vec![
                "spec.analysis.metrics[0].bogus: Forbidden: field not declared in schema",
                "spec.foo: Forbidden: field not declared in schema",
            ]
        );
        assert!(errs.iter().all(|e| e.kind == FieldErrorKind::Forbidden && e.reason() == "FieldValueForbidden"));
        assert_eq!(errs[0].message, "field not declared in schema");
        // A clean object passes strict mode, metadata and all.
        assert!(compiled().admit(canary(), None, true).is_ok());
    }

    #[test]
    fn required_field() {
        let msg = one_error(|o| {
            o["spec"].as_object_mut().map(|s| s.remove("targetRef"));
        });
        assert_eq!(msg, "spec.targetRef: Required value");
        let msg = one_error(|o| o["spec"]["analysis"]["metrics"] = json!([{"interval": "2m"}]));
        assert_eq!(msg, "spec.analysis.metrics[0].name: Required value");
    }

    #[test]
    fn enum_value() {
        let msg = one_error(|o| o["spec"]["provider"] = json!("nginx"));
        assert_eq!(
            msg,
            r#"spec.provider: Unsupported value: "nginx": supported values: "istio", "gatewayapi""#
        );
    }

    #[test]
    fn type_mismatch() {
        let msg = one_error(|o| o["spec"]["service"]["port"] = json!("80"));
        assert_eq!(
            msg,
            r#"spec.service.port: Invalid value: "string": spec.service.port in body must be of type integer: "string""#
        );
        // 1.0 is a number, not an integer.
        let msg = one_error(|o| o["spec"]["service"]["port"] = json!(80.0));
        assert!(
            msg.ends_with(r#"must be of type integer: "number""#),
            "{msg}"
        );
        let msg = one_error(|o| o["spec"]["analysis"]["metrics"] = json!({"name": "x"}));
        assert_eq!(
            msg,
            r#"spec.analysis.metrics: Invalid value: "object": spec.analysis.metrics in body must be of type array: "object""#
        );
    }

    #[test]
    fn type_error_reason_is_type_invalid() {
        let mut obj = canary();
        obj["spec"]["service"]["port"] = json!(true);
        let errs = compiled().admit(obj, None, false).expect_err("invalid");
        assert_eq!(errs[0].kind, FieldErrorKind::TypeInvalid);
        assert_eq!(errs[0].reason(), "FieldValueTypeInvalid");
        assert_eq!(errs[0].field, "spec.service.port");
    }

    #[test]
    fn int_or_string() {
        let mut obj = canary();
        obj["spec"]["service"]["targetPort"] = json!(8080);
        assert!(compiled().admit(obj, None, false).is_ok());
        let msg = one_error(|o| o["spec"]["service"]["targetPort"] = json!(true));
        assert_eq!(
            msg,
            r#"spec.service.targetPort: Invalid value: "boolean": spec.service.targetPort in body must be of type integer,string: "boolean""#
        );
    }

    #[test]
    fn numeric_bounds() {
        let msg = one_error(|o| o["spec"]["analysis"]["stepWeight"] = json!(200));
        assert_eq!(
            msg,
            "spec.analysis.stepWeight: Invalid value: 200: spec.analysis.stepWeight in body should be less than or equal to 100"
        );
        let msg = one_error(|o| o["spec"]["service"]["port"] = json!(0));
        assert_eq!(
            msg,
            "spec.service.port: Invalid value: 0: spec.service.port in body should be greater than or equal to 1"
        );
        let msg = one_error(|o| {
            o["spec"]["analysis"]["metrics"][0]["thresholdRange"]["max"] = json!(100)
        });
        assert_eq!(
            msg,
            "spec.analysis.metrics[0].thresholdRange.max: Invalid value: 100: \
             spec.analysis.metrics[0].thresholdRange.max in body should be less than 100"
        );
        let mut obj = canary();
        obj["spec"]["analysis"]["metrics"][0]["thresholdRange"]["max"] = json!(99.5);
        assert!(compiled().admit(obj, None, false).is_ok());
    }

    #[test]
    fn string_constraints() {
        let msg = one_error(|o| o["spec"]["targetRef"]["name"] = json!("Bad_Name"));
        assert_eq!(
            msg,
            r#"spec.targetRef.name: Invalid value: "Bad_Name": spec.targetRef.name in body should match '^[a-z][a-z0-9-]*$'"#
        );
        let errs = errors_for(|o| o["spec"]["targetRef"]["name"] = json!(""));
        assert!(
            errs.contains(&r#"spec.targetRef.name: Invalid value: "": spec.targetRef.name in body should be at least 1 chars long"#.to_string()),
            "{errs:#?}"
        );
        let msg = one_error(|o| o["spec"]["targetRef"]["name"] = json!("abcdefghijk"));
        assert_eq!(
            msg,
            "spec.targetRef.name: Too long: may not be more than 10 bytes"
        );
        // maxLength counts characters, not bytes.
        let schema = CompiledSchema::new(
            &json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": 2}}}),
        )
        .expect("compiles");
        assert!(schema.admit(json!({"s": "éé"}), None, false).is_ok());
    }

    #[test]
    fn array_constraints() {
        let msg = one_error(|o| o["spec"]["service"]["gateways"] = json!(["a", "b", "c"]));
        assert_eq!(
            msg,
            "spec.service.gateways: Too many: 3: must have at most 2 items"
        );
        let msg = one_error(|o| o["spec"]["service"]["gateways"] = json!(["a", "a"]));
        assert_eq!(
            msg,
            r#"spec.service.gateways: Invalid value: ["a","a"]: spec.service.gateways in body shouldn't contain duplicates"#
        );
        let msg = one_error(|o| o["spec"]["service"]["gateways"] = json!(["a", 1]));
        assert!(
            msg.starts_with(r#"spec.service.gateways[1]: Invalid value: "integer""#),
            "{msg}"
        );
    }

    #[test]
    fn object_constraints_and_additional_properties() {
        let msg = one_error(|o| o["spec"]["analysis"]["metrics"][0]["thresholdRange"] = json!({}));
        assert_eq!(
            msg,
            r#"spec.analysis.metrics[0].thresholdRange: Invalid value: {}: spec.analysis.metrics[0].thresholdRange in body should have at least 1 properties"#
        );
        let msg = one_error(|o| {
            o["spec"]["analysis"]["metrics"][0]["templateVariables"] = json!({"ns": "x", "n": 1})
        });
        assert_eq!(
            msg,
            r#"spec.analysis.metrics[0].templateVariables.n: Invalid value: "integer": spec.analysis.metrics[0].templateVariables.n in body must be of type string: "integer""#
        );
    }

    #[test]
    fn date_time_format() {
        let mut obj = canary();
        obj["spec"]["startedAt"] = json!("2024-05-01T10:00:00.123Z");
        assert!(compiled().admit(obj, None, false).is_ok());
        let mut obj = canary();
        obj["spec"]["startedAt"] = json!("2024-05-01T10:00:00+02:00");
        assert!(compiled().admit(obj, None, false).is_ok());
        let msg = one_error(|o| o["spec"]["startedAt"] = json!("yesterday"));
        assert_eq!(
            msg,
            r#"spec.startedAt: Invalid value: "yesterday": spec.startedAt in body must be of type date-time: "yesterday""#
        );
    }

    #[test]
    fn nulls() {
        // Nullable: kept.
        let mut obj = canary();
        obj["spec"]["skipAnalysis"] = Value::Null;
        let out = compiled().admit(obj, None, false).expect("nullable");
        assert!(out["spec"]["skipAnalysis"].is_null());
        // Non-nullable with a default: replaced by the default.
        let mut obj = canary();
        obj["spec"]["provider"] = Value::Null;
        let out = compiled().admit(obj, None, false).expect("defaulted");
        assert_eq!(out["spec"]["provider"], "istio");
        // Non-nullable optional: dropped.
        let mut obj = canary();
        obj["spec"]["startedAt"] = Value::Null;
        let out = compiled().admit(obj, None, false).expect("dropped");
        assert!(out["spec"].get("startedAt").is_none());
        // Non-nullable required: dropped, hence missing.
        assert_eq!(
            one_error(|o| o["spec"]["targetRef"] = Value::Null),
            "spec.targetRef: Required value"
        );
        // Null list item: a type error.
        let msg = one_error(|o| o["spec"]["service"]["gateways"] = json!([null]));
        assert_eq!(
            msg,
            r#"spec.service.gateways[0]: Invalid value: "null": spec.service.gateways[0] in body must be of type string: "null""#
        );
    }

    #[test]
    fn multiple_errors_are_collected() {
        let errs = errors_for(|o| {
            o["spec"]["provider"] = json!("nginx");
            o["spec"]["service"] = json!({"port": "x"});
            o["spec"]["analysis"]["maxWeight"] = json!(0);
            o["spec"]["analysis"]["metrics"] =
                json!([{"name": "a"}, {"thresholdRange": {"max": 500}}]);
        });
        let fields: Vec<&str> = errs
            .iter()
            .map(|e| e.split(':').next().unwrap_or(""))
            .collect();
        for expected in [
            "spec.provider",
            "spec.service.port",
            "spec.analysis.maxWeight",
            "spec.analysis.metrics[1].name",
            "spec.analysis.metrics[1].thresholdRange.max",
        ] {
            assert!(
                fields.contains(&expected),
                "missing {expected} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), 5, "{errs:#?}");
    }

    #[test]
    fn cel_rule_message_surfaces_with_path() {
        let mut obj = canary();
        obj["spec"]["analysis"]["stepWeight"] = json!(60);
        let errs = compiled().admit(obj, None, false).expect_err("cel");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.analysis");
        assert_eq!(errs[0].kind, FieldErrorKind::Invalid);
        assert_eq!(
            errs[0].to_string(),
            r#"spec.analysis: Invalid value: "object": maxWeight must be greater than or equal to stepWeight"#
        );
    }

    #[test]
    fn cel_sees_defaults() {
        // maxWeight defaults to 50, so stepWeight 60 must fail even when maxWeight is absent
        // and stepWeight 40 must pass.
        let mut obj = canary();
        obj["spec"]["analysis"]["stepWeight"] = json!(40);
        assert!(compiled().admit(obj, None, false).is_ok());
    }

    #[test]
    fn cel_skipped_when_structure_invalid() {
        let errs = errors_for(|o| {
            o["spec"]["analysis"]["stepWeight"] = json!(200);
            o["spec"]["analysis"]["maxWeight"] = json!(50);
        });
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].contains("less than or equal to 100"));
    }

    #[test]
    fn transition_rule_only_on_update() {
        let schema = compiled();
        let mut created = canary();
        created["spec"]["clusterName"] = json!("east");
        let stored = schema
            .admit(created, None, false)
            .expect("create ignores oldSelf rules");

        let mut changed = stored.clone();
        changed["spec"]["clusterName"] = json!("west");
        let errs = schema
            .admit(changed.clone(), Some(&stored), false)
            .expect_err("immutable");
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            r#"spec.clusterName: Invalid value: "string": immutable"#
        );

        // Unchanged value passes; so does setting it when the old object lacked it.
        assert!(schema.admit(stored.clone(), Some(&stored), false).is_ok());
        assert!(schema.admit(changed, Some(&canary()), false).is_ok());
    }

    #[test]
    fn cel_reason_and_field_path() {
        let schema = CompiledSchema::new(&json!({
            "type": "object",
            "properties": {"spec": {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                "x-kubernetes-validations": [{
                    "rule": "!(has(self.a) && has(self.b))",
                    "message": "a and b are mutually exclusive",
                    "fieldPath": ".b",
                    "reason": "FieldValueForbidden"
                }]
            }},
            "x-kubernetes-validations": [{"rule": "has(self.spec)"}]
        }))
        .expect("compiles");
        let errs = schema
            .admit(json!({"spec": {"a": "x", "b": "y"}}), None, false)
            .expect_err("cel");
        assert_eq!(errs[0].field, "spec.b");
        assert_eq!(errs[0].kind, FieldErrorKind::Forbidden);
        assert_eq!(
            errs[0].to_string(),
            "spec.b: Forbidden: a and b are mutually exclusive"
        );
        let errs = schema
            .admit(json!({"apiVersion": "v1", "kind": "X"}), None, false)
            .expect_err("root rule");
        assert_eq!(
            errs[0].to_string(),
            r#"<nil>: Invalid value: "object": failed rule: has(self.spec)"#
        );
    }

    #[test]
    fn bad_cel_rule_fails_compilation() {
        let mut schema = canary_schema();
        schema["properties"]["spec"]["x-kubernetes-validations"] = json!([{"rule": "self.(("}]);
        let err = CompiledSchema::new(&schema).expect_err("bad rule");
        assert!(err.contains("self.(("), "{err}");
        assert!(CompiledSchema::new(&json!("nope")).is_err());
    }

    #[test]
    fn combinators() {
        let schema = CompiledSchema::new(&json!({
            "type": "object",
            "properties": {
                "any": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                        "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
                "one": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                        "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
                "not": {"type": "string", "not": {"enum": ["forbidden"]}},
                "all": {"type": "integer", "allOf": [{"minimum": 1}, {"maximum": 5}]}
            }
        }))
        .expect("compiles");
        assert!(
            schema
                .admit(
                    json!({"any": {"a": "x"}, "one": {"b": "y"}, "not": "ok", "all": 3}),
                    None,
                    false
                )
                .is_ok()
        );

        let errs = schema
            .admit(json!({"any": {}}), None, false)
            .expect_err("anyOf");
        let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            vec![
                r#"any: Invalid value: "": any must validate at least one schema (anyOf)"#,
                "any.a: Required value",
            ]
        );
        let errs = schema
            .admit(json!({"one": {"a": "x", "b": "y"}}), None, false)
            .expect_err("oneOf");
        assert!(
            errs[0].message.contains("Found 2 valid alternatives"),
            "{errs:#?}"
        );
        let errs = schema
            .admit(json!({"not": "forbidden"}), None, false)
            .expect_err("not");
        assert_eq!(errs[0].message, "not must not validate the schema (not)");
        let errs = schema
            .admit(json!({"all": 9}), None, false)
            .expect_err("allOf");
        assert_eq!(
            errs[0].to_string(),
            "all: Invalid value: 9: all in body should be less than or equal to 5"
        );
    }

    #[test]
    fn integer_formats_and_multiple_of() {
        let schema = CompiledSchema::new(&json!({
            "type": "object",
            "properties": {
                "i32": {"type": "integer", "format": "int32"},
                "step": {"type": "number", "multipleOf": 0.5},
                "even": {"type": "integer", "multipleOf": 2}
            }
        }))
        .expect("compiles");
        assert!(
            schema
                .admit(
                    json!({"i32": 2147483647, "step": 1.5, "even": 4}),
                    None,
                    false
                )
                .is_ok()
        );
        let errs = schema
            .admit(
                json!({"i32": 2147483648_i64, "step": 1.2, "even": 3}),
                None,
                false,
            )
            .expect_err("bad");
        let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(rendered.contains(&r#"i32: Invalid value: 2147483648: i32 in body must be of type int32: "2147483648""#.to_string()), "{rendered:#?}");
        assert!(
            rendered.contains(
                &"step: Invalid value: 1.2: step in body should be a multiple of 0.5".to_string()
            ),
            "{rendered:#?}"
        );
        assert!(
            rendered.contains(
                &"even: Invalid value: 3: even in body should be a multiple of 2".to_string()
            ),
            "{rendered:#?}"
        );
    }

    #[test]
    fn embedded_resource_keeps_type_meta() {
        let schema = CompiledSchema::new(&json!({
            "type": "object",
            "properties": {"template": {
                "type": "object",
                "x-kubernetes-embedded-resource": true,
                "properties": {"spec": {"type": "object", "properties": {"x": {"type": "string"}}}}
            }}
        }))
        .expect("compiles");
        let out = schema
            .admit(
                json!({"template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": "y", "z": 1}, "junk": 1}}),
                None,
                false,
            )
            .expect("valid");
        assert_eq!(
            out["template"],
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": "y"}})
        );
    }

    #[test]
    fn root_type_meta_is_never_pruned_or_required() {
        let schema = CompiledSchema::new(&json!({
            "type": "object",
            "required": ["metadata", "spec"],
            "properties": {"spec": {"type": "object"}}
        }))
        .expect("compiles");
        let out = schema
            .admit(
                json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"anything": 1}, "spec": {}}),
                None,
                true,
            )
            .expect("valid");
        assert_eq!(out["metadata"]["anything"], 1);
        let errs = schema
            .admit(json!({"kind": "K"}), None, false)
            .expect_err("spec missing");
        assert_eq!(
            errs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["spec: Required value"]
        );
        assert!(schema.admit(json!([1]), None, false).is_err());
    }

    #[test]
    fn reasons() {
        let cases = [
            (FieldErrorKind::Required, "FieldValueRequired"),
            (FieldErrorKind::Invalid, "FieldValueInvalid"),
            (FieldErrorKind::NotSupported, "FieldValueNotSupported"),
            (FieldErrorKind::TooLong, "FieldValueTooLong"),
            (FieldErrorKind::TooMany, "FieldValueTooMany"),
            (FieldErrorKind::TypeInvalid, "FieldValueTypeInvalid"),
            (FieldErrorKind::Forbidden, "FieldValueForbidden"),
        ];
        for (kind, reason) in cases {
            assert_eq!(FieldError::new("f", kind, "").reason(), reason);
        }
    }

    #[test]
    fn go_float_formatting() {
        assert_eq!(go_float(100.0), "100");
        assert_eq!(go_float(1.5), "1.5");
        assert_eq!(go_float(-3.0), "-3");
        assert_eq!(go_float(100000.0), "100000");
        assert_eq!(go_float(1e6), "1e+06");
        assert_eq!(go_float(1234567.0), "1.234567e+06");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_float(0.00001), "1e-05");
    }

    #[test]
    fn root_cel_rules_see_type_meta() {
        let schema = CompiledSchema::new(&json!({
            "type": "object",
            "properties": {"spec": {"type": "object"}},
            "x-kubernetes-validations": [{"rule": "self.metadata.name.size() < 5", "message": "name too long"}]
        }))
        .expect("compiles");
        let ok =
            json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "abc"}, "spec": {}});
        assert!(schema.admit(ok, None, false).is_ok());
        let bad =
            json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "abcdef"}, "spec": {}});
        let errs = schema.admit(bad, None, false).expect_err("long name");
        assert_eq!(
            errs[0].to_string(),
            r#"<nil>: Invalid value: "object": name too long"#
        );
    }
}
