//! `crds/*.yaml` are generated from the Rust types; this fails when someone edits one or changes a type
//! without regenerating (`cargo run -p sluice -- crd --out-dir crds`).

use std::path::Path;

#[test]
fn committed_crds_match_the_code() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut expected_files = Vec::new();
    for crd in sluice::api::crds() {
        let name = sluice::api::crd_file_name(&crd);
        let generated = sluice::api::crd_yaml(&crd).expect("CRD renders as YAML");
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| {
            panic!("crds/{name} is missing ({e}); run `cargo run -p sluice -- crd --out-dir crds`")
        });
        assert!(
            committed == generated,
            "crds/{name} differs from the code; run `cargo run -p sluice -- crd --out-dir crds`"
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds a file the code does not generate"
    );
}

#[test]
fn generated_yaml_parses_back_to_the_same_crds() {
    let yaml = sluice::api::all_crds_yaml().expect("renders");
    let parsed: Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        serde_saphyr::from_multiple(&yaml).expect("sluice crd output is valid YAML");
    assert_eq!(parsed, sluice::api::crds());
}
