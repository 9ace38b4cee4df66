//! Helpers for scenario tests: the local control plane with Sluice installed, and the real `kubectl` against it, with its own kubeconfig and
//! discovery cache so tests never touch the user's files or each other.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the repository's files (`crds/`, `config/`) are.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What one kubectl invocation returned.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl KubectlOutput {
    fn from_output(output: Output) -> KubectlOutput {
        KubectlOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// `kubectl` bound to one cluster.
pub struct Kubectl {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    /// Writes `kubeconfig` into `dir` (a per-test temporary directory) and uses `dir/cache` for discovery.
    pub fn new(dir: &Path, kubeconfig: &str) -> std::io::Result<Kubectl> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig)?;
        Ok(Kubectl {
            dir: dir.to_owned(),
            kubeconfig: path,
        })
    }

    /// Uses an existing kubeconfig file, with `dir/cache` for discovery.
    pub fn with_kubeconfig(dir: &Path, kubeconfig: &Path) -> Kubectl {
        Kubectl {
            dir: dir.to_owned(),
            kubeconfig: kubeconfig.to_owned(),
        }
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_binary());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env_remove("KUBECONFIG")
            .current_dir(repo_root());
        cmd
    }

    /// Runs kubectl to completion (bounded by its own `--request-timeout`).
    pub fn run(&self, args: &[&str]) -> KubectlOutput {
        let mut all = vec!["--request-timeout=20s"];
        all.extend_from_slice(args);
        match self.command(&all).output() {
            Ok(output) => KubectlOutput::from_output(output),
            Err(err) => KubectlOutput {
                success: false,
                stdout: String::new(),
                stderr: format!("could not run {}: {err}", kubectl_binary()),
            },
        }
    }

    /// Runs kubectl with `stdin` as its standard input.
    pub fn run_with_stdin(&self, args: &[&str], stdin: &str) -> KubectlOutput {
        use std::io::Write;
        let spawned = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                return KubectlOutput {
                    success: false,
                    stdout: String::new(),
                    stderr: err.to_string(),
                };
            }
        };
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        match child.wait_with_output() {
            Ok(output) => KubectlOutput::from_output(output),
            Err(err) => KubectlOutput {
                success: false,
                stdout: String::new(),
                stderr: err.to_string(),
            },
        }
    }

    /// Runs kubectl and fails the test with its output when it does not succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.success,
            "kubectl {} failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Starts a long-running kubectl (e.g. `get -w`) whose output lines can be awaited.
    pub fn spawn_lines(&self, args: &[&str]) -> std::io::Result<LineStream> {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("kubectl has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(LineStream { child, lines: rx })
    }
}

/// Output lines of a running process; the process is killed on drop.
pub struct LineStream {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl LineStream {
    /// Waits up to `timeout` for a line containing `needle`; returns every line read meanwhile on failure.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        Err(seen)
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kubectl to test with: `$KUBECTL` or the one on `PATH`.
/// `$KUBECTL`, else the kubectl built with the control plane (same release as the API server), else
/// `kubectl` on PATH.
pub fn kubectl_binary() -> String {
    if let Ok(kubectl) = std::env::var("KUBECTL") {
        return kubectl;
    }
    sluice_testcluster::Tools::locate()
        .ok()
        .map(|tools| tools.kubectl)
        .filter(|path| path.is_file())
        .map_or_else(|| "kubectl".to_owned(), |path| path.display().to_string())
}

/// Polls `check` every 50ms until it returns `Some`, for at most `timeout`.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `sluice` binary of this workspace, rebuilt once per test process so a stale binary is never tested
/// (`cargo test -p sluice-e2e` alone does not rebuild other packages' binaries).
pub fn sluice_binary() -> std::io::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // Test executables live in target/<profile>/deps, binaries (the demo) in target/<profile>.
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let parent = exe
                .parent()
                .ok_or_else(|| "cannot locate the target directory".to_owned())?;
            let profile_dir = if parent.ends_with("deps") {
                parent.parent().unwrap_or(parent)
            } else {
                parent
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args([
                "build",
                "--quiet",
                "-p",
                "sluice",
                "-p",
                "sluice-authz",
                "--bins",
            ]);
            // Benchmarks run from target/release and measure release binaries.
            if profile_dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build
                .current_dir(repo_root())
                .status()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !status.success() {
                return Err("cargo build -p sluice failed".to_owned());
            }
            Ok(profile_dir.join("sluice"))
        })
        .clone()
        .map_err(std::io::Error::other)
}

