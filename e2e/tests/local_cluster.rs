//! The local control plane every end-to-end test runs on: Sluice installed by `kubectl apply -k
//! config/base`, the real mesh CRDs established, workloads made Ready by kwok, and the operator's
//! ServiceAccount held to exactly the RBAC of `config/base`.

use sluice_e2e::harness::{Kubectl, start_cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_installs_and_its_service_account_has_only_its_rbac() {
    let cluster = start_cluster()
        .await
        .expect("control plane with Sluice installed");
    let admin = &cluster.kubectl;
    for crd in [
        "rollouts.sluice.dev",
        "authorizationpolicies.sluice.dev",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "authorizationpolicies.security.istio.io",
        "httproutes.gateway.networking.k8s.io",
        "trafficsplits.split.smi-spec.io",
        "servicesplitters.consul.hashicorp.com",
    ] {
        admin.ok(&["get", "crd", crd]);
    }
    let version = admin.ok(&["version", "-o", "json"]);
    let versions = sluice_testcluster::Versions::pinned().unwrap();
    assert!(
        version.contains(&format!("\"gitVersion\": \"{}\"", versions.kubernetes)),
        "{version}"
    );

    // Workloads get real ReplicaSets and Pods, made Ready by kwok.
    admin.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx",
        "--replicas=2",
    ]);
    admin.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);

    // The operator's ServiceAccount: what config/base grants, and nothing more.
    let operator = Kubectl::with_kubeconfig(cluster.dir.path(), &cluster.operator_kubeconfig);
    let can = |args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        operator.run(&all).stdout.trim() == "yes"
    };
    assert!(can(&[
        "patch",
        "rollouts.sluice.dev/status",
        "-n",
        "default"
    ]));
    assert!(can(&["create", "deployments.apps", "-n", "default"]));
    assert!(can(&[
        "patch",
        "virtualservices.networking.istio.io",
        "-n",
        "default"
    ]));
    assert!(!can(&["create", "namespaces"]));
    assert!(!can(&["delete", "nodes"]));
    let refused = operator.run(&["create", "namespace", "not-allowed"]);
    assert!(!refused.success);
    assert!(refused.stderr.contains("forbidden"), "{}", refused.stderr);
}
