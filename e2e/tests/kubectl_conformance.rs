//! The machine's real `kubectl` against the sandbox: what a user does with Sluice's CRDs and samples must work
//! exactly as on a cluster.

use std::time::Duration;

use serde_json::Value;
use sluice_e2e::harness::{Kubectl, eventually};
use sluice_e2e::{BackgroundSandbox, SandboxConfig};

struct Env {
    kubectl: Kubectl,
    _sandbox: BackgroundSandbox,
    _dir: tempfile::TempDir,
}

fn env() -> Env {
    let sandbox = BackgroundSandbox::start(SandboxConfig {
        ready_delay: Duration::from_millis(100),
        ..SandboxConfig::default()
    })
    .expect("sandbox starts on a free loopback port");
    let dir = tempfile::tempdir().expect("temporary directory");
    let kubectl = Kubectl::new(dir.path(), &sandbox.kubeconfig()).expect("kubeconfig written");
    Env {
        kubectl,
        _sandbox: sandbox,
        _dir: dir,
    }
}

/// An environment with the CRDs and the samples applied, as the README's quick start does.
fn env_with_samples() -> Env {
    let env = env();
    let out = env.kubectl.ok(&["apply", "-f", "crds/"]);
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/rollouts.sluice.dev created"),
        "{out}"
    );
    let out = env.kubectl.ok(&["apply", "-f", "config/samples/"]);
    assert!(out.contains("rollout.sluice.dev/podinfo created"), "{out}");
    assert!(out.contains("deployment.apps/podinfo created"), "{out}");
    env
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("kubectl printed invalid JSON ({e}): {text}"))
}

#[test]
fn crds_and_samples_apply_and_read_back() {
    let env = env_with_samples();
    let k = &env.kubectl;
    let rollout = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(rollout["spec"]["targetRef"]["name"], "podinfo");
    // Schema defaults are applied by the server, as on a real cluster.
    assert_eq!(rollout["spec"]["analysis"]["failureCounting"], "cumulative");
    assert_eq!(rollout["metadata"]["generation"], 1);
    assert!(
        rollout["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );

    let yaml = k.ok(&["get", "authorizationpolicies", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: AuthorizationPolicy") && yaml.contains("name: podinfo-authz"),
        "{yaml}"
    );

    // Short names, categories and printer columns come from the CRDs.
    let table = k.ok(&["get", "ro"]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "WEIGHT", "FAILEDCHECKS", "AGE"] {
        assert!(
            header.contains(column),
            "missing column {column} in {table}"
        );
    }
    assert!(
        k.ok(&["get", "sluice"])
            .contains("rollout.sluice.dev/podinfo")
    );

    // A re-apply of unchanged files writes nothing. (kubectl still says "configured" for the Rollout: the
    // server defaults fields inside list items and JSON merge patches replace lists whole, as on a cluster.)
    let before = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    let out = k.ok(&["apply", "-f", "config/samples/"]);
    assert!(out.contains("deployment.apps/podinfo unchanged"), "{out}");
    let after = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(
        before["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );
}

#[test]
fn deployments_become_ready_through_the_kubelet_stand_in() {
    let env = env_with_samples();
    let out = env
        .kubectl
        .ok(&["rollout", "status", "deployment/podinfo", "--timeout=20s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    env.kubectl
        .ok(&["scale", "deployment/podinfo", "--replicas=3"]);
    let ready = eventually(Duration::from_secs(10), || {
        let d = json_of(
            &env.kubectl
                .ok(&["get", "deployment", "podinfo", "-o", "json"]),
        );
        (d["status"]["readyReplicas"] == 3).then_some(d)
    });
    assert!(
        ready.is_some(),
        "scaled deployment never reported 3 ready replicas"
    );
}

#[test]
fn a_never_ready_template_stays_unavailable() {
    let env = env_with_samples();
    let k = &env.kubectl;
    k.ok(&[
        "patch", "deployment", "podinfo", "--type=merge", "-p",
        r#"{"spec":{"template":{"metadata":{"annotations":{"sandbox.sluice.dev/never-ready":"true"}}}}}"#,
    ]);
    let settled = eventually(Duration::from_secs(10), || {
        let d = json_of(&k.ok(&["get", "deployment", "podinfo", "-o", "json"]));
        (d["status"]["observedGeneration"] == d["metadata"]["generation"]).then_some(d)
    })
    .expect("status caught up with the new generation");
    assert_eq!(settled["status"]["readyReplicas"], 0);
    let out = k.run(&["rollout", "status", "deployment/podinfo", "--timeout=2s"]);
    assert!(
        !out.success,
        "a never-ready deployment must not report a finished rollout: {}",
        out.stdout
    );
}

#[test]
fn server_side_apply_tracks_field_managers() {
    let env = env_with_samples();
    let k = &env.kubectl;
    let applied = r#"
apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata:
  name: ssa
spec:
  targetRef: {kind: Deployment, name: podinfo}
  service: {port: 9898}
  analysis: {interval: 30s, stepWeight: 20, maxWeight: 60}
"#;
    let out = k.run_with_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=team-a",
            "-f",
            "-",
        ],
        applied,
    );
    assert!(out.success, "{}", out.stderr);
    let obj = json_of(&k.ok(&[
        "get",
        "rollout",
        "ssa",
        "-o",
        "json",
        "--show-managed-fields",
    ]));
    let managers: Vec<&str> = obj["metadata"]["managedFields"]
        .as_array()
        .map(|m| m.iter().filter_map(|e| e["manager"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        managers.contains(&"team-a"),
        "managedFields: {}",
        obj["metadata"]["managedFields"]
    );

    // Another manager changing a field team-a owns conflicts unless it forces.
    let other = applied.replace("stepWeight: 20", "stepWeight: 30");
    let out = k.run_with_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=team-b",
            "-f",
            "-",
        ],
        &other,
    );
    assert!(!out.success, "expected a conflict, got {}", out.stdout);
    assert!(
        out.stderr.contains("conflict") && out.stderr.contains("stepWeight"),
        "{}",
        out.stderr
    );
    let out = k.run_with_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=team-b",
            "--force-conflicts",
            "-f",
            "-",
        ],
        &other,
    );
    assert!(out.success, "{}", out.stderr);
    let obj = json_of(&k.ok(&["get", "rollout", "ssa", "-o", "json"]));
    assert_eq!(obj["spec"]["analysis"]["stepWeight"], 30);
    assert_eq!(obj["metadata"]["generation"], 2);
}

#[test]
fn merge_and_json_patches() {
    let env = env_with_samples();
    let k = &env.kubectl;
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--type=merge",
        "-p",
        r#"{"spec":{"analysis":{"stepWeight":5}}}"#,
    ]);
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/analysis/threshold","value":2}]"#,
    ]);
    let obj = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(obj["spec"]["analysis"]["stepWeight"], 5);
    assert_eq!(obj["spec"]["analysis"]["threshold"], 2);
    assert_eq!(obj["metadata"]["generation"], 3);
    // A patch that breaks a CEL rule is refused and changes nothing.
    let out = k.run(&[
        "patch",
        "rollout",
        "podinfo",
        "--type=merge",
        "-p",
        r#"{"spec":{"analysis":{"stepWeight":80}}}"#,
    ]);
    assert!(
        !out.success
            && out
                .stderr
                .contains("maxWeight must be greater than or equal to stepWeight"),
        "{}",
        out.stderr
    );
    // Strategic merge on a built-in kind merges containers by name.
    k.ok(&["patch", "deployment", "podinfo", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"podinfo","image":"ghcr.io/stefanprodan/podinfo:6.7.1"}]}}}}"#]);
    let d = json_of(&k.ok(&["get", "deployment", "podinfo", "-o", "json"]));
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0]["image"], "ghcr.io/stefanprodan/podinfo:6.7.1");
    assert!(
        containers[0]["ports"].is_array(),
        "strategic merge dropped the container's other fields"
    );
}

