//! Rego gates fail closed on a real API server: every way a gate can fail to be asked — its namespace or
//! ConfigMap unreadable (RBAC refuses the read), the ConfigMap missing, a policy that does not compile or
//! errs when evaluated — denies the promotion, and only a policy that says `true` allows it.

use std::path::Path;
use std::time::Duration;

use kube::Client;
use serde_json::{Value, json};
use sluice::api::Rollout;
use sluice::controller::gate::ask_gates;
use sluice::rollout::Gate;
use sluice_e2e::harness::{Cluster, client_for, repo_root, start_cluster};

const NS: &str = "shop";

fn rollout(config_map: &str, annotations: Value) -> Rollout {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "podinfo", "namespace": NS, "annotations": annotations},
        "spec": {"targetRef": {"kind": "Deployment", "name": "podinfo"}, "service": {"port": 9898},
            "analysis": {"interval": "10s", "stepWeight": 20,
                "policies": [{"name": "change-control", "configMapRef": {"name": config_map},
                              "onDeny": "rollback"}]}},
        "status": {"revision": "abc", "canaryWeight": 20, "currentStep": 0},
    }))
    .expect("a valid Rollout")
}

/// `kubectl apply` of one object (as JSON), as an admin.
fn apply(cluster: &Cluster, object: Value) {
    let out = cluster
        .kubectl
        .run_with_stdin(&["apply", "-f", "-"], &object.to_string());
    assert!(out.success, "kubectl apply {object}: {}", out.stderr);
}

fn config_map(name: &str, rego: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS},
           "data": {"gate.rego": rego}})
}

/// A ServiceAccount in `shop` that may read ConfigMaps there and, if `namespaces`, read Namespaces.
async fn service_account(
    cluster: &Cluster,
    name: &str,
    configmaps: bool,
    namespaces: bool,
) -> Client {
    let rbac = "rbac.authorization.k8s.io/v1";
    let subjects = json!([{"kind": "ServiceAccount", "name": name, "namespace": NS}]);
    apply(
        cluster,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}}),
    );
    if configmaps {
        apply(
            cluster,
            json!({"apiVersion": rbac, "kind": "Role", "metadata": {"name": name, "namespace": NS},
                   "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]}),
        );
        apply(
            cluster,
            json!({"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": name, "namespace": NS},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": subjects}),
        );
    }
    if namespaces {
        apply(
            cluster,
            json!({"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": name},
                   "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]}),
        );
        apply(
            cluster,
            json!({"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": name},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                   "subjects": subjects}),
        );
    }
    let path = cluster.dir.path().join(format!("{name}.kubeconfig"));
    cluster
        .control_plane
        .write_service_account_kubeconfig(NS, name, &path, Duration::from_secs(3600))
        .await
        .expect("a token for the ServiceAccount");
    client_for(&path).await.expect("client")
}

fn shipped_gate() -> String {
    std::fs::read_to_string(Path::new(&repo_root()).join("policies/rollout-gate/gate.rego"))
        .expect("the shipped gate policy")
}

#[track_caller]
fn assert_denied(gate: &Gate, wanted: &str, rollback: bool) {
    match gate {
        Gate::Denied {
            reasons,
            rollback: r,
            ..
        } => {
            assert!(
                reasons.iter().any(|reason| reason.contains(wanted)),
                "the reasons say {wanted:?}: {reasons:?}"
            );
            assert_eq!(*r, rollback, "rollback for {reasons:?}");
        }
        Gate::Allowed(by) => panic!("allowed by {by:?}; expected a denial saying {wanted:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_fail_closed_on_every_error_path() {
    let cluster = start_cluster()
        .await
        .expect("control plane with Sluice installed");
    apply(
        &cluster,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NS, "labels": {"environment": "production"}}}),
    );
    let configmaps = [
        config_map("gate", &shipped_gate()),
        config_map("broken", "package sluice.rollout.gate\n\nallow if {\n"),
        // Two values for one complete rule: an evaluation error, not a `false`.
        config_map(
            "erring",
            "package sluice.rollout.gate\n\nallow := true if input.rollout.name\n\nallow := false if input.rollout.name\n",
        ),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "no-rego", "namespace": NS},
               "data": {"README": "no policy here"}}),
    ];
    for cm in configmaps {
        apply(&cluster, cm);
    }
    let everything = service_account(&cluster, "gate-reader", true, true).await;
    let no_namespaces = service_account(&cluster, "no-namespaces", true, false).await;
    let no_configmaps = service_account(&cluster, "no-configmaps", false, true).await;
    let unapproved = rollout("gate", json!({}));
    let approved = rollout(
        "gate",
        json!({"sluice.dev/approved-by": "alice", "sluice.dev/approved-revision": "abc"}),
    );

    // The shipped gate in a production namespace: no approval, no promotion (a policy decision, so
    // `onDeny: rollback` applies).
    let gate = ask_gates(&everything, &unapproved, &[]).await;
    assert_denied(&gate, "sluice.dev/approved-by", true);

    // The namespace's labels cannot be read: the gate must not see "no labels" (not production) and allow.
    let gate = ask_gates(&no_namespaces, &unapproved, &[]).await;
    assert_denied(&gate, "cannot read the labels of namespace \"shop\"", false);
    let gate = ask_gates(&no_namespaces, &approved, &[]).await;
    assert_denied(&gate, "cannot read the labels", false);

    // The ConfigMap cannot be read, is missing, or holds no policy.
    let gate = ask_gates(&no_configmaps, &approved, &[]).await;
    assert_denied(&gate, "cannot read ConfigMap \"gate\"", false);
    let gate = ask_gates(&everything, &rollout("nope", json!({})), &[]).await;
    assert_denied(&gate, "ConfigMap \"nope\" not found", true);
    let gate = ask_gates(&everything, &rollout("no-rego", json!({})), &[]).await;
    assert_denied(&gate, "has no *.rego key", true);

    // The policy does not compile, or errs when evaluated.
    let gate = ask_gates(&everything, &rollout("broken", json!({})), &[]).await;
    assert_denied(&gate, "the policy cannot be evaluated", true);
    let gate = ask_gates(&everything, &rollout("erring", json!({})), &[]).await;
    assert_denied(&gate, "the policy cannot be evaluated", true);

    // And the same gate allows once approved, when the current time is outside the shipped freeze windows.
    let gate = ask_gates(&everything, &approved, &[]).await;
    let frozen = matches!(&gate, Gate::Denied { reasons, .. } if reasons.iter().any(|r| r.contains("change freeze")));
    if !frozen {
        assert_eq!(gate, Gate::Allowed(vec!["policy change-control".into()]));
    }
}
