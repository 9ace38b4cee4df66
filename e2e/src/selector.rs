//! Label and field selectors as `kubectl` and kube-rs send them in `labelSelector` / `fieldSelector`.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::status::ApiError;

#[derive(Clone, Debug, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, ApiError> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_term(term).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: invalid label selector term {term:?}"
                ))
            })?);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn matches(&self, labels: Option<&Value>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside `( … )`.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_term(term: &str) -> Option<Requirement> {
    if let Some(key) = term.strip_prefix('!') {
        return valid_key(key.trim()).map(Requirement::NotExists);
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Some(Requirement::NotEquals(
            valid_key(k.trim())?,
            v.trim().to_owned(),
        ));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Some(Requirement::Equals(
            valid_key(k.trim())?,
            v.trim().to_owned(),
        ));
    }
    for (op, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((k, set)) = term.split_once(op) {
            let set = set.trim().strip_prefix('(')?.strip_suffix(')')?;
            let values = set
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
            let key = valid_key(k.trim())?;
            return Some(if negated {
                Requirement::NotIn(key, values)
            } else {
                Requirement::In(key, values)
            });
        }
    }
    valid_key(term).map(Requirement::Exists)
}

fn valid_key(key: &str) -> Option<String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    ok.then(|| key.to_owned())
}

/// A field selector: `metadata.name=x,metadata.namespace!=y`, any dotted path into the object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector term {term:?}"
                )));
            };
            terms.push((
                path.trim().split('.').map(str::to_owned).collect(),
                equal,
                value.trim().to_owned(),
            ));
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, expected)| {
            let found = path.iter().try_fold(object, |v, segment| v.get(segment));
            let actual = match found {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *expected) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_follow_kubernetes_syntax() {
        let labels = json!({"app": "web", "tier": "front", "env": "prod"});
        let matches = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches(Some(&labels)));
        assert_eq!(matches(""), Ok(true));
        assert_eq!(matches("app=web"), Ok(true));
        assert_eq!(matches("app==web,tier=front"), Ok(true));
        assert_eq!(matches("app=api"), Ok(false));
        assert_eq!(matches("app!=api"), Ok(true));
        assert_eq!(matches("env in (prod, staging)"), Ok(true));
        assert_eq!(matches("env notin (prod)"), Ok(false));
        assert_eq!(matches("tier,!canary"), Ok(true));
        assert_eq!(matches("!tier"), Ok(false));
        assert!(LabelSelector::parse("app=web,(").is_err());
        assert!(LabelSelector::parse("no in tuple").is_err());
    }

    #[test]
    fn missing_labels_only_match_negative_terms() {
        let sel = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches(None));
        assert_eq!(sel("app!=web"), Ok(true));
        assert_eq!(sel("app notin (web)"), Ok(true));
        assert_eq!(sel("app"), Ok(false));
    }

    #[test]
    fn field_selectors_read_dotted_paths() {
        let obj = json!({"metadata": {"name": "a", "namespace": "x"}, "involvedObject": {"kind": "Rollout"}});
        let matches = |s: &str| FieldSelector::parse(s).map(|f| f.matches(&obj));
        assert_eq!(matches("metadata.name=a"), Ok(true));
        assert_eq!(matches("metadata.name=b"), Ok(false));
        assert_eq!(
            matches("metadata.namespace!=y,involvedObject.kind=Rollout"),
            Ok(true)
        );
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
