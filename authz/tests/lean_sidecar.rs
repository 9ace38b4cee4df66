//! The `sluice-authz` sidecar runs beside every workload: its build graph must not pull in a Kubernetes
//! client (or the API types), whatever else the workspace links.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

/// Packages (by name) the `sluice-authz` library and binary link, following normal dependencies only.
fn linked_packages() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    let names: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve nodes")
        .iter()
        .map(|n| (n["id"].as_str().unwrap_or(""), n))
        .collect();
    let root = names
        .iter()
        .find(|(_, name)| **name == "sluice-authz")
        .map(|(id, _)| *id)
        .expect("sluice-authz is a workspace member");
    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if normal {
                stack.push(dep["pkg"].as_str().unwrap_or(""));
            }
        }
    }
    seen.iter().map(|id| names[id].to_string()).collect()
}

#[test]
fn the_sidecar_links_no_kubernetes_client() {
    let linked = linked_packages();
    assert!(
        linked.contains("sluice-rego") && linked.contains("tonic"),
        "the walk found the sidecar's real dependencies: {linked:?}"
    );
    let kubernetes: Vec<&String> = linked
        .iter()
        .filter(|name| {
            name.starts_with("kube") || name.starts_with("k8s-") || name.as_str() == "sluice"
        })
        .collect();
    assert!(
        kubernetes.is_empty(),
        "sluice-authz links Kubernetes crates: {kubernetes:?}"
    );
}
