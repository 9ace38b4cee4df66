//! The kwok configuration: kwok's default Stages (read from the kwok module, as kwokctl assembles them) with
//! Sluice's readiness stages (`kwok-stages.yaml`). The kwok binary itself has no built-in stages: started
//! without any it refuses to run ("no stages found").

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::Error;
use crate::cluster::READY_AFTER_ANNOTATION;

/// Sluice's own stages (delayed and never-ready Pods).
pub const SLUICE_STAGES: &str = include_str!("kwok-stages.yaml");

/// The text for `kwok --config`: the default stages found in `stages_dir`, `pod-ready` restricted to Pods
/// without the [`READY_AFTER_ANNOTATION`], then Sluice's stages.
pub fn config(stages_dir: &Path) -> Result<String, Error> {
    let mut docs = Vec::new();
    for file in [
        "node-initialize.yaml",
        "node-heartbeat-with-lease.yaml",
        "pod-ready.yaml",
        "pod-complete.yaml",
        "pod-delete.yaml",
    ] {
        let path = stages_dir.join(file);
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        if file == "pod-ready.yaml" {
            docs.push(
                restrict_pod_ready(&text)
                    .map_err(|e| Error::Build(format!("{}: {e}", path.display())))?,
            );
        } else {
            docs.push(text);
        }
    }
    docs.push(SLUICE_STAGES.to_string());
    Ok(docs
        .iter()
        .map(|d| d.trim_end())
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n")
}

/// Adds `<annotation> DoesNotExist` to the selector of kwok's `pod-ready` stage; returns it as JSON (valid
/// YAML for kwok).
fn restrict_pod_ready(text: &str) -> Result<String, String> {
    let mut stage: Value = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    let expressions = stage
        .pointer_mut("/spec/selector/matchExpressions")
        .and_then(Value::as_array_mut)
        .ok_or("no spec.selector.matchExpressions")?;
    expressions.push(serde_json::json!({
        "key": format!(".metadata.annotations[\"{READY_AFTER_ANNOTATION}\"]"),
        "operator": "DoesNotExist",
    }));
    serde_json::to_string_pretty(&stage).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sluice_stages_are_valid_yaml_stages() {
        for doc in SLUICE_STAGES.split("\n---\n") {
            let stage: Value = serde_saphyr::from_str(doc).expect("stage parses");
            assert_eq!(stage["kind"], "Stage");
            assert_eq!(stage["spec"]["resourceRef"]["kind"], "Pod");
            let keys: Vec<&str> = stage["spec"]["selector"]["matchExpressions"]
                .as_array()
                .expect("selector")
                .iter()
                .filter_map(|e| e["key"].as_str())
                .collect();
            assert!(keys.iter().any(|k| k.contains(READY_AFTER_ANNOTATION)));
        }
    }

    #[test]
    fn pod_ready_is_restricted_to_unannotated_pods() {
        let text = "apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Stage\nmetadata:\n  name: pod-ready\nspec:\n  \
                    resourceRef:\n    kind: Pod\n  selector:\n    matchExpressions:\n    - key: '.status.phase'\n      \
                    operator: 'In'\n      values: ['Pending']\n  next:\n    statusTemplate: |\n      phase: Running\n";
        let out = restrict_pod_ready(text).expect("patched");
        let stage: Value = serde_json::from_str(&out).expect("json");
        let exprs = stage["spec"]["selector"]["matchExpressions"]
            .as_array()
            .expect("array");
        assert_eq!(exprs.len(), 2);
        assert_eq!(exprs[1]["operator"], "DoesNotExist");
        assert_eq!(stage["spec"]["next"]["statusTemplate"], "phase: Running\n");
    }
}
