//! Sluice's own artifacts as a user meets them with `kubectl` on a real cluster (the local control plane of
//! `harness::start_cluster`, which installs Sluice with `kubectl apply -k config/base`): the CRDs and their
//! printer columns, short names and categories, the samples, schema and CEL validation, the install
//! kustomization, the `kubectl sluice` plugin, and the harness's fake readiness. How Kubernetes itself
//! behaves (apply, patches, watches, garbage collection, …) is not tested here: the API server is the real one.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use sluice_e2e::harness::{Cluster, eventually, kubectl_sluice, repo_root, start_cluster};

async fn cluster() -> Cluster {
    start_cluster()
        .await
        .expect("control plane with Sluice installed")
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("kubectl printed invalid JSON ({e}): {text}"))
}

/// The non-empty lines of `kubectl ... -o name`.
fn names(output: &str) -> BTreeSet<String> {
    output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_and_samples_apply_and_read_back() {
    let cluster = cluster().await;
    let k = &cluster.kubectl;

    // Every CRD of crds/ is installed, established and its names accepted (no clash with the mesh CRDs).
    let mut crds = 0;
    for entry in std::fs::read_dir(repo_root().join("crds")).expect("crds/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let crd = json_of(&k.ok(&["get", "crd", &name, "-o", "json"]));
        for condition in ["Established", "NamesAccepted"] {
            let status = crd["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == condition)
                .map(|c| c["status"].clone());
            assert_eq!(status, Some("True".into()), "{name} {condition}: {crd}");
        }
        crds += 1;
    }
    assert!(crds >= 3, "only {crds} CRDs in crds/");

    // Every sample applies and can be read back (a sample for a mesh whose CRD is missing would fail here).
    let applied = names(&k.ok(&["apply", "-f", "config/samples/", "-o", "name"]));
    let stored = names(&k.ok(&["get", "-f", "config/samples/", "-o", "name"]));
    assert_eq!(applied, stored);
    for expected in [
        "rollout.sluice.dev/podinfo",
        "authorizationpolicy.sluice.dev/podinfo-authz",
        "deployment.apps/podinfo",
        "service/podinfo",
    ] {
        assert!(applied.contains(expected), "{expected} not in {applied:?}");
    }

    let rollout = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(rollout["spec"]["targetRef"]["name"], "podinfo");
    // Schema defaults are applied by the API server.
    assert_eq!(rollout["spec"]["analysis"]["failureCounting"], "cumulative");
    assert_eq!(rollout["spec"]["progressDeadlineSeconds"], 600);
    assert_eq!(rollout["metadata"]["generation"], 1);

    // `authorizationpolicies` alone is ambiguous next to Istio's security.istio.io AuthorizationPolicy
    // (kubectl picks Istio's); the short name `sap` and the full name are Sluice's.
    for resource in ["sap", "authorizationpolicies.sluice.dev"] {
        let listed = k.ok(&["get", resource, "-o", "jsonpath={.items[*].metadata.name}"]);
        assert_eq!(listed.trim(), "podinfo-authz", "kubectl get {resource}");
    }

    // Short names, categories and printer columns come from the CRDs.
    let table = k.ok(&["get", "ro"]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "WEIGHT", "FAILEDCHECKS", "AGE"] {
        assert!(
            header.contains(column),
            "missing column {column} in {table}"
        );
    }
    let sluice = k.ok(&["get", "sluice", "-o", "name"]);
    for expected in [
        "rollout.sluice.dev/podinfo",
        "authorizationpolicy.sluice.dev/podinfo-authz",
    ] {
        assert!(sluice.contains(expected), "kubectl get sluice: {sluice}");
    }
    assert!(
        k.ok(&["get", "all", "-o", "name"])
            .contains("rollout.sluice.dev/podinfo"),
        "Rollouts are in the `all` category"
    );

    // The columns read the status subresource (written as the operator does, through /status).
    k.ok(&[
        "patch",
        "rollout",
        "podinfo",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Progressing","canaryWeight":20,"failedChecks":1,"revision":"0123abcd"}}"#,
    ]);
    let row = k.ok(&["get", "rollout", "podinfo", "--no-headers"]);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["podinfo", "Progressing", "20", "1"], "{row}");
    let wide = k.ok(&["get", "rollout", "podinfo", "-o", "wide"]);
    assert!(
        wide.contains("REVISION") && wide.contains("0123abcd"),
        "{wide}"
    );

    // Re-applying unchanged samples stores nothing new. (kubectl still says "configured" for the Rollout:
    // the API server defaults fields inside list items and client-side apply replaces lists whole.)
    let before = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    let out = k.ok(&["apply", "-f", "config/samples/"]);
    assert!(out.contains("deployment.apps/podinfo unchanged"), "{out}");
    let after = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(
        before["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );

    // The kubectl plugin reads the same objects. The real Deployment controller has meanwhile recorded
    // events on the Deployment `podinfo`; they are not the Rollout's and must not be shown as such.
    k.ok(&["rollout", "status", "deployment/podinfo", "--timeout=60s"]);
    let scaled = eventually(Duration::from_secs(20), || {
        let out = k.ok(&[
            "get",
            "events.events.k8s.io",
            "--field-selector",
            "regarding.kind=Deployment,regarding.name=podinfo",
            "-o",
            "name",
        ]);
        (!out.trim().is_empty()).then_some(())
    });
    assert!(
        scaled.is_some(),
        "the Deployment controller recorded no event"
    );
    let plugin = |args: &[&str]| {
        let out = kubectl_sluice(&cluster.kubeconfig, args);
        assert!(
            out.success,
            "kubectl sluice {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out.stdout
    };
    let list = plugin(&["list", "-n", "default"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("podinfo") && l.contains("Progressing")),
        "{list}"
    );
    let get = plugin(&["get", "podinfo", "-n", "default"]);
    assert!(get.contains("Phase:      Progressing"), "{get}");
    assert!(get.contains("canary 20%"), "{get}");
    assert!(
        !get.contains("ScalingReplicaSet"),
        "the Deployment's events are shown as the Rollout's:\n{get}"
    );
    let status = plugin(&["policy", "status", "podinfo-authz", "-n", "default"]);
    assert!(status.contains("podinfo-authz"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_rollout_is_rejected_with_the_field_path() {
    let cluster = cluster().await;
    let k = &cluster.kubectl;
    let reject = |name: &str, spec: &str, expected: &[&str]| {
        let manifest = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: Rollout\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
        );
        let out = k.run_with_stdin(&["apply", "-f", "-"], &manifest);
        assert!(!out.success, "{name} was accepted: {}", out.stdout);
        for expected in expected {
            assert!(
                out.stderr.contains(expected),
                "missing {expected:?} in: {}",
                out.stderr
            );
        }
        let stored = k.run(&["get", "rollout", name]);
        assert!(!stored.success, "an invalid Rollout must not be stored");
    };

    // The OpenAPI schema: ranges and enums, each error with its field path.
    reject(
        "broken",
        "  targetRef: {kind: Deployment, name: podinfo}\n  service: {port: 70000}\n  provider: nginx\n  analysis: {interval: 1m, stepWeight: 150}\n",
        &[
            "The Rollout \"broken\" is invalid",
            "spec.service.port: Invalid value: 70000: spec.service.port in body should be less than or equal to 65535",
            "spec.provider: Unsupported value: \"nginx\"",
            "spec.analysis.stepWeight: Invalid value: 150: spec.analysis.stepWeight in body should be less than or equal to 100",
        ],
    );
    // The CEL rules (x-kubernetes-validations), on the field and across fields.
    reject(
        "zero-step",
        "  targetRef: {kind: Deployment, name: podinfo}\n  service: {port: 9898}\n  analysis: {interval: 1m, stepWeight: 0, maxWeight: 50}\n",
        &["spec.analysis.stepWeight: Invalid value: 0: stepWeight must be at least 1"],
    );
    reject(
        "crossed",
        "  targetRef: {kind: Deployment, name: podinfo}\n  service: {port: 9898}\n  analysis: {interval: 1m, stepWeight: 60, maxWeight: 50}\n",
        &[
            "spec.analysis: Invalid value",
            "maxWeight must be greater than or equal to stepWeight",
        ],
    );
    reject(
        "unsorted",
        "  targetRef: {kind: Deployment, name: podinfo}\n  service: {port: 9898}\n  analysis: {interval: 1m, stepWeights: [20, 10], maxWeight: 50}\n",
        &[
            "spec.analysis.stepWeights: Invalid value",
            "stepWeights must be in increasing order",
        ],
    );
    reject(
        "too-fast",
        "  targetRef: {kind: Deployment, name: podinfo}\n  service: {port: 9898}\n  analysis: {interval: 500ms, stepWeight: 10}\n",
        &[
            "spec.analysis.interval: Invalid value",
            "interval must be at least 1s",
        ],
    );

    // A valid change to an existing Rollout that breaks a rule is refused and changes nothing.
    k.ok(&["apply", "-f", "config/samples/rollout-istio-canary.yaml"]);
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
    let rollout = json_of(&k.ok(&["get", "rollout", "podinfo", "-o", "json"]));
    assert_eq!(rollout["spec"]["analysis"]["stepWeight"], 10);
    assert_eq!(rollout["metadata"]["generation"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_install_kustomization_applies() {
    // start_cluster installed Sluice with `kubectl apply -k config/base`; installing again changes nothing.
    let cluster = cluster().await;
    let k = &cluster.kubectl;
    let out = k.ok(&["apply", "-k", "config/base"]);
    for line in out.lines() {
        assert!(
            line.ends_with(" unchanged"),
            "a re-install changed {line:?}:\n{out}"
        );
    }
    for installed in [
        "namespace/sluice-system",
        "customresourcedefinition.apiextensions.k8s.io/rollouts.sluice.dev",
        "customresourcedefinition.apiextensions.k8s.io/authorizationpolicies.sluice.dev",
        "serviceaccount/sluice",
        "clusterrole.rbac.authorization.k8s.io/sluice",
        "clusterrolebinding.rbac.authorization.k8s.io/sluice",
        "deployment.apps/sluice-operator",
    ] {
        assert!(out.contains(installed), "missing {installed:?} in:\n{out}");
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
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "sluice");
    assert_eq!(
        pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
        true
    );
    assert_eq!(
        deployment["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "sluice"
    );
    // The manifest is schedulable and rolls out (kwok stands in for the kubelet; the image is not pulled).
    let out = k.ok(&[
        "rollout",
        "status",
        "deployment/sluice-operator",
        "-n",
        "sluice-system",
        "--timeout=60s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
}

/// The harness's stand-in for kubelets (kwok with Sluice's stages): Pods become Ready at once, later
/// (`sluice.dev/test-ready-after: 5s`) or never (`never`), for Deployments and StatefulSets alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_become_ready_through_the_harness() {
    let cluster = cluster().await;
    let k = &cluster.kubectl;
    let deployment = |name: &str, ready_after: Option<&str>| {
        let annotations = ready_after
            .map(|a| format!("annotations: {{sluice.dev/test-ready-after: \"{a}\"}}, "))
            .unwrap_or_default();
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{{annotations}labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: app, image: \"example:1\"}}]}}\n"
        )
    };
    let ready_replicas = |name: &str| {
        let d = json_of(&k.ok(&["get", "deployment", name, "-o", "json"]));
        d["status"]["readyReplicas"].as_i64().unwrap_or(0)
    };

    for (name, ready_after) in [
        ("now", None),
        ("later", Some("5s")),
        ("never", Some("never")),
    ] {
        let out = k.run_with_stdin(&["apply", "-f", "-"], &deployment(name, ready_after));
        assert!(out.success, "{}", out.stderr);
    }
    let out = k.ok(&["rollout", "status", "deployment/now", "--timeout=60s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    k.ok(&["scale", "deployment/now", "--replicas=3"]);
    k.ok(&["rollout", "status", "deployment/now", "--timeout=60s"]);
    assert_eq!(ready_replicas("now"), 3);

    // `5s`: the Pods run but are not Ready at first, then become Ready.
    let running = eventually(Duration::from_secs(30), || {
        let pods = json_of(&k.ok(&["get", "pods", "-l", "app=later", "-o", "json"]));
        let phases: Vec<String> = pods["items"]
            .as_array()?
            .iter()
            .map(|p| p["status"]["phase"].as_str().unwrap_or("").to_owned())
            .collect();
        (phases.len() == 2 && phases.iter().all(|p| p == "Running")).then_some(())
    });
    assert!(running.is_some(), "the `5s` pods never ran");
    let out = k.ok(&["rollout", "status", "deployment/later", "--timeout=60s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    assert_eq!(ready_replicas("later"), 2);

    // `never`: Running, never Ready; the Deployment never finishes rolling out.
    let out = k.run(&["rollout", "status", "deployment/never", "--timeout=3s"]);
    assert!(
        !out.success,
        "a never-ready Deployment must not report a finished rollout: {}",
        out.stdout
    );
    assert_eq!(ready_replicas("never"), 0);
    let pods = k.ok(&["get", "pods", "-l", "app=never", "--no-headers"]);
    assert!(
        pods.lines().count() == 2
            && pods
                .lines()
                .all(|l| l.contains("0/1") && l.contains("Running")),
        "{pods}"
    );

    let statefulset = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: default}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: "postgres:16"}]}
"#;
    let out = k.run_with_stdin(&["apply", "-f", "-"], statefulset);
    assert!(out.success, "{}", out.stderr);
    let out = k.ok(&["rollout", "status", "statefulset/db", "--timeout=60s"]);
    assert!(
        out.contains("roll out complete") || out.contains("rolling update complete"),
        "{out}"
    );
}
