//! Starting, watching and stopping the control plane.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};

use crate::kubeconfig::{self, Credentials};
use crate::pki::Authority;
use crate::process::{self, Process, ProcessRecord};
use crate::{Error, Tools};

/// Annotation that kwok's Sluice stages read: a Go duration (`5s`) after which the Pod becomes Ready, or
/// `never`. Pods without it become Ready at once.
pub const READY_AFTER_ANNOTATION: &str = "sluice.dev/test-ready-after";

/// Annotation that marks the fake Nodes kwok manages.
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Pod IPs (kwok allocates them). Not loopback: EndpointSlice validation refuses 127.0.0.0/8 ("may not be
/// in the loopback range"). Nothing listens on these addresses, so tests must never dial a Pod IP or a
/// Service ClusterIP (nor make the API server do so through a proxy subresource or a Service-referenced
/// webhook): such traffic would leave the machine.
const POD_CIDR: &str = "10.244.0.0/16";
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub tools: Tools,
    /// Directory for etcd data, PKI, kubeconfigs and logs. `None`: a temporary directory removed on stop.
    /// Whatever a previous cluster left there is removed first.
    pub state_dir: Option<PathBuf>,
    /// Where to write the admin kubeconfig. `None`: `<state_dir>/admin.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// Number of fake Nodes kwok manages (`kwok-node-0`, …).
    pub nodes: usize,
    /// How long to wait for the API server, the Nodes and the controllers.
    pub ready_timeout: Duration,
    /// If set, the [`ClusterState`] is saved there after each process starts, so that a start that is
    /// interrupted (Ctrl-C) can still be cleaned up with [`ClusterState::stop`].
    pub state_file: Option<PathBuf>,
    /// Stop every component when the thread that started the cluster ends (Linux `PR_SET_PDEATHSIG`), so a
    /// test process that is killed leaves nothing behind. Off for `cargo xtask cluster up`, which detaches.
    pub stop_with_parent: bool,
    /// Users whose requests the API server records in its audit log (`<state_dir>/audit.log`, JSON lines at
    /// level Metadata, one line per completed request): the scale benchmark counts requests by verb from it.
    /// Empty: no audit log.
    pub audit_users: Vec<String>,
    /// Client QPS (and burst) of kube-controller-manager and kube-scheduler, with 50 concurrent Deployment and
    /// ReplicaSet syncs: their defaults (20 and 50 QPS, 5 syncs) make the cluster's own controllers the
    /// bottleneck when thousands of Deployments change at once. `None`: the defaults.
    pub controller_qps: Option<u32>,
}

impl ClusterOptions {
    pub fn new(tools: Tools) -> Self {
        ClusterOptions {
            tools,
            state_dir: None,
            kubeconfig: None,
            nodes: 1,
            ready_timeout: Duration::from_secs(120),
            state_file: None,
            stop_with_parent: true,
            audit_users: Vec::new(),
            controller_qps: None,
        }
    }
}

/// Loopback ports of the components.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
    pub kwok: u16,
}

impl Ports {
    /// Free ports, all different: every listener is held until all are chosen.
    fn free() -> Result<Self, Error> {
        let listeners = (0..6)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Start(format!("no free loopback port: {e}")))?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Start(format!("no free loopback port: {e}")))?;
        Ok(Ports {
            etcd_client: ports[0],
            etcd_peer: ports[1],
            apiserver: ports[2],
            controller_manager: ports[3],
            scheduler: ports[4],
            kwok: ports[5],
        })
    }
}

/// Everything needed to use or stop a running cluster, also from another process: `cargo xtask cluster`
/// saves it as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterState {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub ports: Ports,
    pub kubernetes_version: String,
    pub etcd_version: String,
    pub kwok_version: String,
    pub kubectl: PathBuf,
    pub nodes: Vec<String>,
    pub started_unix: u64,
    /// In start order; stopped in reverse.
    pub processes: Vec<ProcessRecord>,
}

