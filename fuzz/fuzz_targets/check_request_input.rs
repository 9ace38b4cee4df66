//! CheckRequest → OPA-Envoy input: paths, queries and bodies of every content type OPA-Envoy parses.
//! Invariants: no panic; the mapping is deterministic; `parsed_path` is a list of strings and
//! `parsed_query` an object of string lists; a body is either parsed, flagged truncated, or refused.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_authz::input::{InputOptions, PARTIAL_BODY_HEADER, policy_input};

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=b",
    "multipart/form-data; boundary=\"a b\"",
    "application/grpc",
    "text/plain",
];

#[derive(Arbitrary, Debug)]
struct Case {
    path: String,
    content_type: u8,
    custom_content_type: Option<String>,
    content_length: Option<i64>,
    partial: Option<bool>,
    body: Vec<u8>,
    as_raw_body: bool,
    headers: Vec<(String, String)>,
}

fuzz_target!(|case: Case| {
    let mut headers: HashMap<String, String> = case.headers.into_iter().collect();
    let content_type = case.custom_content_type.unwrap_or_else(|| {
        CONTENT_TYPES[usize::from(case.content_type) % CONTENT_TYPES.len()].to_owned()
    });
    headers.insert("content-type".into(), content_type);
    if let Some(cl) = case.content_length {
        headers.insert("content-length".into(), cl.to_string());
    }
    if let Some(partial) = case.partial {
        headers.insert(PARTIAL_BODY_HEADER.into(), partial.to_string());
    }
    let (body, raw_body) = match (case.as_raw_body, String::from_utf8(case.body.clone())) {
        (false, Ok(text)) => (text, Vec::new()),
        _ => (String::new(), case.body),
    };
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: case.path,
                    headers,
                    body,
                    raw_body,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let options = InputOptions::default();
    let first = policy_input(&request, &options);
    let second = policy_input(&request, &options);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "input mapping is not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("input mapping is not deterministic"),
    }
    let Ok(input) = first else { return };
    let doc = &input.document;
    let path = doc["parsed_path"].as_array().expect("parsed_path is a list");
    assert!(path.iter().all(Value::is_string));
    let query = doc["parsed_query"].as_object().expect("parsed_query is an object");
    assert!(query.values().all(|v| v.as_array().is_some_and(|l| l.iter().all(Value::is_string))));
    let truncated = doc["truncated_body"].as_bool().expect("truncated_body is a boolean");
    if truncated {
        assert!(doc["parsed_body"].is_null(), "a truncated body is never parsed");
    }
    // The exact body, when present, replaces parsed_body and nothing else.
    let rego = input.clone().into_rego();
    assert!(rego.as_object().is_ok());
});