#[test]
fn status_subresource_is_separate_from_spec() {
    let env = env_with_samples();
    let k = &env.kubectl;
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Progressing","canaryWeight":20},"spec":{"suspend":true}}"#,
    ]);
    let obj = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(obj["status"]["phase"], "Progressing");
    assert_eq!(obj["status"]["canaryWeight"], 20);
    assert_eq!(
        obj["spec"]["suspend"], false,
        "a status write must not change spec"
    );
    assert_eq!(
        obj["metadata"]["generation"], 1,
        "a status write must not bump generation"
    );

    // And a write to the main resource cannot change status.
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Failed"},"spec":{"suspend":true}}"#,
    ]);
    let obj = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(obj["status"]["phase"], "Progressing");
    assert_eq!(obj["spec"]["suspend"], true);
    assert_eq!(obj["metadata"]["generation"], 2);
    let columns = k.ok(&["get", "rollout", "podinfo", "--no-headers"]);
    assert!(
        columns.contains("Progressing") && columns.contains("20"),
        "{columns}"
    );
}

#[test]
fn get_watch_sees_an_update() {
    let env = env_with_samples();
    let k = &env.kubectl;
    let mut watch = k
        .spawn_lines(&[
            "get",
            "rollout",
            "podinfo",
            "-w",
            "--output-watch-events",
            "-o",
            "custom-columns=EVENT:.type,NAME:.object.metadata.name,PHASE:.object.status.phase",
        ])
        .expect("kubectl get -w starts");
    watch
        .wait_for("podinfo", Duration::from_secs(15))
        .expect("initial state is listed");
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Promoting"}}"#,
    ]);
    let line = watch.wait_for("Promoting", Duration::from_secs(15));
    assert!(
        line.is_ok(),
        "kubectl get -w did not show the update; saw {line:?}"
    );
    assert!(line.unwrap_or_default().contains("MODIFIED"));
}

#[test]
fn finalizers_hold_deletion_until_removed() {
    let env = env_with_samples();
    let k = &env.kubectl;
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["sluice.dev/cleanup"]}}"#,
    ]);
    k.ok(&["delete", "rollout", "podinfo", "--wait=false"]);
    let obj = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert!(
        obj["metadata"]["deletionTimestamp"].is_string(),
        "deletion must be pending: {obj}"
    );
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let out = k.run(&["get", "rollout", "podinfo"]);
    assert!(
        !out.success && out.stderr.contains("NotFound"),
        "{}",
        out.stderr
    );
}