impl ClusterState {
    /// Reads a state file; `Ok(None)` if there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, Error> {
        match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::State(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::State(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Each component and whether its process is still running.
    pub fn processes_running(&self) -> Vec<(&ProcessRecord, bool)> {
        self.processes
            .iter()
            .map(|p| (p, process::is_running(p)))
            .collect()
    }

    /// Stops every process of the cluster (SIGTERM to each process group, SIGKILL after `grace`). Works
    /// from any process; pids that now belong to another program are left alone.
    pub fn stop(&self, grace: Duration) {
        for record in self.processes.iter().rev() {
            if process::is_running(record)
                && let Some(pid) = rustix::process::Pid::from_raw(record.pid)
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
            }
        }
        for record in self.processes.iter().rev() {
            process::stop_record(record, grace);
        }
        // The processes were reparented to init when `up` exited; wait (briefly) until it has reaped
        // them, so that nothing, not even a zombie, is left in the process table.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.processes.iter().any(|p| process::pid_exists(p.pid))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client with the admin credentials.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        client_from(&self.kubeconfig).await
    }

    /// Writes a kubeconfig that authenticates as ServiceAccount `namespace/name` with a token from the
    /// TokenRequest API (what `kubectl create token` does), valid for `ttl`.
    pub async fn write_service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
        ttl: Duration,
    ) -> Result<(), Error> {
        let client = self.client().await?;
        let token = request_token(&client, namespace, name, ttl).await?;
        let ca = fs::read_to_string(self.dir.join("pki").join("ca.crt"))
            .map_err(|e| Error::io(&self.dir.join("pki").join("ca.crt"), e))?;
        let text = kubeconfig::render(
            &format!("{namespace}-{name}"),
            &self.server,
            &ca,
            &Credentials::Token(&token),
            Some(namespace),
        );
        kubeconfig::write(path, &text)
    }
}

