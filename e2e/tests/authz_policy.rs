//! End-to-end AuthorizationPolicy flow: the real `sluice operator`, holding only the RBAC of `config/base`,
//! against a real local control plane (see `testcluster/`) compiles and tests the Rego, serves the bundle
//! over OPA's bundle protocol, wakes long-polling clients (and a real `opa run`) on a new revision, keeps the
//! last good revision when a module breaks, wires the policy into Istio (the published security.istio.io
//! CRD), and lets the garbage collector remove what it owns when the policy is deleted.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sluice::api::AuthorizationPolicy;
use sluice_e2e::harness::{Cluster, OperatorProcess, sluice_binary, start_cluster};
use sluice_e2e::opa::{BundleConfig, OpaServer};

const NS: &str = "default";

const POLICY_V1: &str = r#"package envoy.authz

default allow := false

allow if input.attributes.request.http.method == "GET"
"#;

const POLICY_V2: &str = r#"package envoy.authz

default allow := false

allow if input.attributes.request.http.method in {"GET", "HEAD"}
"#;

const TESTS: &str = r#"package envoy.authz

test_get_allowed if allow with input as {"attributes": {"request": {"http": {"method": "GET"}}}}

test_post_denied if not allow with input as {"attributes": {"request": {"http": {"method": "POST"}}}}
"#;

fn policy(module: &str) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "shop-authz", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "shop"}},
            "istio": {"provider": "sluice-authz"},
            "modules": [
                {"name": "authz.rego", "rego": module},
                {"name": "authz_test.rego", "configMapRef": {"name": "shop-rego-tests", "key": "authz_test.rego"}},
            ],
        }
    })
}

struct Env {
    client: Client,
    operator: OperatorProcess,
    http: reqwest::Client,
    cluster: Cluster,
}

async fn start() -> Env {
    let cluster = start_cluster()
        .await
        .expect("control plane with Sluice installed");
    // The operator runs as its ServiceAccount: a verb missing from config/base fails the test.
    let operator = OperatorProcess::start(
        &cluster.operator_kubeconfig,
        "http://127.0.0.1:9",
        &cluster.dir.path().join("operator.log"),
    )
    .expect("operator starts");
    let _ = rustls::crypto::ring::default_provider().install_default();
    Env {
        client: cluster.client.clone(),
        operator,
        http: reqwest::Client::new(),
        cluster,
    }
}

impl Env {
    async fn apply(&self, object: Value) {
        let api: Api<AuthorizationPolicy> = Api::namespaced(self.client.clone(), NS);
        api.patch(
            "shop-authz",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(object),
        )
        .await
        .expect("policy applied");
    }

    async fn policy(&self) -> AuthorizationPolicy {
        Api::<AuthorizationPolicy>::namespaced(self.client.clone(), NS)
            .get("shop-authz")
            .await
            .expect("policy readable")
    }