/// A running `sluice operator`; killed (SIGKILL) on drop. Its log goes to `log_path`.
pub struct OperatorProcess {
    child: Child,
    log_path: PathBuf,
    /// Base URL of its bundle server, e.g. `http://127.0.0.1:41234`.
    pub bundle_url: String,
    /// Base URL of its `/metrics`, `/healthz` and `/readyz`.
    pub metrics_url: String,
}

impl OperatorProcess {
    pub fn start(
        kubeconfig: &Path,
        prometheus_url: &str,
        log_path: &Path,
    ) -> std::io::Result<OperatorProcess> {
        Self::start_with(kubeconfig, prometheus_url, log_path, &[])
    }

    /// [`OperatorProcess::start`] with more `sluice operator` flags.
    pub fn start_with(
        kubeconfig: &Path,
        prometheus_url: &str,
        log_path: &Path,
        extra_args: &[&str],
    ) -> std::io::Result<OperatorProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let bundle_port = crate::prometheus::free_port().map_err(std::io::Error::other)?;
        let bundle_addr = format!("127.0.0.1:{bundle_port}");
        let metrics_port = crate::prometheus::free_port().map_err(std::io::Error::other)?;
        let metrics_addr = format!("127.0.0.1:{metrics_port}");
        let child = Command::new(sluice_binary()?)
            .args([
                "operator",
                "--metrics-addr",
                &metrics_addr,
                "--bundle-addr",
                &bundle_addr,
                "--prometheus-url",
                prometheus_url,
            ])
            .args(extra_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(OperatorProcess {
            child,
            log_path: log_path.to_owned(),
            bundle_url: format!("http://{bundle_addr}"),
            metrics_url: format!("http://{metrics_addr}"),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, like a node dying: no cleanup runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real local control plane (see `testcluster/`) with Sluice installed by `kubectl apply -k config/base`
/// and the published mesh CRDs applied, an admin client, and a kubeconfig for the operator's own
/// ServiceAccount, so the operator under test has exactly the RBAC of `config/base`.
pub struct Cluster {
    pub control_plane: sluice_testcluster::Cluster,
    /// Admin (system:masters) client, for the test's own reads and writes.
    pub client: kube::Client,
    pub dir: tempfile::TempDir,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Kubeconfig of `system:serviceaccount:sluice-system:sluice`.
    pub operator_kubeconfig: PathBuf,
    pub kubectl: Kubectl,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The pinned control-plane binaries; an error that says how to build them when they are missing.
pub fn control_plane_tools() -> Result<sluice_testcluster::Tools, BoxError> {
    let tools = sluice_testcluster::Tools::locate()?;
    let missing = tools.missing();
    if !missing.is_empty() {
        return Err(format!(
            "the local control plane is not built ({} missing): run `cargo xtask cluster build` (or `cargo xtask test`)",
            missing[0].display()
        )
        .into());
    }
    Ok(tools)
}

/// Hand-written CRDs for the meshes that publish none Sluice can install here (SMI, Consul).
const UNPUBLISHED_MESH_CRDS: &str = "e2e/fixtures/mesh-crds-unpublished.yaml";

/// Starts a control plane on free loopback ports (its own etcd, API server, controllers and kwok
/// node), installs Sluice and the mesh CRDs, and waits until every CRD is established.
pub async fn start_cluster() -> Result<Cluster, BoxError> {
    start_cluster_with(|_| {}).await
}

/// [`start_cluster`] with options changed by `configure` (more nodes, an audit log).
pub async fn start_cluster_with(
    configure: impl FnOnce(&mut sluice_testcluster::ClusterOptions),
) -> Result<Cluster, BoxError> {
    let tools = control_plane_tools()?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("admin.kubeconfig");
    let mut options = sluice_testcluster::ClusterOptions::new(tools);
    options.state_dir = Some(dir.path().join("cluster"));
    options.kubeconfig = Some(kubeconfig.clone());
    configure(&mut options);
    let control_plane = sluice_testcluster::Cluster::start(options).await?;
    let kubectl = Kubectl::with_kubeconfig(dir.path(), &kubeconfig);
    install(&kubectl)?;
    let operator_kubeconfig = dir.path().join("operator.kubeconfig");
    control_plane
        .write_service_account_kubeconfig(
            "sluice-system",
            "sluice",
            &operator_kubeconfig,
            Duration::from_secs(4 * 3600),
        )
        .await?;
    Ok(Cluster {
        client: control_plane.client(),
        control_plane,
        dir,
        kubeconfig,
        operator_kubeconfig,
        kubectl,
    })
}

/// `kubectl apply -k config/base`, then the mesh CRDs; waits until all are established.
pub fn install(kubectl: &Kubectl) -> Result<(), BoxError> {
    let checked = |what: &str, out: KubectlOutput| -> Result<(), BoxError> {
        if out.success {
            Ok(())
        } else {
            Err(format!("{what} failed:\n{}{}", out.stdout, out.stderr).into())
        }
    };
    checked(
        "kubectl apply -k config/base",
        kubectl.run(&["apply", "-k", "config/base"]),
    )?;
    let mut files: Vec<String> = sluice_testcluster::mesh_crd_files()?
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    files.push(
        repo_root()
            .join(UNPUBLISHED_MESH_CRDS)
            .display()
            .to_string(),
    );
    let mut args = vec!["apply", "--server-side"];
    for file in &files {
        args.extend(["-f", file.as_str()]);
    }
    checked("applying the mesh CRDs", kubectl.run(&args))?;
    checked(
        "waiting for the CRDs",
        kubectl.run(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ]),
    )
}

/// A kube-rs client for a kubeconfig file, e.g. `Cluster::operator_kubeconfig` to act as the operator's
/// ServiceAccount (exactly the RBAC of `config/base`).
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client, BoxError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Runs `kubectl sluice ARGS` through the real kubectl, which finds this workspace's `kubectl-sluice`
/// plugin on PATH; the plugin reads `kubeconfig` from `$KUBECONFIG` (kubectl does not pass its flags on).
pub fn kubectl_sluice(kubeconfig: &Path, args: &[&str]) -> KubectlOutput {
    let bin_dir = match sluice_binary() {
        Ok(binary) => binary.parent().map(Path::to_owned).unwrap_or_default(),
        Err(err) => {
            return KubectlOutput {
                success: false,
                stdout: String::new(),
                stderr: format!("cannot build the sluice binaries: {err}"),
            };
        }
    };
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )));
    let mut cmd = Command::new(kubectl_binary());
    cmd.arg("sluice")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(repo_root());
    if let Ok(path) = path {
        cmd.env("PATH", path);
    }
    match cmd.output() {
        Ok(output) => KubectlOutput::from_output(output),
        Err(err) => KubectlOutput {
            success: false,
            stdout: String::new(),
            stderr: format!("could not run {}: {err}", kubectl_binary()),
        },
    }
}

/// CPU seconds (user + system) so far, resident set now and its peak in MiB, of process `pid`, from
/// `/proc/<pid>/stat` (clock ticks of 1/100 s) and `/proc/<pid>/status`; `NaN` where a field cannot be read.
pub fn process_usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name (which may hold spaces); utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (
        (tick(11) + tick(12)) / 100.0,
        kib("VmRSS:") / 1024.0,
        kib("VmHWM:") / 1024.0,
    )
}