/// A ServiceAccount token from the TokenRequest API.
pub async fn request_token(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    ttl: Duration,
) -> Result<String, Error> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .map_err(|e| Error::Api(format!("token for ServiceAccount {namespace}/{name}: {e}")))?;
    created.status.map(|s| s.token).ok_or_else(|| {
        Error::Api(format!(
            "TokenRequest for {namespace}/{name} returned no token"
        ))
    })
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client, Error> {
    let text = fs::read_to_string(kubeconfig).map_err(|e| Error::io(kubeconfig, e))?;
    let parsed = Kubeconfig::from_yaml(&text)
        .map_err(|e| Error::Api(format!("{}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Api(format!("{}: {e}", kubeconfig.display())))?;
    kube::Client::try_from(config).map_err(|e| Error::Api(e.to_string()))
}

/// A running control plane. Dropping it stops every process it started (unless [`Cluster::detach`]ed).
pub struct Cluster {
    state: ClusterState,
    processes: Vec<Process>,
    tempdir: Option<tempfile::TempDir>,
    client: kube::Client,
    started: Instant,
    timings: Vec<(String, Duration)>,
    state_file: Option<PathBuf>,
    stop_with_parent: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on free loopback ports,
    /// creates the fake Nodes, and returns when the API server is ready, every Node is Ready and the
    /// controller-manager has created the `default` ServiceAccount.
    pub async fn start(opts: ClusterOptions) -> Result<Self, Error> {
        let (dir, tempdir) = match &opts.state_dir {
            Some(dir) => {
                for sub in ["etcd", "pki", "logs", "kubeconfigs"] {
                    let path = dir.join(sub);
                    if path.exists() {
                        fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                    }
                }
                fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                (dir.canonicalize().map_err(|e| Error::io(dir, e))?, None)
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("sluice-testcluster-")
                    .tempdir()
                    .map_err(|e| Error::io(&std::env::temp_dir(), e))?;
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        let logs = dir.join("logs");
        let configs = dir.join("kubeconfigs");
        for d in [&logs, &configs] {
            fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let tools = &opts.tools;
        let ports = Ports::free()?;
        let server = format!("https://127.0.0.1:{}", ports.apiserver);
        let ca = Authority::create(&dir.join("pki"))?;
        let ca_pem = ca.ca_pem();
        let pki = ca.pki.clone();

        let user_config = |name: &str, user: &str, group: Option<&str>| -> Result<PathBuf, Error> {
            let cert = ca.client(user, group)?;
            let text = kubeconfig::render(
                "sluice-testcluster",
                &server,
                &ca_pem,
                &Credentials::Certificate {
                    cert_pem: &cert.cert_pem,
                    key_pem: &cert.key_pem,
                },
                None,
            );
            let path = configs.join(format!("{name}.kubeconfig"));
            kubeconfig::write(&path, &text)?;
            Ok(path)
        };
        let admin = user_config("admin", "sluice-admin", Some("system:masters"))?;
        // In system:masters, without --use-service-account-credentials: creating a ServiceAccount and a
        // token for each of ~40 controllers added 5-6 s to every start.
        let kcm_config = user_config(
            "controller-manager",
            "system:kube-controller-manager",
            Some("system:masters"),
        )?;
        let scheduler_config = user_config("scheduler", "system:kube-scheduler", None)?;
        let kwok_config = user_config("kwok", "kwok-controller", Some("system:masters"))?;
        let kubeconfig_path = opts
            .kubeconfig
            .clone()
            .unwrap_or_else(|| dir.join("admin.kubeconfig"));
        let admin_text = fs::read_to_string(&admin).map_err(|e| Error::io(&admin, e))?;
        kubeconfig::write(&kubeconfig_path, &admin_text)?;
        let kubeconfig_path = kubeconfig_path
            .canonicalize()
            .map_err(|e| Error::io(&kubeconfig_path, e))?;

        let stages = dir.join("kwok.yaml");
        let stage_text = crate::kwok::config(&tools.kwok_stages)?;
        fs::write(&stages, stage_text).map_err(|e| Error::io(&stages, e))?;

        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut cluster = Cluster {
            state: ClusterState {
                dir: dir.clone(),
                kubeconfig: kubeconfig_path,
                server: server.clone(),
                ports,
                kubernetes_version: tools.versions.kubernetes.clone(),
                etcd_version: tools.versions.etcd.clone(),
                kwok_version: tools.versions.kwok.clone(),
                kubectl: tools.kubectl.clone(),
                nodes: (0..opts.nodes).map(|i| format!("kwok-node-{i}")).collect(),
                started_unix,
                processes: Vec::new(),
            },
            processes: Vec::new(),
            tempdir,
            client: client_from(&admin).await?,
            started: Instant::now(),
            timings: Vec::new(),
            state_file: opts.state_file.clone(),
            stop_with_parent: opts.stop_with_parent,
        };
        let deadline = Instant::now() + opts.ready_timeout;
        let p = |path: &Path| path.display().to_string();

        // etcd
        let etcd_client = format!("http://127.0.0.1:{}", ports.etcd_client);
        let etcd_peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
        cluster.spawn(
            "etcd",
            &tools.etcd,
            vec![
                "--name=node0".into(),
                format!("--data-dir={}", p(&dir.join("etcd"))),
                format!("--listen-client-urls={etcd_client}"),
                format!("--advertise-client-urls={etcd_client}"),
                format!("--listen-peer-urls={etcd_peer}"),
                format!("--initial-advertise-peer-urls={etcd_peer}"),
                format!("--initial-cluster=node0={etcd_peer}"),
                "--unsafe-no-fsync=true".into(),
                "--auto-compaction-mode=periodic".into(),
                "--auto-compaction-retention=5m".into(),
                "--quota-backend-bytes=2147483648".into(),
                "--log-level=warn".into(),
            ],
        )?;
        cluster
            .wait_until("etcd /health", deadline, || async {
                http_get(ports.etcd_client, "/health")
                    .is_some_and(|body| body.contains("\"health\":\"true\""))
            })
            .await?;

        // kube-apiserver
        let sa_key = p(&pki.service_account_key);
        let mut audit = Vec::new();
        if !opts.audit_users.is_empty() {
            let policy = dir.join("audit-policy.yaml");
            let users = serde_json::to_string(&opts.audit_users)
                .map_err(|e| Error::Api(format!("audit users: {e}")))?;
            let text = format!(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\n\
                 rules:\n  - level: Metadata\n    users: {users}\n  - level: None\n"
            );
            std::fs::write(&policy, text).map_err(|e| Error::io(&policy, e))?;
            audit = vec![
                format!("--audit-policy-file={}", p(&policy)),
                format!("--audit-log-path={}", p(&dir.join("audit.log"))),
                "--audit-log-format=json".into(),
                // Written before each response: a reader sees every completed request at once.
                "--audit-log-mode=blocking".into(),
                "--audit-log-maxsize=0".into(),
            ];
        }
        cluster.spawn(
            "kube-apiserver",
            &tools.kube_apiserver,
            audit
                .into_iter()
                .chain([
                    format!("--etcd-servers={etcd_client}"),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", ports.apiserver),
                    // Nothing dials the `kubernetes` Service here; with no endpoint reconciler the loopback
                    // address is accepted and no other host address is ever published.
                    "--advertise-address=127.0.0.1".into(),
                    "--endpoint-reconciler-type=none".into(),
                    format!(
                        "--cert-dir={}",
                        p(&dir.join("pki").join("apiserver-generated"))
                    ),
                    format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
                    format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
                    format!("--client-ca-file={}", p(&pki.ca_cert)),
                    format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
                    format!(
                        "--service-account-key-file={}",
                        p(&pki.service_account_public_key)
                    ),
                    format!("--service-account-signing-key-file={sa_key}"),
                    format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    "--authorization-mode=Node,RBAC".into(),
                    "--allow-privileged=true".into(),
                    "--profiling=false".into(),
                ])
                .collect(),
        )?;
        let client = cluster.client.clone();
        cluster
            .wait_until("kube-apiserver /readyz", deadline, || {
                let client = client.clone();
                async move {
                    let request = http::Request::get("/readyz").body(Vec::new());
                    match request {
                        Ok(request) => client
                            .request_text(request)
                            .await
                            .is_ok_and(|body| body.trim() == "ok"),
                        Err(_) => false,
                    }
                }
            })
            .await?;

        // kube-controller-manager, kube-scheduler, kwok
        cluster.spawn(
            "kube-controller-manager",
            &tools.kube_controller_manager,
            vec![
                format!("--kubeconfig={}", p(&kcm_config)),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.controller_manager),
                format!("--cert-dir={}", p(&dir.join("pki").join("kcm-generated"))),
                format!("--root-ca-file={}", p(&pki.ca_cert)),
                format!("--service-account-private-key-file={sa_key}"),
                format!("--cluster-signing-cert-file={}", p(&pki.ca_cert)),
                format!("--cluster-signing-key-file={}", p(&pki.ca_key)),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ]
            .into_iter()
            .chain(opts.controller_qps.into_iter().flat_map(|qps| {
                [
                    format!("--kube-api-qps={qps}"),
                    format!("--kube-api-burst={qps}"),
                    "--concurrent-deployment-syncs=50".into(),
                    "--concurrent-replicaset-syncs=50".into(),
                ]
            }))
            .collect(),
        )?;
        cluster.spawn(
            "kube-scheduler",
            &tools.kube_scheduler,
            vec![
                format!("--kubeconfig={}", p(&scheduler_config)),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.scheduler),
                format!(
                    "--cert-dir={}",
                    p(&dir.join("pki").join("scheduler-generated"))
                ),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ]
            .into_iter()
            .chain(opts.controller_qps.into_iter().flat_map(|qps| {
                [
                    format!("--kube-api-qps={qps}"),
                    format!("--kube-api-burst={qps}"),
                ]
            }))
            .collect(),
        )?;
        cluster.spawn(
            "kwok",
            &tools.kwok,
            vec![
                format!("--kubeconfig={}", p(&kwok_config)),
                format!("--config={}", p(&stages)),
                "--manage-all-nodes=false".into(),
                format!("--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake"),
                format!("--cidr={POD_CIDR}"),
                // Node address and "kubelet" port point at kwok's own server on loopback, so whatever the
                // API server proxies to a node (logs, exec, port-forward) stays on this machine.
                "--node-ip=127.0.0.1".into(),
                format!("--node-port={}", ports.kwok),
                "--node-lease-duration-seconds=40".into(),
                format!("--server-address=127.0.0.1:{}", ports.kwok),
            ],
        )?;

        let nodes: Api<Node> = Api::all(cluster.client.clone());
        for name in &cluster.state.nodes {
            let node = fake_node(name)?;
            nodes
                .create(&PostParams::default(), &node)
                .await
                .map_err(|e| Error::Api(format!("creating Node {name}: {e}")))?;
        }
        let names = cluster.state.nodes.clone();
        cluster
            .wait_until("Ready Nodes (kwok)", deadline, || {
                let nodes = nodes.clone();
                let names = names.clone();
                async move {
                    for name in &names {
                        match nodes.get_opt(name).await {
                            Ok(Some(node)) if node_ready(&node) => {}
                            _ => return false,
                        }
                    }
                    true
                }
            })
            .await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), "default");
        cluster
            .wait_until(
                "the default ServiceAccount (kube-controller-manager)",
                deadline,
                || {
                    let accounts = accounts.clone();
                    async move { matches!(accounts.get_opt("default").await, Ok(Some(_))) }
                },
            )
            .await?;
        let scheduler_port = ports.scheduler;
        cluster
            .wait_until("kube-scheduler to listen", deadline, || async move {
                listening(scheduler_port)
            })
            .await?;
        Ok(cluster)
    }

    fn spawn(&mut self, name: &str, binary: &Path, args: Vec<String>) -> Result<(), Error> {
        let log = self.state.dir.join("logs").join(format!("{name}.log"));
        let process = Process::spawn(name, binary, &args, &log, self.stop_with_parent)?;
        self.state.processes.push(process.record.clone());
        self.processes.push(process);
        match &self.state_file {
            Some(path) => self.state.save(path),
            None => Ok(()),
        }
    }

    /// Polls `check` every 100 ms until it holds; fails early, with the log's tail, if a component exits.
    async fn wait_until<F, Fut>(
        &mut self,
        what: &str,
        deadline: Instant,
        mut check: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        loop {
            if check().await {
                self.timings
                    .push((what.to_string(), self.started.elapsed()));
                return Ok(());
            }
            for process in &mut self.processes {
                if let Some(status) = process.exited() {
                    return Err(Error::Start(format!(
                        "{} exited ({status}) while waiting for {what}; last lines of {}:\n{}",
                        process.record.name,
                        process.record.log.display(),
                        process::log_tail(&process.record.log, 30)
                    )));
                }
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .processes
                    .iter()
                    .map(|p| p.record.log.display().to_string())
                    .collect();
                return Err(Error::Start(format!(
                    "timed out waiting for {what}; logs: {}",
                    logs.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// When each readiness check passed, measured from the start of the first process.
    pub fn timings(&self) -> &[(String, Duration)] {
        &self.timings
    }

    /// The cluster's state (ports, paths, pids).
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// The API server's audit log (written only when [`ClusterOptions::audit_users`] is set).
    pub fn audit_log(&self) -> PathBuf {
        self.state.dir.join("audit.log")
    }

    /// The admin kubeconfig (user `sluice-admin` in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.state.kubeconfig
    }

    /// A client with the admin credentials.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// See [`ClusterState::write_service_account_kubeconfig`].
    pub async fn write_service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
        ttl: Duration,
    ) -> Result<(), Error> {
        self.state
            .write_service_account_kubeconfig(namespace, name, path, ttl)
            .await
    }

    /// Leaves the processes running and returns what is needed to stop them later
    /// ([`ClusterState::stop`]). The state directory is kept even if it was temporary.
    pub fn detach(mut self) -> ClusterState {
        for process in &mut self.processes {
            process.detach();
        }
        self.processes.clear();
        if let Some(tmp) = self.tempdir.take() {
            let _ = tmp.keep();
        }
        self.state.clone()
    }

    /// Stops every process (SIGTERM to each process group, SIGKILL after a grace period) and removes a
    /// temporary state directory.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for process in self.processes.iter().rev() {
            if let Some(pid) = rustix::process::Pid::from_raw(process.record.pid) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
            }
        }
        for process in self.processes.iter_mut().rev() {
            process.stop(Duration::from_secs(10));
        }
        self.processes.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn fake_node(name: &str) -> Result<Node, Error> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": { KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0" },
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/agent": "",
            },
        },
        "status": {
            "allocatable": { "cpu": "64", "memory": "256Gi", "pods": "1000" },
            "capacity": { "cpu": "64", "memory": "256Gi", "pods": "1000" },
        },
    }))
    .map_err(|e| Error::Api(format!("Node {name}: {e}")))
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A plain-HTTP GET on loopback (etcd's client URL); the body, if the status is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(500),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}