    /// Waits until the status describes the current generation and `check` holds.
    async fn wait_for(
        &self,
        what: &str,
        check: impl Fn(&AuthorizationPolicy) -> bool,
    ) -> AuthorizationPolicy {
        let started = Instant::now();
        loop {
            let p = self.policy().await;
            let current =
                p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation;
            if current && check(&p) {
                return p;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "policy never became {what}; status: {:#?}\noperator log:\n{}",
                p.status,
                self.operator.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn bundle_url(&self) -> String {
        format!("{}/bundles/{NS}/shop-authz", self.operator.bundle_url)
    }
}

fn condition(policy: &AuthorizationPolicy, type_: &str) -> Option<(String, String, String)> {
    policy
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn is_true(policy: &AuthorizationPolicy, type_: &str) -> bool {
    condition(policy, type_).is_some_and(|(status, _, _)| status == "True")
}

/// Evaluates `data.envoy.authz.allow` on a downloaded bundle with the real `sluice policy eval`.
fn eval_bundle(bundle: &[u8], method: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bundle.tar.gz");
    std::fs::write(&path, bundle).expect("bundle written");
    let input = dir.path().join("input.json");
    let request = json!({"attributes": {"request": {"http": {"method": method}}}});
    std::fs::write(&input, request.to_string()).expect("input written");
    let output = std::process::Command::new(sluice_binary().expect("sluice binary"))
        .args(["policy", "eval", "--bundle"])
        .arg(&path)
        .arg("--input")
        .arg(&input)
        .output()
        .expect("sluice policy eval runs");
    assert!(
        output.status.success(),
        "eval failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_is_compiled_tested_served_long_polled_and_kept_when_broken() {
    let mut env = start().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(env.client.clone(), NS);
    configmaps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "shop-rego-tests", "namespace": NS},
                "data": {"authz_test.rego": TESTS},
            }))
            .expect("configmap"),
        )
        .await
        .expect("test module ConfigMap created");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(env.client.clone(), NS);
    for (name, app) in [("shop", "shop"), ("cart", "cart")] {
        deployments
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {
                        "selector": {"matchLabels": {"app": app}},
                        "template": {
                            "metadata": {"labels": {"app": app}},
                            "spec": {"containers": [{"name": "app", "image": "podinfo"}]},
                        },
                    },
                }))
                .expect("deployment"),
            )
            .await
            .expect("deployment created");
    }

    // 1. A policy that compiles and passes its tests becomes a revision.
    env.apply(policy(POLICY_V1)).await;
    let first = env.wait_for("ready", |p| is_true(p, "Ready")).await;
    let status = first.status.clone().expect("status");
    let revision_1 = status.revision.clone().expect("a revision");
    for type_ in ["Compiled", "TestsPassed", "Distributed", "Ready"] {
        assert!(
            is_true(&first, type_),
            "{type_}: {:?}",
            condition(&first, type_)
        );
    }
    assert_eq!(
        status.matched_workloads, 1,
        "only the shop Deployment is selected"
    );
    assert!(
        condition(&first, "TestsPassed")
            .unwrap()
            .2
            .contains("2 tests passed"),
        "{:?}",
        condition(&first, "TestsPassed")
    );

    // The selected workloads' requests are sent to the ext_authz provider through Istio.
    let istio = Api::<kube::api::DynamicObject>::namespaced_with(
        env.client.clone(),
        NS,
        &kube::api::ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        },
    );
    let wired = istio
        .get("shop-authz-ext-authz")
        .await
        .expect("Istio AuthorizationPolicy");
    assert_eq!(
        wired.data["spec"],
        json!({
            "action": "CUSTOM",
            "provider": {"name": "sluice-authz"},
            "rules": [{}],
            "selector": {"matchLabels": {"app": "shop"}},
        })
    );
    assert!(
        is_true(&first, "MeshConfigured"),
        "{:?}",
        condition(&first, "MeshConfigured")
    );

    // A settled policy is not rewritten: what the API server stores reads back equal to the status the
    // controller computes, so the status write (which triggers a reconcile) does not repeat forever. The
    // Deployment controller keeps updating the selected workloads meanwhile, each update a reconcile.
    // "Ready" can be seen one write before the last (a watch-triggered reconcile in flight), so the policy must
    // settle (2 s without a write) within a few rounds; a write loop never does.
    let mut settled = first.clone();
    for round in 1.. {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = env.policy().await;
        if later.metadata.resource_version == settled.metadata.resource_version {
            break;
        }
        assert!(
            round < 5,
            "the policy keeps being rewritten: {:#?}\nbecame\n{:#?}",
            settled.status,
            later.status
        );
        settled = later;
    }

    // 2. The bundle is served with its revision as ETag, and a real evaluation of it behaves.
    let response = env
        .http
        .get(env.bundle_url())
        .send()
        .await
        .expect("GET bundle");
    assert_eq!(response.status(), 200);
    let etag_1 = response.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag_1, format!("\"{revision_1}\""));
    let bundle_1 = response.bytes().await.expect("bundle body");
    assert_eq!(&bundle_1[..2], &[0x1f, 0x8b], "a gzip tarball");
    assert_eq!(eval_bundle(&bundle_1, "GET"), "true");
    assert_eq!(eval_bundle(&bundle_1, "HEAD"), "false");
    let not_modified = env
        .http
        .get(env.bundle_url())
        .header("if-none-match", &etag_1)
        .send()
        .await
        .expect("conditional GET");
    assert_eq!(not_modified.status(), 304);

    // The same bundle sits in the owned ConfigMap for workloads that mount it.
    let configmap = configmaps
        .get("shop-authz-bundle")
        .await
        .expect("bundle ConfigMap");
    assert_eq!(
        configmap
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("sluice.dev/revision")),
        Some(&revision_1)
    );
    assert_eq!(
        configmap
            .binary_data
            .as_ref()
            .and_then(|d| d.get("bundle.tar.gz"))
            .map(|b| b.0.as_slice()),
        Some(bundle_1.as_ref())
    );
    let owner = &configmap.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("AuthorizationPolicy", Some(true))
    );

    // A real OPA (`opa run`, plain bundles, long polling) loads the served revision and reports it.
    let opa = OpaServer::start(&BundleConfig {
        server: env.operator.bundle_url.clone(),
        resource: format!("bundles/{NS}/shop-authz"),
        long_poll_secs: 30,
        verification: None,
        status_receiver: None,
    })
    .expect("opa starts");
    opa.wait_active(&env.http, &revision_1).await;
    let allowed = |method: &str| json!({"attributes": {"request": {"http": {"method": method}}}});
    assert_eq!(
        opa.decide(&env.http, "envoy/authz/allow", &allowed("HEAD"))
            .await
            .expect("OPA decides"),
        Some(json!(false))
    );

    // 3. A long-polling client learns about a new revision as soon as it is published.
    let poll = tokio::spawn({
        let http = env.http.clone();
        let url = env.bundle_url();
        let etag = etag_1.clone();
        async move {
            let response = http
                .get(url)
                .header("if-none-match", etag)
                .header("prefer", "modes=snapshot,delta;wait=30")
                .send()
                .await
                .expect("long poll");
            let answered = Instant::now();
            let status = response.status();
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            let etag = response.headers()["etag"].to_str().unwrap().to_owned();
            (
                status,
                content_type,
                etag,
                response.bytes().await.expect("body"),
                answered,
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !poll.is_finished(),
        "the long poll waits while nothing changes"
    );
    let applied = Instant::now();
    env.apply(policy(POLICY_V2)).await;
    let (status, content_type, etag_2, bundle_2, answered) = poll.await.expect("poll task");
    let delay = answered.duration_since(applied);
    println!("long-poll client got the new revision {delay:?} after the apply");
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/vnd.openpolicyagent.bundles");
    assert_ne!(etag_2, etag_1);
    assert_eq!(eval_bundle(&bundle_2, "HEAD"), "true");
    // Answered because of the change, not because its 30 s wait ran out (how fast is the line above).
    assert!(
        delay < Duration::from_secs(25),
        "long poll answered after {delay:?}, at the end of its wait rather than on the change"
    );
    let second = env
        .wait_for("ready on the new revision", |p| {
            is_true(p, "Ready")
                && p.status
                    .as_ref()
                    .and_then(|s| s.revision.as_ref())
                    .map(|r| format!("\"{r}\""))
                    == Some(etag_2.clone())
        })
        .await;
    let revision_2 = second.status.unwrap().revision.unwrap();
    let opa_delay = opa.wait_active(&env.http, &revision_2).await;
    println!(
        "the real OPA activated the new revision {opa_delay:?} after the operator reported it"
    );
    assert_eq!(
        opa.decide(&env.http, "envoy/authz/allow", &allowed("HEAD"))
            .await
            .expect("OPA decides"),
        Some(json!(true))
    );

    // 4. A broken module is refused with file:line; the previous revision keeps serving.
    env.apply(policy("package envoy.authz\n\nallow if {\n  input.x ==\n"))
        .await;
    let broken = env
        .wait_for("rejected", |p| {
            condition(p, "Compiled").is_some_and(|c| c.0 == "False")
        })
        .await;
    let (_, reason, message) = condition(&broken, "Compiled").unwrap();
    assert_eq!(reason, "CompileError");
    assert!(
        message.contains("authz.rego:"),
        "error names the file and line: {message}"
    );
    let status = broken.status.clone().unwrap();
    assert_eq!(status.revision.as_deref(), Some(revision_2.as_str()));
    assert_eq!(
        condition(&broken, "Ready").unwrap().1,
        "PreviousRevisionServing"
    );
    let still = env
        .http
        .get(env.bundle_url())
        .send()
        .await
        .expect("GET bundle");
    assert_eq!(still.headers()["etag"].to_str().unwrap(), etag_2);

    // 5. Back to the good spec. Then an edit of a referenced ConfigMap alone, with no change to the spec,
    // triggers a rebuild: its tests now fail, so it is refused, naming the failing test.
    env.apply(policy(POLICY_V2)).await;
    env.wait_for("compiled again", |p| {
        condition(p, "Compiled").is_some_and(|c| c.0 == "True") && is_true(p, "Ready")
    })
    .await;
    configmaps
        .patch(
            "shop-rego-tests",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"authz_test.rego": TESTS.replace("not allow", "allow")}}),
            ),
        )
        .await
        .expect("tests edited");
    let failing = env
        .wait_for("failing tests", |p| {
            condition(p, "TestsPassed").is_some_and(|c| c.0 == "False")
        })
        .await;
    let (_, _, message) = condition(&failing, "TestsPassed").unwrap();
    assert!(message.contains("test_post_denied"), "{message}");
    assert_eq!(
        failing.status.unwrap().revision.as_deref(),
        Some(revision_2.as_str())
    );

    // 6. A restarted operator serves the last good revision from the ConfigMap, though the spec is broken.
    env.operator.kill();
    env.operator = OperatorProcess::start(
        &env.cluster.operator_kubeconfig,
        "http://127.0.0.1:9",
        &env.cluster.dir.path().join("operator-2.log"),
    )
    .expect("operator restarts");
    let started = Instant::now();
    let served = loop {
        if let Ok(response) = env.http.get(env.bundle_url()).send().await
            && response.status() == 200
        {
            break response;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the restarted operator never served a bundle:\n{}",
            env.operator.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(served.headers()["etag"].to_str().unwrap(), etag_2);
    let after_restart = env.policy().await;
    assert_eq!(
        after_restart.status.unwrap().revision.as_deref(),
        Some(revision_2.as_str())
    );

    // 7. Deleting the policy stops serving its bundle.
    Api::<AuthorizationPolicy>::namespaced(env.client.clone(), NS)
        .delete("shop-authz", &Default::default())
        .await
        .expect("deleted");
    let started = Instant::now();
    loop {
        let status = env
            .http
            .get(env.bundle_url())
            .send()
            .await
            .expect("GET")
            .status();
        if status == 404 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "bundle still served after delete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The garbage collector removes what the policy owned: its ownerReferences are valid on a real cluster.
    let started = Instant::now();
    loop {
        let configmap = configmaps.get_opt("shop-authz-bundle").await.expect("get");
        let wired = istio.get_opt("shop-authz-ext-authz").await.expect("get");
        if configmap.is_none() && wired.is_none() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "owned objects survived their policy: ConfigMap {}, Istio policy {}",
            configmap.is_some(),
            wired.is_some()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Nothing the operator did was refused for lack of permission.
    for log in ["operator.log", "operator-2.log"] {
        let text = std::fs::read_to_string(env.cluster.dir.path().join(log)).unwrap_or_default();
        assert!(
            !text.contains("forbidden"),
            "the operator lacks RBAC ({log}):\n{text}"
        );
    }
}