#[test]
fn deleting_an_owner_collects_its_dependents() {
    let env = env_with_samples();
    let k = &env.kubectl;
    let owner = json_of(&k.ok(&["get", "deployment", "podinfo", "-o", "json"]));
    let uid = owner["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let dependent = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"owned","ownerReferences":[{{"apiVersion":"apps/v1","kind":"Deployment","name":"podinfo","uid":"{uid}"}}]}},"data":{{"k":"v"}}}}"#
    );
    let out = k.run_with_stdin(&["create", "-f", "-"], &dependent);
    assert!(out.success, "{}", out.stderr);
    k.ok(&["create", "configmap", "unowned", "--from-literal=k=v"]);
    k.ok(&["delete", "deployment", "podinfo"]);
    let gone = eventually(Duration::from_secs(10), || {
        let out = k.run(&["get", "configmap", "owned"]);
        (!out.success && out.stderr.contains("NotFound")).then_some(())
    });
    assert!(gone.is_some(), "the owned ConfigMap survived its owner");
    k.ok(&["get", "configmap", "unowned"]);
}

#[test]
fn an_invalid_rollout_is_rejected_with_the_field_path() {
    let env = env_with_samples();
    let invalid = r#"
apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata:
  name: broken
spec:
  targetRef: {kind: Deployment, name: podinfo}
  service: {port: 70000}
  provider: nginx
  analysis: {interval: 1m, stepWeight: 150}
"#;
    let out = env.kubectl.run_with_stdin(&["apply", "-f", "-"], invalid);
    assert!(!out.success);
    for expected in [
        "The Rollout \"broken\" is invalid",
        "spec.service.port",
        "less than or equal to 65535",
        "spec.provider: Unsupported value: \"nginx\"",
        "spec.analysis.stepWeight",
    ] {
        assert!(
            out.stderr.contains(expected),
            "missing {expected:?} in: {}",
            out.stderr
        );
    }
    let out = env.kubectl.run(&["get", "rollout", "broken"]);
    assert!(!out.success, "an invalid Rollout must not be stored");
}

#[test]
fn label_selectors_and_namespaces() {
    let env = env();
    let k = &env.kubectl;
    k.ok(&["create", "namespace", "team"]);
    k.ok(&[
        "create",
        "configmap",
        "a",
        "-n",
        "team",
        "--from-literal=x=1",
    ]);
    k.ok(&[
        "create",
        "configmap",
        "b",
        "-n",
        "team",
        "--from-literal=x=1",
    ]);
    k.ok(&["label", "configmap", "a", "-n", "team", "tier=front"]);
    let names = k.ok(&[
        "get",
        "configmaps",
        "-n",
        "team",
        "-l",
        "tier=front",
        "-o",
        "name",
    ]);
    assert_eq!(names.trim(), "configmap/a");
    let names = k.ok(&[
        "get",
        "configmaps",
        "-n",
        "team",
        "-l",
        "tier!=front",
        "-o",
        "name",
    ]);
    assert_eq!(names.trim(), "configmap/b");
    let all = k.ok(&["get", "configmaps", "-A", "-o", "name"]);
    assert!(all.contains("configmap/a") && all.contains("configmap/b"));
    k.ok(&["delete", "namespace", "team"]);
    let out = k.run(&["get", "namespace", "team"]);
    assert!(!out.success, "namespace should be gone: {}", out.stdout);
    let out = k.run(&["get", "configmap", "a", "-n", "team"]);
    assert!(!out.success, "namespace deletion must delete its content");
}

#[test]
fn the_install_kustomization_applies() {
    let env = env();
    let k = &env.kubectl;
    let out = k.ok(&["apply", "-k", "config/base"]);
    for created in [
        "namespace/sluice-system created",
        "customresourcedefinition.apiextensions.k8s.io/rollouts.sluice.dev created",
        "clusterrole.rbac.authorization.k8s.io/sluice created",
        "deployment.apps/sluice-operator created",
    ] {
        assert!(out.contains(created), "missing {created:?} in:\n{out}");
    }
    let deployment = json_of(&k.ok(&[
        "get",
        "deployment",
        "sluice-operator",
        "-n",
        "sluice-system",
        "-o",
        "json",
    ]));
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        deployment["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "sluice"
    );
}

#[test]
fn statefulsets_roll_out_like_on_a_cluster() {
    let env = env();
    let statefulset = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: "postgres:16"}]}
"#;
    let out = env
        .kubectl
        .run_with_stdin(&["apply", "-f", "-"], statefulset);
    assert!(out.success, "{}", out.stderr);
    let out = env
        .kubectl
        .ok(&["rollout", "status", "statefulset/db", "--timeout=20s"]);
    assert!(
        out.contains("roll out complete") || out.contains("rolling update complete"),
        "{out}"
    );
}
